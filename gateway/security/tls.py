"""SSL contexts for mutual-TLS 1.3 carriers, and the helpers that name the peer.

Identity is the key, not DNS: hostname checks are off everywhere. A listener must
hold the certificates of the peers it accepts (or their CA) in its trust store,
because the stdlib cannot accept an unknown client certificate and judge it later.
A self-signed end-entity certificate loaded with ``load_verify_locations`` acts as
its own trust anchor in OpenSSL, so no CA flag is needed on gateway certificates.
A dialer that knows only a fingerprint verifies nothing in OpenSSL and pins the
fingerprint itself after the handshake (``identify_peer``).
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterable, Mapping
from typing import Protocol, TypeVar

from gateway.errors import IdentityError
from gateway.security.identity import Identity, fingerprint_of_der_cert

_T = TypeVar("_T")

StrPath = str | os.PathLike[str]


class HasPeerCert(Protocol):
    """What ``ssl.SSLObject``, ``ssl.SSLSocket`` and ``trio.SSLStream`` all provide."""

    def getpeercert(self, binary_form: bool = ...) -> object: ...


def _base_context(purpose: int, identity: Identity) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    try:
        ctx.load_cert_chain(identity.cert_path, identity.key_path)
    except (OSError, ssl.SSLError) as exc:
        raise IdentityError(
            f"{identity.key_path}: cannot use this identity for TLS: {exc}"
        ) from exc
    return ctx


def _trust(ctx: ssl.SSLContext, path: StrPath, what: str) -> None:
    try:
        ctx.load_verify_locations(cafile=os.fspath(path))
    except (OSError, ssl.SSLError) as exc:
        raise IdentityError(f"{path}: cannot load {what}: {exc}") from exc


def server_context(
    identity: Identity,
    trusted_cert_paths: Iterable[StrPath],
    ca_path: StrPath | None = None,
) -> ssl.SSLContext:
    """Context for accepted carriers: present our cert, require a trusted client cert."""
    ctx = _base_context(ssl.PROTOCOL_TLS_SERVER, identity)
    ctx.verify_mode = ssl.CERT_REQUIRED
    for path in trusted_cert_paths:
        _trust(ctx, path, "peer certificate")
    if ca_path is not None:
        _trust(ctx, ca_path, "CA certificate")
    return ctx


def client_context(
    identity: Identity,
    peer_cert_path: StrPath | None = None,
    ca_path: StrPath | None = None,
) -> ssl.SSLContext:
    """Context for dialed carriers: present our cert; verify the server when we can.

    With neither a peer certificate nor a CA, OpenSSL verifies nothing (CERT_NONE)
    and the caller must pin with ``identify_peer`` before trusting the carrier.
    """
    # PROTOCOL_TLS_CLIENT turns check_hostname on; _base_context turns it off first.
    ctx = _base_context(ssl.PROTOCOL_TLS_CLIENT, identity)
    if peer_cert_path is None and ca_path is None:
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    ctx.verify_mode = ssl.CERT_REQUIRED
    if peer_cert_path is not None:
        _trust(ctx, peer_cert_path, "peer certificate")
    if ca_path is not None:
        _trust(ctx, ca_path, "CA certificate")
    return ctx


def peer_fingerprint(ssl_object: HasPeerCert) -> str:
    """Fingerprint of the certificate the peer presented (works under CERT_NONE too)."""
    der = ssl_object.getpeercert(binary_form=True)
    if not isinstance(der, bytes) or not der:
        raise IdentityError("peer presented no certificate")
    return fingerprint_of_der_cert(der)


def identify_peer(ssl_object: HasPeerCert, peers_by_fingerprint: Mapping[str, _T]) -> _T:
    """The configured peer whose fingerprint the carrier's certificate has, or IdentityError."""
    fingerprint = peer_fingerprint(ssl_object)
    try:
        return peers_by_fingerprint[fingerprint]
    except KeyError:
        raise IdentityError(
            f"peer presented certificate {fingerprint}, which is not a configured peer"
        ) from None


