"""TLS contexts for STLS (RFC 2595) and implicit TLS (RFC 8314), and test certificates.

One ``ssl.SSLContext`` lives for the life of the server (the POP3S listener holds
it); ``reload`` loads the new chain into that same object, so SIGHUP changes the
certificate for new handshakes while established sessions keep theirs.  The new
pair is first loaded into a scratch context: a bad file is reported and the live
context is never touched, so it cannot end up half-updated (new chain, old key).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
from pathlib import Path

from mailbag.errors import ConfigError


class TlsContext:
    """Owns the server's SSL context and reloads its certificate on demand."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.cert = cert
        self.key = key
        self.context = server_context()
        self.reload()

    def reload(self) -> None:
        """(Re)load certificate and key; raises ConfigError naming the file at fault.

        On error the certificate in use stays in use.
        """
        for label, path in (("tls.cert", self.cert), ("tls.key", self.key)):
            if not path.is_file():
                raise ConfigError(f"{label}: {path}: file not found")
        try:
            server_context().load_cert_chain(self.cert, self.key)  # validate first
            self.context.load_cert_chain(self.cert, self.key)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"tls.cert/tls.key: cannot load {self.cert}: {exc}") from None


def server_context() -> ssl.SSLContext:
    """A server context with the policy of RFC 8314 section 4.1 and current practice.

    TLS 1.2 is the floor (1.0 and 1.1 are deprecated by RFC 8996); with 1.2 only forward-
    secret AEAD suites are allowed; TLS 1.3 suites are OpenSSL's defaults, which are all
    AEAD.  No compression (CRIME), no TLS 1.2 renegotiation (a client could make the
    server do handshakes on demand), and the server's cipher order wins.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20")
    context.options |= (
        ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_RENEGOTIATION
    )
    return context


def write_self_signed(cert: Path, key: Path, hostname: str, *, days: int = 825) -> None:
    """Create a self-signed certificate for ``mailbag init`` (replace it for production)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    private_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    now = datetime.datetime.now(datetime.UTC)
    alt_names: list[x509.GeneralName] = [x509.DNSName(hostname), x509.DNSName("localhost")]
    alt_names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(private_key, hashes.SHA256())
    )
    key_bytes = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(key_bytes)
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
