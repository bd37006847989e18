"""A middle relay: the engine joins two circuits into one stream, with end-to-end credit.

Two carrier pairs stand for the links on either side of a relay hop; the relay engine
joins the relay's two circuits; the ends are checked as one trio stream.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from gateway.carriers.circuit import Circuit
from gateway.errors import CircuitBroken
from gateway.faults import byte_flipper
from gateway.relay.sessions import SessionLog
from gateway_codecs import ErrorCode
from tests.carriers import carrier_pair, open_pair
from tests.engine import bridge, running_engine

MakeEnds = Callable[[], Awaitable[tuple[Circuit, Circuit]]]


@asynccontextmanager
async def relay_hop(window: int = 256 * 1024) -> AsyncIterator[tuple[MakeEnds, SessionLog]]:
    """make_ends() opens a circuit on each link, bridges the relay's two legs and returns
    the two far ends (entry side, exit side)."""
    sessions = SessionLog()
    async with carrier_pair(window) as (left, left_in), carrier_pair(window) as (right, right_in), \
            running_engine() as engine:

        async def make_ends() -> tuple[Circuit, Circuit]:
            entry_end, upstream = await open_pair(left, left_in)
            onward, exit_end = await open_pair(right, right_in)
            bridge(engine, upstream, onward, sessions)
            return entry_end, exit_end

        yield make_ends, sessions


async def test_bridged_circuits_pass_trio_half_closeable_stream_conformance() -> None:
    async with relay_hop() as (make_ends, _):
        await trio.testing.check_half_closeable_stream(make_ends, None)


@pytest.mark.parametrize("window", [16 * 1024, 256 * 1024])
async def test_large_transfers_both_ways_in_order_and_the_session_ends(window: int) -> None:
    up = bytes(range(256)) * 4096 * 2
    down = bytes(reversed(range(256))) * 4096 * 3
    with trio.fail_after(30):
        async with relay_hop(window) as (make_ends, sessions):
            entry, exit_ = await make_ends()
            got: dict[str, bytes] = {}

            async def drain(name: str, circuit: Circuit) -> None:
                parts = []
                while chunk := await circuit.receive_some(50_000):
                    parts.append(chunk)
                got[name] = b"".join(parts)

            async def send(circuit: Circuit, data: bytes) -> None:
                await circuit.send_all(data)
                await circuit.send_eof()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(drain, "at_exit", exit_)
                nursery.start_soon(drain, "at_entry", entry)
                nursery.start_soon(send, entry, up)
                nursery.start_soon(send, exit_, down)
            await sessions.wait_idle()
    assert got["at_exit"] == up and got["at_entry"] == down
    assert sessions.total == 1


async def test_a_stalled_exit_holds_the_entry_back_within_the_windows() -> None:
    window = 16 * 1024
    with trio.fail_after(10):
        async with relay_hop(window) as (make_ends, _):
            entry, exit_ = await make_ends()
            sent = 0
            with trio.move_on_after(0.5):
                while sent < 8 << 20:
                    await entry.send_all(b"q" * 4096)
                    sent += 4096
            # The relay buffers at most one window per leg: credit is end to end.
            assert window <= sent <= 3 * window
            received = 0
            while received < sent:
                received += len(await exit_.receive_some(65536))
            assert received == sent


async def test_a_reset_travels_through_with_its_code_and_reason() -> None:
    with trio.fail_after(10):
        async with relay_hop() as (make_ends, sessions):
            entry, exit_ = await make_ends()
            await entry.send_all(b"hi")
            assert await exit_.receive_some(10) == b"hi"
            exit_.reset(ErrorCode.INTEGRITY_ERROR, "bad record")
            with pytest.raises(trio.BrokenResourceError) as caught:
                while await entry.receive_some(10):
                    pass
            await sessions.wait_idle()
    cause = caught.value.__cause__
    assert isinstance(cause, CircuitBroken)
    assert cause.code == ErrorCode.INTEGRITY_ERROR and cause.reason == "bad record"


@pytest.mark.parametrize("offset", [0, 5000, 16 * 1024 + 3, 3 * 1024 * 1024 - 1])
async def test_a_transform_rewrites_each_byte_once_whatever_the_credit(offset: int) -> None:
    """The test-only fault injector is a transform inside the engine: it must see every
    byte exactly once at its true offset, whether the bytes went straight through (sink)
    or waited in the queue for credit."""
    data = bytes(range(256)) * 4096 * 3  # 3 MiB through 16 KiB windows: both paths, many times
    window = 16 * 1024
    sessions = SessionLog()
    with trio.fail_after(30):
        async with carrier_pair(window) as (left, left_in), carrier_pair(window) as (right, right_in), \
                running_engine() as engine:
            entry, upstream = await open_pair(left, left_in)
            onward, exit_end = await open_pair(right, right_in)
            bridge(engine, upstream, onward, sessions, transform=byte_flipper(offset))

            async def send() -> None:
                await entry.send_all(data)
                await entry.send_eof()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                parts = []
                while chunk := await exit_end.receive_some(7000):  # a slow-ish, small reader
                    parts.append(chunk)
            await exit_end.send_eof()
            await sessions.wait_idle()
    got = b"".join(parts)
    assert len(got) == len(data)
    diffs = [i for i, (x, y) in enumerate(zip(got, data, strict=True)) if x != y]
    assert diffs == [offset]
