"""The PROXY protocol, versions 1 and 2 (HAProxy's spec, "proxy-protocol.txt"), sans-IO.

A load balancer in front of many nodes hides the client's address; the
PROXY header it sends first restores it, so throttling, plaintext policy,
connection caps and logs see the real client.  The header is trusted only
from ``server.trusted_proxies`` (the listener decides that); this module
only parses, with the same rules as every other network input: every byte
is hostile, size is bounded (v1: 107 octets; v2: 16 + a capped length),
and anything malformed or truncated is a ``ProxyError`` with a clear
reason, never another exception.

Use: feed bytes to ``ProxyParser.feed`` until it returns a ``ProxyHeader``;
bytes after the header (a client may pipeline its first command) are in
``trailing_data`` and belong to the protocol that follows.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Literal

#: Spec section 2.1: "a receiver may safely assume that ... 107 characters" is the v1 maximum.
V1_MAX = 107
V1_PREFIX = b"PROXY "
#: Spec section 2.2: the 12-octet v2 signature.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER = 16
#: Address block plus TLVs we accept (the spec allows 65535; no proxy we support needs
#: more than a few hundred).  Larger is refused rather than buffered.
DEFAULT_V2_MAX_LENGTH = 1024

_V2_ADDRESS_SIZES = {0x1: 12, 0x2: 36, 0x3: 216}  # INET, INET6, UNIX
_V2_FAMILIES = {0x0: "UNSPEC", 0x1: "TCP4", 0x2: "TCP6", 0x3: "UNIX"}

Family = Literal["TCP4", "TCP6", "UNKNOWN", "UNSPEC", "UNIX"]


class ProxyError(ValueError):
    """Not a valid PROXY header; the text says what is wrong (for logs, not for clients)."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """What the proxy told us.

    ``source``/``destination`` are ``(address, port)`` for TCP over IPv4 or
    IPv6, and None when the header carries no usable address (v1
    ``UNKNOWN``, v2 ``LOCAL``, ``UNSPEC`` or ``UNIX``): then the connection's
    own address is the one to use (spec: the proxy's health checks do this).
    """

    version: int
    local: bool
    family: Family
    source: tuple[str, int] | None = None
    destination: tuple[str, int] | None = None


def _parse_port(text: bytes) -> int:
    if not text.isdigit() or len(text) > 5 or (len(text) > 1 and text.startswith(b"0")):
        raise ProxyError(f"bad port {text[:8]!r}")
    port = int(text)
    if port > 65535:
        raise ProxyError(f"port {port} out of range")
    return port


def _parse_address(text: bytes, version: int) -> str:
    try:
        address = ipaddress.ip_address(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ProxyError(f"bad IPv{version} address {text[:48]!r}") from None
    if address.version != version:
        raise ProxyError(f"bad IPv{version} address {text[:48]!r}")
    return str(address)


def parse_v1(line: bytes) -> ProxyHeader:
    """Parse one v1 line, CRLF included (``PROXY TCP4 src dst sport dport``)."""
    if not line.startswith(V1_PREFIX) or not line.endswith(b"\r\n"):
        raise ProxyError("v1 header must start with 'PROXY ' and end with CRLF")
    if len(line) > V1_MAX:
        raise ProxyError(f"v1 header longer than {V1_MAX} octets")
    body = line[len(V1_PREFIX) : -2]
    if b"\r" in body or b"\n" in body:
        raise ProxyError("v1 header contains a line break")
    if body == b"UNKNOWN" or body.startswith(b"UNKNOWN "):
        # Spec 2.1: the rest of the line is to be ignored.
        return ProxyHeader(1, True, "UNKNOWN")
    fields = body.split(b" ")
    if len(fields) != 5 or fields[0] not in (b"TCP4", b"TCP6"):
        raise ProxyError("v1 header needs TCP4|TCP6 src dst sport dport, single spaces")
    version = 4 if fields[0] == b"TCP4" else 6
    source = (_parse_address(fields[1], version), _parse_port(fields[3]))
    destination = (_parse_address(fields[2], version), _parse_port(fields[4]))
    family: Family = "TCP4" if version == 4 else "TCP6"
    return ProxyHeader(1, False, family, source, destination)


def parse_v2(header: bytes) -> ProxyHeader:
    """Parse one complete v2 header (signature, 4 octets, address block, TLVs)."""
    if len(header) < V2_HEADER or not header.startswith(V2_SIGNATURE):
        raise ProxyError("v2 header too short or without the signature")
    ver_cmd, fam, length = struct.unpack_from("!BBH", header, 12)
    if len(header) != V2_HEADER + length:
        raise ProxyError("v2 header length does not match its length field")
    if ver_cmd >> 4 != 2:
        raise ProxyError(f"v2 header with version {ver_cmd >> 4}")
    command = ver_cmd & 0x0F
    if command not in (0x0, 0x1):
        raise ProxyError(f"v2 header with unknown command {command}")
    family_code, transport = fam >> 4, fam & 0x0F
    if family_code not in _V2_FAMILIES or transport > 0x2:
        raise ProxyError(f"v2 header with unknown family/transport 0x{fam:02x}")
    if command == 0x0:  # LOCAL: the proxy speaking for itself (health check)
        return ProxyHeader(2, True, "UNSPEC")
    family: Family = _V2_FAMILIES[family_code]  # type: ignore[assignment]
    if family_code == 0x0:
        return ProxyHeader(2, False, "UNSPEC")
    if transport != 0x1:
        raise ProxyError("v2 header for a datagram (or unspecified) transport on a stream")
    need = _V2_ADDRESS_SIZES[family_code]
    if length < need:
        raise ProxyError(f"v2 {family} address block truncated ({length} < {need} octets)")
    body = memoryview(header)[V2_HEADER:]
    _check_tlvs(body[need:])
    if family_code == 0x3:
        return ProxyHeader(2, False, "UNIX")
    size = 4 if family_code == 0x1 else 16
    src = ipaddress.ip_address(bytes(body[:size]))
    dst = ipaddress.ip_address(bytes(body[size : 2 * size]))
    sport, dport = struct.unpack_from("!HH", body, 2 * size)
    return ProxyHeader(2, False, family, (str(src), sport), (str(dst), dport))


def _check_tlvs(tlvs: memoryview) -> None:
    """Walk the TLVs (type, 2-octet length, value) only to check they fit; values are ignored."""
    offset = 0
    while offset < len(tlvs):
        if len(tlvs) - offset < 3:
            raise ProxyError("v2 TLV truncated")
        (size,) = struct.unpack_from("!H", tlvs, offset + 1)
        offset += 3 + size
        if offset > len(tlvs):
            raise ProxyError("v2 TLV longer than the header")


def starts_with_header(data: bytes) -> bool:
    """True if ``data`` opens with a PROXY header (v1 ``PROXY `` or the v2 signature).

    For refusing a header where none is expected: a client that is not a
    trusted proxy must not get to choose the address we believe it has.
    """
    return data.startswith(V1_PREFIX) or data.startswith(V2_SIGNATURE)


class ProxyParser:
    """Incremental detection and parsing of one PROXY header at the start of a connection."""

    def __init__(self, *, v2_max_length: int = DEFAULT_V2_MAX_LENGTH) -> None:
        self._buffer = bytearray()
        self._v2_max = v2_max_length
        self.header: ProxyHeader | None = None
        #: Bytes received after the header: the start of the real protocol.
        self.trailing_data = b""

    def feed(self, data: bytes) -> ProxyHeader | None:
        """Add received bytes; return the header once complete, None while more is needed.

        Raises ``ProxyError`` as soon as the bytes cannot be a valid header
        (so a connection that sends no PROXY header is refused after its
        first octets, not after a timeout).
        """
        if self.header is not None:
            raise ProxyError("the PROXY header was already parsed")
        self._buffer += data
        buf = bytes(self._buffer)
        if buf[:12] == V2_SIGNATURE[: len(buf[:12])]:
            return self._feed_v2(buf)
        if buf[:6] == V1_PREFIX[: len(buf[:6])]:
            return self._feed_v1(buf)
        raise ProxyError("connection did not start with a PROXY header")

    def _feed_v1(self, buf: bytes) -> ProxyHeader | None:
        end = buf.find(b"\n", 0, V1_MAX)
        if end < 0:
            if len(buf) >= V1_MAX:
                raise ProxyError(f"v1 header without CRLF in the first {V1_MAX} octets")
            return None
        return self._done(parse_v1(buf[: end + 1]), buf[end + 1 :])

    def _feed_v2(self, buf: bytes) -> ProxyHeader | None:
        if len(buf) < V2_HEADER:
            return None
        (length,) = struct.unpack_from("!H", buf, 14)
        if length > self._v2_max:
            raise ProxyError(f"v2 header of {length} octets exceeds the {self._v2_max} allowed")
        total = V2_HEADER + length
        if len(buf) < total:
            return None
        return self._done(parse_v2(buf[:total]), buf[total:])

    def _done(self, header: ProxyHeader, rest: bytes) -> ProxyHeader:
        self.header = header
        self.trailing_data = rest
        self._buffer.clear()
        return header


def encode_v1(header: ProxyHeader) -> bytes:
    """The v1 line for ``header`` (for tests and for a client that must send one)."""
    if header.source is None or header.destination is None:
        return b"PROXY UNKNOWN\r\n"
    src, dst = header.source, header.destination
    return f"PROXY {header.family} {src[0]} {dst[0]} {src[1]} {dst[1]}\r\n".encode("ascii")


def encode_v2(header: ProxyHeader, tlvs: bytes = b"") -> bytes:
    """The v2 header for ``header`` with optional raw TLVs appended."""
    if header.local:
        return V2_SIGNATURE + struct.pack("!BBH", 0x20, 0x00, len(tlvs)) + tlvs
    if header.source is None or header.destination is None:
        return V2_SIGNATURE + struct.pack("!BBH", 0x21, 0x00, len(tlvs)) + tlvs
    src = ipaddress.ip_address(header.source[0])
    dst = ipaddress.ip_address(header.destination[0])
    fam = 0x11 if src.version == 4 else 0x21
    block = src.packed + dst.packed + struct.pack("!HH", header.source[1], header.destination[1])
    body = block + tlvs
    return V2_SIGNATURE + struct.pack("!BBH", 0x21, fam, len(body)) + body
