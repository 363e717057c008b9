"""What the server offers, and the CAPA response that announces it (RFC 2449).

Kept apart from the state machine because the answer depends on the
connection (encrypted or not, plaintext allowed from this address or not,
logged in or not) and the rule "announce only what really works" is easiest
to check in one small pure function.
"""

from __future__ import annotations

from dataclasses import dataclass

#: SASL mechanisms that send the password itself; offered only where plaintext is allowed.
PLAINTEXT_MECHANISMS = frozenset({"PLAIN", "LOGIN"})


@dataclass(frozen=True, slots=True)
class Pop3Policy:
    """Server-wide protocol settings (from the config; identical for every connection)."""

    implementation: str = "mailbag"
    #: RFC 2449 section 4: command lines are at most 255 octets, including CRLF.
    max_command_line: int = 255
    #: SASL continuation lines carry tokens far longer than 255 octets (OAuth).
    max_sasl_line: int = 16384
    #: Consecutive errors after which the connection is closed.
    max_errors: int = 10
    #: Failed logins on one connection after which it is closed.
    max_auth_failures: int = 3
    sasl_mechanisms: tuple[str, ...] = ("PLAIN",)
    stls: bool = False
    apop: bool = True
    utf8: bool = True
    #: EXPIRE value (RFC 2449 section 6.7): "NEVER" or days; honest by default.
    expire: str = "NEVER"
    #: LOGIN-DELAY in seconds (RFC 2449 section 6.8); 0 means no policy, not announced.
    login_delay: int = 0
    #: Extra text for CAPA; hidden details such as versions stay out.
    #: RFC 6856 LANG: languages for response texts (first = default); () disables LANG.
    languages: tuple[str, ...] = ("en", "zh-CN")


def capability_lines(
    policy: Pop3Policy,
    *,
    authenticated: bool,
    secure: bool,
    plaintext_allowed: bool,
) -> list[str]:
    """Return CAPA lines for the connection's current situation."""
    lines = ["TOP"]
    if plaintext_allowed:
        lines.append("USER")
    lines += ["UIDL", "RESP-CODES", "AUTH-RESP-CODE", "PIPELINING"]
    mechanisms = offered_mechanisms(policy, plaintext_allowed=plaintext_allowed)
    if mechanisms:
        lines.append("SASL " + " ".join(mechanisms))
    if policy.stls and not secure and not authenticated:
        lines.append("STLS")
    lines.append(f"EXPIRE {policy.expire}")
    if policy.login_delay > 0:
        lines.append(f"LOGIN-DELAY {policy.login_delay}")
    if policy.utf8:
        lines.append("UTF8 USER" if plaintext_allowed else "UTF8")
    if policy.languages:
        lines.append("LANG")
    lines.append(f"IMPLEMENTATION {policy.implementation}")
    return lines


def offered_mechanisms(policy: Pop3Policy, *, plaintext_allowed: bool) -> list[str]:
    """SASL mechanisms usable on this connection right now."""
    return [
        m
        for m in policy.sasl_mechanisms
        if plaintext_allowed or m.upper() not in PLAINTEXT_MECHANISMS
    ]
