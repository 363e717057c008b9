"""The SCRAM-SHA-256 server mechanism as pure bytes in, steps out (RFC 5802, RFC 7677).

The client side is ``scramp``'s, an independent implementation, so these tests check
interoperability and not just agreement with ourselves.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
import scramp  # type: ignore[import-untyped]
from hypothesis import given, settings
from hypothesis import strategies as st

from mailbag.auth.scram import ScramSecrets, make_scram_secrets, salted_password
from mailbag.errors import AuthError
from mailbag.session.sasl import (
    Challenge,
    Failure,
    ScramSha256Server,
    Success,
    decoy_secrets,
    new_mechanism,
)

USERS: dict[str, ScramSecrets | None] = {
    "demo": make_scram_secrets("demo"),
    "jürgen": make_scram_secrets("pässwörd"),
    "legacy": None,  # a user whose entry has no SCRAM keys
}


def lookup(login: str) -> tuple[str, ScramSecrets | None] | None:
    name = login.lower()
    return (name, USERS[name]) if name in USERS else None


def exchange(
    user: str, password: str
) -> tuple[ScramSha256Server, scramp.ScramClient, Challenge | Success | Failure]:
    """Run the exchange with scramp's client up to the verdict on the client-final message."""
    server = ScramSha256Server(lookup)
    client = scramp.ScramClient(["SCRAM-SHA-256"], user, password)
    step = server.start(client.get_client_first().encode())
    assert isinstance(step, Challenge)
    client.set_server_first(step.data.decode())
    return server, client, server.step(client.get_client_final().encode())


def manual_exchange(user: str, password: str, authzid: str) -> Challenge | Success | Failure:
    """The client side by hand (scramp has no authzid), straight from RFC 5802 section 3."""
    server = ScramSha256Server(lookup)
    gs2 = f"n,a={authzid},"
    bare = f"n={user},r=clientnonce"
    step = server.start((gs2 + bare).encode())
    assert isinstance(step, Challenge)
    server_first = step.data.decode()
    attrs = dict(a.split("=", 1) for a in server_first.split(","))
    salted = salted_password(password, base64.b64decode(attrs["s"]), int(attrs["i"]))
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    without_proof = f"c={base64.b64encode(gs2.encode()).decode()},r={attrs['r']}"
    auth_message = f"{bare},{server_first},{without_proof}".encode()
    signature = hmac.new(stored_key, auth_message, hashlib.sha256).digest()
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    return server.step(f"{without_proof},p={base64.b64encode(proof).decode()}".encode())


def test_auth_scram_success_then_empty_response() -> None:
    # RFC 5034 section 4: server-final travels as a challenge; the empty answer ends it.
    server, client, step = exchange("demo", "demo")
    assert isinstance(step, Success) and step.final is not None
    assert (step.user, step.login) == ("demo", "demo")
    client.set_server_final(step.final.decode())  # scramp verifies ServerSignature
    done = server.step(b"")
    assert done == Success("demo", "demo", None)


def test_auth_scram_utf8_user_and_password_saslprep() -> None:
    # RFC 5802 section 5.1: names and passwords are UTF-8, prepared with SASLprep.
    _, client, step = exchange("jürgen", "pässwörd")
    assert isinstance(step, Success) and step.final is not None
    client.set_server_final(step.final.decode())


def test_auth_scram_wrong_password_fails() -> None:
    _, _, step = exchange("demo", "wrong")
    assert step == Failure("wrong password", "demo")


def test_auth_scram_unknown_user_fails_like_wrong_password() -> None:
    # The server-first message for an unknown user looks real (stable decoy salt) ...
    server = ScramSha256Server(lookup)
    first = scramp.ScramClient(["SCRAM-SHA-256"], "nobody", "x").get_client_first()
    again = scramp.ScramClient(["SCRAM-SHA-256"], "nobody", "x").get_client_first()
    one = server.start(first.encode())
    two = ScramSha256Server(lookup).start(again.encode())
    assert isinstance(one, Challenge) and isinstance(two, Challenge)
    assert one.data.split(b",")[1:] == two.data.split(b",")[1:]  # same s= and i=
    assert b",i=4096" in one.data
    # ... and the exchange fails only at the proof.
    _, _, step = exchange("nobody", "x")
    assert step == Failure("unknown user", "nobody")


def test_auth_scram_user_without_keys_fails() -> None:
    _, _, step = exchange("legacy", "whatever")
    assert step == Failure("no SCRAM secret stored", "legacy")


def test_auth_scram_authzid_self_allowed_other_refused() -> None:
    # RFC 5802 section 5.1 a=: only acting as oneself is allowed (no proxy authorization).
    assert isinstance(manual_exchange("demo", "demo", authzid="demo"), Success)
    assert manual_exchange("demo", "wrong", authzid="demo") == Failure("wrong password", "demo")
    refused = manual_exchange("demo", "demo", authzid="jürgen")
    assert refused == Failure("authorization identity not allowed", "demo")


