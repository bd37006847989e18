"""The relay engine between a socket and a circuit: half-close, credit, resets, bugs.

The circuit is a real one (two carriers over a socketpair); the socket is one end of a
real TCP connection on loopback; the engine runs as it does in the gateway.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from gateway.carriers.circuit import Circuit
from gateway.errors import CircuitBroken
from gateway.relay.ports import SocketPort
from gateway.relay.sessions import SessionLog
from gateway_codecs import ErrorCode
from tests.carriers import carrier_pair, open_pair
from tests.engine import relay_socket, running_engine

MIB = 1 << 20


class Ended:
    """What the relay reports when a session ends."""

    def __init__(self) -> None:
        self.error: BaseException | None = None
        self.event = trio.Event()

    def __call__(self, error: BaseException | None) -> None:
        assert not self.event.is_set(), "on_end called twice"
        self.error = error
        self.event.set()


@asynccontextmanager
async def relayed(window: int = 256 * 1024, sndbuf: int | None = None
                  ) -> AsyncIterator[tuple[Circuit, trio.SocketStream, Ended, SessionLog]]:
    """(far circuit, far socket end, end report, session log): the relay joins the near
    circuit of a carrier pair to the near end of a loopback TCP connection."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    near, _ = listener.accept()
    listener.close()
    near.setblocking(False)
    if sndbuf is not None:
        near.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sndbuf)
    far_socket = trio.SocketStream(trio.socket.from_stdlib_socket(client))
    sessions = SessionLog()
    ended = Ended()
    async with carrier_pair(window) as (dialer, inbound), running_engine() as engine:
        far_circuit, near_circuit = await open_pair(dialer, inbound)
        relay_socket(engine, near, near_circuit, sessions, on_end=ended)
        yield far_circuit, far_socket, ended, sessions
    await far_socket.aclose()


async def read_all(stream: trio.abc.ReceiveStream) -> bytes:
    parts = []
    while chunk := await stream.receive_some(65536):
        parts.append(chunk)
    return b"".join(parts)


@pytest.mark.parametrize("window", [16 * 1024, 256 * 1024])
@pytest.mark.parametrize("first", ["socket", "circuit"])
async def test_both_directions_with_half_close_each_way(window: int, first: str) -> None:
    """Whichever side ends first, its EOF reaches the other while that one still sends."""
    request = bytes(range(256)) * 4096 * 3  # 3 MiB, many windows
    reply = bytes(reversed(range(256))) * 4096 * 2
    with trio.fail_after(30):
        async with relayed(window, sndbuf=32 * 1024) as (circuit, sock, ended, sessions):
            got: dict[str, bytes] = {}

            async def circuit_side() -> None:
                if first == "socket":
                    got["request"] = await read_all(circuit)
                await circuit.send_all(reply)
                await circuit.send_eof()
                if first == "circuit":
                    got["request"] = await read_all(circuit)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(circuit_side)
                if first == "circuit":
                    got["reply"] = await read_all(sock)
                await sock.send_all(request)
                await sock.send_eof()
                if first == "socket":
                    got["reply"] = await read_all(sock)
            await ended.event.wait()
    assert got["request"] == request
    assert got["reply"] == reply
    assert ended.error is None
    assert sessions.active == 0 and sessions.total == 1


async def test_a_reader_without_credit_stops_the_socket_being_read() -> None:
    window = 16 * 1024
    with trio.fail_after(30):
        async with relayed(window) as (circuit, sock, _, _):
            raw = sock.socket
            sent = 0
            chunk = b"z" * 65536
            # The far circuit never reads: the relay must stop reading the socket once the
            # window is used, so the writer blocks with a bounded amount taken.
            with trio.move_on_after(1.0):
                while sent < 64 * MIB:
                    await sock.send_all(chunk)
                    sent += len(chunk)
            assert sent < 64 * MIB, "the socket was drained without credit"
            unread = raw.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
            assert sent >= window  # the window itself was used
            received = 0
            with trio.move_on_after(1.0):
                while received < sent:
                    received += len(await circuit.receive_some(65536))
            assert received == sent, f"{received} of {sent} ({unread} B send buffer)"


async def test_a_reset_is_noticed_while_the_circuit_has_no_credit() -> None:
    """The far circuit never reads, so the relay stops reading the socket; the socket's
    peer then resets. The session must still end at once (RST on the circuit), or every
    abandoned session would be held forever."""
    window = 16 * 1024
    with trio.fail_after(10):
        async with relayed(window) as (circuit, sock, ended, sessions):
            with trio.move_on_after(0.5):
                while True:
                    await sock.send_all(b"z" * 65536)
            assert circuit.send_credit >= 0 and not ended.event.is_set()
            sock.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await sock.aclose()  # RST, with the circuit's window full
            with trio.fail_after(2):
                await ended.event.wait()
            with pytest.raises(trio.BrokenResourceError):
                while await circuit.receive_some(65536):
                    pass
    assert ended.error is not None and "broken" in str(ended.error)
    assert sessions.active == 0


