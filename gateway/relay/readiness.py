"""Socket readiness for the relay engine: which local sockets can be read or written now.

The engine runs without a task per session, so it needs a readiness source that calls
it back. Two backends, one interface (`Readiness`):

- `EpollReadiness` (Linux, the default there): one level-triggered epoll set of our own,
  which trio watches as a single file descriptor; one wake-up hands over up to
  `MAX_EVENTS` sockets. An empty mask still reports errors and hang-ups, so a socket
  that is not read (its circuit has no credit) still reports a reset.
- `TaskReadiness` (everywhere trio runs: macOS, the BSDs; forced on Linux with
  ``TUNNELGATE_READINESS=portable``, as CI does for a second run of the suite): trio's
  own waits, one task per watched socket and one more while it waits to write. A socket
  that is not read is checked for an error when it becomes readable, and then every
  `STALL_POLL` seconds while it stays stalled (a reset must end a session whatever its
  credit).

Event bits are epoll's values on every platform, so the Linux path passes masks through.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import logging
import os
import select
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import Protocol

import trio

from gateway.carriers.writes import write_batch

log = logging.getLogger("tunnelgate.readiness")

READABLE, WRITABLE, ERROR, HANGUP = 0x001, 0x004, 0x008, 0x010
MAX_EVENTS = 512  # socket events handled per epoll wake-up (one write batch)
STALL_POLL = 0.25  # s between error checks of a readable socket nobody may read yet
BACKEND_ENV = "TUNNELGATE_READINESS"


class Watcher(Protocol):
    """What a watched socket's owner implements, called inside a write batch; neither may
    raise (the engine guards its own entry points)."""

    def on_ready(self, events: int) -> None:
        """The socket is ready for these event bits (ERROR: read SO_ERROR to learn which)."""

    def on_socket_error(self, code: int) -> None:
        """The socket failed with errno `code` (the backend has read SO_ERROR already)."""


class Readiness(abc.ABC):
    """Watch sockets for the engine; `serve` is the one task that delivers events."""

    name: str

    @abc.abstractmethod
    def add(self, sock: socket.socket, watcher: Watcher, mask: int) -> None: ...

    @abc.abstractmethod
    def modify(self, sock: socket.socket, mask: int) -> None: ...

    @abc.abstractmethod
    def remove(self, sock: socket.socket) -> None:
        """Stop watching (before the socket is closed); never raises."""

    @abc.abstractmethod
    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Deliver events until cancelled."""


class EpollReadiness(Readiness):
    name = "epoll"

    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._watchers: dict[int, Watcher] = {}

    def add(self, sock: socket.socket, watcher: Watcher, mask: int) -> None:
        fd = sock.fileno()
        self._epoll.register(fd, mask)
        self._watchers[fd] = watcher

    def modify(self, sock: socket.socket, mask: int) -> None:
        self._epoll.modify(sock.fileno(), mask)

    def remove(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        if self._watchers.pop(fd, None) is not None:
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(fd)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        epoll, watchers = self._epoll, self._watchers
        try:
            while True:
                await trio.lowlevel.wait_readable(epoll)
                with write_batch():  # one write per carrier for all this wake-up moved
                    for fd, events in epoll.poll(0, MAX_EVENTS):
                        watcher = watchers.get(fd)
                        if watcher is not None:
                            watcher.on_ready(events)
        finally:
            trio.lowlevel.notify_closing(epoll)
            epoll.close()


class _Watch:
    """One socket under `TaskReadiness`: a reader task for its life, a writer task while
    it waits to write."""

    __slots__ = ("active", "mask", "read_scope", "sock", "watcher", "write_scope", "writing")

    def __init__(self, sock: socket.socket, watcher: Watcher, mask: int) -> None:
        self.sock = sock
        self.watcher = watcher
        self.mask = mask
        self.active = True
        self.writing = False
        self.read_scope: trio.CancelScope | None = None
        self.write_scope: trio.CancelScope | None = None

    async def guarded(self, watch: Callable[[], Awaitable[None]]) -> None:
        """A bug while watching one socket ends that socket's session, not the backend
        (whose end would end every session of the gateway)."""
        try:
            await watch()
        except Exception:
            log.exception("readiness: internal error watching fd %d; ending its session",
                          self.sock.fileno())
            self.active = False
            with write_batch():
                self.watcher.on_socket_error(errno.EIO)

    def deliver(self, events: int) -> None:
        with write_batch():
            self.watcher.on_ready(events)

    async def watch_reads(self) -> None:
        with contextlib.suppress(trio.ClosedResourceError, OSError):
            while self.active:
                with trio.CancelScope() as self.read_scope:
                    await trio.lowlevel.wait_readable(self.sock)
                    if not self.active:
                        return
                    if self.mask & READABLE:
                        self.deliver(READABLE)
                        continue
                    # Not to be read now (no credit): readable means data, an EOF or an
                    # error. Only an error matters until reading resumes.
                    code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if code:
                        with write_batch():
                            self.watcher.on_socket_error(code)
                        return
                    await trio.sleep(STALL_POLL)  # cancelled when reading resumes

    async def watch_writes(self) -> None:
        # `writing` was set when this task was scheduled: a second request to write
        # before it runs must not start another (one waiter per fd and direction).
        try:
            with trio.CancelScope() as self.write_scope, \
                    contextlib.suppress(trio.ClosedResourceError, OSError):
                while self.active and self.mask & WRITABLE:
                    await trio.lowlevel.wait_writable(self.sock)
                    if self.active and self.mask & WRITABLE:
                        self.deliver(WRITABLE)
        finally:
            self.writing = False


class TaskReadiness(Readiness):
    name = "portable"

    def __init__(self) -> None:
        self._watches: dict[int, _Watch] = {}
        self._nursery: trio.Nursery | None = None

    def add(self, sock: socket.socket, watcher: Watcher, mask: int) -> None:
        if self._nursery is None:
            raise RuntimeError("the readiness task is not running")
        watch = _Watch(sock, watcher, mask)
        self._watches[sock.fileno()] = watch
        self._nursery.start_soon(watch.guarded, watch.watch_reads)
        if mask & WRITABLE:
            watch.writing = True
            self._nursery.start_soon(watch.guarded, watch.watch_writes)

    def modify(self, sock: socket.socket, mask: int) -> None:
        watch = self._watches[sock.fileno()]
        old, watch.mask = watch.mask, mask
        if mask & READABLE and not old & READABLE and watch.read_scope is not None:
            watch.read_scope.cancel()  # out of a stall's sleep: read now
        if mask & WRITABLE and not watch.writing:
            assert self._nursery is not None
            watch.writing = True
            self._nursery.start_soon(watch.guarded, watch.watch_writes)

    def remove(self, sock: socket.socket) -> None:
        watch = self._watches.pop(sock.fileno(), None)
        if watch is not None:
            watch.active = False
            for scope in (watch.read_scope, watch.write_scope):
                if scope is not None:
                    scope.cancel()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None
                nursery.cancel_scope.cancel()


def open_readiness() -> Readiness:
    """epoll where the platform has it, the portable backend elsewhere or when
    ``TUNNELGATE_READINESS=portable`` asks for it."""
    wanted = os.environ.get(BACKEND_ENV, "").strip().lower()
    if wanted not in ("", "epoll", "portable"):
        print(f"tunnelgate: {BACKEND_ENV}={wanted!r} is not epoll or portable; using the default",
              file=sys.stderr)
    if wanted != "portable" and hasattr(select, "epoll"):
        return EpollReadiness()
    return TaskReadiness()
