"""The readiness backends: chosen from the platform or the environment, and the portable
one reports what the engine needs (readable, writable, and a reset while not read)."""

from __future__ import annotations

import select
import socket
import struct

import pytest
import trio

from gateway.relay.readiness import (
    ERROR,
    READABLE,
    WRITABLE,
    EpollReadiness,
    Readiness,
    TaskReadiness,
    open_readiness,
)


@pytest.mark.parametrize(("wanted", "expected"), [("portable", TaskReadiness), ("epoll", EpollReadiness),
                                                  ("", EpollReadiness), ("kqueue", EpollReadiness)])
def test_the_backend_is_chosen_from_the_environment(monkeypatch: pytest.MonkeyPatch, wanted: str,
                                                    expected: type) -> None:
    if not hasattr(select, "epoll"):
        pytest.skip("no epoll on this platform")
    monkeypatch.setenv("TUNNELGATE_READINESS", wanted)
    assert isinstance(open_readiness(), expected)


def test_without_epoll_the_portable_backend_is_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TUNNELGATE_READINESS", raising=False)
    monkeypatch.delattr(select, "epoll", raising=False)
    assert isinstance(open_readiness(), TaskReadiness)


class Seen:
    def __init__(self) -> None:
        self.events: list[int] = []
        self.errors: list[int] = []
        self.changed = trio.Event()

    def on_ready(self, events: int) -> None:
        self.events.append(events)
        self.changed.set()

    def on_socket_error(self, code: int) -> None:
        self.errors.append(code)
        self.changed.set()

    async def next(self) -> None:
        with trio.fail_after(5):
            await self.changed.wait()
        self.changed = trio.Event()


@pytest.mark.parametrize("backend", [TaskReadiness, EpollReadiness])
async def test_a_reset_is_reported_while_the_socket_is_not_read(backend: type[Readiness]) -> None:
    if backend is EpollReadiness and not hasattr(select, "epoll"):
        pytest.skip("no epoll on this platform")
    readiness = backend()
    listener = socket.create_server(("127.0.0.1", 0))
    peer = socket.create_connection(listener.getsockname())
    ours, _ = listener.accept()
    listener.close()
    ours.setblocking(False)
    seen = Seen()
    async with trio.open_nursery() as nursery:
        await nursery.start(readiness.serve)
        readiness.add(ours, seen, READABLE)
        peer.sendall(b"data nobody reads yet")
        await seen.next()
        assert seen.events[-1] & READABLE
        readiness.modify(ours, WRITABLE)  # stop reading (no credit), wait to write
        await seen.next()
        assert seen.events[-1] & WRITABLE
        readiness.modify(ours, 0)  # nothing wanted: only an error may still be reported
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.close()
        await seen.next()
        if seen.errors:
            assert seen.errors == [104]  # ECONNRESET, read by the backend
        else:
            assert seen.events[-1] & ERROR
        readiness.remove(ours)
        nursery.cancel_scope.cancel()
    ours.close()


@pytest.mark.parametrize("backend", [TaskReadiness, EpollReadiness])
async def test_a_descriptor_reused_at_once_after_remove_and_close_can_be_watched(
        backend: type[Readiness]) -> None:
    """The portable backend's watch tasks wait in trio on the socket: removing it must
    drop those waits at once, or a new socket given the same descriptor number (the next
    session's, created in the same scheduler tick) meets "another task is already
    reading / writing this fd", and the error ended the whole gateway."""
    if backend is EpollReadiness and not hasattr(select, "epoll"):
        pytest.skip("no epoll on this platform")
    readiness = backend()
    async with trio.open_nursery() as nursery:
        await nursery.start(readiness.serve)
        for _ in range(50):
            ours, theirs = socket.socketpair()
            ours.setblocking(False)
            readiness.add(ours, Seen(), READABLE | WRITABLE)
            await trio.lowlevel.checkpoint()  # the watch tasks are waiting now
            fd = ours.fileno()
            readiness.remove(ours)
            ours.close()
            theirs.close()
            again, other = socket.socketpair()
            assert again.fileno() == fd or other.fileno() == fd  # the number is reused
            again.setblocking(False)
            seen = Seen()
            readiness.add(again, seen, WRITABLE)
            await seen.next()  # watched, and writable: no BusyResourceError
            readiness.remove(again)
            again.close()
            other.close()
        nursery.cancel_scope.cancel()


async def test_asking_twice_to_write_before_the_watch_runs_starts_one_writer() -> None:
    """Two `modify` calls wanting WRITABLE in one scheduler tick: the second must not
    start a second writer task on the same socket (trio: "another task is already
    reading / writing this fd", which ended the portable backend and the gateway)."""
    readiness = TaskReadiness()
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    seen = Seen()
    async with trio.open_nursery() as nursery:
        await nursery.start(readiness.serve)
        readiness.add(ours, seen, READABLE)
        readiness.modify(ours, READABLE | WRITABLE)
        readiness.modify(ours, WRITABLE)
        await seen.next()
        assert seen.events[-1] & WRITABLE
        readiness.remove(ours)
        nursery.cancel_scope.cancel()
    ours.close()
    theirs.close()


async def test_a_bug_while_watching_one_socket_ends_only_its_session() -> None:
    class Broken(Seen):
        def on_ready(self, events: int) -> None:
            raise RuntimeError("a bug in this session's handling")

    readiness = TaskReadiness()
    bad, bad_peer = socket.socketpair()
    good, good_peer = socket.socketpair()
    for s in (bad, good):
        s.setblocking(False)
    broken, seen = Broken(), Seen()
    async with trio.open_nursery() as nursery:
        await nursery.start(readiness.serve)
        readiness.add(bad, broken, WRITABLE)
        await broken.next()
        assert broken.errors == [5]  # EIO: the session is failed with the error
        readiness.add(good, seen, WRITABLE)  # the backend still serves the others
        await seen.next()
        assert seen.events[-1] & WRITABLE
        readiness.remove(bad)
        readiness.remove(good)
        nursery.cancel_scope.cancel()
    for s in (bad, bad_peer, good, good_peer):
        s.close()
