"""Maildir name rules, on strings only: keys, size fields, UIDLs, new names."""

from __future__ import annotations

import base64
import hashlib
import os
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailbag.errors import InvalidUsername
from mailbag.storage.maildir_names import (
    NameGenerator,
    arrival_key,
    arrival_order,
    derive_uidl,
    is_valid_uidl,
    sanitize_hostname,
    split_user,
    unique_name,
    wire_size_from_name,
)

DOVECOT_KEY = "1700000000.M123P45.mx,S=123,W=130"


def test_unique_name_strips_info_part() -> None:
    assert unique_name(DOVECOT_KEY + ":2,S") == DOVECOT_KEY
    assert unique_name(DOVECOT_KEY + ":2,") == DOVECOT_KEY
    assert unique_name("1234567890.V801I1234M5678.host") == "1234567890.V801I1234M5678.host"


def test_uidl_is_24_lowercase_base32_chars_of_sha256() -> None:
    uid = derive_uidl(DOVECOT_KEY)
    assert re.fullmatch(r"[a-z2-7]{24}", uid)
    assert uid == derive_uidl(DOVECOT_KEY)
    assert uid != derive_uidl(DOVECOT_KEY + "x")
    assert is_valid_uidl(uid)


def test_uidl_of_undecodable_name_is_valid() -> None:
    key = b"1700000000.M1P2.h\xff\xfe".decode("utf-8", "surrogateescape")
    assert is_valid_uidl(derive_uidl(key))


@pytest.mark.parametrize("bad", ["", "a b", "x" * 71, "tab\t", "é"])
def test_invalid_uidls_are_rejected(bad: str) -> None:
    assert not is_valid_uidl(bad)


def test_wire_size_comes_from_w_field_only() -> None:
    assert wire_size_from_name(DOVECOT_KEY) == 130
    assert wire_size_from_name("1700000000.M1P2.host,S=50") is None
    assert wire_size_from_name("1234567890.V801I1234M5678.host") is None
    assert wire_size_from_name("1700000000.M1P2.host,W=7,S=5") == 7


def test_arrival_key_sorts_by_leading_timestamp_then_name() -> None:
    names = [
        "900000000.b",
        "1000000000.M100P1Q2Rab.h",
        "1000000000.a",
        "no-timestamp",
        "1000000000.M99P1Q10Rab.h",
        "900000000.a",
        "1000000000.M99P1Q9Rab.h",
    ]
    assert sorted(names, key=arrival_key) == [
        "no-timestamp",
        "900000000.a",
        "900000000.b",
        "1000000000.a",
        "1000000000.M99P1Q9Rab.h",
        "1000000000.M99P1Q10Rab.h",
        "1000000000.M100P1Q2Rab.h",
    ]


def test_hostname_sanitized_as_maildir_spec_says() -> None:
    assert sanitize_hostname("a/b:c,d") == "a\\057b\\072c\\054d"
    assert sanitize_hostname("") == "localhost"


def test_generated_names_have_documented_shape_and_are_unique() -> None:
    gen = NameGenerator("mx/1:2")
    names = {gen.make(10, 12) for _ in range(1000)}
    assert len(names) == 1000
    for name in names:
        assert re.fullmatch(
            r"\d+\.M\d{1,6}P\d+Q\d+R[0-9a-f]{16}\.mx\\0571\\0722,S=10,W=12", name
        ), name
        assert ":" not in name and "/" not in name
        assert wire_size_from_name(name) == 12


@pytest.mark.parametrize(
    ("user", "expected"),
    [("bob", ("bob", "")), ("bob@example.com", ("bob", "example.com")), ("a@b@c", ("a@b", "c"))],
)
def test_split_user(user: str, expected: tuple[str, str]) -> None:
    assert split_user(user) == expected


@pytest.mark.parametrize("user", ["", ".", "..", "a/b", "@example.com", "x@..", "del\x7f"])
def test_split_user_refuses_unsafe(user: str) -> None:
    with pytest.raises(InvalidUsername):
        split_user(user)


@pytest.mark.parametrize("key", [DOVECOT_KEY, "1234567890.V801I1234M5678.host", "é", "x" * 300])
def test_uidl_equals_truncated_base32_of_sha256(key: str) -> None:
    digest = hashlib.sha256(os.fsencode(key)).digest()
    assert derive_uidl(key) == base64.b32encode(digest).decode()[:24].lower()


_NAME_PART = st.one_of(
    st.integers(0, 2_000_000_000).map(str),
    st.builds(
        lambda sec, usec, pid, q: f"{sec}.M{usec}P{pid}" + (f"Q{q}" if q is not None else ""),
        st.integers(0, 2_000_000_000),
        st.integers(0, 10**7),  # also past the packing limit of 10**6
        st.integers(0, 99999),
        st.none() | st.integers(0, 10**10),
    ),
    st.text(alphabet="0123456789.MPQVabc", max_size=12),
)


@given(st.lists(st.tuples(_NAME_PART, st.text(alphabet="abc.,=", max_size=4)), max_size=150))
def test_arrival_order_is_the_arrival_key_order(parts: list[tuple[str, str]]) -> None:
    keys = list({head + tail for head, tail in parts})
    assert arrival_order(keys) == sorted(keys, key=arrival_key)


def _w_by_fields(key: str) -> int | None:
    """The size rule spelled out: the first W field among the S/W fields after the first comma."""
    comma = key.find(",")
    if comma < 0:
        return None
    for field, value in re.findall(r",([SW])=(\d+)", key[comma:]):
        if field == "W":
            return int(value)
    return None


_NAME_PIECES = ["1700000000.M1P2.host", ",S=", ",W=", "12", "x", ",", "=", ":2,S"]


@given(st.lists(st.sampled_from(_NAME_PIECES), max_size=10).map("".join))
def test_wire_size_from_name_takes_the_first_w_field_after_the_first_comma(key: str) -> None:
    assert wire_size_from_name(key) == _w_by_fields(key)
