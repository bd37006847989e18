"""Resumable sessions (issue 11, SPEC.md §14), in process: an entry and an exit relayed
by the engine over real carriers; the carrier under the session is killed mid-transfer
and the session goes on over a new one, every byte once and in order."""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import trio

from gateway.carriers.carrier import Carrier
from gateway.carriers.circuit import Circuit
from gateway.carriers.transport import SocketTransport
from gateway.carriers.writes import flush_lingering
from gateway.errors import CircuitBroken, OpenRefused
from gateway.relay import resume
from gateway.relay.e2e import SecureStream
from gateway.relay.engine import RelayEngine
from gateway.relay.ports import CircuitPort, Relay, SocketPort
from gateway.relay.resume import ResumeState, ResumeTable, Resumption, exit_state, make_resumable, open_state
from gateway.relay.sessions import SessionLog
from gateway.security.identity import write_identity
from gateway.security.tls import client_context, server_context
from gateway_codecs import (
    Acknowledged,
    CircuitKind,
    CircuitReset,
    ErrorCode,
    FrameType,
    OpenRequest,
    Resumable,
    Resuming,
)
from gateway_codecs.frames import FinFlags
from tests.carriers import carriers
from tests.codec_helpers import parse_frames

MIB = 1 << 20
TARGET = OpenRequest(CircuitKind.TCP, "127.0.0.1", 9)


def _tcp_pair() -> tuple[socket.socket, socket.socket]:
    listener = socket.create_server(("127.0.0.1", 0))
    far = socket.create_connection(listener.getsockname())
    near, _ = listener.accept()
    listener.close()
    return far, near


@dataclass
class Session:
    client: trio.SocketStream  # what the client holds (the entry's local socket's peer)
    target: trio.SocketStream  # what the target holds (the exit's local socket's peer)
    sessions: SessionLog
    reconnected: trio.Event | None = None  # set it after replacing the entry's carrier
    entry_port: Resumption | None = None


@asynccontextmanager
async def resumable_session(carrier_slot: list[Carrier], timeout: float = 10.0, tls: Path | None = None,
                            capacity: int = 1 << 30
                            ) -> AsyncIterator[tuple[Session, ResumeTable, ResumeTable]]:
    """An entry and an exit gateway's halves in one process. `carrier_slot[0]` is the
    entry's current carrier to the exit (the test replaces it to "reconnect")."""
    sessions = SessionLog()
    changed = trio.Event()

    async def find_carrier(peer: str, deadline: float, avoid: Carrier | None) -> Carrier | None:
        with trio.move_on_at(deadline):
            while carrier_slot[0].closed.is_set():
                await changed.wait()
            return carrier_slot[0]
        return None

    entry_table = ResumeTable(timeout, find_carrier, handshake_timeout=5, capacity=capacity)
    exit_table = ResumeTable(timeout)
    engine = RelayEngine()
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        await nursery.start(entry_table.run)
        await nursery.start(exit_table.run)
        client, target, entry_port = await _open(engine, carrier_slot[0], entry_table, exit_table,
                                                 sessions, tls)
        session = Session(client, target, sessions, entry_port=entry_port)
        session.reconnected = changed
        yield session, entry_table, exit_table
        nursery.cancel_scope.cancel()
    await client.aclose()
    await target.aclose()


async def _open(engine: RelayEngine, carrier: Carrier, entry_table: ResumeTable,
                exit_table: ResumeTable, sessions: SessionLog, tls: Path | None
                ) -> tuple[trio.SocketStream, trio.SocketStream, Resumption]:
    """`tls`: a folder for an identity: the session runs TLS end to end inside."""
    client, entry_sock = _tcp_pair()
    target, exit_sock = _tcp_pair()
    state, near, far = await _resumable_circuits(carrier)
    near_port, far_port = CircuitPort(near), CircuitPort(far)
    if tls is not None:
        near_tls, far_tls = await _handshake(near, far, tls)
        near_port, far_port = near_tls.into_port(), far_tls.into_port()
    engine.relay(make_resumable(far_port, exit_state(far.request), exit_table),
                 SocketPort(exit_sock, engine.readiness), sessions.open("exit", "t", far))
    entry_port = make_resumable(near_port, state, entry_table)
    engine.relay(SocketPort(entry_sock, engine.readiness), entry_port, sessions.open("entry", "t", near))
    assert isinstance(entry_port, Resumption)
    return (trio.SocketStream(trio.socket.from_stdlib_socket(client)),
            trio.SocketStream(trio.socket.from_stdlib_socket(target)), entry_port)


async def _resumable_circuits(carrier: Carrier, ack_at_once: bool = False
                              ) -> tuple[ResumeState, Circuit, Circuit]:
    """A resumable OPEN, accepted by the far end (whose exit port sends the first ACK;
    `ack_at_once`: an ACK(0) right after OPEN_OK too, as exits before 2026-12-06 did)."""
    state, request = open_state(TARGET, "exit")
    near = carrier.open(request)
    far = await _accepted.receive()
    assert isinstance(near, Circuit) and isinstance(far, Circuit)
    far.accept()
    if ack_at_once:
        far.send_ack(0)
    return state, near, far


async def _handshake(near: Circuit, far: Circuit, folder: Path) -> tuple[SecureStream, SecureStream]:
    """End-to-end TLS inside the circuit, with an identity made in `folder`."""
    identity = write_identity(folder / "gw")
    near_tls = SecureStream(near, client_context(identity), server_side=False)
    far_tls = SecureStream(far, server_context(identity, [folder / "gw.crt"]), server_side=True)
    async with trio.open_nursery() as handshakes:
        handshakes.start_soon(near_tls.do_handshake)
        handshakes.start_soon(far_tls.do_handshake)
    return near_tls, far_tls


_accepted: trio.MemoryReceiveChannel[Circuit]


async def _transfer(s: Session, up: bytes, down: bytes) -> tuple[bytes, bytes]:
    got: dict[str, bytes] = {}

    async def side(me: trio.SocketStream, data: bytes, name: str) -> None:
        async def read() -> None:
            parts = []
            while chunk := await me.receive_some(65536):
                parts.append(chunk)
            got[name] = b"".join(parts)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            await me.send_all(data)
            await me.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(side, s.client, up, "at_client")  # (what the client read)
        nursery.start_soon(side, s.target, down, "at_target")
    return got["at_target"], got["at_client"]


async def test_a_resumable_session_without_loss_completes_and_retires_its_circuit() -> None:
    global _accepted
    up, down = bytes(range(256)) * 4096 * 3, bytes(reversed(range(256))) * 4096 * 2
    with trio.fail_after(20):
        async with carriers(64 * 1024, resume=True) as (dialer, acceptor, inbound):
            _accepted = inbound  # type: ignore[assignment]
            async with resumable_session([dialer]) as (s, entry_table, exit_table):
                at_target, at_client = await _transfer(s, up, down)
                await s.sessions.wait_idle()
                assert not entry_table.buffered and not exit_table.buffered
                assert not dialer.circuits and not acceptor.circuits  # RST NO_ERROR retired it
                assert dialer.session.live_circuits == 0 and acceptor.session.live_circuits == 0
    assert hashlib.sha256(at_target).digest() == hashlib.sha256(up).digest()
    assert at_client == down


