"""Gateway identities: an Ed25519 key and the self-signed certificate made from it.

The certificate is the public half, shared like an SSH public key; humans compare
fingerprints (``SHA256:...``, OpenSSH style). The fingerprint is computed over the
public key, not the certificate, so the ``.key`` and the ``.crt`` give the same answer
and a re-issued certificate for the same key keeps its fingerprint.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import os
import shlex
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes as PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gateway.errors import IdentityError

# Long enough that nobody is paged by an expiry; rotation is by re-keying, not renewal.
VALIDITY = datetime.timedelta(days=3650)
# Tolerates clocks a little behind ours on the peer.
BACKDATE = datetime.timedelta(minutes=5)

FINGERPRINT_PREFIX = "SHA256:"


@dataclass(frozen=True)
class Identity:
    """A loaded identity: where its files are, its certificate and its fingerprint."""

    name: str
    key_path: Path
    cert_path: Path
    cert: x509.Certificate
    fingerprint: str


def generate_identity(name: str) -> tuple[bytes, bytes]:
    """Make a new key and its self-signed certificate; returns (key PEM, cert PEM).

    The certificate is an end-entity (CA=False) with digitalSignature usage and both
    TLS purposes: OpenSSL accepts such a self-signed leaf as its own trust anchor
    when it is loaded with ``load_verify_locations`` (checked in tests/test_identity.py).
    """
    key = ed25519.Ed25519PrivateKey.generate()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, None)
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return key_pem, cert.public_bytes(serialization.Encoding.PEM)


def identity_paths(path_prefix: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``dir/NAME`` -> (``dir/NAME.key``, ``dir/NAME.crt``)."""
    prefix = Path(path_prefix)
    if prefix.suffix in (".key", ".crt"):
        prefix = prefix.with_suffix("")
    return prefix.with_name(prefix.name + ".key"), prefix.with_name(prefix.name + ".crt")


def write_identity(path_prefix: str | os.PathLike[str]) -> Identity:
    """Generate an identity named after the prefix's last part and write both files.

    The key file is created with mode 0600 (never world-readable, not even briefly)
    and neither file is ever overwritten: losing a key silently is worse than an error.
    """
    key_path, cert_path = identity_paths(path_prefix)
    name = key_path.stem
    for path in (key_path, cert_path):
        if path.exists():
            raise IdentityError(f"{path}: already exists, refusing to overwrite it")
    key_pem, cert_pem = generate_identity(name)
    _write_new(key_path, key_pem, 0o600)
    try:
        _write_new(cert_path, cert_pem, 0o644)
    except BaseException:
        key_path.unlink()
        raise
    return load_identity(key_path)


def _write_new(path: Path, data: bytes, mode: int) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except FileExistsError:
        raise IdentityError(f"{path}: already exists, refusing to overwrite it") from None
    except OSError as exc:
        raise IdentityError(f"{path}: cannot create: {exc.strerror}") from exc
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def fingerprint_of_public_key(public: PublicKey) -> str:
    """OpenSSH-style ``SHA256:`` + unpadded base64 of sha256 over the DER SubjectPublicKeyInfo."""
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    digest = hashlib.sha256(der).digest()
    return FINGERPRINT_PREFIX + base64.b64encode(digest).decode("ascii").rstrip("=")


def fingerprint_of_cert(cert: x509.Certificate) -> str:
    """Fingerprint of the certificate's public key (any key type, not only Ed25519)."""
    return fingerprint_of_public_key(cert.public_key())


def fingerprint_of_der_cert(der: bytes) -> str:
    """Fingerprint of a DER certificate, as ``getpeercert(binary_form=True)`` returns it."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise IdentityError(f"peer certificate is not valid DER X.509: {exc}") from exc
    return fingerprint_of_cert(cert)


def fingerprint_of_file(path: str | os.PathLike[str]) -> str:
    """Fingerprint of a PEM certificate or PEM Ed25519 private key, whichever the file holds."""
    data = _read(Path(path))
    if b"-----BEGIN CERTIFICATE-----" in data:
        return fingerprint_of_cert(load_cert(Path(path), data))
    if b"PRIVATE KEY-----" in data:
        return fingerprint_of_public_key(load_private_key(Path(path), data).public_key())
    raise IdentityError(f"{path}: neither a PEM certificate nor a PEM private key")


def load_cert(path: Path, data: bytes | None = None) -> x509.Certificate:
    """Read one PEM certificate, translating every failure into IdentityError."""
    if data is None:
        data = _read(path)
    try:
        return x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise IdentityError(f"{path}: not a PEM certificate: {exc}") from exc


def load_private_key(path: Path, data: bytes | None = None) -> ed25519.Ed25519PrivateKey:
    """Read an unencrypted PEM private key and insist that it is Ed25519."""
    if data is None:
        data = _read(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:  # encrypted key, no password given
        raise IdentityError(f"{path}: encrypted private keys are not supported") from exc
    except ValueError as exc:
        raise IdentityError(f"{path}: not a PEM private key: {exc}") from exc
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise IdentityError(
            f"{path}: expected an Ed25519 private key, got {type(key).__name__}"
            " (make one with `tunnelgate keygen NAME`)"
        )
    return key


def load_identity(key_path: str | os.PathLike[str]) -> Identity:
    """Load ``NAME.key`` (which only its owner may read) and the ``NAME.crt`` beside it, and
    check that they belong together."""
    key_path = Path(key_path)
    cert_path = key_path.with_suffix(".crt")
    if key_path.suffix != ".key":
        raise IdentityError(f"{key_path}: expected a key file named NAME.key")
    _refuse_unprotected(key_path)
    key = load_private_key(key_path)
    cert = load_cert(cert_path)
    fingerprint = fingerprint_of_cert(cert)
    if fingerprint != fingerprint_of_public_key(key.public_key()):
        raise IdentityError(
            f"{cert_path}: certificate does not match the key {key_path.name}"
            f" (certificate key is {fingerprint},"
            f" private key is {fingerprint_of_public_key(key.public_key())})"
        )
    return Identity(
        name=key_path.stem,
        key_path=key_path,
        cert_path=cert_path,
        cert=cert,
        fingerprint=fingerprint,
    )


def _refuse_unprotected(key_path: Path) -> None:
    """Refuse a private key others may read (it may be copied already) or write (it may be
    swapped), as ssh does; the message says how to fix it."""
    if os.name != "posix":
        return
    try:
        mode = stat.S_IMODE(key_path.stat().st_mode)
    except OSError:
        return  # reading it says what is wrong
    if mode & 0o066:
        can = " and ".join(w for w, bits in (("readable", 0o044), ("writable", 0o022)) if mode & bits)
        by = " and ".join(w for w, bits in (("group", 0o060), ("others", 0o006)) if mode & bits)
        raise IdentityError(
            f"{key_path} is {can} by {by} (mode {mode:04o}); run chmod 600 {shlex.quote(str(key_path))}"
        )


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise IdentityError(f"{path}: no such file") from None
    except OSError as exc:
        raise IdentityError(f"{path}: cannot read: {exc.strerror}") from exc
