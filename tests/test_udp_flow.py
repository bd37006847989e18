"""A datagram that arrives for a UDP flow that has just ended (its circuit reset, or
closed by the far side's idle timeout) is dropped and counted, never raised into the
listener loop that read it (issue 9, item 6): two carriers over a socketpair."""

from __future__ import annotations

import pytest
import trio

from gateway.carriers.circuit import DatagramCircuit
from gateway.relay.udp import DatagramFlow
from gateway_codecs import CircuitKind, ErrorCode, OpenRequest
from tests.carriers import carrier_pair


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