async def test_the_exits_first_ack_rides_with_its_fin_or_comes_within_one_sweep(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The exit says "resumable" with its first ACK, not with one of its own right after
    OPEN_OK (SPEC.md §14): a short session's first ACK is the one before the exit's FIN,
    so it costs no frame; a session that lives on gets it from the sweep. (Over carriers
    without FIN_ACK, where that ACK is a frame of its own, to count it.)"""
    global _accepted
    acks: list[int] = []
    with trio.fail_after(20):
        async with carriers(resume=True, fin_ack=False) as (dialer, acceptor, inbound):
            _accepted = inbound  # type: ignore[assignment]
            send_ack = acceptor.session.send_ack

            def counted(circuit_id: int, delivered: int) -> None:
                acks.append(delivered)
                send_ack(circuit_id, delivered)

            monkeypatch.setattr(acceptor.session, "send_ack", counted)
            monkeypatch.setattr(resume, "ACK_DELAY", 30.0)  # no sweep in this session's life
            async with resumable_session([dialer]) as (s, _, _):
                await s.client.send_all(b"question")
                await s.client.send_eof()
                assert await _read_to_eof(s.target) == b"question"
                await s.target.send_all(b"answer")  # a server answering, then closing
                await s.target.send_eof()
                assert await _read_to_eof(s.client) == b"answer"
                flush_lingering()  # the sweep's other job: the entry's final RST NO_ERROR
                await s.sessions.wait_idle()
            assert acks == [len(b"question") + 1]  # the entry's bytes and FIN, before our FIN
            acks.clear()
            monkeypatch.setattr(resume, "ACK_DELAY", 0.05)
            async with resumable_session([dialer]) as (s, _, _):
                assert s.entry_port is not None
                while not s.entry_port.resume.confirmed:  # idle: the sweep sends ACK(0)
                    await trio.sleep(0.01)
                assert acks == [0]


async def test_a_plain_session_whose_route_is_lost_before_the_first_ack_resumes(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """No ACK has come yet, but every byte the entry sent is still in its replay: it
    parks the session and resumes it, and the exit, which held it from OPEN_OK on, takes it."""
    monkeypatch.setattr(resume, "ACK_DELAY", 30.0)  # no sweep, so no first ACK
    with trio.fail_after(20):
        async with session_with_a_spare_carrier() as (s, entry_table, _, switch):
            assert s.entry_port is not None and not s.entry_port.resume.confirmed
            await s.client.send_all(b"before")
            assert await s.target.receive_some(6) == b"before"
            _cut(s.entry_port.circuit.carrier)  # type: ignore[arg-type]
            while not entry_table.parked:
                await trio.sleep(0.01)
            switch()
            at_target, at_client = await _transfer(s, b" and after", b"reply")
            flush_lingering()  # the sweep's other job: the entry's final RST NO_ERROR
            await s.sessions.wait_idle()
    assert (at_target, at_client) == (b" and after", b"reply")  # "before" was read above: once


async def _read_to_eof(stream: trio.SocketStream) -> bytes:
    parts = []
    while chunk := await stream.receive_some(65536):
        parts.append(chunk)
    return b"".join(parts)


@asynccontextmanager
async def session_with_a_spare_carrier(window: int = 256 * 1024, tls: Path | None = None
                                       ) -> AsyncIterator[tuple[Session, ResumeTable, ResumeTable,
                                                                Callable[[], None]]]:
    """`resumable_session` over one carrier, with a second one standing by: the exit
    answers resumptions on it, and the returned `switch()` makes it the entry's carrier
    (call it after cutting the first)."""
    global _accepted
    async with carriers(window, resume=True) as (dialer, _, inbound), \
            carriers(window, resume=True) as (dialer2, _, inbound2):
        _accepted = inbound  # type: ignore[assignment]
        slot = [dialer]

        def switch() -> None:
            slot[0] = dialer2
            assert s.reconnected is not None
            s.reconnected.set()

        async with resumable_session(slot, tls=tls) as (s, entry_table, exit_table), \
                trio.open_nursery() as nursery:
            nursery.start_soon(_serve_resumptions, inbound2, exit_table)
            yield s, entry_table, exit_table, switch
            nursery.cancel_scope.cancel()


def _cut(carrier: Carrier) -> None:
    """Break the carrier's connection under it at both ends at once (what `ss -K` does):
    whatever is in flight is lost."""
    transport = carrier.transport
    assert isinstance(transport, SocketTransport)
    transport.sock.shutdown(socket.SHUT_RDWR)


async def _serve_resumptions(inbound: trio.MemoryReceiveChannel, table: ResumeTable) -> None:
    """The exit's side of a new carrier: answer RESUMING OPENs as the gateway does."""
    async for circuit in inbound:
        refused = table.accept(circuit)
        if refused:
            circuit.refuse(ErrorCode.RESUME_REFUSED, refused)


@pytest.mark.parametrize("end_to_end", [False, True], ids=["plain", "end-to-end"])
async def test_a_session_survives_its_carrier_cut_mid_transfer(caplog: pytest.LogCaptureFixture,
                                                               end_to_end: bool, tmp_path: Path) -> None:
    global _accepted
    caplog.set_level(logging.INFO, "tunnelgate")
    up, down = os.urandom(8 * MIB), os.urandom(5 * MIB)
    with trio.fail_after(30):
        async with carriers(64 * 1024, resume=True) as (dialer, _, inbound), \
                carriers(64 * 1024, resume=True) as (dialer2, _, inbound2):
            _accepted = inbound  # type: ignore[assignment]
            slot = [dialer]
            async with resumable_session(slot, tls=tmp_path if end_to_end else None) \
                    as (s, entry_table, exit_table), trio.open_nursery() as n:
                n.start_soon(_serve_resumptions, inbound2, exit_table)
                got: list[tuple[bytes, bytes]] = []

                async def transfer() -> None:
                    got.append(await _transfer(s, up, down))

                n.start_soon(transfer)
                while dialer.session.offsets(1)[0] < 2 * MIB:  # well into the transfer
                    await trio.sleep(0.001)
                _cut(dialer)
                await trio.sleep(0.2)  # both ends park; the entry finds no carrier yet
                assert len(entry_table.parked) == 1 and len(exit_table.parked) == 1
                slot[0] = dialer2
                assert s.reconnected is not None
                s.reconnected.set()
                while not got:
                    await trio.sleep(0.01)
                await s.sessions.wait_idle()
                n.cancel_scope.cancel()
    at_target, at_client = got[0]
    assert hashlib.sha256(at_target).digest() == hashlib.sha256(up).digest()
    assert hashlib.sha256(at_client).digest() == hashlib.sha256(down).digest()
    assert caplog.text.count("route lost") == 2 and caplog.text.count("resumed (") == 2
    assert "error" not in caplog.text.lower().replace("no_error", "")


async def test_a_forged_or_replayed_resumption_is_refused_and_changes_nothing(
        caplog: pytest.LogCaptureFixture) -> None:
    """The session id is not enough: a RESUMING OPEN must reveal the secret behind the
    current verifier, and a secret is good once."""
    global _accepted
    with trio.fail_after(20):
        async with carriers(resume=True) as (dialer, _, inbound):
            _accepted = inbound  # type: ignore[assignment]
            async with resumable_session([dialer]) as (s, _, exit_table):
                (session_id,) = exit_table.exits
                assert s.entry_port is not None
                forged = Resuming(session_id, b"x" * 16, b"y" * 16, 0)
                circuit = dialer.open(replace(TARGET, resume=forged))
                answered = await _accepted.receive()
                assert exit_table.accept(answered) == "wrong or already used resumption secret"
                answered.refuse(ErrorCode.RESUME_REFUSED, "refused")
                with pytest.raises(trio.BrokenResourceError):
                    await circuit.wait_open()
                # A replay of the right secret once it has been used: refused too.
                secret = s.entry_port.resume.secret
                honest = dialer.open(replace(TARGET, resume=Resuming(session_id, secret, b"n" * 16, 0)))
                assert exit_table.accept(await _accepted.receive()) == ""
                replayed = dialer.open(replace(TARGET, resume=Resuming(session_id, secret, b"m" * 16, 0)))
                assert exit_table.accept(await _accepted.receive()) == \
                    "wrong or already used resumption secret"
                for c in (honest, replayed):
                    c.reset()
                unknown = Resuming(b"u" * 16, secret, b"m" * 16, 0)
                dialer.open(replace(TARGET, resume=unknown))
                assert "unknown or expired" in exit_table.accept(await _accepted.receive())


async def test_a_session_not_resumed_in_time_is_reset_at_both_ends(caplog: pytest.LogCaptureFixture) -> None:
    global _accepted
    caplog.set_level(logging.INFO, "tunnelgate")
    with trio.fail_after(20):
        async with carriers(resume=True) as (dialer, _, inbound):
            _accepted = inbound  # type: ignore[assignment]
            async with resumable_session([dialer], timeout=0.5) as (s, _, _):
                await s.client.send_all(b"hello")
                assert await s.target.receive_some(5) == b"hello"
                _cut(dialer)  # and no carrier ever comes back
                for end in (s.client, s.target):
                    with pytest.raises(trio.BrokenResourceError):  # RST, never a FIN
                        while await end.receive_some(100):
                            pass
                await s.sessions.wait_idle()
    assert caplog.text.count("not resumed within 0.5 s after the route was lost") == 2


async def test_past_resume_buffer_a_session_stops_being_resumable_and_says_so(
        caplog: pytest.LogCaptureFixture) -> None:
    """The target reads nothing, so what the entry sent stays unacknowledged; past the
    gateway's resume_buffer the session is no longer resumable (logged), and a carrier
    loss then ends it at once, as before resumption."""
    global _accepted
    with trio.fail_after(20):
        async with carriers(resume=True) as (dialer, _, inbound):
            _accepted = inbound  # type: ignore[assignment]
            async with resumable_session([dialer], capacity=128 * 1024) as (s, entry_table, _):
                with trio.move_on_after(0.5):
                    while True:
                        await s.client.send_all(b"z" * 65536)
                assert "no longer resumable: resume_buffer (131072 B) is full" in caplog.text
                assert entry_table.buffered == 0
                _cut(dialer)
                with pytest.raises(trio.BrokenResourceError):
                    while await s.client.receive_some(100):
                        pass
                assert not entry_table.parked


async def test_an_end_to_end_session_is_resumable_only_once_the_exit_has_its_handshake(
        caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    """An exit's ACK says "resumable", but an end-to-end session can only resume once
    the exit holds its TLS state: until the exit's ACK covers the
    entry's handshake, a lost route ends the session (RST, and the log says why) instead
    of parking it for a resumption the exit would refuse as unknown."""
    global _accepted
    caplog.set_level(logging.INFO, "tunnelgate")
    with trio.fail_after(20):
        async with carriers(resume=True) as (dialer, _, inbound):
            _accepted = inbound  # type: ignore[assignment]
            engine = RelayEngine()
            table = ResumeTable(10, handshake_timeout=5)
            sessions = SessionLog()
            async with trio.open_nursery() as nursery:
                await nursery.start(engine.run)
                await nursery.start(table.run)
                client, entry_sock = _tcp_pair()
                state, near, far = await _resumable_circuits(dialer, ack_at_once=True)
                near_tls, _ = await _handshake(near, far, tmp_path)
                # The exit never gets as far as relaying (its handshake "did not finish").
                port = make_resumable(near_tls.into_port(), state, table)
                engine.relay(SocketPort(entry_sock, engine.readiness), port,
                             sessions.open("entry", "t", near))
                await near.wait_ack()
                await trio.sleep(0.05)
                assert isinstance(port, Resumption) and not port.resume.confirmed
                _cut(dialer)
                stream = trio.SocketStream(trio.socket.from_stdlib_socket(client))
                with pytest.raises(trio.BrokenResourceError):  # RST, never a FIN
                    while await stream.receive_some(100):
                        pass
                await sessions.wait_idle()
                assert not table.parked
                nursery.cancel_scope.cancel()
            await stream.aclose()
    assert "before the exit had confirmed the session resumable" in caplog.text


async def test_a_complete_sessions_rst_waits_for_the_next_write_at_most_one_sweep() -> None:
    """RST NO_ERROR at the end of a resumable session is wanted by nobody urgently: it
    rides with the carrier's next write (no write, no wake-up of its own under load), or
    leaves with the sweep's flush_lingering."""
    global _accepted
    with trio.fail_after(10):
        async with carriers(resume=True) as (dialer, _, inbound):
            first, second = dialer.open(TARGET), dialer.open(TARGET)
            arrived = {c.id: c for c in (await inbound.receive(), await inbound.receive())}
            far_first, far_second = arrived[first.id], arrived[second.id]  # (either order)
            for far in (far_first, far_second):
                far.accept()
            await first.wait_open()
            await second.wait_open()
            assert isinstance(first, Circuit) and isinstance(second, Circuit)
            first.retire()
            await trio.sleep(0.1)
            assert far_first.broken is None  # still waiting in the carrier's queue
            await second.send_all(b"x")  # the next write takes it along
            assert await far_second.receive_some(1) == b"x"
            await trio.sleep(0.05)
            assert far_first.broken is not None and far_first.broken.code == ErrorCode.NO_ERROR
            # Alone: flush_lingering (the resume table's sweep) sends it.
            second.retire()
            await trio.sleep(0.1)
            assert far_second.broken is None
            flush_lingering()
            with trio.fail_after(2):
                while far_second.broken is None:
                    await trio.sleep(0.01)
            assert far_second.broken.code == ErrorCode.NO_ERROR


@dataclass
class Chain:
    """An entry and an exit in one process, over one carrier or through a middle relay."""

    session: Session
    entry_table: ResumeTable
    exit_table: ResumeTable
    carriers: list[Carrier]  # every carrier, dialer and acceptor ends, entry side first


@asynccontextmanager
async def chain(hop: bool, fin_ack: tuple[bool, bool] = (True, True)) -> AsyncIterator[Chain]:
    """A resumable session from a client to a target: entry -> exit, or entry -> relay ->
    exit (`hop`, the relay as exits.CircuitServer._relay runs it). `fin_ack`: whether each
    carrier (entry side, relay to exit) has FIN_ACK."""
    async with carriers(resume=True, fin_ack=fin_ack[0]) as (dialer, acceptor, inbound), \
            carriers(resume=True, fin_ack=fin_ack[1]) as (onward_dialer, onward_acceptor, onward_inbound):
        engine = RelayEngine()
        sessions = SessionLog()
        entry_table, exit_table = ResumeTable(10), ResumeTable(10)
        async with trio.open_nursery() as nursery:
            await nursery.start(engine.run)
            await nursery.start(entry_table.run)
            await nursery.start(exit_table.run)
            client, entry_sock = _tcp_pair()
            target, exit_sock = _tcp_pair()
            state, request = open_state(replace(TARGET, route=("exit",)) if hop else TARGET,
                                        "hub" if hop else "exit")
            near = dialer.open(request)
            far = await inbound.receive()
            assert isinstance(near, Circuit) and isinstance(far, Circuit)
            if hop:  # (the relay takes itself off the route)
                onward = onward_dialer.open(far.request.evolve(route=far.request.route[1:]))
                far_end = await onward_inbound.receive()
                assert isinstance(onward, Circuit) and isinstance(far_end, Circuit)
                far_end.accept()
                await onward.wait_open()
                far.accept()
                engine.relay(CircuitPort(far), CircuitPort(onward), sessions.open("relay", "t", far))
                far = far_end
            else:
                far.accept()
            engine.relay(make_resumable(CircuitPort(far), exit_state(far.request), exit_table),
                         SocketPort(exit_sock, engine.readiness), sessions.open("exit", "t", far))
            engine.relay(SocketPort(entry_sock, engine.readiness),
                         make_resumable(CircuitPort(near), state, entry_table),
                         sessions.open("entry", "t", near))
            del near, far, state
            session = Session(trio.SocketStream(trio.socket.from_stdlib_socket(client)),
                              trio.SocketStream(trio.socket.from_stdlib_socket(target)), sessions)
            used = [dialer, acceptor] + ([onward_dialer, onward_acceptor] if hop else [])
            try:
                yield Chain(session, entry_table, exit_table, used)
            finally:
                await session.client.aclose()
                await session.target.aclose()
                nursery.cancel_scope.cancel()


@pytest.mark.parametrize("hop", [False, True], ids=["entry-exit", "through-a-relay"])
async def test_an_ended_session_leaves_nothing_to_the_cyclic_garbage_collector(hop: bool) -> None:
    """Relay, directions and ports refer to each other while a session lives; at its end
    those references are cut (ports.EndedRelay), and a reset kept by a circuit loses the
    traceback that held the engine's frame. So an ended session, its sockets and circuits
    included, is freed by reference counting at once, and the collector's passes (which
    walk everything alive) stay rare: with a session's worth of cycles each time, they
    were a tenth of a relay's CPU per session."""
    gc.collect()
    gc.disable()
    try:
        with trio.fail_after(20):
            async with chain(hop) as c:
                s = c.session
                assert await _transfer(s, b"up" * 1000, b"down" * 1000) == (b"up" * 1000, b"down" * 1000)
                await s.client.aclose()
                await s.target.aclose()
                flush_lingering()  # an RST NO_ERROR, if the session ended with one
                await s.sessions.wait_idle()
                del s
                gc.set_debug(gc.DEBUG_SAVEALL)
                gc.collect()
                left = {type(o).__name__ for o in gc.garbage}
                gc.set_debug(0)
                gc.garbage.clear()
    finally:
        gc.enable()
    assert not left & {"StreamRelay", "Direction", "SocketPort", "CircuitPort", "ResumableCircuitPort",
                       "Circuit", "socket", "CircuitBroken", "ResumeState"}, left


def _count_frames(carrier: Carrier, seen: list[tuple[int, int]]) -> None:
    """Record (type, flags) of every frame `carrier` writes."""
    produce = carrier.session.data_to_send

    def counted(max_bytes: int | None = None) -> bytes:
        data = produce(max_bytes)
        seen.extend((f.type, f.flags) for f in parse_frames(data))
        return data

    carrier.session.data_to_send = counted  # type: ignore[method-assign]


async def _question_answer_then_client_closes(s: Session) -> None:
    """The pattern of most short sessions: a request, its answer, the client closes, the
    server closes in turn."""
    await s.client.send_all(b"question")
    assert await s.target.receive_some(8) == b"question"
    await s.target.send_all(b"answer")
    assert await s.client.receive_some(6) == b"answer"
    await s.client.send_eof()
    assert await _read_to_eof(s.target) == b""
    await s.target.send_eof()
    assert await _read_to_eof(s.client) == b""


@pytest.mark.parametrize("hop", [False, True], ids=["entry-exit", "through-a-relay"])
async def test_a_short_session_ends_with_two_fins_as_one_that_is_not_resumable(
        hop: bool, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """FIN_ACK (SPEC.md §14): each side's data acknowledged by the other's FIN, the last
    FIN saying COMPLETE; no ACK frame, no RST NO_ERROR, at any hop; every hop retires the
    circuit with the FINs and logs the session `ok`; the exit keeps it for a lost FIN."""
    caplog.set_level(logging.INFO, "tunnelgate")
    monkeypatch.setattr(resume, "ACK_DELAY", 30.0)  # no sweep: nothing but the session's frames
    frames: list[tuple[int, int]] = []
    with trio.fail_after(20):
        async with chain(hop) as c:
            for carrier in c.carriers:
                _count_frames(carrier, frames)
            await _question_answer_then_client_closes(c.session)
            await c.session.sessions.wait_idle()
            assert all(carrier.session.live_circuits == 0 and not carrier.circuits for carrier in c.carriers)
            assert not c.entry_table.completed
            assert len(c.exit_table.exits) == 1  # (the exit keeps it for a lost FIN)
    hops = 2 if hop else 1
    fins = sorted(flags for kind, flags in frames if kind == FrameType.FIN)
    assert fins == [int(FinFlags.ACK)] * hops + [int(FinFlags.ACK | FinFlags.COMPLETE)] * hops
    assert not [kind for kind, _ in frames if kind in (FrameType.ACK, FrameType.RST)], frames
    closed = [ln for ln in caplog.text.splitlines() if "session closed" in ln]
    assert len(closed) == 1 + hops and all(ln.endswith(", ok") for ln in closed), closed


@pytest.mark.parametrize("hop", [False, True], ids=["entry-exit", "through-a-relay"])
async def test_an_entrys_last_fin_says_complete_only_over_a_direct_carrier(
        hop: bool, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server answers and closes first, so the entry's FIN is the last. Direct, it says
    COMPLETE (the entry's TIME_WAIT covers its loss); through a relay it does not (a
    carrier beyond the first hop could lose it unseen), and the exit's RST NO_ERROR ends
    the session, as without FIN_ACK."""
    caplog.set_level(logging.INFO, "tunnelgate")
    monkeypatch.setattr(resume, "ACK_DELAY", 30.0)
    frames: list[tuple[int, int]] = []
    with trio.fail_after(20):
        async with chain(hop) as c:
            for carrier in c.carriers:
                _count_frames(carrier, frames)
            s = c.session
            await s.client.send_all(b"question")
            assert await s.target.receive_some(8) == b"question"
            await s.target.send_all(b"answer")
            await s.target.send_eof()
            assert await _read_to_eof(s.client) == b"answer"
            await s.client.send_eof()
            assert await _read_to_eof(s.target) == b""
            while any(carrier.session.live_circuits for carrier in c.carriers):
                flush_lingering()  # (the RST NO_ERROR, through a relay)
                await trio.sleep(0.01)
            await s.sessions.wait_idle()
    completes = [kind for kind, flags in frames if kind == FrameType.FIN and flags & FinFlags.COMPLETE]
    resets = [kind for kind, _ in frames if kind == FrameType.RST]
    assert (len(completes), len(resets)) == ((0, 2) if hop else (1, 0)), frames
    closed = [ln for ln in caplog.text.splitlines() if "session closed" in ln]
    assert len(closed) == (3 if hop else 2) and all(ln.endswith(", ok") for ln in closed), closed


@pytest.mark.parametrize("fin_ack", [(True, False), (False, True)],
                         ids=["exit-side-older", "entry-side-older"])
async def test_a_leg_without_fin_ack_ends_the_session_the_way_it_did_before(
        fin_ack: tuple[bool, bool], caplog: pytest.LogCaptureFixture) -> None:
    """One leg of the route has no FIN_ACK (a gateway from before it): no FIN crosses it
    with flags, the endpoint there ends the session with RST NO_ERROR as before, and all
    three end `ok` with every circuit retired."""
    caplog.set_level(logging.INFO, "tunnelgate")
    frames: list[tuple[int, int]] = []
    with trio.fail_after(20):
        async with chain(True, fin_ack) as c:
            older = c.carriers[2:] if not fin_ack[1] else c.carriers[:2]
            for carrier in older:
                _count_frames(carrier, frames)
            await _question_answer_then_client_closes(c.session)
            flush_lingering()  # the RST NO_ERROR on the older leg
            await c.session.sessions.wait_idle()
            while any(carrier.session.live_circuits for carrier in c.carriers):
                await trio.sleep(0.01)
            assert not c.entry_table.parked and not c.exit_table.parked
    assert (FrameType.RST, 0) in frames and not [f for k, f in frames if k == FrameType.FIN and f]
    closed = [ln for ln in caplog.text.splitlines() if "session closed" in ln]
    assert len(closed) == 3 and all(ln.endswith(", ok") for ln in closed), closed


async def test_a_middle_relay_takes_rst_no_error_as_the_end_even_without_fins(
        caplog: pytest.LogCaptureFixture) -> None:
    """A circuit a session resumed on after its FINs had crossed carries no FIN: the
    entry's RST NO_ERROR is its end. A relay on it passes it on and logs the session
    `ok` (it logged an error, "NO_ERROR: session complete", before)."""
    caplog.set_level(logging.INFO, "tunnelgate")
    with trio.fail_after(10):
        async with carriers(resume=True) as (dialer, _, inbound), \
                carriers(resume=True) as (onward_dialer, _, onward_inbound):
            engine, sessions = RelayEngine(), SessionLog()
            async with trio.open_nursery() as nursery:
                await nursery.start(engine.run)
                _, request = open_state(TARGET, "exit")
                near = dialer.open(request)
                far = await inbound.receive()
                onward = onward_dialer.open(far.request)
                far_end = await onward_inbound.receive()
                assert isinstance(near, Circuit) and isinstance(far, Circuit)
                assert isinstance(onward, Circuit) and isinstance(far_end, Circuit)
                far_end.accept()
                await onward.wait_open()
                far.accept()
                await near.wait_open()
                engine.relay(CircuitPort(far), CircuitPort(onward), sessions.open("relay", "t", far))
                near.retire()
                while far_end.broken is None:
                    flush_lingering()  # (what the resume table's sweep does)
                    await trio.sleep(0.01)
                assert far_end.broken.code == ErrorCode.NO_ERROR
                await sessions.wait_idle()
                nursery.cancel_scope.cancel()
    closed = [ln for ln in caplog.text.splitlines() if "relay session closed" in ln]
    assert len(closed) == 1 and closed[0].endswith(", ok"), closed


async def _cut_when_closed(caplog: pytest.LogCaptureFixture, role: str, carrier: Carrier,
                           parks: ResumeTable) -> None:
    """Once the `role` end logged its session closed (its last FIN sent), cut `carrier`
    (whatever is in flight on it is lost) and wait until the other end parks."""
    while f"{role} session closed" not in caplog.text:
        await trio.sleep(0.01)
    _cut(carrier)
    while not parks.parked:
        await trio.sleep(0.01)


def _both_ended_ok(caplog: pytest.LogCaptureFixture) -> None:
    closed = [ln for ln in caplog.text.splitlines() if "session closed" in ln]
    assert len(closed) == 2 and all(ln.endswith(", ok") for ln in closed), closed


class SlowSocket:
    """Makes one local socket take nothing until `release` (a client or target that has
    stopped reading: what the engine takes for it waits in its direction)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.port: SocketPort | None = None
        write = SocketPort.write

        def slow(port: SocketPort, data: bytes | memoryview) -> int:
            return 0 if port is self.port else write(port, data)

        monkeypatch.setattr(SocketPort, "write", slow)

    def release(self, relay: Relay) -> None:
        self.port = None
        relay.on_event()  # (no readiness event: the socket never filled)


async def _taken(relay: Relay, done: Callable[[], bool]) -> None:
    """Run the session's engine until `done()`: what arrived is taken off the circuit
    (delivered, as far as the far end learns) and waits for the slow socket."""
    while not done():
        relay.on_event()
        await trio.sleep(0.01)


async def _until(condition: Callable[[], bool]) -> None:
    while not condition():
        await trio.sleep(0.01)


async def test_after_a_complete_fin_a_lost_carrier_changes_nothing_while_the_client_drains(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """The entry has the exit's last bytes and its FIN COMPLETE, but its client is slow to
    take them. The carrier is lost meanwhile: nothing more was to cross it, so the entry
    does not park; the client gets every byte and the FIN; both ends `ok` (found by
    review: the entry parked, and its resumption of a session the exit had completed
    failed)."""
    caplog.set_level(logging.INFO, "tunnelgate")
    slow = SlowSocket(monkeypatch)
    with trio.fail_after(20):
        async with session_with_a_spare_carrier() as (s, entry_table, exit_table, _):
            entry = s.entry_port
            assert entry is not None
            exit_port = next(iter(exit_table.live))
            await s.client.send_all(b"question")
            await s.client.send_eof()
            assert await _read_to_eof(s.target) == b"question"
            slow.port = entry.relay.a  # type: ignore[attr-defined]
            await s.target.send_all(b"last bytes")
            await _taken(entry.relay, lambda: entry.resume.delivered == 10)
            await _until(lambda: exit_port.resume.acked == exit_port.resume.sent)  # (the entry's sweep)
            await s.target.send_eof()
            await _until(lambda: entry.circuit.fin_complete)
            _cut(entry.circuit.carrier)  # type: ignore[arg-type]
            await trio.sleep(0.3)
            assert not entry_table.parked
            slow.release(entry.relay)
            assert await _read_to_eof(s.client) == b"last bytes"
            await s.sessions.wait_idle()
    _both_ended_ok(caplog)


async def test_a_fin_taken_before_a_resumption_reaches_the_client_after_it(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """The entry took the exit's last bytes and FIN while its client was not reading; the
    route is lost, and the session resumes on a circuit that does not carry that FIN
    again (the entry had it). The client still gets it (found by review: it hung)."""
    caplog.set_level(logging.INFO, "tunnelgate")
    slow = SlowSocket(monkeypatch)
    with trio.fail_after(20):
        async with session_with_a_spare_carrier() as (s, entry_table, exit_table, switch):
            entry = s.entry_port
            assert entry is not None
            await s.client.send_all(b"question")
            assert await s.target.receive_some(8) == b"question"
            slow.port = entry.relay.a  # type: ignore[attr-defined]
            await s.target.send_all(b"last bytes")
            await s.target.send_eof()
            await _taken(entry.relay, lambda: entry.resume.eof_delivered)
            _cut(entry.circuit.carrier)  # type: ignore[arg-type]
            await _until(lambda: bool(entry_table.parked and exit_table.parked))
            switch()
            await _until(lambda: not entry_table.parked)
            slow.release(entry.relay)
            assert await _read_to_eof(s.client) == b"last bytes"
            await s.client.send_eof()
            assert await _read_to_eof(s.target) == b""
            await s.sessions.wait_idle()
    _both_ended_ok(caplog)


async def test_an_exit_says_complete_only_once_its_target_has_everything(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """The exit took the entry's last bytes and FIN, but its target is slow to take them:
    the target closing its side then gets a plain FIN from the exit, not one saying
    COMPLETE (which would leave nobody to resume the session if the carrier were lost
    while those bytes still wait), and the entry's RST NO_ERROR ends the session."""
    caplog.set_level(logging.INFO, "tunnelgate")
    slow = SlowSocket(monkeypatch)
    frames: list[tuple[int, int]] = []
    with trio.fail_after(20):
        async with session_with_a_spare_carrier() as (s, _, exit_table, _):
            exit_port = next(iter(exit_table.live))
            _count_frames(exit_port.circuit.carrier, frames)  # type: ignore[arg-type]
            slow.port = exit_port.relay.b  # type: ignore[attr-defined]
            await s.client.send_all(b"last bytes")
            await s.client.send_eof()
            await _taken(exit_port.relay, lambda: exit_port.resume.eof_delivered)
            await s.target.send_eof()
            await _until(lambda: exit_port.resume.fin_sent)
            slow.release(exit_port.relay)
            assert await _read_to_eof(s.target) == b"last bytes"
            while "exit session closed" not in caplog.text:
                flush_lingering()  # (the entry's RST NO_ERROR)
                await trio.sleep(0.01)
            await s.sessions.wait_idle()
    assert not [f for kind, f in frames if kind == FrameType.FIN and f & FinFlags.COMPLETE], frames
    _both_ended_ok(caplog)


def _lose_frames_of(carrier: Carrier, circuit: Circuit, kind: type = object) -> None:
    """From now on `carrier` ignores what arrives for `circuit` (as if it were lost in
    flight with a carrier about to be cut); only events of `kind` if given."""
    dispatch = carrier._dispatch

    def lossy(event: object) -> None:
        if getattr(event, "circuit_id", None) != circuit.id or not isinstance(event, kind):
            dispatch(event)  # type: ignore[arg-type]

    carrier._dispatch = lossy  # type: ignore[method-assign]


async def test_an_exits_lost_complete_fin_is_sent_again_when_the_entry_resumes(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """The exit completed the session with FIN COMPLETE and forgot all but its keys; that
    FIN is lost with the carrier. The entry, still waiting for it, resumes the session,
    and the exit answers with the FIN again: both ends `ok`."""
    caplog.set_level(logging.INFO, "tunnelgate")
    monkeypatch.setattr(resume, "ACK_DELAY", 30.0)
    with trio.fail_after(20):
        async with session_with_a_spare_carrier() as (s, entry_table, _, switch):
            assert s.entry_port is not None
            near = s.entry_port.circuit
            await s.client.send_all(b"question")
            assert await s.target.receive_some(8) == b"question"
            await s.target.send_all(b"answer")
            assert await s.client.receive_some(6) == b"answer"
            _lose_frames_of(near.carrier, near)  # type: ignore[arg-type]
            await s.client.send_eof()
            assert await _read_to_eof(s.target) == b""
            await s.target.send_eof()
            await _cut_when_closed(caplog, "exit", near.carrier, entry_table)  # type: ignore[arg-type]
            switch()
            assert await _read_to_eof(s.client) == b""
            await s.sessions.wait_idle()
    assert "its last FIN was lost; sent again" in caplog.text
    _both_ended_ok(caplog)


async def test_an_entrys_lost_complete_fin_is_sent_again_from_time_wait(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """The server answered and closed first; the client's close made the entry's FIN the
    last one, saying COMPLETE, and it is lost with the carrier. The exit parks; the entry
    (TIME_WAIT) resumes the session and sends that FIN again: both ends `ok`."""
    caplog.set_level(logging.INFO, "tunnelgate")
    monkeypatch.setattr(resume, "ACK_DELAY", 30.0)
    with trio.fail_after(20):
        async with session_with_a_spare_carrier() as (s, entry_table, exit_table, switch):
            assert s.entry_port is not None
            await s.client.send_all(b"question")
            assert await s.target.receive_some(8) == b"question"
            await s.target.send_all(b"answer")
            await s.target.send_eof()
            assert await _read_to_eof(s.client) == b"answer"
            exit_carrier = s.entry_port.circuit.carrier
            far = next(c for c in exit_table.live).circuit  # the exit's end of the circuit
            _lose_frames_of(far.carrier, far)  # type: ignore[arg-type]
            await s.client.send_eof()
            await _cut_when_closed(caplog, "entry", exit_carrier, exit_table)  # type: ignore[arg-type]
            switch()
            entry_table.sweep(trio.current_time())  # (the sweep's period is patched away)
            assert await _read_to_eof(s.target) == b""
            await s.sessions.wait_idle()
    assert "its last FIN was lost; sent again" in caplog.text
    _both_ended_ok(caplog)


async def test_a_completed_session_whose_last_rst_is_lost_is_confirmed_over_a_new_carrier(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """TIME_WAIT: the entry completed the session, but its RST NO_ERROR (the exit's only
    word that its FIN arrived) was still waiting to be written when the carrier died. The
    exit parks the session; the entry, seeing that carrier lost, resumes it saying
    everything arrived, and the exit ends it `ok` instead of giving up on it later."""
    caplog.set_level(logging.INFO, "tunnelgate")
    monkeypatch.setattr(resume, "ACK_DELAY", 30.0)  # no sweep flushes the lingering RST
    with trio.fail_after(20):
        async with session_with_a_spare_carrier() as (s, entry_table, exit_table, switch):
            assert s.entry_port is not None
            first_carrier = s.entry_port.circuit.carrier
            await s.client.send_all(b"question")
            await s.client.send_eof()
            assert await _read_to_eof(s.target) == b"question"
            await s.target.send_all(b"answer")
            await s.target.send_eof()
            assert await _read_to_eof(s.client) == b"answer"
            while "entry session closed" not in caplog.text:
                await trio.sleep(0.01)
            _cut(first_carrier)  # type: ignore[arg-type]  # the RST NO_ERROR lingered on it: lost
            while not exit_table.parked:
                await trio.sleep(0.01)
            switch()
            entry_table.sweep(trio.current_time())  # (the sweep's period is patched away)
            await s.sessions.wait_idle()
    _both_ended_ok(caplog)
    assert "exit session closed" in caplog.text and not exit_table.parked


@dataclass
class SpareRoute:
    """entry -> relay -> exit, with a spare carrier on each leg: a session resumes over
    whichever is up, through the relay, as in the gateway."""

    session: Session
    entry_table: ResumeTable
    exit_table: ResumeTable
    first: Carrier  # entry -> relay (the dialer's end)
    onward: Carrier  # relay -> exit (the dialer's end)
    near: Circuit  # the entry's circuit
    far: list[Circuit]  # the exit's circuit (filled in as it arrives)


@asynccontextmanager
async def route_with_spares(exit_timeout: float = 3.0, fin_ack: tuple[bool, bool] = (True, True),
                            entry_timeout: float = 10.0, spare: bool = True, busy_relay: bool = False
                            ) -> AsyncIterator[SpareRoute]:
    """`fin_ack`: whether the entry's legs, and the relay's legs to the exit, have FIN_ACK;
    `spare`: whether the entry finds its spare carrier when its first one is lost;
    `busy_relay`: the relay looks at a resumption's answer only once all of it came."""
    async with carriers(resume=True, fin_ack=fin_ack[0]) as (first, _, inbound), \
            carriers(resume=True, fin_ack=fin_ack[0]) as (first_spare, _, inbound_spare), \
            carriers(resume=True, fin_ack=fin_ack[1]) as (onward, _, onward_inbound), \
            carriers(resume=True, fin_ack=fin_ack[1]) as (onward_spare, _, onward_inbound_spare):
        engine, sessions = RelayEngine(), SessionLog()

        async def find_carrier(peer: str, deadline: float, avoid: Carrier | None) -> Carrier | None:
            if not first.closed.is_set():
                return first
            if spare:
                return first_spare
            await trio.sleep_until(deadline)
            return None

        entry_table = ResumeTable(entry_timeout, find_carrier, handshake_timeout=5)
        exit_table = ResumeTable(exit_timeout)
        client, entry_sock = _tcp_pair()
        target, exit_sock = _tcp_pair()
        far: list[Circuit] = []

        async def relay(circuit: Circuit) -> None:
            """As exits.CircuitServer._relay: on over whichever leg to the exit is up."""
            leg = onward_spare if onward.closed.is_set() else onward
            out = leg.open(circuit.request.evolve(route=circuit.request.route[1:]))
            if busy_relay and far:
                await trio.sleep(0.05)
            try:
                await out.wait_open()
            except trio.BrokenResourceError as exc:
                assert isinstance(exc.__cause__, OpenRefused | CircuitBroken)
                circuit.refuse(exc.__cause__.code, exc.__cause__.reason)
                return
            assert isinstance(out, Circuit)
            circuit.accept()
            engine.relay(CircuitPort(circuit), CircuitPort(out), sessions.open("relay", "t", circuit))

        async def serve_relay(channel: trio.MemoryReceiveChannel[Circuit]) -> None:
            async for circuit in channel:
                nursery.start_soon(relay, circuit)

        async def serve_exit(channel: trio.MemoryReceiveChannel[Circuit]) -> None:
            async for circuit in channel:
                if far:  # a resumption
                    refused = exit_table.accept(circuit)
                    if refused:
                        circuit.refuse(ErrorCode.RESUME_REFUSED, refused)
                    continue
                far.append(circuit)
                circuit.accept()
                engine.relay(make_resumable(CircuitPort(circuit), exit_state(circuit.request), exit_table),
                             SocketPort(exit_sock, engine.readiness), sessions.open("exit", "t", circuit))

        async with trio.open_nursery() as nursery:
            for task in (engine.run, entry_table.run, exit_table.run):
                await nursery.start(task)
            for channel in (inbound, inbound_spare):
                nursery.start_soon(serve_relay, channel)
            for channel in (onward_inbound, onward_inbound_spare):
                nursery.start_soon(serve_exit, channel)
            state, request = open_state(replace(TARGET, route=("exit",)), "relay")
            near = first.open(request)
            assert isinstance(near, Circuit)
            await near.wait_open()
            entry_port = make_resumable(CircuitPort(near), state, entry_table)
            engine.relay(SocketPort(entry_sock, engine.readiness), entry_port,
                         sessions.open("entry", "t", near))
            session = Session(trio.SocketStream(trio.socket.from_stdlib_socket(client)),
                              trio.SocketStream(trio.socket.from_stdlib_socket(target)), sessions)
            try:
                yield SpareRoute(session, entry_table, exit_table, first, onward, near, far)
            finally:
                await session.client.aclose()
                await session.target.aclose()
                nursery.cancel_scope.cancel()


def _endpoints_ended_ok(caplog: pytest.LogCaptureFixture) -> None:
    closed = [ln for ln in caplog.text.splitlines()
              if "entry session closed" in ln or "exit session closed" in ln]
    assert len(closed) == 2 and all(ln.endswith(", ok") for ln in closed), closed


async def _client_closes_then_server_answers_and_closes(s: Session) -> None:
    """The client's FIN first; the server's answer and FIN at once after it, so the
    exit's FIN cannot say COMPLETE (its answer is not acknowledged yet)."""
    await s.client.send_all(b"question")
    await s.client.send_eof()
    assert await _read_to_eof(s.target) == b"question"


async def test_through_relays_the_entrys_last_word_lost_beyond_its_first_hop_is_recovered(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """The entry has the exit's answer and FIN, and everything of its own acknowledged;
    its last word (once its RST NO_ERROR, now an ACK) is lost between the relay and the
    exit, and that carrier dies. The entry does not end the session itself through a
    relay: it waits for the exit's RST NO_ERROR, so it hears the relay's ROUTE_LOST and
    resumes, and the exit completes. Both ends `ok` (found by CI: the entry ended `ok`,
    the exit waited out resume_timeout and logged an error)."""
    caplog.set_level(logging.INFO, "tunnelgate")
    monkeypatch.setattr(resume, "ACK_DELAY", 30.0)  # no sweep: only the session's own frames
    with trio.fail_after(20):
        async with route_with_spares() as r:
            s = r.session
            await _client_closes_then_server_answers_and_closes(s)
            _lose_frames_of(r.far[0].carrier, r.far[0])  # type: ignore[arg-type]
            await s.target.send_all(b"answer")
            await s.target.send_eof()
            assert await _read_to_eof(s.client) == b"answer"
            await trio.sleep(0.1)
            assert "entry session closed" not in caplog.text  # it waits for the exit
            _cut(r.onward)
            await s.sessions.wait_idle()
    assert "resumed (" in caplog.text
    _endpoints_ended_ok(caplog)


@pytest.mark.parametrize("fin_ack", [True, False], ids=["fin-ack", "no-fin-ack"])
@pytest.mark.parametrize("spare", [True, False], ids=["route-back", "no-route"])
async def test_through_relays_an_exits_lost_rst_ends_the_entrys_session_ok_and_is_confirmed(
        fin_ack: bool, spare: bool, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The exit ended the session with RST NO_ERROR (it had the entry's ACK of its FIN);
    that RST is lost on the entry's first hop, and the carrier dies. The entry has had
    everything both ways: it ends the session `ok` at once (no parking, no RST to its
    client even if no route comes back: found by review), and tells the exit over a new
    route in the background; the exit kept what it takes to answer (CompletedExit: its
    FIN again, saying COMPLETE; FIN and RST NO_ERROR over carriers without FIN_ACK)."""
    caplog.set_level(logging.INFO, "tunnelgate")
    monkeypatch.setattr(resume, "ACK_DELAY", 30.0)
    with trio.fail_after(20):
        async with route_with_spares(fin_ack=(fin_ack, fin_ack), entry_timeout=1.0, spare=spare) as r:
            s = r.session
            _lose_frames_of(r.first, r.near, CircuitReset)  # type: ignore[arg-type]
            await _client_closes_then_server_answers_and_closes(s)
            await s.target.send_all(b"answer")
            await s.target.send_eof()
            assert await _read_to_eof(s.client) == b"answer"
            while "exit session closed" not in caplog.text:
                flush_lingering()  # (the RSTs of a complete session linger for a write)
                await trio.sleep(0.01)
            await trio.sleep(0.1)
            assert "entry session closed" not in caplog.text  # its RST was lost
            ticket = r.far[0].request.resume
            assert isinstance(ticket, Resumable)
            completed = r.exit_table.exits[ticket.session_id]
            verifier = completed.verifier
            _cut(r.first)
            await s.sessions.wait_idle()
            if spare:  # the confirmation reached the exit (it took the next secret)
                await _until(lambda: completed.verifier != verifier)
    _endpoints_ended_ok(caplog)
    assert "resumed (" not in caplog.text


async def test_through_relays_an_exits_lost_ack_and_a_relays_no_error_refusal_leave_a_slow_client_everything(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """The entry's ACK of the exit's FIN is lost and the relay->exit carrier dies, while the
    client has not read the answer yet. The entry resumes; the exit completes at once, and
    the relay, which got OPEN_OK, ACK and RST NO_ERROR together, refuses the circuit with
    NO_ERROR. That is the session's end: the client still gets every byte and a clean EOF
    (found by review: the refusal was taken as a break, and the client got an RST)."""
    caplog.set_level(logging.INFO, "tunnelgate")
    monkeypatch.setattr(resume, "ACK_DELAY", 30.0)
    answer = os.urandom(150_000)
    with trio.fail_after(20):
        async with route_with_spares() as r:
            s = r.session
            entry = next(p for p in r.entry_table.live if p.resume.via)
            await _client_closes_then_server_answers_and_closes(s)
            _lose_frames_of(r.far[0].carrier, r.far[0])  # type: ignore[arg-type]  # the entry's ACK
            await s.target.send_all(answer)
            await s.target.send_eof()
            await _until(lambda: entry.resume.eof_delivered)  # (the answer waits in socket buffers)
            _cut(r.onward)
            await _until(lambda: "entry session closed" in caplog.text)
            assert await _read_to_eof(s.client) == answer
            await s.sessions.wait_idle()
    _endpoints_ended_ok(caplog)


async def test_through_relays_a_resumption_the_exit_completes_at_once_ends_the_session(
        caplog: pytest.LogCaptureFixture) -> None:
    """The FINs crossed and both ends' ACKs of them are lost; the relay -> exit carrier
    dies. The entry, parked, resumes; the exit, which lacked only that ACK, completes at
    once, and the relay, which got OPEN_OK, ACK and RST NO_ERROR together, refuses the
    circuit with NO_ERROR. The entry takes that as the end: its client, which had not
    read yet, gets every byte and a clean EOF (found by review: the refusal was taken as
    a break, and the client got an RST)."""
    caplog.set_level(logging.INFO, "tunnelgate")
    answer = os.urandom(150_000)
    with trio.fail_after(20):
        async with route_with_spares(fin_ack=(False, False), busy_relay=True) as r:  # (ACKs apart from FINs)
            s = r.session
            entry = next(p for p in r.entry_table.live if p.resume.via)
            await s.client.send_all(b"question")
            assert await s.target.receive_some(8) == b"question"
            await _until(lambda: entry.resume.confirmed)  # (the exit's first ACK, from its sweep)
            _lose_frames_of(r.first, r.near, Acknowledged)  # type: ignore[arg-type]
            await s.client.send_eof()
            assert await _read_to_eof(s.target) == b""
            _lose_frames_of(r.far[0].carrier, r.far[0])  # type: ignore[arg-type]  # the entry's ACK
            await s.target.send_all(answer)
            await s.target.send_eof()
            await _until(lambda: entry.resume.eof_delivered)  # (the answer waits in socket buffers)
            assert entry.resume.acked < entry.resume.sent + 1
            _cut(r.onward)
            await _until(lambda: "entry session closed" in caplog.text)
            assert await _read_to_eof(s.client) == answer
            await s.sessions.wait_idle()
    assert "resumed (" in caplog.text
    _endpoints_ended_ok(caplog)


async def test_an_exit_no_longer_resumable_still_delivers_its_tail_before_its_rst(
        caplog: pytest.LogCaptureFixture) -> None:
    """An exit whose session stopped being resumable (resume_buffer) ends it once its FIN
    is queued, with RST NO_ERROR: that RST goes after the data and FIN still queued,
    never instead of them (found by review: the client lost the last few hundred KB and
    the entry hung, while the exit logged `ok`)."""
    caplog.set_level(logging.INFO, "tunnelgate")
    answer = os.urandom(3_000_000)
    got: list[bytes] = []

    async def download(client: trio.SocketStream) -> None:
        got.append(await _read_to_eof(client))

    with trio.fail_after(20):
        async with session_with_a_spare_carrier() as (s, _, exit_table, _):
            exit_port = next(iter(exit_table.live))
            await s.client.send_all(b"q")
            await s.client.send_eof()
            assert await _read_to_eof(s.target) == b"q"
            exit_port._not_resumable("test")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(download, s.client)
                await s.target.send_all(answer)
                await s.target.send_eof()
            await s.sessions.wait_idle()
    assert got == [answer]
    _both_ended_ok(caplog)


async def test_through_a_relay_an_exit_no_longer_resumable_waits_for_the_ack_of_its_fin(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """As above, through a relay whose leg to the entry is out of credit (a slow client):
    the exit's RST NO_ERROR must not overtake its last bytes waiting at the relay, so
    the exit ends the session only on the entry's ACK of its FIN (found by a second
    review: the relay dropped the tail with that RST, and the entry hung)."""
    caplog.set_level(logging.INFO, "tunnelgate")
    answer = os.urandom(400_000)
    slow = SlowSocket(monkeypatch)
    with trio.fail_after(20):
        async with route_with_spares() as r:
            s = r.session
            entry = next(p for p in r.entry_table.live if p.resume.via)
            exit_port = next(p for p in r.exit_table.live if not p.resume.via)
            await s.client.send_all(b"q")
            await s.client.send_eof()
            assert await _read_to_eof(s.target) == b"q"
            slow.port = entry.relay.a  # type: ignore[attr-defined]
            exit_port._not_resumable("test")
            await s.target.send_all(answer)
            await s.target.send_eof()
            await _until(lambda: exit_port.resume.fin_sent)
            for _ in range(30):  # (what the sweep would do, were the exit to end now)
                flush_lingering()
                await trio.sleep(0.01)
            assert "exit session closed" not in caplog.text
            slow.release(entry.relay)
            assert await _read_to_eof(s.client) == answer
            await s.sessions.wait_idle()
    _endpoints_ended_ok(caplog)


async def test_a_relay_passes_complete_to_a_leg_without_fin_ack_as_fin_and_rst_no_error(
        caplog: pytest.LogCaptureFixture) -> None:
    """The exit's last FIN says COMPLETE; the relay's leg to the entry has no FIN_ACK (a
    gateway from before it). The relay passes it as a plain FIN and RST NO_ERROR, which
    is the exit's word the entry waits for through relays: all three end `ok` (found by
    review: the entry waited for ever)."""
    caplog.set_level(logging.INFO, "tunnelgate")
    frames: list[tuple[int, int]] = []
    with trio.fail_after(20):
        async with route_with_spares(fin_ack=(False, True)) as r:
            s = r.session
            exit_port = next(p for p in r.exit_table.live if not p.resume.via)
            _count_frames(r.first, frames)
            await s.client.send_all(b"question")
            assert await s.target.receive_some(8) == b"question"
            await s.target.send_all(b"answer")
            assert await s.client.receive_some(6) == b"answer"
            await _until(lambda: exit_port.resume.acked == exit_port.resume.sent)  # (the sweep's ACK)
            await s.client.send_eof()
            assert await _read_to_eof(s.target) == b""
            await s.target.send_eof()  # the exit's FIN says COMPLETE
            assert await _read_to_eof(s.client) == b""
            await s.sessions.wait_idle()
    assert "its last FIN" not in caplog.text and (FrameType.RST, 0) not in frames  # (none from the entry)
    closed = [ln for ln in caplog.text.splitlines() if "session closed" in ln]
    assert len(closed) == 3 and all(ln.endswith(", ok") for ln in closed), closed


async def test_complete_sessions_rsts_linger_together() -> None:
    """Sessions ending one after another on a quiet carrier: each RST NO_ERROR lingers
    with the ones before it (another lingering frame is no reason to write now), and
    one flush takes them all."""
    global _accepted
    with trio.fail_after(10):
        async with carriers(resume=True) as (dialer, _, inbound):
            near = [dialer.open(TARGET) for _ in range(3)]
            arrived = {c.id: c for c in [await inbound.receive() for _ in near]}
            for far in arrived.values():
                far.accept()
            for circuit in near:
                await circuit.wait_open()
            for circuit in near:
                assert isinstance(circuit, Circuit)
                circuit.retire()
            await trio.sleep(0.1)
            assert all(far.broken is None for far in arrived.values())  # none written yet
            flush_lingering()
            with trio.fail_after(2):
                while any(far.broken is None for far in arrived.values()):
                    await trio.sleep(0.01)


@pytest.mark.parametrize("client_waits_for_the_fin", [False, True], ids=["fins-cross", "fin-first"])
async def test_an_end_to_end_half_close_during_a_download_completes_promptly(
        tmp_path: Path, client_waits_for_the_fin: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The client half-closes while the target's bytes (and, crossing, its FIN) are still
    in flight: TLS must send close_notify without choking on the records it has not read
    yet, every byte must arrive, and the session must end at once, not at a sweep or never
    (found by review: a FIN left unread behind TLS records hung the session)."""
    global _accepted
    monkeypatch.setattr(resume, "ACK_DELAY", 5.0)  # a session that needs the sweep shows
    down = os.urandom(4 * MIB)
    with trio.fail_after(20):
        async with carriers(resume=True) as (dialer, _, inbound):
            _accepted = inbound  # type: ignore[assignment]
            async with resumable_session([dialer], tls=tmp_path) as (s, _, _):
                assert s.entry_port is not None
                near = s.entry_port.circuit
                async with trio.open_nursery() as n:
                    async def target_side() -> None:
                        await s.target.send_all(down)
                        await s.target.send_eof()
                        assert await s.target.receive_some(10) == b""  # the client's FIN came
                    n.start_soon(target_side)
                    if client_waits_for_the_fin:
                        while not near.fin_received:
                            await trio.sleep(0.001)
                    else:
                        await trio.sleep(0.01)  # some of the download is in flight
                    await s.client.send_eof()
                    got = bytearray()
                    while chunk := await s.client.receive_some(1 << 16):
                        got += chunk
                assert got == down
                t0 = trio.current_time()
                await s.sessions.wait_idle()
                assert trio.current_time() - t0 < 2.5  # ended by its FINs and ACKs, not the sweep
