"""`SocketRelay`: every plain socket <-> circuit session of a gateway, relayed by one task.

`splice()` gives a session two pumps: a task, a cancel scope and a trio wait (an epoll
re-arm) per message and direction. In the common case, a local TCP socket on one side
and a circuit on the other with no end-to-end TLS between, the same job needs no task
per session: the sockets sit in one level-triggered epoll set of our own, which trio
watches as a single file descriptor, and socket readiness and circuit events (data,
credit, EOF, reset; delivered by the carrier's reader) drive a small state machine per
session, synchronously. That saves two task starts and a nursery per session
(sessions/s) and two tasks' memory per idle session (about 10 KB -> 2 KB); per message
the cost stays about the same (one trio wait, on the epoll set instead of the socket).

The semantics are splice()'s: per-circuit credit (a socket is not read while its
circuit has no credit; a circuit's bytes stay in its queue while the socket is full),
an EOF becomes send_eof the other way (half-close), a broken side aborts the other, and
the session record gets the byte counts and the reason.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import trio

from gateway.carriers.circuit import Circuit
from gateway.carriers.writes import write_batch
from gateway.errors import SessionError
from gateway.relay.localsock import LocalStream, set_reset_on_close
from gateway.relay.sessions import SessionRecord
from gateway.relay.splice import SPLICE_CHUNK, SpliceResult, describe_abnormal_end, describe_error, splice
from gateway_codecs import ErrorCode

log = logging.getLogger("tunnelgate.relay")

MAX_EVENTS = 512  # socket events handled per wake-up (one write batch)
_IN, _OUT, _ERR, _HUP = select.EPOLLIN, select.EPOLLOUT, select.EPOLLERR, select.EPOLLHUP

SessionEnd = Callable[[BaseException | None], None]
T = TypeVar("T")


class _Session:
    """One socket and one circuit, relayed both ways; all methods are synchronous."""

    __slots__ = ("circuit", "circuit_eof_done", "ended", "fd", "hub", "mask", "on_end", "pending",
                 "reading", "record", "registered", "sock", "sock_error", "socket_eof_done",
                 "socket_is_client", "to_circuit", "to_socket")

    def __init__(self, hub: SocketRelay, sock: socket.socket, circuit: Circuit,
                 record: SessionRecord, socket_is_client: bool, on_end: SessionEnd) -> None:
        self.hub = hub
        self.sock = sock
        self.fd = sock.fileno()
        self.circuit = circuit
        self.record = record
        self.socket_is_client = socket_is_client
        self.on_end = on_end
        self.mask = 0
        # In the epoll set even with an empty mask: epoll then still reports an error or
        # hang-up, so a reset is noticed while the socket is not read (no credit).
        self.registered = False
        self.pending: memoryview | None = None  # circuit bytes the socket has not taken yet
        self.reading = True  # the socket is read (until its EOF; paused without credit)
        self.to_circuit = 0
        self.to_socket = 0
        self.socket_eof_done = False  # the socket's EOF went on as the circuit's FIN
        self.circuit_eof_done = False  # the circuit's FIN went on as shutdown(SHUT_WR)
        # An error a send in push() met: reading it consumed the socket's pending error,
        # so the socket may next look like a clean EOF. Checked before anything else.
        self.sock_error: OSError | None = None
        self.ended = False

    # ---- registration
    def _watch(self, mask: int) -> None:
        if self.ended:
            return
        if not self.registered:
            self.hub.epoll.register(self.fd, mask)
            self.registered = True
        elif mask != self.mask:
            self.hub.epoll.modify(self.fd, mask)
        self.mask = mask

    def _unwatch(self) -> None:
        if self.registered:
            self.registered = False
            self.mask = 0
            self.hub.epoll.unregister(self.fd)

    def start(self) -> None:
        self.circuit.sink = self.push_guarded
        self.circuit.watcher = self.on_circuit_event_guarded
        self._watch(_IN)
        self.on_circuit_event()  # what the circuit queued before we took it over

    # ---- circuit -> socket
    def push_guarded(self, data: bytes | memoryview) -> int:
        """`push` as the circuit's sink: it runs in the carrier's reader, which a bug in
        one session must not stop."""
        try:
            return self.push(data)
        except Exception as exc:
            _internal_error(self, exc)
            return 0

    def push(self, data: bytes | memoryview) -> int:
        """The circuit's sink: write at once if nothing is waiting; the rest stays queued."""
        if self.pending is not None or self.mask & _OUT:
            return 0
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            # Not raised here (this is the carrier's reader): kept, and the OUT watch
            # brings the relay task to fail the session with it.
            self.sock_error = exc
            sent = 0
        if sent < len(data):
            self._watch(self.mask | _OUT)
        self.to_socket += sent
        return sent

    def _drain_circuit(self) -> None:
        """Write what the circuit has queued while the socket takes it; then its EOF."""
        while True:
            if self.pending is None:
                data = self.circuit.take_nowait(SPLICE_CHUNK)
                if data is None:
                    break
                self.pending = memoryview(data)
            try:
                sent = self.sock.send(self.pending)
            except (BlockingIOError, InterruptedError):
                self._watch(self.mask | _OUT)
                return
            except OSError as exc:
                self._fail_socket(exc)
                return
            self.to_socket += sent
            if sent < len(self.pending):
                self.pending = self.pending[sent:]
                self._watch(self.mask | _OUT)
                return
            self.pending = None
        self._watch(self.mask & ~_OUT)
        if self.circuit.at_eof and not self.circuit_eof_done:
            self.circuit_eof_done = True
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError as exc:
                if exc.errno != errno.ENOTCONN:
                    self._fail_socket(exc)
                    return
            self._end_if_done()

    def on_circuit_event_guarded(self) -> None:
        _guarded(self, self.on_circuit_event)

    def on_circuit_event(self) -> None:
        """EOF, credit or breakage on the circuit (from the carrier's reader), or a start."""
        if self.ended:
            return
        circuit = self.circuit
        if circuit.broken is not None:
            self.fail(circuit.broken)
            return
        if self.reading and not self.mask & _IN and circuit.send_credit > 0:
            self._watch(self.mask | _IN)  # credit is back: read the socket again
        if not self.mask & _OUT:
            self._drain_circuit()

    # ---- socket -> circuit
    def _read_socket(self) -> None:
        if self.sock_error is not None:
            self._fail_socket(self.sock_error)
            return
        circuit = self.circuit
        credit = circuit.send_credit
        if credit <= 0:
            self._watch(self.mask & ~_IN)  # on_circuit_event resumes when credit arrives
            return
        try:
            data = self.sock.recv(min(credit, SPLICE_CHUNK))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fail_socket(exc)
            return
        if not data:
            self.reading = False
            self._watch(self.mask & ~_IN)
            try:
                circuit.end_now()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.fail(circuit.broken or SessionError("circuit closed"))
                return
            self.socket_eof_done = True
            self._end_if_done()
            return
        if circuit.try_send(data) < len(data):
            self.fail(circuit.broken or SessionError("circuit closed"))
            return
        self.to_circuit += len(data)

    def on_events(self, mask: int) -> None:
        if self.sock_error is not None:
            self._fail_socket(self.sock_error)
            return
        if mask & _ERR:
            code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            self.fail(SessionError(f"connection broken: {os.strerror(code) if code else 'error'}"))
            return
        if mask & (_IN | _HUP) and self.mask & _IN:
            self._read_socket()
        if mask & _OUT and not self.ended:
            self._drain_circuit()
        if mask & _HUP and not self.ended and not self.mask & (_IN | _OUT):
            # Both directions of the socket are shut (no error: that came first) and we
            # wait for nothing on it (HUP would be reported forever): stop watching;
            # credit or data re-registers it.
            self._unwatch()

    # ---- the end
    def _end_if_done(self) -> None:
        if self.socket_eof_done and self.circuit_eof_done:
            self.end(None)

    def _fail_socket(self, exc: OSError) -> None:
        self.fail(SessionError(f"connection broken: {exc.strerror or exc}"))

    def fail(self, error: BaseException) -> None:
        """End both sides as broken: RST on the circuit and on the socket, so neither
        far end takes what it got for the whole session (a FIN would say so)."""
        if not self.ended:
            set_reset_on_close(self.sock)
            self.circuit.abort(str(error) or "the other side of the relay broke")
            self.end(error)

    def end(self, error: BaseException | None) -> None:
        if self.ended:
            return
        self._unwatch()
        self.ended = True
        self.hub.sessions.pop(self.fd, None)
        circuit = self.circuit
        circuit.sink = None
        circuit.watcher = None
        circuit.close_now()
        self.sock.close()
        if self.socket_is_client:
            self.record.finish(self.to_circuit, self.to_socket, _describe(error))
        else:
            self.record.finish(self.to_socket, self.to_circuit, _describe(error))
        self.record.__exit__(None, None, None)
        self.on_end(error)


