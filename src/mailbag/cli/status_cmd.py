"""``mailbag status [-c FILE]``: is the server up and answering?

For monitoring systems that run a command (Nagios-style checks, systemd
``ExecStartPost``, a cron job) rather than poll HTTP: it connects to every
configured POP3 listener, expects the ``+OK`` greeting (after a TLS
handshake on implicit-TLS ports), says ``QUIT``, and asks ``/healthz`` on
the metrics address when there is one.  A wildcard listener (``0.0.0.0``,
``::``) is probed on loopback.  Exit status 0 when everything answered, 1
otherwise; one line per probe either way.
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import ssl
import time

from mailbag.cli.common import add_config_option, config_from_args
from mailbag.config import ListenAddress, parse_listen

_WILDCARDS = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``status`` command."""
    parser = subparsers.add_parser(
        "status",
        help="check that a running server answers (exit 0 if healthy)",
        description="Connect to every configured POP3 listener and the /healthz endpoint "
        "(if metrics.listen is set) and report. Exit status 0 if all answered.",
    )
    add_config_option(parser)
    parser.add_argument("--timeout", type=float, default=5.0, metavar="SECONDS",
                        help="per probe (default 5)")
    parser.set_defaults(handler=run)


def _host(address: ListenAddress) -> str:
    return _WILDCARDS.get(address.host, address.host)


def probe_pop3(address: ListenAddress, timeout: float) -> str:
    """The greeting's first words, or raise OSError/ssl.SSLError/ValueError."""
    with socket.create_connection((_host(address), address.port), timeout=timeout) as raw:
        sock: socket.socket = raw
        if address.tls:
            context = ssl.create_default_context()
            # A liveness probe, not a trust decision: the certificate may name
            # the public host name, and we connect to loopback.
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            sock = context.wrap_socket(raw, server_hostname=_host(address))
        sock.settimeout(timeout)
        greeting = sock.recv(512)
        if not greeting.startswith(b"+OK"):
            raise ValueError(f"unexpected greeting {greeting[:40]!r}")
        sock.sendall(b"QUIT\r\n")
        return greeting.split(b"\r\n", 1)[0][:60].decode("ascii", "replace")


def probe_health(listen: str, timeout: float) -> tuple[bool, str]:
    """``(healthy, summary)`` from ``GET /healthz``."""
    address = parse_listen(listen, key="metrics.listen")
    connection = http.client.HTTPConnection(_host(address), address.port, timeout=timeout)
    try:
        connection.request("GET", "/healthz")
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    try:
        details = json.loads(body)
        summary = f"{details.get('status')}, {details.get('sessions')} sessions"
    except (ValueError, AttributeError):
        summary = body[:60].decode("ascii", "replace")
    return response.status == 200, f"HTTP {response.status}: {summary}"


def run(args: argparse.Namespace) -> int:
    """Handle ``mailbag status``."""
    config = config_from_args(args)
    healthy = True
    for address in config.listen:
        kind = "pop3s" if address.tls else "pop3"
        started = time.monotonic()
        try:
            greeting = probe_pop3(address, args.timeout)
        except (OSError, ValueError) as exc:
            healthy = False
            print(f"FAIL {kind} {address}: {exc}")
        else:
            took = (time.monotonic() - started) * 1000
            print(f"ok   {kind} {address}: {greeting} ({took:.0f} ms)")
    if config.metrics.listen:
        try:
            ok, summary = probe_health(config.metrics.listen, args.timeout)
        except (OSError, http.client.HTTPException) as exc:
            ok, summary = False, str(exc)
        healthy = healthy and ok
        print(f"{'ok  ' if ok else 'FAIL'} healthz {config.metrics.listen}: {summary}")
    return 0 if healthy else 1
