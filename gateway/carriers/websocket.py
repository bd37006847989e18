"""WebSocket carriers (`ws://`, `wss://`): the same carrier through HTTP infrastructure.

Layers, outermost first: TCP; for `wss://`, an outer TLS that only gets the bytes past
proxies and CDNs (it authenticates nothing we rely on); the WebSocket (RFC 6455, through
wsproto: the HTTP upgrade, then binary messages); inside its byte stream, the same
mutual TLS 1.3 with pinned keys as a `tls://` carrier. A reverse proxy, a CDN or a
man-in-the-middle that terminates the outer layers sees only the inner TLS's records:
it can neither read the carrier nor pass as either gateway.

The inner TLS runs in memory (`ssl.SSLObject` over two BIOs); the outer layers are a
`SocketTransport`/`TlsTransport` (OpenSSL on the socket). `try_send` encrypts, frames and
writes at once; bytes the socket did not take wait in `_raw_out`, and `backlogged` tells
the carrier to call `try_send(b"")` again once the socket is writable.
"""

from __future__ import annotations

import ssl
from typing import ClassVar

from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from gateway.carriers.transport import CarrierTransport, SocketTransport, TransportBroken
from gateway.errors import IdentityError
from gateway.security.identity import fingerprint_of_der_cert

SUBPROTOCOL = "tunnelgate"  # offered by dialers, echoed by listeners (informational)
READ_SIZE = 65536  # raw bytes read at once
SEND_CHUNK = 65536  # plaintext bytes framed as one message
MAX_HANDSHAKE = 16384  # bytes of HTTP upgrade request or response
BACKLOG_LIMIT = 256 * 1024  # framed bytes held before try_send says "full"


class HandshakeRefused(TransportBroken):
    """The far side (or a proxy in between) answered the upgrade with an HTTP error."""


