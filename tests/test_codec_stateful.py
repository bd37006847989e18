"""Hypothesis state machine: random operations on both ends of a carrier keep the invariants.

Both sessions act at random (open, accept, refuse, send within credit, consume, half-close,
reset, ping) while the two directions of the link deliver random prefixes of what is in
flight, so frames cross each other the way they do on a real carrier. Invariants:

- no side ever raises: in particular no FLOW_CONTROL_ERROR (credit is never overrun);
- every stream byte arrives exactly once and in order on its circuit;
- ids never collide, have their opener's parity and increase;
- once the link is drained, both ends agree on every circuit's state.
"""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from gateway_codecs import (
    CarrierSession,
    CircuitClosed,
    CircuitKind,
    CircuitRefused,
    CircuitRequested,
    CircuitReset,
    CircuitState,
    DataReceived,
    EndOfStream,
    Event,
    HandshakeComplete,
    OpenRequest,
    Role,
    Settings,
)

SIDES = st.sampled_from((0, 1))
REQUEST = OpenRequest(CircuitKind.TCP, "example.net", 80)
AGREE = {
    (CircuitState.OPENING, CircuitState.PENDING),
    (CircuitState.OPEN, CircuitState.OPEN),
    (None, None),
}


def pattern(cid: int, side: int, start: int, n: int) -> bytes:
    """The stream `side` sends on `cid`: position-dependent, so reordering would show."""
    return bytes((cid * 31 + side * 101 + i * 7 + (i >> 8)) & 0xFF for i in range(start, start + n))


