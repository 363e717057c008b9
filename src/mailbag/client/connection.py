"""Open an authenticated POP3 session for an :class:`Account`.

The TLS policy lives here, in one place, so every command gets the same
answers: implicit TLS for ``pop3s://``, STLS whenever the server offers it
for ``pop3://``, a hard error if STLS fails, ``--require-tls`` to refuse
plaintext altogether, and a warning before a password crosses the network
in the clear (loopback excepted: tests and local servers) -- only for the
logins that send it (PLAIN, USER/PASS), not for SCRAM or APOP.
"""

from __future__ import annotations

import ipaddress
import ssl
import sys
from typing import Literal

from mailbag.client import sasl
from mailbag.client.account import Account
from mailbag.client.pop3 import POP3Client, Trace
from mailbag.errors import ConfigError


def ssl_context(ca: str | None = None, insecure: bool = False) -> ssl.SSLContext:
    """Verifying context; ``ca`` adds a trust anchor, ``insecure`` trusts anything."""
    try:
        context = ssl.create_default_context(cafile=ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load CA file {ca}: {exc}") from exc
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def open_session(
    account: Account,
    *,
    ca: str | None = None,
    insecure: bool = False,
    require_tls: bool = False,
    trace: Trace | None = None,
    timeout: float = 60.0,
    login: bool = True,
) -> POP3Client:
    """Connect (with the TLS policy above) and log in unless ``login`` is false."""
    mode: Literal["implicit", "starttls"] = "implicit" if account.tls == "implicit" else "starttls"
    client = POP3Client.connect(
        account.host, account.port, tls=mode, context=ssl_context(ca, insecure),
        timeout=timeout, trace=trace,
    )
    try:
        if not client.tls and require_tls:
            raise ConfigError(f"{account.host} does not offer STLS and --require-tls is set")
        if login:
            if account.password is None:
                raise ConfigError("no password")
            mechanism = sasl.choose(account.mechanism, client.capabilities, client.greeting,
                                    host=account.host, tls=client.tls)
            if mechanism in sasl.PLAINTEXT and not client.tls and not _is_loopback(account.host):
                print(f"mailbag: warning: {account.host} offers no TLS; "
                      f"the password is sent in the clear ({sasl.WIRE_NAMES[mechanism]})",
                      file=sys.stderr)
            client.login(account.user, account.password, account.mechanism)
    except BaseException:
        client.close()
        raise
    return client
