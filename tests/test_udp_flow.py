"""A datagram that arrives for a UDP flow that has just ended (its circuit reset, or
closed by the far side's idle timeout) is dropped and counted, never raised into the
listener loop that read it (issue 9, item 6): two carriers over a socketpair."""

from __future__ import annotations

import pytest
import trio

from gateway.carriers.carrier import Carrier
from gateway.carriers.circuit import DatagramCircuit
from gateway.relay.udp import DatagramCounts, DatagramFlow, bridge_datagrams
from gateway_codecs import CircuitKind, ErrorCode, OpenRequest
from tests.carriers import Inbound, carrier_pair


@pytest.mark.parametrize("end", ["reset", "far-side-idle"])
async def test_a_datagram_for_a_flow_that_just_ended_is_dropped_not_raised(end: str) -> None:
    with trio.fail_after(10):
        async with carrier_pair() as (dialer, inbound):
            near = dialer.open(OpenRequest(CircuitKind.UDP, "127.0.0.1", 9))
            far = await inbound.receive()
            assert isinstance(near, DatagramCircuit) and isinstance(far, DatagramCircuit)
            far.accept()
            await near.wait_open()
            flow = DatagramFlow(near, lambda data: None)
            flow.from_local(b"one")
            dialer.flush()
            assert await far.receive() == b"one"
            if end == "reset":
                far.reset(ErrorCode.CANCELLED, "gone")
            else:
                await far.aclose()  # what the far side's idle timeout does: RST NO_ERROR
            await near.ended.wait()
            assert (near.broken is None) == (end == "far-side-idle")  # a normal end is no failure
            flow.from_local(b"two")  # the listener read it before the flow's task removed it
            assert flow.dropped == 1
            assert (flow.counts.a_to_b, flow.counts.bytes_a_to_b) == (1, 3)


async def _udp_pair(dialer: Carrier, inbound: Inbound) -> tuple[DatagramCircuit, DatagramCircuit]:
    near = dialer.open(OpenRequest(CircuitKind.UDP, "127.0.0.1", 9))
    far = await inbound.receive()
    assert isinstance(near, DatagramCircuit) and isinstance(far, DatagramCircuit)
    far.accept()
    await near.wait_open()
    return near, far


@pytest.mark.parametrize("end", ["idle", "reset"])
async def test_a_middle_relay_bridges_datagrams_both_ways_until_idle_or_reset(end: str) -> None:
    """A relay hop's UDP flow: datagrams cross both ways from the carriers' readers, the
    transform applies to the entry -> exit direction only, and the flow ends on silence
    (a normal end) or when a leg is reset (an error)."""
    counts = DatagramCounts()
    with trio.fail_after(10):
        async with carrier_pair() as (left, left_in), carrier_pair() as (right, right_in):
            entry, upstream = await _udp_pair(left, left_in)
            onward, exit_end = await _udp_pair(right, right_in)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(bridge_datagrams, upstream, onward, 0.5, counts,
                                   lambda data: data.upper())
                entry.send(b"ping")
                assert await exit_end.receive() == b"PING"
                exit_end.send(b"pong")
                assert await entry.receive() == b"pong"
                if end == "reset":
                    exit_end.reset(ErrorCode.CANCELLED, "exit went away")
    assert (counts.a_to_b, counts.bytes_a_to_b, counts.b_to_a, counts.bytes_b_to_a) == (1, 4, 1, 4)
    if end == "idle":
        assert counts.idle and counts.error is None
    else:
        assert not counts.idle and "exit went away" in str(counts.error)
