"""The shipped ``packaging/haproxy.cfg`` in front of three real mailbag nodes (Maildir).

What this proves about the HAProxy settings, without a database: health
checks pass through the nodes' PROXY requirement (``check-send-proxy``),
``send-proxy-v2`` gives every node the real client address (the client
connects from 127.0.0.2; HAProxy itself from 127.0.0.1), ``leastconn``
spreads concurrent sessions over all nodes, POP3S is passed through
(the client's TLS ends at the node), and LMTP reaches a node too.
The PostgreSQL cluster tests (shared maildrops) are in ``test_pg_cluster.py``.
"""

from __future__ import annotations

import re
import shutil
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.harness import HAPROXY, HaProxy
from tests.conftest import MailbagServer, make_home
from tests.net.pop3raw import RawLines
from tests.net.tlshelpers import set_option, wait_until

CLIENT = "127.0.0.2"

pytestmark = pytest.mark.skipif(
    shutil.which("haproxy") is None and not Path(HAPROXY).exists(),
    reason="haproxy is not installed (apt-get install haproxy)",
)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[HaProxy, list[MailbagServer]]]:
    nodes = [make_home(tmp_path / f"node{i}") for i in (1, 2, 3)]
    started: list[MailbagServer] = []
    proxy = HaProxy(tmp_path, nodes)
    try:
        for node in nodes:
            set_option(node, "server", "trusted_proxies", '["127.0.0.1/32"]')
            node.start()
            started.append(node)
            # The harness's readiness probes (POP3 and LMTP ports) came without a header.
            assert wait_until(lambda n=node: n.log().count("proxy-failed") == 2)
        proxy.node_log_marks = {node.port: len(node.log()) for node in nodes}
        proxy.start()
        proxy.wait_up(3)
        yield proxy, nodes
    finally:
        proxy.stop()
        for node in started:
            node.stop()


def pop3(port: int) -> RawLines:
    conn = RawLines(socket.create_connection(("127.0.0.1", port), timeout=10,
                                             source_address=(CLIENT, 0)))
    assert conn.line().startswith(b"+OK")
    return conn


def test_health_checks_pass_with_proxy_headers(
    cluster: tuple[HaProxy, list[MailbagServer]],
) -> None:
    proxy, nodes = cluster
    # Each node has been checked (its POP3 port greeted HAProxy: a v2 LOCAL header, so the
    # session's address is the proxy's own) and none logged a missing header.  (The
    # harness's own readiness probe, before HAProxy started, connected without one.)
    for node in nodes:
        assert wait_until(lambda n=node: "peer=127.0.0.1:" in n.log(), timeout=15)
        since_proxy = node.log()[proxy.node_log_marks[node.port]:]
        assert "proxy-failed" not in since_proxy and "proxy-refused" not in since_proxy
    assert all(state == "UP" for state in proxy.status().values())


def test_sessions_spread_over_nodes_with_the_real_address(
    cluster: tuple[HaProxy, list[MailbagServer]],
) -> None:
    proxy, nodes = cluster
    held = [pop3(proxy.front.pop3) for _ in range(6)]
    # leastconn over 6 concurrent sessions: two per node, each node sees 127.0.0.2.
    for node in nodes:
        assert wait_until(
            lambda n=node: len(re.findall(rf"connect .*peer={re.escape(CLIENT)}:", n.log())) == 2
        )
    for conn in held:
        conn.send(b"QUIT\r\n")
        conn.close()


def test_pop3s_is_passed_through(cluster: tuple[HaProxy, list[MailbagServer]]) -> None:
    proxy, nodes = cluster
    raw = socket.create_connection(("127.0.0.1", proxy.front.pop3s), timeout=10,
                                   source_address=(CLIENT, 0))
    # The node's certificate (self-signed per node home): the TLS session ends at the node.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    tls = context.wrap_socket(raw, server_hostname="localhost")
    der = tls.getpeercert(binary_form=True)
    assert der in {ssl.PEM_cert_to_DER_cert(node.cert.read_text()) for node in nodes}
    conn = RawLines(tls)  # type: ignore[arg-type]
    assert conn.line().startswith(b"+OK")
    conn.send(b"USER demo\r\n")
    assert conn.line().startswith(b"+OK")
    conn.send(b"PASS demo\r\n")
    assert conn.line().startswith(b"+OK")
    conn.close()
    assert any(wait_until(lambda n=node: "tls=TLSv1.3" in n.log() and
                          f"peer={CLIENT}:" in n.log(), timeout=2) for node in nodes)


def test_lmtp_through_haproxy(cluster: tuple[HaProxy, list[MailbagServer]]) -> None:
    proxy, nodes = cluster
    conn = RawLines(socket.create_connection(("127.0.0.1", proxy.front.lmtp), timeout=10,
                                             source_address=(CLIENT, 0)))
    assert conn.line().startswith(b"220")
    conn.send(b"LHLO mx.example\r\n")
    while not conn.line().startswith(b"250 "):
        pass
    for command in (b"MAIL FROM:<a@example.org>", b"RCPT TO:<demo>", b"DATA"):
        conn.send(command + b"\r\n")
        assert conn.line()[:1] in (b"2", b"3")
    conn.send(b"Subject: through haproxy\r\n\r\nhi\r\n.\r\n")
    assert conn.line().startswith(b"250")
    conn.send(b"QUIT\r\n")
    conn.close()
    delivered = [p for node in nodes for p in (node.maildir() / "new").glob("*")]
    assert len(delivered) == 1 and f"[{CLIENT}]".encode() in delivered[0].read_bytes()