class WebSocketTransport(CarrierTransport):
    scheme: ClassVar[str] = "ws"

    def __init__(self, raw: SocketTransport, ws: WSConnection) -> None:
        self.raw = raw
        self.ws = ws
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.tls: ssl.SSLObject | None = None
        self._raw_out = bytearray()
        self._read_buffer = bytearray(READ_SIZE)
        self._eof = False  # the raw connection ended, or the far side closed the WebSocket
        self.backlogged = False
        self.closed = False

    # -------------------------------------------------------------- handshakes

    @classmethod
    async def dial(cls, raw: SocketTransport, host: str, path: str, inner: ssl.SSLContext
                   ) -> WebSocketTransport:
        """The client's side: the upgrade request, then the inner TLS (caller: deadline)."""
        self = cls(raw, WSConnection(ConnectionType.CLIENT))
        self._raw_out += self.ws.send(Request(host=host, target=path, subprotocols=[SUBPROTOCOL]))
        await self._drain()
        while True:
            for event in await self._events():
                if isinstance(event, AcceptConnection):
                    await self._inner_handshake(inner, server_side=False)
                    return self
                if isinstance(event, RejectConnection):
                    raise HandshakeRefused(f"WebSocket upgrade refused: HTTP {event.status_code}")
                if isinstance(event, RejectData):
                    continue
                self._handle(event)

    @classmethod
    async def accept(cls, raw: SocketTransport, path: str, inner: ssl.SSLContext) -> WebSocketTransport:
        """The listener's side: the upgrade for `path` (404 otherwise), then the inner TLS."""
        self = cls(raw, WSConnection(ConnectionType.SERVER))
        while True:
            for event in await self._events():
                if not isinstance(event, Request):
                    raise TransportBroken(f"expected a WebSocket upgrade, got {type(event).__name__}")
                if event.target.split("?", 1)[0] != path:
                    self._raw_out += self.ws.send(RejectConnection(status_code=404))
                    await self._drain()
                    raise HandshakeRefused(f"WebSocket upgrade for {event.target[:80]!r}, not {path}")
                subprotocol = SUBPROTOCOL if SUBPROTOCOL in event.subprotocols else None
                self._raw_out += self.ws.send(AcceptConnection(subprotocol=subprotocol))
                await self._inner_handshake(inner, server_side=True)
                return self

    async def _inner_handshake(self, context: ssl.SSLContext, server_side: bool) -> None:
        tls = context.wrap_bio(self.incoming, self.outgoing, server_side=server_side)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._frame_outgoing()
                await self._drain()
                for event in await self._events():
                    self._handle(event)
            except ssl.SSLError as exc:
                raise TransportBroken(f"TLS error: {exc.reason or exc}") from exc
        self.tls = tls
        self._frame_outgoing()  # the last handshake flight
        await self._drain()

    async def _events(self) -> list[Event]:
        """The WebSocket events the next raw read gives (waiting for one)."""
        while True:
            got = self._read_raw()
            if got is None:
                await self.raw.wait_readable()
                continue
            events = list(self.ws.events()) if got or self._eof else []
            if events:
                return events
            if self._eof:
                raise TransportBroken("the connection ended during the WebSocket handshake")

    async def _drain(self) -> None:
        while self._raw_out:
            if not self._write_raw():
                await self.raw.wait_writable()

    # -------------------------------------------------------------- reading

    def _read_raw(self) -> int | None:
        """One raw read into wsproto: the byte count (0 at the end), or None if none ready."""
        if self._eof:
            return 0
        n = self.raw.try_recv_into(memoryview(self._read_buffer))
        if n is None:
            return None
        try:
            self.ws.receive_data(bytes(self._read_buffer[:n]) if n else None)
        except RemoteProtocolError as exc:
            raise TransportBroken(f"WebSocket protocol error: {exc}") from exc
        if n == 0:
            self._eof = True
        return n

    def _handle(self, event: Event) -> None:
        if isinstance(event, BytesMessage):
            self.incoming.write(event.data)
        elif isinstance(event, Ping):
            self._raw_out += self.ws.send(event.response())
        elif isinstance(event, CloseConnection):
            self._eof = True
            try:
                self._raw_out += self.ws.send(event.response())
            except LocalProtocolError:
                pass  # we had closed it already
            self._write_raw()
        elif isinstance(event, TextMessage):
            raise TransportBroken("a text message on a carrier WebSocket")

    def try_recv_into(self, buffer: memoryview) -> int | None:
        assert self.tls is not None
        while True:
            try:
                n: int = self.tls.read(len(buffer), buffer)  # type: ignore[assignment]  # into buffer: a count
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:
                return 0
            except ssl.SSLError as exc:
                raise TransportBroken(f"TLS error: {exc.reason or exc}") from exc
            else:
                if self.outgoing.pending:  # a post-handshake message to answer
                    self._frame_outgoing()
                    self._write_raw()
                return n
            if self._eof:
                self.incoming.write_eof()
                return 0
            if self._read_raw() is None:
                return None
            for event in self.ws.events():
                self._handle(event)

    def looks_drained(self, got: int, asked: int) -> bool:
        assert self.tls is not None
        return got < asked and not self.tls.pending() and not self.incoming.pending

    async def wait_readable(self) -> None:
        await self.raw.wait_readable()

    # -------------------------------------------------------------- writing

    def _frame_outgoing(self) -> None:
        cipher = self.outgoing.read()
        if cipher:
            self._raw_out += self.ws.send(BytesMessage(data=cipher))

    def _write_raw(self) -> bool:
        """Write what is framed as far as the socket takes it; True once all is out."""
        while self._raw_out:
            sent = self.raw.try_send(memoryview(self._raw_out))
            if sent is None:
                break
            del self._raw_out[:sent]
        self.backlogged = bool(self._raw_out)
        return not self._raw_out

    def try_send(self, data: memoryview) -> int | None:
        assert self.tls is not None
        if self._raw_out and (not self._write_raw() and (not data or len(self._raw_out) > BACKLOG_LIMIT)):
            return None
        if not data:
            return 0
        chunk = data[:SEND_CHUNK]
        try:
            self.tls.write(chunk)
        except ssl.SSLError as exc:
            raise TransportBroken(f"TLS error: {exc.reason or exc}") from exc
        self._frame_outgoing()
        self._write_raw()
        return len(chunk)

    async def wait_writable(self) -> None:
        await self.raw.wait_writable()

    # -------------------------------------------------------------- closing

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:  # close_notify and the WebSocket close, best effort (never waits)
            if self.tls is not None:
                self.tls.unwrap()
        except (ssl.SSLError, ValueError):
            pass
        try:
            self._frame_outgoing()
            self._raw_out += self.ws.send(CloseConnection(code=1000))
            self._write_raw()
        except (LocalProtocolError, TransportBroken):
            pass
        self.raw.close()

    def remote(self) -> str:
        return self.raw.remote()

    def peer_fingerprint(self) -> str:
        assert self.tls is not None
        der = self.tls.getpeercert(binary_form=True)
        if not der:
            raise IdentityError("peer presented no certificate")
        return fingerprint_of_der_cert(der)


class SecureWebSocketTransport(WebSocketTransport):
    scheme: ClassVar[str] = "wss"
