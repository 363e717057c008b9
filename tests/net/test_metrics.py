"""The metrics endpoint scraped and parsed after a scripted session; /healthz; JSON log lines."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import MailbagServer, free_port, make_home
from tests.net.pop3raw import RawPop3

prometheus_parser = pytest.importorskip("prometheus_client.parser")

MESSAGE = b"Subject: metrics\r\n\r\nBODY-MARKER-4711 must never be logged\r\n"


def configured(tmp_path: Path, *, metrics: bool = True, json_logs: bool = False,
               per_ip: int = 50) -> tuple[MailbagServer, int]:
    home = make_home(tmp_path / "home")
    port = free_port()
    text = home.config.read_text()
    if metrics:
        text = text.replace('[metrics]\n', '[metrics]\n', 1).replace(
            'listen = ""', f'listen = "127.0.0.1:{port}"', 1)
    if json_logs:
        text = text.replace('format = "text"', 'format = "json"')
    text = text.replace("max_connections_per_ip = 50", f"max_connections_per_ip = {per_ip}")
    home.config.write_text(text)
    return home, port


def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the exposition, keyed by (name, sorted labels)."""
    result = {}
    for family in prometheus_parser.text_string_to_metric_families(text):
        for sample in family.samples:
            result[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return result


def login(pop: RawPop3, user: str, password: str) -> bytes:
    assert pop.cmd(f"USER {user}").startswith(b"+OK")
    return pop.cmd(f"PASS {password}")


def settled(port: int, total: int = 0) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Samples once no connection is open and at least ``total`` were counted.

    The server's bookkeeping trails the client: on a loaded machine the
    start-up probe's connection may not even be accepted yet.
    """
    deadline = time.monotonic() + 10
    while True:
        status, text = scrape(port)
        assert status == 200
        values = samples(text)
        done = (values.get(("mailbag_connections_current", ())) == 0
                and values.get(("mailbag_connections_total", ()), 0) >= total)
        if done or time.monotonic() > deadline:
            return values
        time.sleep(0.05)


def test_metrics_scraped_after_scripted_session(tmp_path: Path) -> None:
    home, port = configured(tmp_path, per_ip=2)
    home.deliver(MESSAGE)
    home.start()
    try:
        before = settled(port, total=1)  # the start-up probe's connection is in here

        def delta(name: str, **labels: str) -> float:
            key = (name, tuple(sorted(labels.items())))
            return values.get(key, 0.0) - before.get(key, 0.0)

        pop = RawPop3(home.host, home.port)
        assert login(pop, "demo", "demo").startswith(b"+OK")
        idle = RawPop3(home.host, home.port)
        refused = RawPop3(home.host, home.port)  # over the per-address limit
        assert refused.greeting.startswith(b"-ERR [SYS/TEMP]")
        refused.close()
        idle.close()
        pop.send(b"STAT\r\n")
        pop.line()
        for command in ("LIST", "UIDL"):
            pop.send(f"{command}\r\n".encode())
            pop.multiline()
        pop.send(b"RETR 1\r\n")
        assert b"BODY-MARKER-4711" in pop.multiline()
        assert pop.cmd("QUIT").startswith(b"+OK")
        pop.close()
        bad = RawPop3(home.host, home.port)
        assert login(bad, "demo", "wrong").startswith(b"-ERR")
        bad.cmd("QUIT")
        bad.close()

        values = settled(port)
        _, text = scrape(port)
        assert values[("mailbag_connections_current", ())] == 0
        assert delta("mailbag_connections_total") == 3
        assert delta("mailbag_connections_refused_total") == 1
        assert delta("mailbag_logins_total", mechanism="USER", result="ok") == 1
        assert delta("mailbag_logins_total", mechanism="USER", result="failed") == 1
        for command, count in (("USER", 2), ("PASS", 2), ("STAT", 1), ("RETR", 1), ("QUIT", 2)):
            assert delta("mailbag_commands_total", command=command) == count
        assert delta("mailbag_sent_bytes_total") > len(MESSAGE)
        assert delta("mailbag_session_duration_seconds_count") == 3
        assert values[("mailbag_storage_errors_total", (("operation", "read"),))] == 0
        assert ("mailbag_deliveries_total", (("result", "delivered"),)) in values
        assert 'mailbag_info{version="' in text
    finally:
        home.stop()


def test_healthz_answers_ok_and_unknown_paths_404(tmp_path: Path) -> None:
    home, port = configured(tmp_path)
    home.start()
    try:
        status, text = scrape(port, "/healthz")
        assert status == 200
        health = json.loads(text)
        assert health["status"] == "ok" and isinstance(health["sessions"], int)
        assert scrape(port, "/nope")[0] == 404
        # A health check that cannot do its job says so: 503 while the users file is unreadable.
        (home.home / "users").rename(home.home / "users.away")
        status, text = scrape(port, "/healthz")
        assert status == 503 and json.loads(text)["status"] == "degraded"
    finally:
        home.stop()


def test_serve_json_log_lines_parse_and_hold_no_secrets(tmp_path: Path) -> None:
    home, _ = configured(tmp_path, metrics=False, json_logs=True)
    home.add_user("eve", "Pa55-very-secret")
    home.deliver(MESSAGE, user="eve")
    home.start()
    try:
        pop = RawPop3(home.host, home.port)
        assert login(pop, "eve", "Pa55-wrong-secret").startswith(b"-ERR")
        assert login(pop, "eve", "Pa55-very-secret").startswith(b"+OK")
        pop.send(b"RETR 1\r\n")
        assert b"BODY-MARKER-4711" in pop.multiline()
        assert pop.cmd("QUIT").startswith(b"+OK")
        pop.close()
        deadline = time.monotonic() + 10
        while '"logout"' not in home.log() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        home.stop()
    log = home.log()
    assert "Pa55-very-secret" not in log and "Pa55-wrong-secret" not in log
    assert "BODY-MARKER" not in log
    events = [json.loads(line) for line in log.splitlines() if line.strip()]
    by_name = {}
    for event in events:
        assert {"ts", "level", "event"} <= event.keys()
        by_name.setdefault(event["event"], []).append(event)
    failed = by_name["login-failed"][0]
    session = failed["session"]
    assert failed["user"] == "eve" and failed["peer"].startswith("127.0.0.1:")
    (connect,) = [e for e in by_name["connect"] if e["session"] == session]
    assert connect["peer"] == failed["peer"]
    ok = by_name["login"][0]
    assert ok["session"] == session and ok["user"] == "eve" and ok["mechanism"] == "USER"
    (logout,) = [e for e in by_name["logout"] if e["session"] == session]
    assert logout["user"] == "eve" and logout["peer"] == failed["peer"]
    assert logout["outcome"] == "quit" and logout["retrieved"] == 1


def test_ops_endpoint_serves_prometheus_exposition_beside_healthz() -> None:
    import asyncio

    from mailbag.config import ListenAddress
    from mailbag.server.metrics import Metrics, OpsEndpoint

    def ask(port: int, path: str, method: str = "GET",
            accept: str = "") -> tuple[int, dict[str, str], bytes]:
        request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                         headers={"Accept": accept} if accept else {})
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    async def go() -> None:
        health = {"status": "ok"}
        endpoint = OpsEndpoint(ListenAddress("127.0.0.1", 0), Metrics(),
                               lambda: (health["status"] == "ok", dict(health)))
        await endpoint.start(accept=False)  # bound, not serving yet (before a privilege drop)
        port = endpoint.port
        assert port != 0
        await endpoint.accept()
        try:
            status, headers, body = await asyncio.to_thread(ask, port, "/metrics")
            assert status == 200 and b"mailbag_connections_total 0.0" in body
            assert headers["Content-Type"].startswith("text/plain; version=")
            # prometheus-client's own exposition app: content negotiation works.
            status, headers, body = await asyncio.to_thread(
                ask, port, "/metrics", accept="application/openmetrics-text")
            assert headers["Content-Type"].startswith("application/openmetrics-text")
            assert body.endswith(b"# EOF\n")
            assert (await asyncio.to_thread(ask, port, "/metrics", "POST"))[0] == 405
            status, _, body = await asyncio.to_thread(ask, port, "/healthz", "HEAD")
            assert status == 200 and body == b""
            health["status"] = "stopping"
            status, _, body = await asyncio.to_thread(ask, port, "/healthz")
            assert status == 503 and json.loads(body) == {"status": "stopping"}
            assert (await asyncio.to_thread(ask, port, "/healthz", "POST"))[0] == 405
        finally:
            await endpoint.close()
        with pytest.raises(urllib.error.URLError):
            await asyncio.to_thread(ask, port, "/healthz")

    asyncio.run(go())
