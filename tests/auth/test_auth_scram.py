"""SCRAM-SHA-256 secrets and helpers: RFC 7677 vector, agreement with scramp, SASLprep."""

from __future__ import annotations

import base64

import pytest
import scramp  # type: ignore[import-untyped]
from scramp.core import saslprep as scramp_saslprep  # type: ignore[import-untyped]

from mailbag.auth.schemes import verify_password
from mailbag.auth.scram import (
    SASLprepError,
    ScramSecrets,
    client_proof_matches,
    decode_saslname,
    encode_saslname,
    make_scram_secrets,
    new_nonce,
    saslprep,
    server_signature,
)
from mailbag.errors import AuthError

# RFC 7677 section 3.
RFC7677_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC7677_AUTH_MESSAGE = (
    b"n=user,r=rOprNGfwEbeRWgbNEkqO,"
    b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,"
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
)
RFC7677_PROOF = base64.b64decode("dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
RFC7677_SERVER_SIGNATURE = base64.b64decode("6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=")


def test_make_scram_secrets_rfc7677_vector() -> None:
    secrets = make_scram_secrets("pencil", salt=RFC7677_SALT)
    assert client_proof_matches(secrets, RFC7677_AUTH_MESSAGE, RFC7677_PROOF)
    assert server_signature(secrets, RFC7677_AUTH_MESSAGE) == RFC7677_SERVER_SIGNATURE


def test_client_proof_matches_wrong_proof_or_message() -> None:
    secrets = make_scram_secrets("pencil", salt=RFC7677_SALT)
    bad = bytes([RFC7677_PROOF[0] ^ 1]) + RFC7677_PROOF[1:]
    assert not client_proof_matches(secrets, RFC7677_AUTH_MESSAGE, bad)
    assert not client_proof_matches(secrets, RFC7677_AUTH_MESSAGE + b"x", RFC7677_PROOF)
    assert not client_proof_matches(secrets, RFC7677_AUTH_MESSAGE, RFC7677_PROOF[:-1])


@pytest.mark.parametrize("password", ["pencil", "pässwörd", "I\u00adX", "\u2168", "a b"])
@pytest.mark.parametrize("iterations", [4096, 5000])
def test_make_scram_secrets_agrees_with_scramp(password: str, iterations: int) -> None:
    salt = b"0123456789abcdef"
    ours = make_scram_secrets(password, iterations=iterations, salt=salt)
    mech = scramp.ScramMechanism("SCRAM-SHA-256")
    salt_, stored_key, server_key, i = mech.make_auth_info(password, iterations, salt)
    assert (ours.salt, ours.stored_key, ours.server_key, ours.iterations) == (
        salt_,
        stored_key,
        server_key,
        i,
    )


def test_scram_helpers_complete_exchange_with_scramp_client() -> None:
    secrets = make_scram_secrets("pencil")
    client = scramp.ScramClient(["SCRAM-SHA-256"], "user", "pencil")
    client_first = client.get_client_first()
    gs2, _, client_first_bare = client_first.partition(",,")
    assert gs2 == "n"
    client_nonce = dict(p.split("=", 1) for p in client_first_bare.split(","))["r"]
    salt_b64 = base64.b64encode(secrets.salt).decode()
    server_first = f"r={client_nonce}{new_nonce()},s={salt_b64},i={secrets.iterations}"
    client.set_server_first(server_first)
    client_final = client.get_client_final()
    without_proof, _, proof = client_final.rpartition(",p=")
    auth_message = f"{client_first_bare},{server_first},{without_proof}".encode()
    assert client_proof_matches(secrets, auth_message, base64.b64decode(proof))
    verifier = base64.b64encode(server_signature(secrets, auth_message)).decode()
    client.set_server_final(f"v={verifier}")  # raises if our signature were wrong


def test_scram_secrets_field_round_trip() -> None:
    secrets = make_scram_secrets("pencil", salt=RFC7677_SALT)
    field = secrets.to_field()
    assert field.startswith("{SCRAM-SHA-256}4096,W22ZaJ0SNY7soEsUEjb6gQ==,")
    assert ScramSecrets.from_field(field) == secrets
    assert ScramSecrets.from_field(field.split("}", 1)[1]) == secrets
    assert verify_password("pencil", field)
    assert not verify_password("pencil!", field)


@pytest.mark.parametrize(
    "field",
    [
        "",
        "{SCRAM-SHA-1}4096,a,b,c",
        "4096,abc",
        "x,AAAA,AAAA,AAAA",
        "4096,!!!!,AAAA,AAAA",
        "4096,AAAA,AAAA,AAAA",  # keys of the wrong length
        "0,AAAA," + base64.b64encode(b"k" * 32).decode() * 2,
    ],
)
def test_scram_secrets_from_field_malformed_raises_auth_error(field: str) -> None:
    with pytest.raises(AuthError):
        ScramSecrets.from_field(field)


def test_scram_secrets_repr_hides_keys() -> None:
    secrets = make_scram_secrets("pencil", salt=RFC7677_SALT)
    text = repr(secrets)
    assert "hidden" in text
    for secret in (secrets.stored_key, secrets.server_key):
        assert repr(secret) not in text
        assert base64.b64encode(secret).decode() not in text
        assert secret.hex() not in text


def test_make_scram_secrets_too_few_iterations_refused() -> None:
    with pytest.raises(ValueError, match="4096"):
        make_scram_secrets("x", iterations=1000)


def test_make_scram_secrets_random_salt() -> None:
    assert make_scram_secrets("x").salt != make_scram_secrets("x").salt


# RFC 4013 section 3 examples.
@pytest.mark.parametrize(
    "given,expected",
    [("I\u00adX", "IX"), ("user", "user"), ("USER", "USER"), ("\u00aa", "a"), ("\u2168", "IX")],
)
def test_saslprep_rfc4013_examples(given: str, expected: str) -> None:
    assert saslprep(given) == expected


@pytest.mark.parametrize("given", ["\u0007", "\u0627\u0031", "a\u0000b", "\ue000", "a\u200eb"])
def test_saslprep_prohibited_raises(given: str) -> None:
    with pytest.raises(SASLprepError):
        saslprep(given)


def test_saslprep_is_value_error_and_auth_error() -> None:
    with pytest.raises(ValueError):
        saslprep("\u0007")
    with pytest.raises(AuthError):
        saslprep("\u0007")


def test_saslprep_unassigned_only_for_queries() -> None:
    unassigned = "\u0221"  # unassigned in Unicode 3.2 (RFC 3454 table A.1)
    with pytest.raises(SASLprepError):
        saslprep(unassigned)
    assert saslprep(unassigned, allow_unassigned=True) == unassigned


@pytest.mark.parametrize(
    "given",
    ["pencil", "a\u00a0b", "\u00c5ngstr\u00f6m", "A\u030a", "\ufb01", "\u0627\u0628", "x\u200by"],
)
def test_saslprep_agrees_with_scramp(given: str) -> None:
    assert saslprep(given) == scramp_saslprep(given)


def test_saslprep_maps_non_ascii_space_to_space() -> None:
    assert saslprep("a\u3000b\u2003c") == "a b c"


@pytest.mark.parametrize("name", ["user", "a,b", "a=b", "=2C,=3D", ""])
def test_saslname_round_trip(name: str) -> None:
    assert decode_saslname(encode_saslname(name)) == name
    assert "," not in encode_saslname(name)


@pytest.mark.parametrize("value", ["a,b", "a=2c", "a=", "a=4A"])
def test_decode_saslname_bad_escape_raises(value: str) -> None:
    with pytest.raises(SASLprepError):
        decode_saslname(value)


def test_new_nonce_printable_without_comma() -> None:
    nonce = new_nonce()
    assert len(nonce) >= 24 and "," not in nonce and nonce.isprintable()
    assert nonce != new_nonce()