def test_auth_scram_no_initial_response_gets_empty_challenge() -> None:
    # RFC 5034 section 4: without an initial response the server sends an empty challenge.
    server = ScramSha256Server(lookup)
    assert server.start(None) == Challenge(b"")
    client = scramp.ScramClient(["SCRAM-SHA-256"], "demo", "demo")
    assert isinstance(server.step(client.get_client_first().encode()), Challenge)


@pytest.mark.parametrize(
    ("first", "reason"),
    [
        (b"p=tls-unique,,n=demo,r=abc", "channel binding requested but not offered"),
        (b"x,,n=demo,r=abc", "malformed gs2 channel-binding flag"),
        (b"n,,m=ext,n=demo,r=abc", "unsupported mandatory extension"),
        (b"n,,n=demo", "malformed client-first message"),
        (b"n,,n=,r=abc", "malformed client-first message"),
        (b"n,,n=demo,r=a,b", "malformed extension attribute"),
        (b"n,,n=demo,r=a\x7fb", "malformed client-first message"),
        (b"n,,n=de=2Xmo,r=abc", "malformed saslname"),
        (b"n,x,n=demo,r=abc", "malformed authzid"),
        (b"\xff\xfe", "SCRAM message is not UTF-8"),
        (b"", "malformed client-first message"),
    ],
)
def test_auth_scram_malformed_client_first_fails(first: bytes, reason: str) -> None:
    # RFC 5802 section 7 grammar; "p=" because we do not offer SCRAM-SHA-256-PLUS (section 6).
    assert ScramSha256Server(lookup).start(first) == Failure(reason, "")


def test_auth_scram_y_flag_accepted_without_channel_binding() -> None:
    # RFC 5802 section 6: "y" means the client could bind but thinks we cannot: fine.
    server = ScramSha256Server(lookup)
    assert isinstance(server.start(b"y,,n=demo,r=abcdef"), Challenge)


def _server_after_first() -> tuple[ScramSha256Server, scramp.ScramClient]:
    server = ScramSha256Server(lookup)
    client = scramp.ScramClient(["SCRAM-SHA-256"], "demo", "demo")
    step = server.start(client.get_client_first().encode())
    assert isinstance(step, Challenge)
    client.set_server_first(step.data.decode())
    return server, client


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (lambda f: f.replace("c=biws", "c=eSws"), "channel binding data does not match"),
        (lambda f: f.replace(",r=", ",r=X"), "nonce does not match"),
        (lambda f: f.rsplit(",p=", 1)[0], "malformed client-final message"),
        (lambda f: f.rsplit(",p=", 1)[0] + ",p=!!!", "malformed client proof"),
        (lambda f: f.rsplit(",p=", 1)[0] + ",p=" + base64.b64encode(b"short").decode(),
         "wrong password"),
        (lambda f: "r=x,c=biws,p=AAAA", "malformed client-final message"),
    ],
)
def test_auth_scram_tampered_client_final_fails(mangle: object, reason: str) -> None:
    server, client = _server_after_first()
    final = mangle(client.get_client_final())  # type: ignore[operator]
    assert server.step(final.encode()) == Failure(reason, "demo")


def test_auth_scram_data_after_server_final_fails() -> None:
    server, _, step = exchange("demo", "demo")
    assert isinstance(step, Success)
    assert server.step(b"v=bogus") == Failure("unexpected data after server-final message", "demo")


def test_auth_scram_steps_after_end_fail() -> None:
    server, _, _ = exchange("demo", "wrong")
    assert server.step(b"") == Failure("exchange already finished", "demo")


def test_auth_scram_users_database_error_propagates() -> None:
    # The driver turns this into -ERR [SYS/TEMP], not an authentication failure.
    def broken(login: str) -> tuple[str, ScramSecrets | None] | None:
        raise AuthError("users file unreadable")

    with pytest.raises(AuthError):
        ScramSha256Server(broken).start(b"n,,n=demo,r=abcdef")


def test_auth_new_mechanism_by_name() -> None:
    assert isinstance(new_mechanism("SCRAM-SHA-256", lookup), ScramSha256Server)
    assert new_mechanism("CRAM-MD5", lookup) is None


def test_auth_scram_repr_and_decoys_hide_secrets() -> None:
    server, _, _ = exchange("demo", "demo")
    assert "demo" in repr(server) and "key" not in repr(server).lower()
    assert decoy_secrets("x") == decoy_secrets("x") != decoy_secrets("y")
    assert "hidden" in repr(decoy_secrets("x"))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=200), min_size=1, max_size=4))
def test_auth_scram_arbitrary_bytes_never_raise(messages: list[bytes]) -> None:
    # Whatever a client sends, the mechanism answers with a step, never an exception.
    server = ScramSha256Server(lookup)
    step = server.start(messages[0])
    for data in messages[1:]:
        assert isinstance(step, Challenge | Success | Failure)
        step = server.step(data)
    assert isinstance(step, Challenge | Success | Failure)
