"""The PROXY header in front of a session: who is trusted, reading it, the real address.

A load balancer (HAProxy with ``send-proxy-v2``) connects to every node
itself, so without the header every session would come from the proxy's
address: one throttle bucket, one connection-cap bucket, the proxy's
network for the plaintext policy, useless logs.  The header gives the real
client address back, but only a proxy we trust may say who the client is;
anybody else could claim to be 127.0.0.1 and log in with a plaintext
password.  So:

* a connection from ``server.trusted_proxies`` must start with a header
  (v1 or v2), read here before the session exists, under the handshake
  deadline and bounded in size (``protocol.proxy``); without a valid one
  it is closed with one log line;
* the session then sees only the real address (``ConnectionStream.use_peer``):
  the stream's peer is the one place sessions take it from;
* a connection from anywhere else is never parsed here; a header it sends
  is refused by the driver (``session.driver``: closed, one log line).

For implicit TLS (POP3S behind HAProxy in TCP mode) the header arrives
*before* the TLS handshake, on the raw socket, and the ClientHello may be
in the same segment.  ``read_from_socket`` therefore peeks (``MSG_PEEK``)
and consumes exactly the header's octets, leaving the TLS bytes for the
handshake.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Sequence

from mailbag.protocol.proxy import (
    DEFAULT_V2_MAX_LENGTH,
    V2_HEADER,
    ProxyError,
    ProxyHeader,
    ProxyParser,
)
from mailbag.server.connection import ConnectionStream

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Octets peeked at once from a raw socket: the largest header we accept.
_PEEK = V2_HEADER + DEFAULT_V2_MAX_LENGTH
#: Pause before peeking again when the header is incomplete and no new octet came.
_POLL = 0.01


def is_trusted(address: str, networks: Sequence[Network]) -> bool:
    """True if ``address`` (a peer as the socket reports it) lies in ``networks``."""
    if not networks:
        return False
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:  # "?" for a Unix socket
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


def client_address(header: ProxyHeader, proxy: tuple[str, int]) -> tuple[str, int]:
    """The address the session serves: the header's source, or the proxy's own.

    v2 ``LOCAL`` (HAProxy's health checks), v1 ``UNKNOWN`` and address-less
    families mean "the proxy speaking for itself" (spec sections 2.1, 2.2).
    """
    return header.source if header.source is not None else proxy


async def read_from_stream(stream: ConnectionStream, timeout: float) -> ProxyHeader:
    """Read the header from a plain stream; octets after it go back to the stream.

    Raises ``ProxyError`` (malformed, too long, closed early) or ``TimeoutError``.
    """
    parser = ProxyParser()
    async with asyncio.timeout(timeout):
        while True:
            data = await stream.read()
            if not data:
                raise ProxyError("connection closed before a complete PROXY header")
            header = parser.feed(data)
            if header is not None:
                stream.unread(parser.trailing_data)
                return header


async def read_from_socket(sock: socket.socket, timeout: float) -> ProxyHeader:
    """Consume exactly one header from a raw non-blocking socket (before a TLS handshake).

    Raises ``ProxyError``, ``TimeoutError`` or ``OSError``.
    """
    loop = asyncio.get_running_loop()
    seen = -1
    async with asyncio.timeout(timeout):
        while True:
            await _readable(loop, sock)
            data = sock.recv(_PEEK, socket.MSG_PEEK)
            if not data:
                raise ProxyError("connection closed before a complete PROXY header")
            parser = ProxyParser()
            header = parser.feed(data)
            if header is not None:
                size = len(data) - len(parser.trailing_data)
                if len(sock.recv(size)) != size:  # already queued: cannot be short
                    raise ProxyError("PROXY header octets vanished while reading")
                return header
            if len(data) == seen:  # readable but nothing new: wait for the next segment
                await asyncio.sleep(_POLL)
            seen = len(data)


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    """Wait until ``sock`` has something to read (or EOF)."""
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(sock.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_reader(sock.fileno())
