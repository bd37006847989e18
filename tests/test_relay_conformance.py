"""One conformance suite for every way a TCP session is relayed (issue 10, item 8).

Each pairing builds a real session the way the gateway does, with its two far ends as
trio streams the test drives; every pairing is one `StreamRelay` of the relay engine
with two ports:

- socket-circuit: a loopback TCP connection and a circuit (entry and exit sessions
  without end-to-end TLS);
- socket-tls: the same with TLS 1.3 inside the circuit (end-to-end sessions; the
  handshake runs first, then the engine relays the TLS port);
- circuit-circuit: two circuits (a middle relay).

Every pairing must pass the same cases: half-close in either order, a reset at either
end reaches the other as a break (never an EOF) and the session is logged as broken,
credit stops reading while a reset still ends the session, and a relay shut down mid
session breaks both ends. The whole suite runs under each readiness backend (CI runs
it once more with TUNNELGATE_READINESS=portable).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio

from gateway.carriers.circuit import Circuit
from gateway.relay.e2e import SecureStream
from gateway.relay.engine import RelayEngine
from gateway.relay.handshake import handshake_or_abort
from gateway.relay.localsock import LocalStream
from gateway.relay.sessions import SessionLog, SessionRecord
from gateway.security.identity import write_identity
from gateway.security.tls import client_context, server_context
from gateway_codecs import ErrorCode
from tests.carriers import carrier_pair, open_pair
from tests.engine import bridge, relay_socket

PAIRINGS = ["socket-circuit", "socket-tls", "circuit-circuit"]
MIB = 1 << 20


@dataclass
class End:
    """One far end of the relayed session, and how to abort it."""

    stream: trio.abc.HalfCloseableStream
    reset: Callable[[], Awaitable[None]]


@dataclass
class Relayed:
    left: End
    right: End
    record: SessionRecord
    sessions: SessionLog
    stop: Callable[[], None]  # shut the relay down (the drain deadline passed)


def _socket_end(sock: socket.socket) -> End:
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))

    async def reset() -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await stream.aclose()

    return End(stream, reset)


def _circuit_end(circuit: Circuit, stream: trio.abc.HalfCloseableStream | None = None) -> End:
    async def reset() -> None:
        circuit.reset(ErrorCode.INTEGRITY_ERROR, "reset by the test")
        await trio.lowlevel.checkpoint()

    return End(stream or circuit, reset)


def _tcp_pair(small: bool) -> tuple[socket.socket, socket.socket]:
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    near, _ = listener.accept()
    listener.close()
    if small:  # so that "the socket is full" comes after a few KiB, not megabytes
        near.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32 * 1024)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
    return client, near


@asynccontextmanager
async def relayed(pairing: str, tmp_path: Path, window: int = 256 * 1024) -> AsyncIterator[Relayed]:
    sessions = SessionLog()
    opened: list[End] = []
    async with carrier_pair(window) as (dialer, inbound), trio.open_nursery() as nursery:
        engine = RelayEngine()
        await nursery.start(engine.run)
        far, near = await open_pair(dialer, inbound)
        if pairing == "socket-circuit":
            client, sock = _tcp_pair(small=True)
            relay_socket(engine, sock, near, sessions, pairing)
            opened.append(_socket_end(client))
            left, right = opened[0], _circuit_end(far)
        elif pairing == "socket-tls":
            identity = write_identity(tmp_path / "gw")
            near_tls = SecureStream(near, server_context(identity, [tmp_path / "gw.crt"]), server_side=True)
            far_tls = SecureStream(far, client_context(identity), server_side=False)
            async with trio.open_nursery() as handshakes:
                handshakes.start_soon(near_tls.do_handshake)
                handshakes.start_soon(far_tls.do_handshake)
            client, sock = _tcp_pair(small=True)
            relay_socket(engine, sock, near_tls.into_port(), sessions, pairing)
            opened.append(_socket_end(client))
            left, right = opened[0], _circuit_end(far, far_tls)
        else:
            onward, exit_end = await open_pair(dialer, inbound)
            bridge(engine, near, onward, sessions, pairing)
            left, right = _circuit_end(far), _circuit_end(exit_end)
        (session,) = engine.sessions
        yield Relayed(left, right, session.record, sessions, nursery.cancel_scope.cancel)
        nursery.cancel_scope.cancel()
    for end in opened:
        await end.stream.aclose()


async def _read_all(stream: trio.abc.ReceiveStream) -> bytes:
    parts = []
    while chunk := await stream.receive_some(65536):
        parts.append(chunk)
    return b"".join(parts)


async def _assert_broken(stream: trio.abc.ReceiveStream) -> None:
    """Reading to the end raises: the session broke, and no end may look clean."""
    with pytest.raises((trio.BrokenResourceError, trio.ClosedResourceError)):
        while await stream.receive_some(65536):
            pass


@pytest.mark.parametrize("first", ["left", "right"])
@pytest.mark.parametrize("pairing", PAIRINGS)
async def test_half_close_in_either_order_delivers_everything(pairing: str, first: str,
                                                              tmp_path: Path) -> None:
    to_right = bytes(range(256)) * 4096 * 3  # 3 MiB: many windows and socket buffers
    to_left = bytes(reversed(range(256))) * 4096 * 2
    with trio.fail_after(30):
        async with relayed(pairing, tmp_path, window=64 * 1024) as s:
            got: dict[str, bytes] = {}

            async def side(me: End, data: bytes, name: str, goes_first: bool) -> None:
                if not goes_first:
                    got[name] = await _read_all(me.stream)
                await me.stream.send_all(data)
                await me.stream.send_eof()
                if goes_first:
                    got[name] = await _read_all(me.stream)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(side, s.left, to_right, "at_left", first == "left")
                nursery.start_soon(side, s.right, to_left, "at_right", first == "right")
            await s.sessions.wait_idle()
    assert got["at_right"] == to_right and got["at_left"] == to_left
    assert s.record.error == "" and (s.record.sent, s.record.received) in (
        (len(to_left), len(to_right)), (len(to_right), len(to_left)))


@pytest.mark.parametrize("who", ["left", "right"])
@pytest.mark.parametrize("pairing", PAIRINGS)
async def test_a_reset_at_either_end_breaks_the_other_and_is_logged(pairing: str, who: str,
                                                                    tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with relayed(pairing, tmp_path) as s:
            resetting, other = (s.left, s.right) if who == "left" else (s.right, s.left)
            await resetting.stream.send_all(b"hello")
            got = b""
            while len(got) < 5:
                got += await other.stream.receive_some(5 - len(got))
            assert got == b"hello"
            await resetting.reset()
            await _assert_broken(other.stream)
            await s.sessions.wait_idle()
    assert s.record.error, "a broken session was logged as ok"
    if pairing == "circuit-circuit":  # the code and reason travel on
        assert "INTEGRITY_ERROR" in s.record.error and "reset by the test" in s.record.error


@pytest.mark.parametrize("pairing", PAIRINGS)
async def test_credit_stops_reads_and_a_reset_still_ends_the_session(pairing: str, tmp_path: Path) -> None:
    window = 16 * 1024
    with trio.fail_after(15):
        async with relayed(pairing, tmp_path, window=window) as s:
            sent = 0
            with trio.move_on_after(0.5):  # the right end never reads
                while sent < 64 * MIB:
                    await s.left.stream.send_all(b"c" * 4096)
                    sent += 4096
            assert window <= sent < 8 * MIB, f"{sent} B taken for a reader that reads nothing"
            await s.left.reset()
            with trio.fail_after(2):
                await s.sessions.wait_idle()
            await _assert_broken(s.right.stream)
    assert s.record.error


@pytest.mark.parametrize("pairing", PAIRINGS)
async def test_a_relay_shut_down_mid_session_breaks_both_ends(pairing: str, tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with relayed(pairing, tmp_path) as s:
            await s.left.stream.send_all(b"x")
            assert await s.right.stream.receive_some(1) == b"x"
            s.stop()
            await s.sessions.wait_idle()
            await _assert_broken(s.left.stream)
            await _assert_broken(s.right.stream)
    assert "shut down" in s.record.error


@pytest.mark.parametrize("failure", ["broken", "timeout", "cancelled"])
async def test_a_failed_end_to_end_handshake_resets_both_ends(failure: str) -> None:
    """Before relaying starts, a session whose end-to-end handshake fails, times out or is
    cancelled ends with RST on the socket and on the circuit (END_TO_END_FAILED), never
    with a close that could pass for a complete session."""
    from gateway.errors import CircuitBroken

    async def handshake() -> None:
        if failure == "broken":
            raise trio.BrokenResourceError("end-to-end peer presented the wrong key")
        if failure == "timeout":
            raise trio.TooSlowError
        await trio.sleep_forever()

    sessions = SessionLog()
    with trio.fail_after(10):
        async with carrier_pair() as (dialer, inbound):
            far, near = await open_pair(dialer, inbound)
            client, sock = _tcp_pair(small=False)
            record = sessions.track("exit", "t", near)
            warned: list[str] = []
            with trio.move_on_after(0.2 if failure == "cancelled" else 5), record:
                assert await handshake_or_abort(handshake, LocalStream(sock), near, record,
                                                warned.append) is None
            with pytest.raises(trio.BrokenResourceError) as caught:
                await far.receive_some(10)
            stream = _socket_end(client).stream
            with pytest.raises(trio.BrokenResourceError):
                await stream.receive_some(10)
            await stream.aclose()
    cause = caught.value.__cause__
    assert isinstance(cause, CircuitBroken)
    if failure == "cancelled":
        assert cause.code == ErrorCode.CANCELLED and "shut down" in record.error
    else:
        assert cause.code == ErrorCode.END_TO_END_FAILED and record.error and warned
