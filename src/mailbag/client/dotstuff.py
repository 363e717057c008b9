"""Streaming decoder for POP3 multi-line responses: the shared ``protocol.dots`` codec.

``poplib`` reads a multi-line response one line at a time into a Python list
and refuses lines over 2,048 octets; a 30 MB attachment becomes hundreds of
thousands of list items.  The client uses the same decoder as the LMTP
server instead: whole chunks, ``bytes.find``/``replace``, at most four bytes
held back at a chunk edge, so memory stays bounded whatever the line length.
"""

from __future__ import annotations

from mailbag.protocol.dots import DotDecoder, stuff

#: Kept for callers that tune it; the shared decoder never holds more than four bytes.
MAX_HELD_LINE = 64 * 1024

#: The client's name for the shared decoder (``feed`` -> decoded bytes, ``done``, ``trailing``).
DotUnstuffer = DotDecoder

__all__ = ["MAX_HELD_LINE", "DotUnstuffer", "stuff"]