async def test_far_reset_resets_the_socket_and_reports_the_reason() -> None:
    """A broken circuit must not look like a complete reply: the socket gets an RST."""
    with trio.fail_after(10):
        async with relayed() as (circuit, sock, ended, sessions):
            await sock.send_all(b"hello")
            assert await circuit.receive_some(5) == b"hello"
            circuit.reset(ErrorCode.INTEGRITY_ERROR, "tampered")
            await ended.event.wait()
            with pytest.raises(trio.BrokenResourceError) as caught:
                await read_all(sock)
            assert isinstance(caught.value.__cause__, ConnectionResetError)
    assert isinstance(ended.error, CircuitBroken)
    assert ended.error.code == ErrorCode.INTEGRITY_ERROR and "tampered" in str(ended.error)
    assert sessions.active == 0


async def test_a_reset_met_by_a_circuit_push_is_not_taken_for_an_eof() -> None:
    """The socket's peer resets; circuit bytes then reach the socket (pushed by the
    carrier's reader) before or after readiness reports the error. Whichever comes first,
    the circuit must be reset, never given a clean EOF."""
    with trio.fail_after(10):
        async with carrier_pair() as (dialer, inbound), running_engine() as engine:
            far, near = await open_pair(dialer, inbound)
            listener = socket.create_server(("127.0.0.1", 0))
            client = socket.create_connection(listener.getsockname())
            local, _ = listener.accept()
            listener.close()
            ended = Ended()
            relay_socket(engine, local, near, SessionLog(), on_end=ended)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.close()
            await far.send_all(b"reply")
            with pytest.raises(trio.BrokenResourceError):
                while await far.receive_some(100):
                    pass
            await ended.event.wait()
    assert "reset" in str(ended.error).lower(), ended.error


async def test_socket_reset_resets_the_circuit() -> None:
    with trio.fail_after(10):
        async with relayed() as (circuit, sock, ended, _):
            await sock.send_all(b"x")
            assert await circuit.receive_some(1) == b"x"
            sock.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await sock.aclose()  # RST
            await ended.event.wait()
            with pytest.raises(trio.BrokenResourceError):
                while await circuit.receive_some(100):
                    pass
    assert ended.error is not None and "broken" in str(ended.error)


async def test_relay_shutdown_aborts_open_sessions() -> None:
    with trio.fail_after(10):
        async with carrier_pair() as (dialer, inbound):
            far, near = await open_pair(dialer, inbound)
            a, b = socket.socketpair()
            b.setblocking(False)
            ended = Ended()
            sessions = SessionLog()
            async with running_engine() as engine:
                relay_socket(engine, b, near, sessions, on_end=ended)
            assert ended.event.is_set() and "shut down" in str(ended.error)
            assert sessions.active == 0
            with pytest.raises(trio.BrokenResourceError):
                await far.receive_some(10)
            a.close()


async def test_a_failing_session_is_ended_and_the_relay_goes_on(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A bug while handling one session ends that session (logged), not the relay."""
    original = SocketPort.read

    def explode_for_bad(self: SocketPort, max_bytes: int) -> bytes | None:
        data = original(self, max_bytes)
        if data and self.relay.record.what == "bad":
            raise RuntimeError("boom")
        return data

    monkeypatch.setattr(SocketPort, "read", explode_for_bad)
    with trio.fail_after(10):
        async with carrier_pair() as (dialer, inbound):
            sessions = SessionLog()
            async with running_engine() as engine:
                ends = {}
                far = {}
                local = {}
                for name in ("bad", "good"):
                    far[name], near = await open_pair(dialer, inbound)
                    a, b = socket.socketpair()
                    b.setblocking(False)
                    local[name] = trio.SocketStream(trio.socket.from_stdlib_socket(a))
                    ends[name] = Ended()
                    relay_socket(engine, b, near, sessions, name, on_end=ends[name])
                await local["bad"].send_all(b"x")
                await ends["bad"].event.wait()
                assert "internal error: boom" in str(ends["bad"].error)
                await local["good"].send_all(b"still here")
                assert await far["good"].receive_some(100) == b"still here"
            for stream in local.values():
                await stream.aclose()
    assert "internal error" in caplog.text
