"""``mailbag check`` and ``mailbag status``: validate without starting; probe a running server."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from mailbag.cli.config_template import render
from mailbag.config import config_from_dict
from tests.conftest import MailbagServer, free_port, make_home

MAILBAG = [sys.executable, "-m", "mailbag"]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MAILBAG, *args], capture_output=True, text=True, timeout=60,
                          check=False)


def test_config_template_documents_process_and_metrics_defaults() -> None:
    data = tomllib.loads(render(listen=("127.0.0.1:1110",), listen_tls=()))
    config = config_from_dict(data, path=Path("/etc/mailbag/mailbag.toml"))
    defaults = config_from_dict({}, path=Path("/etc/mailbag/mailbag.toml"))
    assert config.process == defaults.process and config.metrics == defaults.metrics
    for section in ("process", "metrics"):
        assert set(data[section]) == set(getattr(defaults, section).__dataclass_fields__)


def test_check_good_config_is_ok(mailbag_home: MailbagServer) -> None:
    result = run("check", "-c", str(mailbag_home.config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "users: " in result.stdout and "(1 accounts)" in result.stdout
    assert "tls: " in result.stdout and "valid until" in result.stdout
    assert result.stdout.rstrip().endswith("OK")


def test_check_bad_value_names_the_key(mailbag_home: MailbagServer) -> None:
    text = mailbag_home.config.read_text().replace("max_errors = 10", "max_errors = -1")
    mailbag_home.config.write_text(text)
    result = run("check", "-c", str(mailbag_home.config))
    assert result.returncode == 1
    assert "limits.max_errors" in result.stderr


def test_check_missing_certificate_and_unknown_user_fail(mailbag_home: MailbagServer) -> None:
    (mailbag_home.home / "tls" / "key.pem").unlink()
    text = mailbag_home.config.read_text().replace('user = ""', 'user = "no-such-mailbag-user"')
    mailbag_home.config.write_text(text)
    result = run("check", "-c", str(mailbag_home.config))
    assert result.returncode == 1
    assert "FAIL tls.key:" in result.stdout
    assert "FAIL process.user: no such user" in result.stdout
    assert result.stdout.rstrip().endswith("FAILED")


def test_status_running_server_ok_and_stopped_server_fails(tmp_path: Path) -> None:
    home = make_home(tmp_path / "home")
    port = free_port()
    text = home.config.read_text().replace('listen = ""', f'listen = "127.0.0.1:{port}"', 1)
    home.config.write_text(text)
    home.start()
    try:
        result = run("status", "-c", str(home.config))
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"ok   pop3 127.0.0.1:{home.port}: +OK" in result.stdout
        assert f"ok   pop3s 127.0.0.1:{home.tls_port}: +OK" in result.stdout
        assert "ok   healthz" in result.stdout and "HTTP 200: ok" in result.stdout
    finally:
        home.stop()
    result = run("status", "-c", str(home.config), "--timeout", "1")
    assert result.returncode == 1
    assert f"FAIL pop3 127.0.0.1:{home.port}" in result.stdout


def test_packaging_sample_config_and_unit_are_consistent() -> None:
    root = Path(__file__).resolve().parents[2] / "packaging"
    config = config_from_dict(tomllib.loads((root / "mailbag.toml").read_text()),
                              path=Path("/etc/mailbag/mailbag.toml"))
    assert config.process.user == "mailbag" and not config.process.allow_root
    assert config.metrics.listen.startswith("127.0.0.1:")
    assert [a.port for a in config.listen] == [110, 110, 995, 995]
    unit = (root / "mailbag.service").read_text()
    for setting in ("User=mailbag", "NoNewPrivileges=yes", "ProtectSystem=strict",
                    "CapabilityBoundingSet=CAP_NET_BIND_SERVICE", "ExecReload=/bin/kill -HUP"):
        assert setting in unit
