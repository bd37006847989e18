"""Identities on disk and the mutual-TLS handshakes they must make work."""

from __future__ import annotations

import datetime
import ssl
import stat
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from cryptography.x509.oid import NameOID

from gateway.errors import IdentityError
from gateway.security.identity import (
    Identity,
    fingerprint_of_cert,
    fingerprint_of_file,
    generate_identity,
    load_identity,
    write_identity,
)
from gateway.security.tls import (
    client_context,
    describe_tls_failure,
    identify_peer,
    peer_fingerprint,
    server_context,
)


def test_keygen_writes_private_key_0600_and_refuses_to_overwrite(tmp_path: Path) -> None:
    ident = write_identity(tmp_path / "hub")
    assert ident.key_path == tmp_path / "hub.key"
    assert ident.cert_path == tmp_path / "hub.crt"
    assert stat.S_IMODE(ident.key_path.stat().st_mode) == 0o600
    key_before = ident.key_path.read_bytes()
    with pytest.raises(IdentityError, match="already exists"):
        write_identity(tmp_path / "hub")
    assert ident.key_path.read_bytes() == key_before


def test_key_is_created_0600_even_under_a_permissive_umask(tmp_path: Path) -> None:
    import os

    old = os.umask(0)
    try:
        ident = write_identity(tmp_path / "edge")
    finally:
        os.umask(old)
    assert stat.S_IMODE(ident.key_path.stat().st_mode) == 0o600


def test_fingerprint_of_key_and_cert_agree_and_are_stable(tmp_path: Path) -> None:
    ident = write_identity(tmp_path / "hub")
    fp = fingerprint_of_file(ident.cert_path)
    assert fp == fingerprint_of_file(ident.key_path) == ident.fingerprint
    assert fp == fingerprint_of_file(ident.cert_path)
    assert fp.startswith("SHA256:") and len(fp) == 7 + 43 and "=" not in fp
    other = write_identity(tmp_path / "edge")
    assert other.fingerprint != fp


def test_certificate_names_the_gateway_and_is_a_ten_year_leaf() -> None:
    _, cert_pem = generate_identity("hub-1")
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "hub-1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["hub-1"]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime >= datetime.timedelta(days=3650)
    assert isinstance(cert.public_key(), ed25519.Ed25519PublicKey)


def test_load_identity_refuses_missing_files(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match=r"nope\.key: no such file"):
        load_identity(tmp_path / "nope.key")
    ident = write_identity(tmp_path / "hub")
    ident.cert_path.unlink()
    with pytest.raises(IdentityError, match=r"hub\.crt: no such file"):
        load_identity(ident.key_path)


def test_load_identity_refuses_a_cert_of_another_key(tmp_path: Path) -> None:
    a = write_identity(tmp_path / "a")
    b = write_identity(tmp_path / "b")
    a.cert_path.write_bytes(b.cert_path.read_bytes())
    with pytest.raises(IdentityError, match=r"a\.crt: certificate does not match the key a\.key"):
        load_identity(a.key_path)