class CarrierPair(RuleBasedStateMachine):
    @initialize(wa=st.integers(1, 800), wb=st.integers(1, 800))
    def start(self, wa: int, wb: int) -> None:
        self.s = (CarrierSession(Role.DIALER, Settings(initial_window=wa)),
                  CarrierSession(Role.ACCEPTOR, Settings(initial_window=wb)))
        self.wire = [bytearray(), bytearray()]  # wire[i]: bytes from side i in flight
        self.opener: dict[int, int] = {}  # circuit id -> side that opened it
        self.sent: dict[tuple[int, int], int] = {}  # (cid, side) -> stream bytes queued
        self.got: dict[tuple[int, int], int] = {}  # (cid, side) -> stream bytes received
        self.fin_seen: set[tuple[int, int]] = set()  # (cid, receiving side)
        self.pending: list[set[int]] = [set(), set()]  # requests awaiting an answer
        self.last_id = [0, 0]
        self.established = [False, False]
        self.drain()

    # ------------------------------------------------------------- link

    def transmit(self, side: int) -> None:
        self.wire[side] += self.s[side].data_to_send()

    def deliver_some(self, side: int, n: int) -> None:
        """Feed the first `n` in-flight bytes from `side` to the other end."""
        self.transmit(side)
        piece = bytes(self.wire[side][:n])
        del self.wire[side][:n]
        if piece:
            self.handle(1 - side, self.s[1 - side].receive_data(piece))

    def drain(self) -> None:
        for _ in range(1000):
            self.deliver_some(0, 1 << 30)
            self.deliver_some(1, 1 << 30)
            if not any(self.wire) and not self.s[0].pending_output and not self.s[1].pending_output:
                return
        raise AssertionError("the link never drained")

    def handle(self, side: int, events: list[Event]) -> None:
        for e in events:
            match e:
                case HandshakeComplete():
                    self.established[side] = True
                case CircuitRequested(circuit_id=cid):
                    assert cid not in self.opener or self.opener[cid] == 1 - side
                    assert cid % 2 == (1 if side == 1 else 0), "peer id of the wrong parity"
                    self.opener[cid] = 1 - side
                    self.pending[side].add(cid)
                case DataReceived(circuit_id=cid, data=data):
                    key = (cid, side)
                    have = self.got.get(key, 0)
                    assert data == pattern(cid, 1 - side, have, len(data)), "bytes out of order"
                    self.got[key] = have + len(data)
                    assert self.got[key] <= self.sent.get((cid, 1 - side), 0), "delivered twice"
                case EndOfStream(circuit_id=cid):
                    assert self.got.get((cid, side), 0) == self.sent.get((cid, 1 - side), 0)
                    self.fin_seen.add((cid, side))
                case CircuitReset(circuit_id=cid) | CircuitRefused(circuit_id=cid):
                    self.pending[side].discard(cid)
                case CircuitClosed(circuit_id=cid):
                    assert self.s[side].circuit_state(cid) is None

    @rule(side=SIDES, n=st.integers(1, 3000))
    def deliver(self, side: int, n: int) -> None:
        self.deliver_some(side, n)

    @rule()
    def drain_and_agree(self) -> None:
        self.drain()
        for cid, opener in self.opener.items():
            states = (self.s[opener].circuit_state(cid), self.s[1 - opener].circuit_state(cid))
            assert states in AGREE, (cid, states)
            for side in (0, 1):
                if self.s[side].circuit_state(cid) is not None:
                    # Everything the peer queued and the window allowed has arrived.
                    assert self.got.get((cid, side), 0) == self.s[side].offsets(cid)[1]

    # ------------------------------------------------------------- actions

    def live(self, side: int) -> list[int]:
        return sorted(c for c in self.opener if self.s[side].circuit_state(c) is not None)

    @precondition(lambda self: all(self.established))
    @rule(side=SIDES)
    def open(self, side: int) -> None:
        if not self.s[side].can_open:
            return
        cid = self.s[side].open_circuit(REQUEST)
        assert cid % 2 == (1 if side == 0 else 0), "own id of the wrong parity"
        assert cid > self.last_id[side] and cid not in self.opener, "id reused"
        self.last_id[side] = cid
        self.opener[cid] = side

    @rule(side=SIDES, data=st.data(), accept=st.booleans(), n=st.integers(0, 1 << 20))
    def answer(self, side: int, data: st.DataObject, accept: bool, n: int) -> None:
        self.deliver_some(1 - side, n)  # let some requests arrive first
        waiting = sorted(c for c in self.pending[side]
                         if self.s[side].circuit_state(c) is CircuitState.PENDING)
        self.pending[side] &= set(waiting)
        if not waiting:
            return
        cid = data.draw(st.sampled_from(waiting))
        self.pending[side].discard(cid)
        if accept:
            self.s[side].accept_circuit(cid)
        else:
            self.s[side].refuse_circuit(cid, 0x0103, "refused by the state machine")

    @rule(side=SIDES, data=st.data(), n=st.integers(1, 7000))
    def send(self, side: int, data: st.DataObject, n: int) -> None:
        candidates = [c for c in self.live(side)
                      if self.s[side].circuit_state(c) is not CircuitState.PENDING]
        if not candidates:
            return
        cid = data.draw(st.sampled_from(candidates))
        n = min(n, self.s[side].send_credit(cid))
        if n == 0:
            return
        start = self.sent.get((cid, side), 0)
        self.s[side].send_data(cid, pattern(cid, side, start, n))
        self.sent[(cid, side)] = start + n

    @rule(side=SIDES, data=st.data(), n=st.integers(1, 7000))
    def consume(self, side: int, data: st.DataObject, n: int) -> None:
        candidates = self.live(side)
        if not candidates:
            return
        cid = data.draw(st.sampled_from(candidates))
        _, received, consumed = self.s[side].offsets(cid)
        self.s[side].consumed(cid, min(n, received - consumed))

    @rule(side=SIDES, data=st.data(), dice=st.integers(0, 1))
    def eof(self, side: int, data: st.DataObject, dice: int) -> None:
        candidates = [c for c in self.live(side)
                      if self.s[side].circuit_state(c) is not CircuitState.PENDING]
        if candidates and dice == 0:
            self.s[side].send_eof(data.draw(st.sampled_from(candidates)))

    @rule(side=SIDES, data=st.data(), dice=st.integers(0, 3))
    def reset(self, side: int, data: st.DataObject, dice: int) -> None:
        candidates = self.live(side)
        if candidates and dice == 0:  # rarer than the rest, or few circuits live long
            self.s[side].reset_circuit(data.draw(st.sampled_from(candidates)))

    @precondition(lambda self: all(self.established))
    @rule(side=SIDES, dice=st.integers(0, 3))
    def ping(self, side: int, dice: int) -> None:
        if dice == 0:
            self.s[side].ping()

    @invariant()
    def credit_is_never_negative(self) -> None:
        for side in (0, 1):
            for cid in self.live(side):
                assert self.s[side].send_credit(cid) >= 0
                _sent, received, consumed = self.s[side].offsets(cid)
                assert 0 <= consumed <= received


CarrierPair.TestCase.settings = settings(
    max_examples=400, stateful_step_count=60, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestCarrierPair = CarrierPair.TestCase
