"""Carrier transports: a connected TCP socket, plain or TLS, driven without a stream layer.

TLS is OpenSSL on the socket itself (a non-blocking `ssl.SSLSocket`): OpenSSL reads and
writes the file descriptor directly, so a record costs one syscall and no copy through
memory BIOs, and a read lands in the carrier's own large buffer (`recv_into`). trio is
only asked to wait (`wait_readable`/`wait_writable`). `try_send` never blocks, which lets
the carrier write from whichever task queued the frames, without a task switch.
"""

from __future__ import annotations

import errno
import socket
import ssl

import trio

from gateway.errors import IdentityError
from gateway.identity import fingerprint_of_der_cert

_WOULD_BLOCK = (BlockingIOError, InterruptedError)
TLS_MAX_RECORD = 16384  # plaintext bytes in one TLS record (RFC 8446, 5.1)


class TransportBroken(Exception):
    """The carrier's connection failed; `str()` says how."""


class CarrierTransport:
    """One carrier's connection. Not a trio stream on purpose: see the module docstring."""

    def __init__(self, sock: socket.socket, tls: ssl.SSLSocket | None = None) -> None:
        self.sock: socket.socket = tls if tls is not None else sock
        self.tls = tls
        self.closed = False

    @classmethod
    def from_trio(cls, stream: trio.SocketStream) -> CarrierTransport:
        """Take over the socket of a connected trio SocketStream."""
        sock = socket.socket(fileno=stream.socket.detach())
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        return cls(sock)

    async def start_tls(self, context: ssl.SSLContext, server_side: bool) -> None:
        """Run the TLS handshake on this socket (the caller sets the deadline)."""
        tls = context.wrap_socket(self.sock, server_side=server_side, do_handshake_on_connect=False)
        tls.setblocking(False)
        self.sock = self.tls = tls
        while True:
            try:
                tls.do_handshake()
                return
            except ssl.SSLWantReadError:
                await trio.lowlevel.wait_readable(tls)
            except ssl.SSLWantWriteError:
                await trio.lowlevel.wait_writable(tls)

    def peer_fingerprint(self) -> str:
        der = self.tls.getpeercert(binary_form=True) if self.tls is not None else None
        if not der:
            raise IdentityError("peer presented no certificate")
        return fingerprint_of_der_cert(der)

    def remote(self) -> str:
        try:
            host, port = self.sock.getpeername()[:2]
        except OSError:
            return "?"
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    # -------------------------------------------------------------- reading

    def try_recv_into(self, buffer: memoryview) -> int | None:
        """Bytes read into `buffer`; 0 at a clean end; None if nothing is ready."""
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
        """Whether a read of `got` bytes (of `asked`) probably emptied the socket: plain TCP
        returns less than asked only then; TLS returns one record at a time, so a record
        shorter than the maximum is most likely the last one that has arrived."""
        if self.tls is None:
            return got < asked
        return got < min(asked, TLS_MAX_RECORD) and not self.tls.pending()

    async def wait_readable(self) -> None:
        await trio.lowlevel.wait_readable(self.sock)

    # -------------------------------------------------------------- writing

    def try_send(self, data: memoryview) -> int | None:
        """Bytes written now (maybe fewer than given); None if the socket is full."""
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
        """Close now. TLS close_notify is best effort (never waits)."""
        if self.closed:
            return
        self.closed = True
        if self.tls is not None:
            try:
                self.tls.unwrap()
            except (OSError, ssl.SSLError, ValueError):
                pass
        trio.lowlevel.notify_closing(self.sock)
        self.sock.close()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return f"TLS error: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{errno.errorcode.get(exc.errno, exc.errno)}: {exc.strerror}"
    return str(exc) or type(exc).__name__
