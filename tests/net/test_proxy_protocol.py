"""PROXY protocol v1/v2 in front of POP3, POP3S and LMTP, over real loopback sockets.

The server trusts 127.0.0.1 as its load balancer (``server.trusted_proxies``).
The "proxy" here is the test itself: it connects from 127.0.0.1 and sends a
header naming a documentation address (203.0.113.7, RFC 5737) as the
client, which is outside ``auth.plaintext_networks`` (127.0.0.0/8): the
server must treat that session as remote.  127.0.0.2 plays an untrusted
host that sends a header anyway.
"""

from __future__ import annotations

import socket
import ssl
from collections.abc import Iterator

import pytest

from mailbag.protocol.proxy import ProxyHeader, encode_v1, encode_v2
from tests.conftest import MailbagServer
from tests.net.pop3raw import RawLines
from tests.net.tlshelpers import client_context, set_option, wait_until

PROXY = "127.0.0.1"
UNTRUSTED = "127.0.0.2"
CLIENT = "203.0.113.7"


def header(version: int, source: str = CLIENT, sport: int = 40000, dport: int = 110) -> bytes:
    family = "TCP6" if ":" in source else "TCP4"
    dest = "::1" if family == "TCP6" else "192.0.2.1"
    h = ProxyHeader(version, False, family, (source, sport), (dest, dport))
    return encode_v1(h) if version == 1 else encode_v2(h)


LOCAL_V2 = encode_v2(ProxyHeader(2, True, "UNSPEC"))


@pytest.fixture
def proxied_server(mailbag_home: MailbagServer) -> Iterator[MailbagServer]:
    set_option(mailbag_home, "server", "trusted_proxies", f'["{PROXY}/32"]')
    set_option(mailbag_home, "limits", "max_connections_per_ip", "2")
    mailbag_home.start()
    try:
        yield mailbag_home
    finally:
        mailbag_home.stop()


def connect(port: int, data: bytes, source: str = PROXY) -> RawLines:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    if data:
        sock.sendall(data)
    return RawLines(sock)


def closed(conn: RawLines, within: float = 5.0) -> bool:
    """True if the server closes the connection within ``within`` s (bytes go to ``buf``)."""
    conn.sock.settimeout(within)
    try:
        while chunk := conn.sock.recv(4096):
            conn.buf += chunk
    except TimeoutError:
        return False
    except ConnectionError:
        pass
    return True


@pytest.mark.parametrize("version", [1, 2])
def test_real_client_address_drives_plaintext_policy_and_logs(
    proxied_server: MailbagServer, version: int
) -> None:
    conn = connect(proxied_server.port, header(version, sport=40000 + version))
    assert conn.line().startswith(b"+OK")
    # 203.0.113.7 is not in plaintext_networks: USER is refused without TLS (RFC 2595 2.2
    # spirit, [AUTH] of RFC 3206), although the TCP peer is 127.0.0.1.
    conn.send(b"USER demo\r\n")
    assert conn.line().startswith(b"-ERR [AUTH]")
    conn.send(b"QUIT\r\n")
    assert conn.line().startswith(b"+OK")
    conn.close()
    assert wait_until(lambda: f"{CLIENT}:{40000 + version}" in proxied_server.log())


def test_pipelined_command_after_header_is_kept(proxied_server: MailbagServer) -> None:
    # HAProxy forwards the client's bytes right after the header, maybe in the same segment.
    conn = connect(proxied_server.port, header(2) + b"CAPA\r\n")
    assert conn.line().startswith(b"+OK")
    assert conn.line().startswith(b"+OK")  # CAPA's first line: nothing was eaten
    conn.close()


def test_v2_local_health_check_uses_the_proxys_address(proxied_server: MailbagServer) -> None:
    # A LOCAL header (HAProxy's health check) speaks for the proxy itself: 127.0.0.1 is local,
    # so plaintext USER is allowed.
    conn = connect(proxied_server.port, LOCAL_V2)
    assert conn.line().startswith(b"+OK")
    conn.send(b"USER demo\r\n")
    assert conn.line().startswith(b"+OK")
    conn.close()


def test_caps_count_the_real_address_not_the_proxy(proxied_server: MailbagServer) -> None:
    # max_connections_per_ip = 2: two sessions for 203.0.113.7 fill its share; a third is
    # refused, while another client behind the same proxy still gets in.
    held = [connect(proxied_server.port, header(2, sport=41000 + i)) for i in range(2)]
    for conn in held:
        assert conn.line().startswith(b"+OK")
    third = connect(proxied_server.port, header(2, sport=41002))
    assert third.line().startswith(b"-ERR [SYS/TEMP] Too many connections")
    other = connect(proxied_server.port, header(2, source="203.0.113.8"))
    assert other.line().startswith(b"+OK")
    assert wait_until(lambda: f"peer={CLIENT}:41002" in proxied_server.log())
    held[0].close()  # frees one slot of 203.0.113.7
    assert wait_until(lambda: _greeted(proxied_server.port, header(2, sport=41003)))
    for conn in [*held, third, other]:
        conn.close()


def _greeted(port: int, data: bytes) -> bool:
    conn = connect(port, data)
    try:
        return conn.line().startswith(b"+OK")
    except ConnectionError:
        return False
    finally:
        conn.close()


