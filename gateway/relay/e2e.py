"""End-to-end protection across untrusted relays (`end_to_end = true` on a tunnel).

TCP: `SecureStream` runs TLS 1.3 (OpenSSL through `ssl.MemoryBIO`) inside the circuit,
between the entry and the exit gateway, each authenticated by its own identity. The
gateway runs only its handshake as a stream, then relays the session as a `TlsPort` of
the relay engine (ports.py), which keeps the rules below. As a stream (for tools and
tests) it is a `HalfCloseableStream`: send_eof sends TLS close_notify (in TLS 1.3 that closes only our
direction) and then FIN, so half-close survives; a FIN without close_notify is a
truncation and fails the session. A modified record fails authentication and the
circuit is reset with INTEGRITY_ERROR: wrong bytes are never delivered.

UDP: TLS needs a reliable stream, datagrams may be dropped. So the flow first runs a
TLS 1.3 handshake over its first datagrams (reliable while nothing else is queued),
inside which each side sends 32 random bytes; both keys of the flow are derived with
HKDF-SHA256 from the two contributions, one key per direction. After that every
datagram is sealed with AES-256-GCM: an 8-byte sequence number (the nonce, unique
per key) travels in clear as associated data; receivers drop replays with a 1024-entry
sliding window. No cipher here is home-made: TLS is OpenSSL's, AEAD and HKDF are
`cryptography`'s.
"""

from __future__ import annotations

import os
import ssl
import struct

import trio
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from gateway.carriers.circuit import Circuit, DatagramCircuit
from gateway.errors import CircuitBroken, IdentityError
from gateway.relay.ports import TlsPort
from gateway.security.identity import fingerprint_of_der_cert
from gateway.stream_abilities import Abortable
from gateway_codecs import ErrorCode

READ_SIZE = 256 * 1024
SEAL_OVERHEAD = 8 + 16  # sequence number + GCM tag
REPLAY_WINDOW = 1024
_SEQ = struct.Struct("!Q")


def _integrity(reason: str) -> CircuitBroken:
    return CircuitBroken(ErrorCode.INTEGRITY_ERROR, reason)


class SecureStream(trio.abc.HalfCloseableStream, Abortable):
    """TLS 1.3 over any half-closeable stream (a circuit), with half-close kept."""

    def __init__(self, transport: trio.abc.HalfCloseableStream, context: ssl.SSLContext,
                 server_side: bool) -> None:
        self.transport = transport
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._in, self._out, server_side=server_side)
        self._eof_sent = False

    @property
    def peer_fingerprint(self) -> str:
        der = self._ssl.getpeercert(binary_form=True)
        if not der:
            raise IdentityError("the end-to-end peer presented no certificate")
        return fingerprint_of_der_cert(der)

    def into_port(self) -> TlsPort:
        """After the handshake: the same TLS session as a port of the relay engine, which
        relays it without a task (with whatever the BIOs already hold)."""
        if not isinstance(self.transport, Circuit):
            raise TypeError("only TLS inside a circuit becomes a relay port")
        return TlsPort(self.transport, self._ssl, self._in, self._out)

    def _fail(self, reason: str, exc: BaseException | None = None) -> CircuitBroken:
        """Reset the circuit with INTEGRITY_ERROR so both ends log the same reason.

        Callers raise ``trio.BrokenResourceError(str(error)) from error``.
        """
        error = _integrity(reason)
        error.__cause__ = exc
        if isinstance(self.transport, Circuit):
            self.transport.reset(ErrorCode.INTEGRITY_ERROR, reason)
        return error

    async def _flush(self) -> None:
        data = self._out.read()
        if data:
            await self.transport.send_all(data)

    async def _fill(self) -> bool:
        data = await self.transport.receive_some(READ_SIZE)
        if not data:
            self._in.write_eof()
            return False
        self._in.write(data)
        return True

    async def do_handshake(self) -> None:
        while True:
            try:
                self._ssl.do_handshake()
            except ssl.SSLWantReadError:
                await self._flush()
                if not await self._fill():
                    error = self._fail("the circuit ended during the end-to-end TLS handshake")
                    raise trio.BrokenResourceError(str(error)) from error
                continue
            except ssl.SSLError as exc:
                await self._flush_quietly()
                error = self._fail(f"end-to-end TLS handshake failed: {exc.reason or exc}", exc)
                raise trio.BrokenResourceError(str(error)) from error
            await self._flush()
            return

    async def _flush_quietly(self) -> None:
        try:
            await self._flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof_sent:
            raise trio.ClosedResourceError("send_all after send_eof")
        view = memoryview(data)
        try:
            while view:
                n = self._ssl.write(view[:READ_SIZE])
                view = view[n:]
        except ssl.SSLError as exc:
            error = self._fail(f"end-to-end TLS write failed: {exc.reason or exc}", exc)
            raise trio.BrokenResourceError(str(error)) from error
        await self._flush()

    async def wait_send_all_might_not_block(self) -> None:
        await self.transport.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        # close_notify leaves at once (before any other checkpoint): never on behalf of a
        # session that has just been cancelled because it broke.
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._eof_sent:
            await trio.lowlevel.checkpoint()
            return
        self._eof_sent = True
        try:
            self._ssl.unwrap()  # sends close_notify: in TLS 1.3 that ends our direction only
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError as exc:
            error = self._fail(f"end-to-end TLS close failed: {exc.reason or exc}", exc)
            raise trio.BrokenResourceError(str(error)) from error
        await self._flush()
        await self.transport.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        while True:
            try:
                data = self._ssl.read(max_bytes or READ_SIZE)
            except ssl.SSLWantReadError:
                await self._flush()  # e.g. a KeyUpdate answer
                if not await self._fill():
                    error = self._fail("the circuit ended without TLS close_notify: truncated")
                    raise trio.BrokenResourceError(str(error)) from error
                continue
            except ssl.SSLZeroReturnError:
                return b""
            except ssl.SSLError as exc:
                error = self._fail(f"end-to-end TLS record failed authentication: {exc.reason or exc}",
                                   exc)
                raise trio.BrokenResourceError(str(error)) from error
            return data

    async def aclose(self) -> None:
        await self.transport.aclose()

    def abort(self, reason: str) -> None:
        if isinstance(self.transport, Circuit):
            self.transport.abort(reason)


