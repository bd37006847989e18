"""Carrier transports: what a carrier runs over, behind one interface.

`CarrierTransport` is all a carrier needs from its connection: non-blocking reads and
writes, waits, close, and who the peer proved to be (if the transport authenticates).
`tcp` is a plain socket (`SocketTransport`), `tls` is TLS 1.3 on it (`TlsTransport`),
`ws`/`wss` a WebSocket with the same TLS inside its byte stream (`websocket.py`);
`schemes.open_transport` picks one from the address's scheme, in that one place.

TLS is OpenSSL on the socket itself (a non-blocking `ssl.SSLSocket`): OpenSSL reads and
writes the file descriptor directly, so a record costs one syscall and no copy through
memory BIOs, and a read lands in the carrier's own large buffer (`recv_into`). trio is
only asked to wait (`wait_readable`/`wait_writable`). `try_send` never blocks, which lets
the carrier write from whichever task queued the frames, without a task switch.
"""

from __future__ import annotations

import abc
import errno
import socket
import ssl
from typing import ClassVar

import trio

from gateway.errors import IdentityError
from gateway.logs import peer_address
from gateway.security.identity import fingerprint_of_der_cert

_WOULD_BLOCK = (BlockingIOError, InterruptedError)
TLS_MAX_RECORD = 16384  # plaintext bytes in one TLS record (RFC 8446, 5.1)


class TransportBroken(Exception):
    """The carrier's connection failed; `str()` says how."""


class CarrierTransport(abc.ABC):
    """The connection under one carrier. Not a trio stream on purpose: see the module
    docstring (a carrier writes from whichever task queued frames, never blocking)."""

    scheme: ClassVar[str]
    # Bytes `try_send` took but the socket has not (a framing transport): the carrier
    # calls `try_send` with nothing once the socket is writable, until this is False.
    backlogged = False

    @abc.abstractmethod
    def try_recv_into(self, buffer: memoryview) -> int | None:
        """Bytes read into `buffer`; 0 at a clean end; None if nothing is ready."""

    @abc.abstractmethod
    def looks_drained(self, got: int, asked: int) -> bool:
        """Whether a read of `got` bytes (of `asked`) probably emptied the connection."""

    @abc.abstractmethod
    async def wait_readable(self) -> None: ...

    @abc.abstractmethod
    def try_send(self, data: memoryview) -> int | None:
        """Bytes written now (maybe fewer than given); None if the connection is full."""

    @abc.abstractmethod
    async def wait_writable(self) -> None: ...

    @abc.abstractmethod
    def close(self) -> None:
        """Close now, never waiting."""

    @abc.abstractmethod
    def remote(self) -> str:
        """The peer's address, for logs."""

    def peer_fingerprint(self) -> str | None:
        """The fingerprint of the key the peer proved it holds; None if this transport
        does not authenticate (plain TCP: the peer's name is only what its HELLO says)."""
        return None


class SocketTransport(CarrierTransport):
    """A connected TCP socket, plain (`tcp://`)."""

    scheme = "tcp"

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.closed = False

    @classmethod
    def from_trio(cls, stream: trio.SocketStream) -> socket.socket:
        """Take over the socket of a connected trio SocketStream."""
        sock = socket.socket(fileno=stream.socket.detach())
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        return sock

    def remote(self) -> str:
        return peer_address(self.sock)

    # -------------------------------------------------------------- reading

    def try_recv_into(self, buffer: memoryview) -> int | None:
        try:
            return self.sock.recv_into(buffer)
        except ssl.SSLWantReadError:
            return None
        except ssl.SSLWantWriteError:
            return None  # TLS 1.3 never needs this for reading; retry after a wait
        except ssl.SSLZeroReturnError:
            return 0
        except _WOULD_BLOCK:
            return None
        except (OSError, ssl.SSLError) as exc:
            raise TransportBroken(_describe(exc)) from exc

    def looks_drained(self, got: int, asked: int) -> bool:
        """Plain TCP returns less than asked only when the socket is empty."""
        return got < asked

    async def wait_readable(self) -> None:
        await trio.lowlevel.wait_readable(self.sock)

    # -------------------------------------------------------------- writing

    def try_send(self, data: memoryview) -> int | None:
        try:
            return self.sock.send(data)
        except (ssl.SSLWantWriteError, ssl.SSLWantReadError):
            return None
        except _WOULD_BLOCK:
            return None
        except (OSError, ssl.SSLError) as exc:
            raise TransportBroken(_describe(exc)) from exc

    async def wait_writable(self) -> None:
        await trio.lowlevel.wait_writable(self.sock)

    # -------------------------------------------------------------- closing

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._before_close()
        trio.lowlevel.notify_closing(self.sock)
        self.sock.close()

    def _before_close(self) -> None:
        pass


class TlsTransport(SocketTransport):
    """TLS 1.3 on a connected TCP socket (`tls://`): OpenSSL reads and writes the socket."""

    scheme = "tls"

    def __init__(self, tls: ssl.SSLSocket) -> None:
        super().__init__(tls)
        self.tls = tls

    @classmethod
    async def handshake(cls, sock: socket.socket, context: ssl.SSLContext, server_side: bool,
                        server_name: str | None = None) -> TlsTransport:
        """Run the TLS handshake on `sock` (the caller sets the deadline, and closes `sock`
        if this raises). `server_name`: the SNI a dialer sends (a wss:// URL's host)."""
        tls = context.wrap_socket(sock, server_side=server_side, do_handshake_on_connect=False,
                                  server_hostname=server_name)
        tls.setblocking(False)
        try:
            while True:
                try:
                    tls.do_handshake()
                    return cls(tls)
                except ssl.SSLWantReadError:
                    await trio.lowlevel.wait_readable(tls)
                except ssl.SSLWantWriteError:
                    await trio.lowlevel.wait_writable(tls)
        except BaseException:
            tls.close()
            raise

    def peer_fingerprint(self) -> str:
        der = self.tls.getpeercert(binary_form=True)
        if not der:
            raise IdentityError("peer presented no certificate")
        return fingerprint_of_der_cert(der)

    def looks_drained(self, got: int, asked: int) -> bool:
        """TLS returns one record at a time, so a record shorter than the maximum is most
        likely the last one that has arrived."""
        return got < min(asked, TLS_MAX_RECORD) and not self.tls.pending()

    def _before_close(self) -> None:
        try:
            self.tls.unwrap()  # close_notify, best effort (never waits)
        except (OSError, ssl.SSLError, ValueError):
            pass


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{errno.errorcode.get(exc.errno, exc.errno)}: {exc.strerror}"
    return str(exc) or type(exc).__name__