def abort_unrelayed(stream: LocalStream, circuit: Circuit, reason: str,
                    code: int = ErrorCode.CANCELLED) -> None:
    """End a session that broke before its relaying started (end-to-end handshake failed
    or timed out, cancelled while it waited): RST on the circuit and on the socket, as for
    any broken session. A close here would say the session completed."""
    if circuit.broken is None:
        circuit.reset(code, reason)
    circuit.close_now()
    stream.abort(reason)
    stream.close_now()


async def handshake_or_abort(handshake: Callable[[], Awaitable[T]], stream: LocalStream,
                             circuit: Circuit, record: SessionRecord,
                             warn: Callable[[str], None]) -> T | None:
    """Run a session's end-to-end handshake before it is relayed. If it fails or times
    out, the session ends as broken (RST both ways, END_TO_END_FAILED, logged with the
    reason) and this returns None; if it is cancelled, the same, and the cancel goes on."""
    try:
        return await handshake()
    except (trio.BrokenResourceError, trio.TooSlowError) as exc:
        reason = ("end-to-end handshake timed out" if isinstance(exc, trio.TooSlowError)
                  else describe_error(exc))
        warn(reason)
        record.finish(0, 0, reason)
        abort_unrelayed(stream, circuit, reason, ErrorCode.END_TO_END_FAILED)
        return None
    except BaseException as exc:
        abort_unrelayed(stream, circuit, describe_abnormal_end(exc))
        raise