class _DatagramTransport(trio.abc.HalfCloseableStream):
    """A datagram circuit seen as a stream, only for the TLS handshake of a UDP flow."""

    def __init__(self, circuit: DatagramCircuit) -> None:
        self.circuit = circuit

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            if not self.circuit.send(bytes(view[:16384])):
                raise trio.BrokenResourceError("flow queue full during the handshake")
            view = view[16384:]
        await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = await self.circuit.receive()
        return data or b""

    async def aclose(self) -> None:
        await self.circuit.aclose()


class SealedFlow:
    """AES-256-GCM per datagram with keys agreed inside a TLS 1.3 handshake."""

    def __init__(self, circuit: DatagramCircuit, send_key: bytes, receive_key: bytes) -> None:
        self.circuit = circuit
        self._seal = AESGCM(send_key)
        self._open = AESGCM(receive_key)
        self._next_seq = 0
        self._highest = -1
        self._seen = 0  # bitmap of the REPLAY_WINDOW sequence numbers below _highest
        self.rejected = 0

    @classmethod
    async def establish(cls, circuit: DatagramCircuit, context: ssl.SSLContext,
                        server_side: bool) -> tuple[SealedFlow, str]:
        """Handshake over the flow; returns the sealed flow and the peer's fingerprint."""
        tls = SecureStream(_DatagramTransport(circuit), context, server_side)
        await tls.do_handshake()
        mine = os.urandom(32)
        await tls.send_all(mine)
        theirs = b""
        while len(theirs) < 32:
            chunk = await tls.receive_some(32 - len(theirs))
            if not chunk:
                raise trio.BrokenResourceError("end-to-end key exchange ended early")
            theirs += chunk
        client, server = (theirs, mine) if server_side else (mine, theirs)
        c2s = _derive(client + server, b"tunnelgate e2e udp client->server")
        s2c = _derive(client + server, b"tunnelgate e2e udp server->client")
        send, receive = (s2c, c2s) if server_side else (c2s, s2c)
        return cls(circuit, send, receive), tls.peer_fingerprint

    def seal(self, datagram: bytes) -> bytes:
        seq = _SEQ.pack(self._next_seq)
        self._next_seq += 1
        return seq + self._seal.encrypt(bytes(4) + seq, datagram, seq)

    def open(self, sealed: bytes) -> bytes | None:
        """The plaintext, or None for a forged, corrupted or replayed datagram."""
        if len(sealed) < SEAL_OVERHEAD:
            self.rejected += 1
            return None
        seq_bytes = sealed[:8]
        (seq,) = _SEQ.unpack(seq_bytes)
        if seq <= self._highest - REPLAY_WINDOW or (
                seq <= self._highest and self._seen >> (self._highest - seq) & 1):
            self.rejected += 1
            return None
        try:
            plain = self._open.decrypt(bytes(4) + seq_bytes, sealed[8:], seq_bytes)
        except InvalidTag:
            self.rejected += 1
            return None
        if seq > self._highest:
            shift = seq - self._highest
            self._seen = ((self._seen << shift) | 1) & ((1 << REPLAY_WINDOW) - 1)
            self._highest = seq
        else:
            self._seen |= 1 << (self._highest - seq)
        return plain


def _derive(material: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(material)
