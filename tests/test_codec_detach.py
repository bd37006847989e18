"""A circuit detached from one carrier and attached to another keeps its offsets, its
credit and its half-close state (issue 10, item 3): the base of session resumption.

Both ends detach from one session pair and attach to a second; the test plays the part
that the RESUME exchange will play on the wire (telling the second end the id)."""

from __future__ import annotations

import pytest

from gateway_codecs import (
    CircuitKind,
    CircuitState,
    DataReceived,
    EndOfStream,
    ErrorCode,
    LocalProtocolError,
    OpenRequest,
    Settings,
)
from tests.codec_helpers import LINK_MODES, connected, of_type
from tests.test_codec_session import open_accepted, received

TCP = OpenRequest(CircuitKind.TCP, "db.internal", 5432)


@pytest.fixture(params=LINK_MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_offsets_credit_and_unsent_bytes_move_to_the_next_carrier(mode: str) -> None:
    window = Settings(initial_window=1000)
    a1, b1, link1 = connected(mode, window, window)
    cid = open_accepted(a1, b1, link1)
    a1.send_data(cid, b"x" * 600)
    _, at_b = link1.pump()
    assert received(at_b, cid) == b"x" * 600
    b1.consumed(cid, 600)  # past half the window: MAX_DATA 1600 is queued, never sent
    a1.send_data(cid, b"y" * 300)  # queued, never framed: the carrier breaks now
    snap_a, snap_b = a1.detach_circuit(cid), b1.detach_circuit(cid)
    assert (snap_a.sent, snap_a.send_limit, snap_a.unsent) == (900, 1000, [b"y" * 300])
    assert (snap_b.received, snap_b.consumed, snap_b.receive_limit) == (600, 600, 1600)
    assert a1.circuit_state(cid) is None and a1.send_credit(cid) == 0

    a2, b2, link2 = connected(mode, window, window)
    new_id = a2.attach_circuit(snap_a)
    assert b2.attach_circuit(snap_b, new_id) == new_id
    assert a2.circuit_state(new_id) is b2.circuit_state(new_id) is CircuitState.OPEN
    assert a2.send_credit(new_id) == 100  # the old limit still holds: MAX_DATA never came
    _, at_b = link2.pump()
    assert received(at_b, new_id) == b"y" * 300  # offsets 600..900, accepted against 1600
    assert a2.send_credit(new_id) == 700  # the lost MAX_DATA 1600, said again on attach
    b2.consumed(new_id, 300)
    b2.set_receive_window(new_id, 1000)  # advertises consumed + window: 1900
    link2.pump()
    assert a2.send_credit(new_id) == 1000
    assert a2.offsets(new_id) == (900, 0, 0) and b2.offsets(new_id) == (0, 900, 900)


def test_a_fin_queued_before_the_detach_follows_on_the_next_carrier(mode: str) -> None:
    a1, b1, link1 = connected(mode)
    cid = open_accepted(a1, b1, link1)
    a1.send_data(cid, b"last words")
    a1.send_eof(cid)
    snap_a, snap_b = a1.detach_circuit(cid), b1.detach_circuit(cid)
    a2, b2, link2 = connected(mode)
    new_id = a2.attach_circuit(snap_a)
    b2.attach_circuit(snap_b, new_id)
    _, at_b = link2.pump()
    assert received(at_b, new_id) == b"last words"
    assert of_type(at_b, EndOfStream) == [EndOfStream(new_id)]


def test_attaching_under_an_id_that_is_not_a_new_one_of_the_peers_is_refused(mode: str) -> None:
    a1, b1, link1 = connected(mode)
    cid = open_accepted(a1, b1, link1)
    snap = b1.detach_circuit(cid)
    a2, b2, link2 = connected(mode)
    used = open_accepted(a2, b2, link2)
    for bad in (used, 2, 0):  # already used, our own parity, never an id
        with pytest.raises(LocalProtocolError) as caught:
            b2.attach_circuit(snap, bad)
        assert caught.value.code == ErrorCode.CIRCUIT_ID_ERROR
    with pytest.raises(LocalProtocolError):
        a1.detach_circuit(cid + 2)  # never opened
    assert not of_type(link2.pump()[1], DataReceived)
