"""Three mailbag nodes on one PostgreSQL database behind the shipped HAProxy (issue 13).

Real processes on loopback: a fresh database on the shared PostgreSQL
(``tests.pgtest``), three ``mailbag serve`` nodes with a 3-second lease,
and HAProxy from ``packaging/haproxy.cfg`` with PROXY v2.  Proved here:
sessions spread over the nodes; the RFC 1939 lock holds across nodes
(``[IN-USE]``); mail delivered over LMTP to one node is read over POP3 from
another; and a node killed with -9 in the middle of sessions with DELEs
pending deletes nothing, loses nothing, frees its locks within the lease
bound, and does not disturb the clients of the other nodes.
"""

from __future__ import annotations

import poplib
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.harness import HaProxy
from tests.cluster.pgnodes import add_users, lmtp_send, login, postgres_node, subject
from tests.conftest import MailbagServer
from tests.net.tlshelpers import wait_until
from tests.pgtest import fresh_database

LEASE = 3.0
USERS = ("alice", "bob", "carol", "dave", "erin", "frank")


class Cluster:
    def __init__(self, dsn: str, proxy: HaProxy, nodes: list[MailbagServer]) -> None:
        self.dsn, self.proxy, self.nodes = dsn, proxy, nodes


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    with fresh_database() as dsn:
        add_users(dsn, *USERS)
        nodes = [postgres_node(tmp_path / f"node{i}", dsn, lease_time=LEASE, name=f"node{i}")
                 for i in (1, 2, 3)]
        proxy = HaProxy(tmp_path, nodes)
        started: list[MailbagServer] = []
        try:
            for node in nodes:
                node.start()
                started.append(node)
            proxy.start()
            proxy.wait_up(3)
            yield Cluster(dsn, proxy, nodes)
        finally:
            proxy.stop()
            for node in started:
                node.stop(signal.SIGKILL if node.proc and node.proc.poll() is None else 0)


def test_sessions_spread_over_nodes(cluster: Cluster) -> None:
    # Six users log in through HAProxy at once: leastconn gives each node two sessions.
    clients = [login(cluster.proxy.front.pop3, user, source="127.0.0.2") for user in USERS]
    for node in cluster.nodes:
        assert wait_until(
            lambda n=node: len(re.findall(r" login session=\S+ peer=127\.0\.0\.2:", n.log())) == 2
        ), node.log()
    for client in clients:
        client.quit()


def test_in_use_across_nodes(cluster: Cluster) -> None:
    lmtp_send(cluster.nodes[0].lmtp_port, ["alice"], b"Subject: one\r\n\r\nx\r\n")
    holder = login(cluster.proxy.front.pop3, "alice", source="127.0.0.2")
    # RFC 1939 section 8 (PASS): the maildrop is locked; every node says [IN-USE].
    for node in cluster.nodes:
        with pytest.raises(poplib.error_proto, match=r"\[IN-USE\]"):
            login(node.port, "alice")
    holder.quit()
    login(cluster.nodes[2].port, "alice").quit()  # released at QUIT, on every node


def test_lmtp_into_one_node_pop3_from_another(cluster: Cluster) -> None:
    a, b, _ = cluster.nodes
    refused = lmtp_send(a.lmtp_port, ["bob", "carol", "nobody"],
                        b"Subject: shared\r\n\r\nfrom node1\r\n")
    assert set(refused) == {"nobody"}
    for user in ("bob", "carol"):
        client = login(b.port, user)
        assert client.stat()[0] == 1
        assert b"from node1" in b"\r\n".join(client.retr(1)[1])
        client.quit()


def test_kill_9_of_a_node_mid_session(cluster: Cluster) -> None:
    node1, node2, node3 = cluster.nodes
    for user in ("dave", "erin", "frank"):
        for n in range(3):
            lmtp_send(node3.lmtp_port, [user], f"Subject: {user} {n}\r\n\r\nbody {n}\r\n".encode())
    # dave and erin on node1 with DELEs pending; frank on node2, mid-session.
    doomed = [login(node1.port, user) for user in ("dave", "erin")]
    for client in doomed:
        assert client.stat()[0] == 3
        client.dele(1)
        client.dele(2)
    frank = login(node2.port, "frank")
    assert frank.stat()[0] == 3
    frank.dele(3)

    assert node1.proc is not None
    node1.proc.kill()  # SIGKILL: no QUIT, no cleanup, no lease release
    killed = time.monotonic()
    node1.proc.wait(timeout=10)

    # The lock of a dead node is freed within the lease bound (plus one heartbeat of slack);
    # until then another node says [IN-USE], never serves the maildrop twice.
    def free(user: str) -> bool:
        try:
            client = login(node3.port, user)
        except poplib.error_proto as exc:
            assert b"[IN-USE]" in exc.args[0], exc
            return False
        client.quit()
        return True

    assert wait_until(lambda: free("dave"), timeout=LEASE + 5)
    freed_after = time.monotonic() - killed
    assert freed_after <= LEASE + 2, freed_after
    for user in ("dave", "erin"):
        client = login(node3.port, user)
        count, _ = client.stat()
        assert count == 3  # the pending DELEs of the killed session committed nothing
        assert sorted(subject(client, i) for i in (1, 2, 3)) == [f"{user} {n}" for n in range(3)]
        client.quit()

    # The other node's client never noticed: it finishes its session and its DELE commits.
    assert b"body 0" in b"\r\n".join(frank.retr(1)[1])
    frank.quit()
    again = login(node2.port, "frank")
    assert again.stat()[0] == 2
    again.quit()

    # HAProxy takes the dead node out; new sessions through it keep working.
    assert wait_until(lambda: cluster.proxy.status().get(("pop3_nodes", "node1")) == "DOWN",
                      timeout=15)
    for _ in range(4):
        login(cluster.proxy.front.pop3, "erin", source="127.0.0.2").quit()