def _guarded(session: _Session, handler: Callable[..., None], *args: int) -> None:
    """A bug in one session's handling must not take the relay (every session) down."""
    try:
        handler(*args)
    except Exception as exc:
        _internal_error(session, exc)


def _internal_error(session: _Session, exc: Exception) -> None:
    log.exception("relayed session %s: internal error; ending it", session.record.what)
    try:
        session.fail(SessionError(f"internal error: {exc}"))
    except Exception:
        log.exception("relayed session %s: could not end it cleanly", session.record.what)
        session.hub.sessions.pop(session.fd, None)
        with contextlib.suppress(OSError, ValueError):
            session.hub.epoll.unregister(session.fd)
        session.ended = True
        set_reset_on_close(session.sock)
        session.sock.close()
        if not session.record.closed:
            out, back = ((session.to_circuit, session.to_socket) if session.socket_is_client
                         else (session.to_socket, session.to_circuit))
            session.record.finish(out, back, f"internal error: {exc}")
            session.record.__exit__(None, None, None)  # a drain must not wait for it


def _describe(error: BaseException | None) -> str:
    return "" if error is None else (str(error) or type(error).__name__)


class _ErrorWatch:
    """A socket some other relay (a task, e.g. splice) moves bytes for, watched here for
    an error or hang-up only: that relay does not look at its socket while it waits for
    credit, and a reset must end the session whatever the flow-control state."""

    __slots__ = ("fd", "hub", "on_error", "sock")

    def __init__(self, hub: SocketRelay, sock: socket.socket, on_error: Callable[[SessionError], None]
                 ) -> None:
        self.hub = hub
        self.sock = sock
        self.fd = sock.fileno()
        self.on_error = on_error

    def on_events(self, mask: int) -> None:
        if mask & _ERR:
            # SO_ERROR is not read: that would clear the error, and the other relay's next
            # recv would then take the dead socket for a clean EOF.
            self.stop()
            self.on_error(SessionError("connection broken: reset or error on the socket"))
        elif mask & _HUP:
            self.stop()  # both directions shut cleanly: nothing left that could break

    def fail(self, error: BaseException) -> None:
        self.stop()

    def stop(self) -> None:
        if self.hub.sessions.get(self.fd) is self:
            del self.hub.sessions[self.fd]
            with contextlib.suppress(OSError, ValueError):
                self.hub.epoll.unregister(self.fd)


