"""Which server, which user, which password: RFC 2384 URLs and secret sources.

An account is named by a URL, ``pop3://user@host:port`` (TLS upgraded with
STLS when offered) or ``pop3s://user@host`` (implicit TLS, RFC 8314), as
RFC 2384 describes for ``pop://`` (accepted too, with ``;AUTH=SCRAM-SHA-256``,
``;AUTH=PLAIN``, ``;AUTH=+APOP`` or ``;AUTH=+USER`` to pick a mechanism).
Many providers want the whole address as the user name;
``pop3://me@163.com@pop.163.com`` works (the last ``@`` separates the host)
and so does ``me%40163.com``.

The password is deliberately *not* accepted in the URL: a command line is
visible to every user of the machine (``ps``) and stays in shell history.
It comes from ``MAILBAG_PASSWORD``, then ``~/.netrc`` (``machine`` = host,
``login`` = user), then a no-echo prompt when a terminal is attached.
"""

from __future__ import annotations

import getpass
import netrc
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

from mailbag.errors import ConfigError

DEFAULT_PORTS = {"starttls": 110, "implicit": 995}
_SCHEMES = {"pop": "starttls", "pop3": "starttls", "pops": "implicit", "pop3s": "implicit"}
#: RFC 2384 ``;AUTH=`` values: ``*`` any, ``+USER``/``+APOP`` the POP3 commands, else SASL.
_AUTH = {"*": "auto", "+user": "user", "+apop": "apop", "plain": "plain",
         "scram-sha-256": "scram-sha-256"}
PASSWORD_ENV = "MAILBAG_PASSWORD"
ACCOUNT_ENV = "MAILBAG_ACCOUNT"


@dataclass(frozen=True, slots=True)
class Account:
    """Parsed account URL; the password is fetched separately and never shown."""

    user: str
    host: str
    port: int
    tls: str  # "implicit" or "starttls"
    mechanism: str = "auto"
    password: str | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        """``user@host:port`` for messages and state-file names (no secret)."""
        return f"{self.user}@{self.host}:{self.port}"

    def with_password(self, password: str) -> Account:
        """A copy carrying the password."""
        return Account(self.user, self.host, self.port, self.tls, self.mechanism, password)

    def with_mechanism(self, mechanism: str) -> Account:
        """A copy with another login method (``--auth``)."""
        return Account(self.user, self.host, self.port, self.tls, mechanism, self.password)


def parse_url(url: str) -> Account:
    """Parse ``pop3[s]://user[;AUTH=mech]@host[:port]`` into an :class:`Account`."""
    scheme, sep, rest = url.partition("://")
    tls = _SCHEMES.get(scheme.lower())
    if not sep or tls is None:
        raise ConfigError(f"account URL must start with pop3:// or pop3s://, got {url!r}")
    rest = rest.rstrip("/")
    userinfo, at, hostport = rest.rpartition("@")
    if not at or not userinfo:
        raise ConfigError(f"account URL needs a user name: pop3://USER@{rest or 'HOST'}")
    user, _, params = userinfo.partition(";")
    if ":" in user:
        raise ConfigError(
            "do not put the password in the URL (it would show in `ps` and shell history); "
            f"use ${PASSWORD_ENV}, ~/.netrc or the prompt"
        )
    mechanism = "auto"
    if params:
        key, _, value = params.partition("=")
        if key.lower() != "auth" or value.lower() not in _AUTH:
            raise ConfigError(
                f"unsupported URL parameter {params!r} (use ;AUTH=SCRAM-SHA-256, ;AUTH=PLAIN, "
                ";AUTH=+APOP or ;AUTH=+USER)")
        mechanism = _AUTH[value.lower()]
    host, port = _split_host(hostport)
    if not host:
        raise ConfigError(f"account URL has no host: {url!r}")
    return Account(unquote(user), host, port or DEFAULT_PORTS[tls], tls, mechanism)


def _split_host(hostport: str) -> tuple[str, int | None]:
    if hostport.startswith("["):  # IPv6 literal
        host, _, tail = hostport[1:].partition("]")
        port_text = tail.removeprefix(":")
    else:
        host, _, port_text = hostport.partition(":")
    if not port_text:
        return host, None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"bad port {port_text!r}")
    return host, int(port_text)


def netrc_password(account: Account, path: Path | None = None) -> str | None:
    """The password for (host, user) from ``~/.netrc``, if there is one."""
    path = path or Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    if not path.is_file():
        return None
    try:
        entries = netrc.netrc(str(path))
    except (netrc.NetrcParseError, OSError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    auth = entries.authenticators(account.host)
    if auth is None:
        return None
    login, _acct, password = auth
    if login and login != account.user:
        return None
    return password or None


def resolve_password(account: Account, *, prompt: bool = True) -> Account:
    """Attach the password from env, netrc or a no-echo prompt; error if none."""
    if account.password is not None:
        return account
    secret = os.environ.get(PASSWORD_ENV) or netrc_password(account)
    if secret is None and prompt and sys.stdin.isatty():
        secret = getpass.getpass(f"Password for {account.user}@{account.host}: ")
    if not secret:
        raise ConfigError(
            f"no password for {account.label}: set ${PASSWORD_ENV}, add it to ~/.netrc "
            "or run from a terminal to be prompted"
        )
    return account.with_password(secret)