@pytest.mark.parametrize("version", [1, 2])
def test_header_from_untrusted_address_is_refused(
    proxied_server: MailbagServer, version: int
) -> None:
    conn = connect(proxied_server.port, b"", source=UNTRUSTED)
    assert conn.line().startswith(b"+OK")  # an ordinary client: greeted at once
    conn.send(header(version, source="127.0.0.9"))
    assert closed(conn) and b"+OK" not in conn.buf  # nothing answered, connection closed
    conn.close()
    assert wait_until(lambda: "proxy-refused" in proxied_server.log())
    assert "127.0.0.9" not in proxied_server.log()
    assert f"peer={UNTRUSTED}:" in proxied_server.log()


def test_trusted_proxy_without_header_is_closed(proxied_server: MailbagServer) -> None:
    conn = connect(proxied_server.port, b"USER demo\r\n")
    assert closed(conn) and conn.buf == b""  # not even a greeting
    conn.close()
    assert wait_until(lambda: "proxy-failed" in proxied_server.log())
    assert "did not start with a PROXY header" in proxied_server.log()


def test_trusted_proxy_silent_is_closed_at_the_deadline(mailbag_home: MailbagServer) -> None:
    set_option(mailbag_home, "server", "trusted_proxies", f'["{PROXY}/32"]')
    set_option(mailbag_home, "limits", "login_timeout", "1.0")
    mailbag_home.start()
    try:
        conn = connect(mailbag_home.port, b"PROXY TCP4 ")  # half a header, then nothing
        assert closed(conn) and conn.buf == b""
        conn.close()
        assert wait_until(lambda: "reason=timeout" in mailbag_home.log())
    finally:
        mailbag_home.stop()


def _tls_after_header(port: int, cafile: str, data: bytes) -> tuple[socket.socket, ssl.SSLObject,
                                                                     ssl.MemoryBIO, ssl.MemoryBIO]:
    """Send the header and the ClientHello in ONE segment, then finish the handshake."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(PROXY, 0))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_context(cafile).wrap_bio(incoming, outgoing, server_hostname="localhost")
    first = True
    while True:
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            pending = outgoing.read()
            sock.sendall((data if first else b"") + pending)
            first = False
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed during handshake") from None
            incoming.write(chunk)
    sock.sendall(outgoing.read())
    return sock, tls, incoming, outgoing


def _tls_line(sock: socket.socket, tls: ssl.SSLObject, incoming: ssl.MemoryBIO,
              outgoing: ssl.MemoryBIO, buf: bytearray) -> bytes:
    while b"\r\n" not in buf:
        try:
            buf += tls.read(65536)
        except ssl.SSLWantReadError:
            sock.sendall(outgoing.read())
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed") from None
            incoming.write(chunk)
    line, _, rest = bytes(buf).partition(b"\r\n")
    buf[:] = rest
    return line


def test_pop3s_header_comes_before_the_tls_handshake(proxied_server: MailbagServer) -> None:
    # HAProxy in TCP mode passes TLS through: header first, then the client's ClientHello,
    # here in the same TCP segment, so the server must consume exactly the header's octets.
    sock, tls, incoming, outgoing = _tls_after_header(
        proxied_server.tls_port, str(proxied_server.cert), header(2, sport=42000, dport=995)
    )
    buf = bytearray()
    assert _tls_line(sock, tls, incoming, outgoing, buf).startswith(b"+OK")
    tls.write(b"USER demo\r\n")  # allowed over TLS from anywhere
    assert _tls_line(sock, tls, incoming, outgoing, buf).startswith(b"+OK")
    tls.write(b"PASS demo\r\n")
    assert _tls_line(sock, tls, incoming, outgoing, buf).startswith(b"+OK")
    sock.close()
    assert wait_until(lambda: f"{CLIENT}:42000" in proxied_server.log())


def test_pop3s_trusted_proxy_without_header_is_closed(proxied_server: MailbagServer) -> None:
    context = client_context(proxied_server.cert)
    raw = socket.create_connection(("127.0.0.1", proxied_server.tls_port), timeout=10,
                                   source_address=(PROXY, 0))
    with pytest.raises((ssl.SSLError, ConnectionError)):
        context.wrap_socket(raw, server_hostname="localhost")
    raw.close()
    assert wait_until(lambda: "proxy-failed" in proxied_server.log())


def test_lmtp_records_the_real_client(proxied_server: MailbagServer) -> None:
    conn = connect(proxied_server.lmtp_port, header(2, sport=43000, dport=24))
    assert conn.line().startswith(b"220")
    conn.send(b"LHLO mx.example\r\n")
    while not conn.line().startswith(b"250 "):
        pass
    for command in (b"MAIL FROM:<a@example.org>", b"RCPT TO:<demo>", b"DATA"):
        conn.send(command + b"\r\n")
        assert conn.line()[:1] in (b"2", b"3")
    conn.send(b"Subject: via proxy\r\n\r\nhello\r\n.\r\n")
    assert conn.line().startswith(b"250")
    conn.close()
    new = list((proxied_server.maildir() / "new").iterdir())
    assert len(new) == 1 and f"[{CLIENT}]".encode() in new[0].read_bytes()
    assert wait_until(lambda: f"{CLIENT}:43000" in proxied_server.log())


def test_lmtp_header_from_untrusted_address_is_refused(proxied_server: MailbagServer) -> None:
    conn = connect(proxied_server.lmtp_port, b"", source=UNTRUSTED)
    assert conn.line().startswith(b"220")
    conn.send(header(1))
    assert closed(conn) and b"250" not in conn.buf
    conn.close()
    assert wait_until(lambda: "proxy-refused" in proxied_server.log())
