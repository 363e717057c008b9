"""Log lines: one per event, and a hostile value can never start a second one."""

from __future__ import annotations

import logging

import pytest

from mailbag.logs import TextFormatter, _quote


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("demo", "demo"),
        ("user@example.org", "user@example.org"),
        (42, "42"),
        ("", '""'),
        ("two words", '"two words"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("a=b", '"a=b"'),
        ("evil\ninfo login user=root", '"evil\\ninfo login user=root"'),
        ("tab\there", '"tab\\there"'),
        ("bell\x07", '"bell\\u0007"'),
        ("caf\u00e9", "caf\u00e9"),
    ],
)
def test_values_are_quoted_when_they_could_be_misread(value: object, shown: str) -> None:
    assert _quote(value) == shown


def test_a_text_line_is_one_line_with_every_field() -> None:
    record = logging.LogRecord("mailbag", logging.INFO, __file__, 1, "login", None, None)
    record.created = 1_800_000_000.5
    record.fields = {"user": "x\ny", "peer": "127.0.0.1:5", "none": None}  # type: ignore[attr-defined]
    line = TextFormatter().format(record)
    assert line == '2027-01-15T08:00:00Z info login user="x\\ny" peer=127.0.0.1:5'
    assert "\n" not in line