# OpenSSL alert reasons seen by the side whose certificate was refused, in words.
_ALERT_REASONS = {
    "TLSV1_ALERT_UNKNOWN_CA": "the peer does not trust our certificate (unknown CA)",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the peer refused our certificate",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the peer says our certificate has expired",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the peer requires a client certificate",
    "TLSV1_ALERT_PROTOCOL_VERSION": "the peer does not speak TLS 1.3",
    "UNSUPPORTED_PROTOCOL": "the peer does not speak TLS 1.3",
    "WRONG_VERSION_NUMBER": "the peer is not speaking TLS (plain tcp:// carrier?)",
    "HTTP_REQUEST": "the peer is speaking HTTP, not TLS",
    # trio does not flush the alert of a failed handshake, so a peer that refuses our
    # certificate usually just closes the connection: this is what we see then.
    "UNEXPECTED_EOF_WHILE_READING": (
        "the peer closed the connection during the TLS handshake"
        " (does it have our certificate, or our CA, in its config?)"
    ),
}


def describe_tls_failure(exc: BaseException) -> str:
    """A readable reason for a failed handshake, found anywhere in the cause chain.

    trio reports TLS failures as ``BrokenResourceError`` with the ``ssl.SSLError`` as
    ``__cause__``; this looks through that so callers can pass what they caught.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            detail = current.verify_message or current.reason or str(current)
            if current.verify_code in (18, 19, 20):  # self-signed / unknown issuer
                return (
                    f"peer certificate is not trusted ({detail}): it is neither a"
                    " configured peer's certificate nor signed by the configured CA"
                )
            return f"peer certificate rejected: {detail}"
        if isinstance(current, ssl.SSLError):
            reason = current.reason or ""
            if reason in _ALERT_REASONS:
                return _ALERT_REASONS[reason]
            return f"TLS error: {reason or current}"
        if isinstance(current, IdentityError):
            return str(current)
        current = current.__cause__ or current.__context__
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class TlsContexts:
    """The SSL contexts one gateway needs, built once: for carriers and end-to-end circuits.

    `server()` trusts every configured peer certificate (and the CA); `client_for(cert,
    fingerprint)` verifies one peer (by certificate, CA, or a pinned fingerprint).
    """

    def __init__(self, identity: Identity, peer_certs: Iterable[StrPath],
                 ca_path: StrPath | None) -> None:
        self.identity = identity
        self.peer_certs = list(peer_certs)
        self.ca_path = ca_path
        self._server: ssl.SSLContext | None = None
        self._clients: dict[str | None, ssl.SSLContext] = {}
        self._outer_server: ssl.SSLContext | None = None
        self._outer_client: ssl.SSLContext | None = None

    def set_peer_certs(self, peer_certs: Iterable[StrPath]) -> None:
        """A reload changed the peers: contexts built from now on trust these (a carrier
        already up keeps the identity it was authenticated with)."""
        certs = list(peer_certs)
        if certs != self.peer_certs:
            self.peer_certs = certs
            self._server = None
            self._clients.clear()

    def server(self) -> ssl.SSLContext:
        if self._server is None:
            self._server = server_context(self.identity, self.peer_certs, self.ca_path)
        return self._server

    def outer_server(self) -> ssl.SSLContext:
        """A `wss://` listener's outer TLS: our certificate, no client certificate (the
        mutual TLS that authenticates runs inside the WebSocket)."""
        if self._outer_server is None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.load_cert_chain(self.identity.cert_path, self.identity.key_path)
            self._outer_server = ctx
        return self._outer_server

    def outer_client(self) -> ssl.SSLContext:
        """A `wss://` dialer's outer TLS. It verifies nothing: a CDN or a proxy in between
        may present any certificate, and what proves the peer is the inner TLS."""
        if self._outer_client is None:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            self._outer_client = ctx
        return self._outer_client

    def client_for(self, peer_cert: StrPath | None) -> ssl.SSLContext:
        key = None if peer_cert is None else os.fspath(peer_cert)
        if key not in self._clients:
            self._clients[key] = client_context(self.identity, peer_cert, self.ca_path)
        return self._clients[key]
