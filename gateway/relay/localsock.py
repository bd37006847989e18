"""`LocalStream`: a client's or a target's TCP connection as a lean trio stream.

trio's SocketStream is general; per session it adds a socket wrapper, conflict
detectors and a helper frame on every call. An idle session is mostly its sockets and
tasks, so this class keeps one raw non-blocking socket and asks trio only to wait
(the carrier transport does the same). Errors become `trio.BrokenResourceError` with
the `OSError` as cause, once, here.
"""

from __future__ import annotations

import contextlib
import errno
import operator
import socket
import struct

import trio

from gateway.stream_abilities import Abortable, NonBlockingSink

DEFAULT_RECEIVE = 256 * 1024
_WOULD_BLOCK = (BlockingIOError, InterruptedError)


_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


def set_reset_on_close(sock: socket.socket) -> None:
    """Let the next close() abort the connection with RST instead of FIN."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)


def _established(sock: socket.socket) -> bool:
    """A connect to this host (or a fast LAN) often completes within the connect call
    itself, even non-blocking: one syscall to check beats a wait and a scheduling round."""
    try:
        sock.getpeername()
    except OSError:
        return False
    return True


class LocalStream(trio.abc.HalfCloseableStream, NonBlockingSink, Abortable):
    __slots__ = ("_closed", "_error", "_sending", "sock")

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
        self.sock = sock
        self._closed = False
        self._sending = False  # a send_all holds bytes: try_send must not overtake them
        # The first error a send met. Meeting it consumed the socket's pending error, so
        # the next recv would return b"" as if the peer had closed cleanly: a reset would
        # pass on as an EOF. Reads raise it instead.
        self._error: OSError | None = None

    @classmethod
    def from_trio(cls, stream: trio.SocketStream) -> LocalStream:
        return cls(socket.socket(fileno=stream.socket.detach()))

    @classmethod
    async def connect(cls, address: str, port: int) -> LocalStream:
        """Connect to a literal IPv4/IPv6 address (no resolver, no happy-eyeballs tasks)."""
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            code = sock.connect_ex((address, port))
            if code in (errno.EINPROGRESS, errno.EAGAIN):
                if _established(sock):
                    code = 0
                else:
                    await trio.lowlevel.wait_writable(sock)
                    code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                raise OSError(code, f"Error connecting to {address}:{port}: {errno.errorcode.get(code)}")
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this connection was closed")

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        size = DEFAULT_RECEIVE if max_bytes is None else operator.index(max_bytes)
        if size < 1:
            raise ValueError("max_bytes must be >= 1")
        self._check_open()
        waited = False
        while True:
            try:
                self._raise_send_error()
                data = self.sock.recv(size)
                if not data:
                    self._raise_send_error()  # met by a send while this task waited
            except _WOULD_BLOCK:
                await trio.lowlevel.wait_readable(self.sock)
                self._check_open()
                waited = True
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(f"connection broken: {exc.strerror or exc}") from exc
            if not waited:
                await trio.lowlevel.checkpoint()
            return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        self._check_open()
        view = memoryview(data)
        waited = False
        self._sending = True
        try:
            while view:
                try:
                    self._raise_send_error()
                    sent = self.sock.send(view)
                except _WOULD_BLOCK:
                    await trio.lowlevel.wait_writable(self.sock)
                    self._check_open()
                    waited = True
                    continue
                except OSError as exc:
                    self._error = self._error or exc
                    raise trio.BrokenResourceError(
                        f"connection broken: {exc.strerror or exc}") from exc
                view = view[sent:]
        finally:
            self._sending = False
        if not waited:
            await trio.lowlevel.checkpoint()

    def try_receive(self, max_bytes: int = DEFAULT_RECEIVE) -> bytes | None:
        """What has already arrived, without waiting; None if nothing (b"": the end)."""
        try:
            return self.sock.recv(max_bytes)
        except OSError:
            return None  # would block, or broken: receive_some will say which

    def try_send(self, data: bytes | bytearray | memoryview) -> int:
        """Write what fits now, without blocking; 0 if nothing did (or the socket failed:
        the next `send_all` reports that)."""
        if self._closed or self._sending or self._error is not None:
            return 0
        try:
            return self.sock.send(data)
        except _WOULD_BLOCK:
            return 0
        except OSError as exc:
            self._error = exc  # the next read or send_all reports it
            return 0

    def _raise_send_error(self) -> None:
        if self._error is not None:
            raise self._error

    async def wait_send_all_might_not_block(self) -> None:
        self._check_open()
        await trio.lowlevel.wait_writable(self.sock)

    async def send_eof(self) -> None:
        self._check_open()
        await trio.lowlevel.checkpoint()
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                raise trio.BrokenResourceError(f"connection broken: {exc.strerror or exc}") from exc

    async def aclose(self) -> None:
        self.close_now()
        await trio.lowlevel.checkpoint()

    def abort(self, reason: str) -> None:
        """Make the close a TCP reset: the peer must not take a broken session for a
        complete one (a FIN would say "that was all")."""
        set_reset_on_close(self.sock)

    def close_now(self) -> None:
        if not self._closed:
            self._closed = True
            trio.lowlevel.notify_closing(self.sock)
            self.sock.close()
