"""PROXY protocol v1/v2 parsing (HAProxy proxy-protocol.txt), bytes only."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailbag.protocol.proxy import (
    V1_MAX,
    V2_SIGNATURE,
    ProxyError,
    ProxyHeader,
    ProxyParser,
    encode_v1,
    encode_v2,
    parse_v1,
    starts_with_header,
)


def parse_all(data: bytes, **options: int) -> tuple[ProxyHeader, bytes]:
    parser = ProxyParser(**options)
    header = parser.feed(data)
    assert header is not None
    return header, parser.trailing_data


def test_v1_tcp4_with_pipelined_command() -> None:
    header, rest = parse_all(b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 110\r\nCAPA\r\n")
    assert header == ProxyHeader(1, False, "TCP4", ("192.0.2.7", 56324), ("198.51.100.1", 110))
    assert rest == b"CAPA\r\n"


def test_v1_tcp6_is_normalised() -> None:
    header, _ = parse_all(b"PROXY TCP6 2001:DB8::1 2001:db8:0::2 65535 995\r\n")
    assert header.source == ("2001:db8::1", 65535)
    assert header.destination == ("2001:db8::2", 995)


@pytest.mark.parametrize("line", [b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff::1 ::1 1 2\r\n"])
def test_v1_unknown_means_use_the_connection_address(line: bytes) -> None:
    header, _ = parse_all(line)
    assert header.local and header.source is None and header.family == "UNKNOWN"


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 110\n",  # bare LF
        b"PROXY TCP4 192.0.2.7 198.51.100.1 56324\r\n",  # missing field
        b"PROXY TCP4  192.0.2.7 198.51.100.1 1 2\r\n",  # double space
        b"PROXY TCP4 ::1 ::1 1 2\r\n",  # v6 address for TCP4
        b"PROXY TCP6 192.0.2.7 192.0.2.8 1 2\r\n",
        b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 2\r\n",
        b"PROXY TCP4 192.0.2.7 198.51.100.1 012 2\r\n",  # leading zero
        b"PROXY TCP4 192.0.2.7 198.51.100.1 -1 2\r\n",
        b"PROXY UDP4 192.0.2.7 198.51.100.1 1 2\r\n",
        b"PROXY TCP4 300.0.0.1 198.51.100.1 1 2\r\n",
        b"PROXY TCP4 192.0.2.7 198.51.100.1 1 2\xff\r\n",
    ],
)
def test_v1_malformed_is_refused(line: bytes) -> None:
    with pytest.raises(ProxyError):
        ProxyParser().feed(line)


def test_v1_longer_than_107_octets_is_refused_without_waiting() -> None:
    parser = ProxyParser()
    with pytest.raises(ProxyError, match="107"):
        parser.feed(b"PROXY UNKNOWN " + b"x" * (V1_MAX - 14))


def test_not_a_proxy_header_is_refused_at_the_first_octets() -> None:
    with pytest.raises(ProxyError, match="did not start"):
        ProxyParser().feed(b"USER alice\r\n")
    with pytest.raises(ProxyError):
        ProxyParser().feed(b"PROXX")
    with pytest.raises(ProxyError):
        ProxyParser().feed(b"\r\n\r\n\x00\r\nQUI!")


def test_v2_inet_with_tlvs_skipped() -> None:
    tlvs = b"\x01\x00\x02h2" + b"\x04\x00\x00"  # ALPN, NOOP (empty)
    data = encode_v2(ProxyHeader(2, False, "TCP4", ("203.0.113.9", 40000), ("10.0.0.1", 995)), tlvs)
    header, rest = parse_all(data + b"+rest")
    assert header == ProxyHeader(2, False, "TCP4", ("203.0.113.9", 40000), ("10.0.0.1", 995))
    assert rest == b"+rest"


def test_v2_inet6_and_local() -> None:
    src, dst = ("2001:db8::5", 1), ("2001:db8::6", 110)
    assert parse_all(encode_v2(ProxyHeader(2, False, "TCP6", src, dst)))[0].source == src
    local, _ = parse_all(encode_v2(ProxyHeader(2, True, "UNSPEC")))
    assert local.local and local.source is None


def test_v2_unix_and_unspec_carry_no_address() -> None:
    unix = V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x31, 216) + bytes(216)
    assert parse_all(unix)[0] == ProxyHeader(2, False, "UNIX")
    unspec = V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x00, 0)
    assert parse_all(unspec)[0] == ProxyHeader(2, False, "UNSPEC")


@pytest.mark.parametrize(
    ("ver_cmd", "fam", "body", "reason"),
    [
        (0x11, 0x11, bytes(12), "version 1"),
        (0x22, 0x11, bytes(12), "unknown command"),
        (0x21, 0x12, bytes(12), "datagram"),
        (0x21, 0x41, bytes(12), "family"),
        (0x21, 0x11, bytes(11), "truncated"),
        (0x21, 0x21, bytes(12), "truncated"),
        (0x21, 0x11, bytes(12) + b"\x01\x00\x05ab", "TLV"),
        (0x21, 0x11, bytes(12) + b"\x01\x00", "TLV truncated"),
    ],
)
def test_v2_malformed_is_refused(ver_cmd: int, fam: int, body: bytes, reason: str) -> None:
    data = V2_SIGNATURE + struct.pack("!BBH", ver_cmd, fam, len(body)) + body
    with pytest.raises(ProxyError, match=reason):
        ProxyParser().feed(data)


def test_v2_length_is_bounded_before_buffering() -> None:
    parser = ProxyParser(v2_max_length=100)
    with pytest.raises(ProxyError, match="exceeds"):
        parser.feed(V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x11, 101))


def test_truncated_header_waits_for_more() -> None:
    parser = ProxyParser()
    assert parser.feed(b"PROXY TCP4 192.0.2.7") is None
    assert parser.feed(V2_SIGNATURE[:0]) is None
    assert parser.feed(b" 198.51.100.1 1 2\r") is None
    assert parser.feed(b"\n") is not None
    with pytest.raises(ProxyError, match="already"):
        parser.feed(b"x")


ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(lambda a: str(ipaddress.IPv6Address(a)))
ports = st.integers(0, 65535)
headers = st.one_of(
    st.builds(lambda s, d, p, q: ProxyHeader(1, False, "TCP4", (s, p), (d, q)),
              ipv4, ipv4, ports, ports),
    st.builds(lambda s, d, p, q: ProxyHeader(1, False, "TCP6", (s, p), (d, q)),
              ipv6, ipv6, ports, ports),
)


@settings(max_examples=200, deadline=None)
@given(headers, st.binary(max_size=40), st.data())
def test_any_header_in_any_chunking_round_trips(
    header: ProxyHeader, rest: bytes, data: st.DataObject
) -> None:
    for version, wire in ((1, encode_v1(header)), (2, encode_v2(header))):
        stream = wire + rest
        cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=5)))
        parser = ProxyParser()
        found = None
        for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            if found is None:
                found = parser.feed(stream[a:b])
            else:
                parser.trailing_data += stream[a:b]
        assert found is not None
        assert (found.source, found.destination, found.version) == (
            header.source, header.destination, version)
        assert parser.trailing_data == rest


@settings(max_examples=500, deadline=None)
@given(st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=120).map(lambda b: b"PROXY " + b),
    st.binary(max_size=120).map(lambda b: V2_SIGNATURE + b),
))
def test_garbage_gives_proxy_error_or_waits_never_anything_else(data: bytes) -> None:
    parser = ProxyParser()
    try:
        header = parser.feed(data)
    except ProxyError:
        return
    if header is None:  # a prefix of something valid: bounded by the limits
        assert len(data) < V1_MAX or data.startswith(V2_SIGNATURE)


def test_parse_v1_requires_the_whole_line() -> None:
    with pytest.raises(ProxyError):
        parse_v1(b"PROXY UNKNOWN")


def test_starts_with_header_spots_both_versions_and_nothing_else() -> None:
    v2 = encode_v2(ProxyHeader(2, True, "UNSPEC"))
    assert starts_with_header(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n")
    assert starts_with_header(v2 + b"rest")
    assert not starts_with_header(b"USER demo\r\n")
    assert not starts_with_header(b"PROXYX\r\n")
    assert not starts_with_header(v2[:11])
