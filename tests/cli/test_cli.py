"""The command line: init, config validation, serve errors, user admin, deliver exit codes."""

from __future__ import annotations

import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from mailbag.cli.config_template import render
from mailbag.cli.main import main
from mailbag.config import config_from_dict, load_config

MAILBAG = [sys.executable, "-m", "mailbag"]


def run(
    *args: str, stdin: bytes = b"", cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*MAILBAG, *args], input=stdin, capture_output=True, cwd=cwd,
                            check=False, timeout=60)
    return subprocess.CompletedProcess(result.args, result.returncode,
                                       result.stdout.decode(), result.stderr.decode())


def test_init_writes_commented_config_users_mail_and_cert(tmp_path: Path) -> None:
    result = run("init", str(tmp_path / "home"))
    assert result.returncode == 0, result.stderr
    home = tmp_path / "home"
    assert (home / "users").stat().st_mode & 0o777 == 0o600
    assert (home / "mail").is_dir() and (home / "tls" / "cert.pem").is_file()
    assert (home / "tls" / "key.pem").stat().st_mode & 0o777 == 0o600
    text = (home / "mailbag.toml").read_text()
    assert '"0.0.0.0:110"' in text and '"0.0.0.0:995"' in text
    config = load_config(home / "mailbag.toml")
    assert [a.port for a in config.listen] == [110, 995]


def test_init_refuses_to_overwrite(tmp_path: Path) -> None:
    assert run("init", str(tmp_path)).returncode == 0
    again = run("init", str(tmp_path))
    assert again.returncode == 2 and "already exists" in again.stderr


def test_config_template_documents_every_key_with_its_default() -> None:
    # Every key in the template must be a real setting whose value is the code's default.
    data = tomllib.loads(render(listen=("127.0.0.1:1110",), listen_tls=()))
    config = config_from_dict(data, path=Path("/etc/mailbag/mailbag.toml"))
    defaults = config_from_dict({}, path=Path("/etc/mailbag/mailbag.toml"))
    assert config.limits == defaults.limits
    assert config.auth == defaults.auth
    assert config.storage == defaults.storage
    assert config.trusted_proxies == defaults.trusted_proxies == ()
    assert config.log_level == defaults.log_level and config.log_format == defaults.log_format
    for section in ("limits", "auth", "storage"):
        documented = set(data[section])
        # storage.options is not a key: it collects a non-default backend's own keys.
        known = set(getattr(defaults, section).__dataclass_fields__) - {"options"}
        assert documented == known, section


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[limits]\nidle_timeout = 'soon'\n", "limits.idle_timeout"),
        ("[limits]\nbogus = 1\n", "limits.bogus: unknown setting"),
        ("[server]\nlisten = ['nonsense']\n", "server.listen"),
        ("[storage]\nmaildir = '/var/mail'\n", "storage.maildir"),
        ("[auth]\nplaintext_networks = ['300.1.1.1/8']\n", "auth.plaintext_networks"),
        ("[server]\ntrusted_proxies = ['10.0.0.300']\n", "server.trusted_proxies"),
        ("[server]\ntrusted_proxies = '10.0.0.1'\n", "server.trusted_proxies"),
        ("not toml [", "invalid TOML"),
        ("[wat]\n", "wat: unknown section"),
    ],
)
def test_serve_bad_config_is_one_clear_line(tmp_path: Path, content: str, message: str) -> None:
    config = tmp_path / "mailbag.toml"
    config.write_text(content)
    result = run("serve", "-c", str(config))
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_serve_missing_config_names_path(tmp_path: Path) -> None:
    result = run("serve", "-c", str(tmp_path / "nope.toml"))
    assert result.returncode == 1 and "nope.toml: config file not found" in result.stderr


def test_serve_port_in_use_is_clear_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        run("init", str(tmp_path), "--listen", f"127.0.0.1:{port}", "--listen-tls", "127.0.0.1:0")
        result = run("serve", "-c", str(tmp_path / "mailbag.toml"))
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: address already in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_serve_unwritable_mail_root_names_path(tmp_path: Path) -> None:
    run("init", str(tmp_path))
    config = tmp_path / "mailbag.toml"
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a directory")
    config.write_text(config.read_text().replace(
        'maildir = "mail/{user}/Maildir"', f'maildir = "{blocker}/sub/{{user}}"'))
    result = run("serve", "-c", str(config))
    assert result.returncode == 1
    assert "storage.maildir" in result.stderr and "blocker" in result.stderr


def test_user_add_list_passwd_del(tmp_path: Path) -> None:
    run("init", str(tmp_path))
    config = str(tmp_path / "mailbag.toml")
    assert run("user", "add", "alice", "--password-stdin", "-c", config,
               stdin=b"s3cret\n").returncode == 0
    line = (tmp_path / "users").read_text().splitlines()[0]
    assert line.startswith("alice:{ARGON2ID}$argon2id$") and "s3cret" not in line
    dup = run("user", "add", "alice", "--password-stdin", "-c", config, stdin=b"x\n")
    assert dup.returncode != 0 and "Traceback" not in dup.stderr
    listing = run("user", "list", "-c", config)
    assert listing.returncode == 0 and "alice" in listing.stdout
    assert run("user", "passwd", "alice", "--password-stdin", "-c", config,
               stdin=b"new\n").returncode == 0
    assert run("user", "del", "alice", "-c", config).returncode == 0
    assert "alice" not in run("user", "list", "-c", config).stdout


def test_user_add_rejects_path_traversal(tmp_path: Path) -> None:
    run("init", str(tmp_path))
    result = run("user", "add", "../evil", "--password-stdin", "-c",
                 str(tmp_path / "mailbag.toml"), stdin=b"x\n")
    assert result.returncode != 0 and "Traceback" not in result.stderr


def test_deliver_exit_codes(tmp_path: Path) -> None:
    run("init", str(tmp_path))
    config = str(tmp_path / "mailbag.toml")
    run("user", "add", "bob", "--password-stdin", "-c", config, stdin=b"pw\n")
    ok = run("deliver", "-c", config, "bob", stdin=b"Subject: hi\n\nbody\n")
    assert ok.returncode == 0, ok.stderr
    assert len(list((tmp_path / "mail" / "bob" / "Maildir" / "new").iterdir())) == 1
    assert run("deliver", "-c", config, "nobody", stdin=b"x\n").returncode == 67  # EX_NOUSER
    assert run("deliver", "-c", config, "bob", stdin=b"").returncode == 65  # EX_DATAERR
    broken = tmp_path / "broken.toml"
    broken.write_text("[limits]\nnope = 1\n")
    assert run("deliver", "-c", str(broken), "bob", stdin=b"x\n").returncode == 78  # EX_CONFIG


def test_help_everywhere(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--help"], ["serve", "--help"], ["user", "add", "--help"], ["deliver", "--help"],
                 ["init", "--help"], ["demo", "--help"]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 0
    assert "usage:" in capsys.readouterr().out
