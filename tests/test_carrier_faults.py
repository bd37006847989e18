"""A bug inside one carrier's frame handling ends that carrier only (issue 9, item 4):
the fault is planted in one acceptor's dispatch; its peer is told why (GOAWAY with
INTERNAL_ERROR), the traceback is logged, and another carrier in the same process goes on.
"""

from __future__ import annotations

import logging

import pytest
import trio

from gateway.carriers.carrier import Carrier
from gateway_codecs import DataReceived, Event
from tests.carriers import carrier_pair, open_pair


async def test_a_bug_in_one_carriers_dispatch_closes_that_carrier_only(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    planted_in: list[Carrier] = []
    original = Carrier._dispatch

    def dispatch(self: Carrier, event: Event) -> None:
        if self in planted_in and isinstance(event, DataReceived):
            raise RuntimeError("planted bug")
        original(self, event)

    monkeypatch.setattr(Carrier, "_dispatch", dispatch)
    with trio.fail_after(10):
        async with carrier_pair() as (bad_dialer, bad_inbound), \
                carrier_pair() as (good_dialer, good_inbound):
            bad_near, bad_far = await open_pair(bad_dialer, bad_inbound)
            good_near, good_far = await open_pair(good_dialer, good_inbound)
            planted_in.append(bad_far.carrier)
            await bad_near.send_all(b"trigger")
            await bad_far.carrier.closed.wait()
            with pytest.raises(trio.BrokenResourceError):
                await bad_near.receive_some(10)  # the dialer side learnt the carrier is gone
            await good_near.send_all(b"still here")
            assert await good_far.receive_some(100) == b"still here"
            assert not good_far.carrier.closed.is_set()
    assert "internal error" in bad_far.carrier.close_reason
    assert "planted bug" in caplog.text and "Traceback" in caplog.text
    assert "INTERNAL_ERROR" in caplog.text  # the dialer was told why, in a GOAWAY