def test_load_identity_refuses_non_ed25519_keys(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    (tmp_path / "r.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (tmp_path / "r.key").chmod(0o600)
    with pytest.raises(IdentityError, match="expected an Ed25519 private key, got"):
        load_identity(tmp_path / "r.key")


@pytest.mark.parametrize(
    ("mode", "words"),
    [
        (0o644, "readable by group and others"),
        (0o666, "readable and writable by group and others"),
        (0o640, "readable by group"),
        (0o602, "writable by others"),
    ],
)
def test_load_identity_refuses_a_key_others_can_read_or_write(
    tmp_path: Path, mode: int, words: str
) -> None:
    ident = write_identity(tmp_path / "hub")
    ident.key_path.chmod(mode)
    with pytest.raises(IdentityError) as info:
        load_identity(ident.key_path)
    assert str(info.value) == (
        f"{ident.key_path} is {words} (mode {mode:04o}); run chmod 600 {ident.key_path}"
    )
    ident.key_path.chmod(0o400)  # owner-only is enough, read-only too
    assert load_identity(ident.key_path).fingerprint == ident.fingerprint


def test_fingerprint_of_file_refuses_garbage(tmp_path: Path) -> None:
    (tmp_path / "x.txt").write_text("hello\n")
    with pytest.raises(IdentityError, match="neither a PEM certificate nor a PEM private key"):
        fingerprint_of_file(tmp_path / "x.txt")


# --- real handshakes over a loopback socket pair --------------------------------------------


@dataclass
class Outcome:
    """What each side of one handshake saw; the sockets are closed by then."""

    errors: dict[str, BaseException] = field(default_factory=dict)
    seen_by_server: str = ""  # fingerprint of the client's certificate
    seen_by_client: str = ""
    version: str | None = None
    pinned: object = None


async def _handshake(
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    pins: dict[str, str] | None = None,
) -> Outcome:
    a, b = trio.socket.socketpair()
    server = trio.SSLStream(trio.SocketStream(a), server_ctx, server_side=True)
    client = trio.SSLStream(trio.SocketStream(b), client_ctx, server_hostname=None)
    out = Outcome()

    async def run_server() -> None:
        try:
            await server.do_handshake()
            out.seen_by_server = peer_fingerprint(server)
            out.version = server.version()
            await server.send_all(b"hello")
        except (trio.BrokenResourceError, IdentityError) as exc:
            out.errors["server"] = exc
            await trio.aclose_forcefully(server)  # so the client sees EOF, not silence

    async def run_client() -> None:
        try:
            await client.do_handshake()
            out.seen_by_client = peer_fingerprint(client)
            if pins is not None:
                out.pinned = identify_peer(client, pins)
            # TLS 1.3: the client finishes before the server has judged its certificate,
            # so a refusal only shows up on the client's first read.
            assert await client.receive_some(5) == b"hello"
        except (trio.BrokenResourceError, IdentityError) as exc:
            out.errors["client"] = exc
            await trio.aclose_forcefully(client)

    try:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_server)
                nursery.start_soon(run_client)
    finally:
        await trio.aclose_forcefully(server)
        await trio.aclose_forcefully(client)
    return out


@pytest.fixture
def hub(tmp_path: Path) -> Identity:
    return write_identity(tmp_path / "hub")


@pytest.fixture
def edge(tmp_path: Path) -> Identity:
    return write_identity(tmp_path / "edge")


async def test_mutual_tls_between_self_signed_identities(hub: Identity, edge: Identity) -> None:
    out = await _handshake(
        server_context(hub, [edge.cert_path]), client_context(edge, hub.cert_path)
    )
    assert out.errors == {}
    assert out.version == "TLSv1.3"
    assert out.seen_by_server == edge.fingerprint
    assert out.seen_by_client == hub.fingerprint


async def test_dialer_can_pin_by_fingerprint_alone(hub: Identity, edge: Identity) -> None:
    out = await _handshake(
        server_context(hub, [edge.cert_path]), client_context(edge), {hub.fingerprint: "hub"}
    )
    assert out.errors == {}
    assert out.pinned == "hub"
    out = await _handshake(
        server_context(hub, [edge.cert_path]), client_context(edge), {edge.fingerprint: "edge"}
    )
    assert isinstance(out.errors["client"], IdentityError)
    assert "which is not a configured peer" in str(out.errors["client"])


async def test_server_refuses_an_unknown_client_certificate(
    hub: Identity, edge: Identity, tmp_path: Path
) -> None:
    stranger = write_identity(tmp_path / "stranger")
    errors = (
        await _handshake(
            server_context(hub, [edge.cert_path]), client_context(stranger, hub.cert_path)
        )
    ).errors
    assert isinstance(errors["server"].__cause__, ssl.SSLCertVerificationError)
    assert "peer certificate is not trusted" in describe_tls_failure(errors["server"])
    assert "client" in errors  # the client hears about it too, not silence


async def test_client_refuses_a_server_with_another_certificate(
    hub: Identity, edge: Identity, tmp_path: Path
) -> None:
    impostor = write_identity(tmp_path / "impostor")
    errors = (
        await _handshake(
            server_context(impostor, [edge.cert_path]), client_context(edge, hub.cert_path)
        )
    ).errors
    assert isinstance(errors["client"].__cause__, ssl.SSLCertVerificationError)
    assert "not trusted" in describe_tls_failure(errors["client"])
    assert "server" in errors


def _ca_signed(
    tmp_path: Path, ca_key: ed25519.Ed25519PrivateKey, ca: x509.Certificate, name: str
) -> Identity:
    """Replace a fresh identity's self-signed cert with one issued by the CA (same key)."""
    ident = write_identity(tmp_path / name)
    cert = x509.load_pem_x509_certificate(ident.cert_path.read_bytes())
    now = datetime.datetime.now(datetime.UTC)
    issued = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(ca.subject)
        .public_key(cert.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, None)
    )
    ident.cert_path.write_bytes(issued.public_bytes(serialization.Encoding.PEM))
    return load_identity(ident.key_path)


async def test_private_ca_mode_trusts_any_cert_the_ca_signed(tmp_path: Path) -> None:
    ca_key = ed25519.Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fleet CA")])
    now = datetime.datetime.now(datetime.UTC)
    ca = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, None)
    )
    ca_path = tmp_path / "ca.crt"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    hub = _ca_signed(tmp_path, ca_key, ca, "hub")
    edge = _ca_signed(tmp_path, ca_key, ca, "edge")
    assert fingerprint_of_cert(edge.cert) == edge.fingerprint
    out = await _handshake(
        server_context(hub, [], ca_path=ca_path), client_context(edge, ca_path=ca_path)
    )
    assert out.errors == {}
    assert out.seen_by_server == edge.fingerprint
    # A self-signed outsider is still refused in CA mode.
    stranger = write_identity(tmp_path / "stranger")
    out = await _handshake(
        server_context(hub, [], ca_path=ca_path), client_context(stranger, ca_path=ca_path)
    )
    assert "server" in out.errors