class SocketRelay:
    """The gateway's relay for plain socket <-> circuit sessions (see the module docstring).

    `run` is the one task; `adopt` hands it a session, which then needs nothing else.
    """

    def __init__(self) -> None:
        self.epoll = select.epoll()
        self.sessions: dict[int, _Session | _ErrorWatch] = {}
        self.running = False

    def adopt(self, sock: socket.socket, circuit: Circuit, record: SessionRecord,
              socket_is_client: bool, on_end: SessionEnd, sent_before: int = 0) -> None:
        """Relay `sock` <-> `circuit` until both ends finished or one broke. `record` is
        entered now and exited at the end; `on_end(error)` is called once, at the end.
        `sent_before`: bytes of the socket's the caller already put on the circuit."""
        record.__enter__()
        session = _Session(self, sock, circuit, record, socket_is_client, on_end)
        session.to_circuit = sent_before
        self.sessions[session.fd] = session
        with write_batch():
            _guarded(session, session.start)

    @contextlib.contextmanager
    def watch_errors(self, sock: socket.socket, on_error: Callable[[SessionError], None]
                     ) -> Iterator[None]:
        """Call `on_error` (once) if `sock` gets an error or reset while in the block."""
        watch = _ErrorWatch(self, sock, on_error)
        if self.running and watch.fd not in self.sessions:
            self.sessions[watch.fd] = watch
            self.epoll.register(watch.fd, 0)  # an empty mask: errors and hang-ups only
        try:
            yield
        finally:
            watch.stop()

    async def splice_socket(self, stream: LocalStream, other: trio.abc.HalfCloseableStream,
                            circuit: Circuit, result: SpliceResult, stream_first: bool = True) -> None:
        """`splice(stream, other)` (or the other way round) for a session this relay does
        not carry itself (end-to-end TLS inside `circuit`), with both ends watched: a
        reset of the socket or of the circuit ends the session at once, even while a pump
        waits for credit or for the other socket to drain."""
        with trio.CancelScope() as scope:
            def broken(error: BaseException) -> None:
                if result.error is None:
                    result.error = error
                scope.cancel()  # splice aborts both sides (RST)

            def circuit_event() -> None:
                if circuit.broken is not None:
                    error = trio.BrokenResourceError(str(circuit.broken))
                    error.__cause__ = circuit.broken
                    broken(error)

            circuit.watcher = circuit_event
            try:
                with self.watch_errors(stream.sock, broken):
                    a, b = (stream, other) if stream_first else (other, stream)
                    await splice(a, b, result)
            finally:
                circuit.watcher = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; then abort what is still open (shutdown's drain is over)."""
        self.running = True
        task_status.started()
        try:
            while True:
                await trio.lowlevel.wait_readable(self.epoll)
                with write_batch():  # one write per carrier for all this wake-up moved
                    for fd, mask in self.epoll.poll(0, MAX_EVENTS):
                        session = self.sessions.get(fd)
                        if isinstance(session, _Session):
                            _guarded(session, session.on_events, mask)
                        elif session is not None:
                            session.on_events(mask)
        finally:
            self.running = False
            with write_batch():
                for session in list(self.sessions.values()):
                    session.fail(SessionError("gateway shut down"))
            trio.lowlevel.notify_closing(self.epoll)
            self.epoll.close()
