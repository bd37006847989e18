"""Two CarrierSessions back to back over a fake link: every feature of the protocol.

Each test runs with the link delivering whole writes, one byte at a time, and at random
split points (the `mode` fixture), so nothing may depend on how the stream is cut.
"""

from __future__ import annotations

import pytest

from gateway_codecs import (
    MAX_DATAGRAM,
    Acknowledged,
    Capability,
    CarrierEnded,
    CarrierSession,
    CircuitAccepted,
    CircuitClosed,
    CircuitKind,
    CircuitRefused,
    CircuitRequested,
    CircuitRequestRefused,
    CircuitReset,
    CircuitState,
    CreditGranted,
    DatagramReceived,
    DataReceived,
    EndOfStream,
    ErrorCode,
    FrameType,
    GoAwayReceived,
    HandshakeComplete,
    LocalProtocolError,
    OpenRequest,
    Origin,
    PingReceived,
    PongReceived,
    ProxyHeader,
    RemoteProtocolError,
    Resumable,
    Role,
    Settings,
)
from gateway_codecs.frames import MAX_CIRCUIT_ID, FinFlags, OpenFlags, encode_open, frame
from gateway_codecs.session import MAX_PENDING_CONTROL_BYTES
from tests.codec_helpers import LINK_MODES, Link, connected, of_type, parse_frames

TCP = OpenRequest(CircuitKind.TCP, "db.internal", 5432, ("relay-b",))
UDP = OpenRequest(CircuitKind.UDP, "10.0.0.53", 53)


@pytest.fixture(params=LINK_MODES)
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def open_accepted(a: CarrierSession, b: CarrierSession, link: Link,
                  request: OpenRequest = TCP) -> int:
    cid = a.open_circuit(request)
    _, at_b = link.pump()
    assert of_type(at_b, CircuitRequested) == [CircuitRequested(cid, request)]
    b.accept_circuit(cid)
    at_a, _ = link.pump()
    assert CircuitAccepted(cid) in at_a
    return cid


def received(events: list[object], cid: int) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, DataReceived) and e.circuit_id == cid)


# ---------------------------------------------------------------- handshake


def test_handshake_exchanges_settings_and_negotiates_capabilities(mode: str) -> None:
    a = CarrierSession(Role.DIALER, Settings(initial_window=1000, node_name="edge-a",
                                             session_id=b"S" * 16))
    b = CarrierSession(Role.ACCEPTOR, Settings(max_circuits=7, capabilities=0))  # type: ignore[arg-type]
    assert not a.established and not a.can_open
    at_a, at_b = Link(a, b, mode).pump()
    (hb,) = of_type(at_b, HandshakeComplete)
    assert isinstance(hb, HandshakeComplete)
    assert hb.peer.initial_window == 1000 and hb.peer.node_name == "edge-a"
    assert hb.peer.session_id == b"S" * 16 and hb.version == 1
    assert hb.capabilities == 0  # b offers no DATAGRAM: the intersection is empty
    (ha,) = of_type(at_a, HandshakeComplete)
    assert isinstance(ha, HandshakeComplete) and ha.peer.max_circuits == 7
    assert a.established and b.established and a.can_open
    with pytest.raises(LocalProtocolError) as exc:
        a.open_circuit(UDP)
    assert exc.value.code == ErrorCode.UNSUPPORTED_KIND


def test_version_negotiation_takes_the_minimum(mode: str) -> None:
    a = CarrierSession(Role.DIALER, Settings(version=7))
    b = CarrierSession(Role.ACCEPTOR)
    _at_a, at_b = Link(a, b, mode).pump()
    (hb,) = of_type(at_b, HandshakeComplete)
    assert isinstance(hb, HandshakeComplete) and hb.peer.version == 7 and hb.version == 1
    assert b.version == 1 and a.version == 1


def test_version_zero_is_a_version_mismatch(mode: str) -> None:
    a = CarrierSession(Role.DIALER, Settings(version=0))
    b = CarrierSession(Role.ACCEPTOR)
    link = Link(a, b, mode)
    with pytest.raises(RemoteProtocolError) as exc:
        link.deliver(a, b)
    assert exc.value.code == ErrorCode.VERSION_MISMATCH
    # b still sends its HELLO first, then a GOAWAY that tells a why.
    frames = parse_frames(b.data_to_send())
    assert [f.type for f in frames] == [FrameType.HELLO, FrameType.GOAWAY]
    at_a = []
    for piece in [frames[0], frames[1]]:
        at_a += a.receive_data(frame(piece.type, piece.flags, piece.circuit_id, piece.payload))
    (goaway,) = of_type(at_a, GoAwayReceived)
    assert isinstance(goaway, GoAwayReceived) and goaway.code == ErrorCode.VERSION_MISMATCH


def test_nothing_but_hello_before_the_peers_hello() -> None:
    a = CarrierSession(Role.DIALER)
    with pytest.raises(LocalProtocolError):
        a.open_circuit(TCP)
    with pytest.raises(LocalProtocolError):
        a.ping()
    assert [f.type for f in parse_frames(a.data_to_send())] == [FrameType.HELLO]


def test_a_first_frame_other_than_hello_is_refused() -> None:
    b = CarrierSession(Role.ACCEPTOR)
    with pytest.raises(RemoteProtocolError):
        b.receive_data(frame(FrameType.PING, 0, 0, bytes(8)))


def test_unknown_frame_type_is_ignored(mode: str) -> None:
    _a, b, link = connected(mode)
    b._queue_control(frame(0x7E, 0xFF, 12345, b"future extension"))
    b.ping(b"12345678")
    at_a, at_b = link.pump()
    assert of_type(at_a, PingReceived) == [PingReceived(b"12345678")]
    assert of_type(at_b, PongReceived) == [PongReceived(b"12345678")]


# ---------------------------------------------------------------- open, accept, refuse


def test_open_accept_and_data_both_ways(mode: str) -> None:
    a, b, link = connected(mode)
    cid = open_accepted(a, b, link)
    assert cid == 1 and a.circuit_state(cid) is b.circuit_state(cid) is CircuitState.OPEN
    a.send_data(cid, b"ping from a")
    b.send_data(cid, b"pong from b")
    at_a, at_b = link.pump()
    assert received(at_b, cid) == b"ping from a"
    assert received(at_a, cid) == b"pong from b"


def test_lent_input_gives_views_and_the_session_keeps_none() -> None:
    """borrow=True: DATA comes as views of the caller's buffer (no copy per byte), and
    frames cut across reads still arrive whole after the buffer was overwritten."""
    a, b, link = connected("lent", acceptor=Settings(initial_window=4 << 20))
    cid = open_accepted(a, b, link)
    payload = bytes(range(256)) * 4096  # 1 MiB, cut into many 64 KiB frames
    a.send_data(cid, payload)
    _, at_b = link.pump()
    assert received(at_b, cid) == payload
    assert link.lent_views > 0


def test_refuse_carries_code_and_reason(mode: str) -> None:
    a, b, link = connected(mode)
    cid = a.open_circuit(TCP)
    link.pump()
    assert b.circuit_state(cid) is CircuitState.PENDING
    b.refuse_circuit(cid, ErrorCode.FORBIDDEN_TARGET, "peer edge-a may not reach db.internal:5432")
    at_a, _ = link.pump()
    assert of_type(at_a, CircuitRefused) == [CircuitRefused(
        cid, ErrorCode.FORBIDDEN_TARGET, "peer edge-a may not reach db.internal:5432")]
    assert a.circuit_state(cid) is None and b.circuit_state(cid) is None


def test_optimistic_data_is_delivered_before_the_answer(mode: str) -> None:
    a, b, link = connected(mode)
    cid = a.open_circuit(TCP)
    a.send_data(cid, b"GET / HTTP/1.1\r\n\r\n")
    a.send_eof(cid)
    _, at_b = link.pump()
    assert [type(e) for e in at_b] == [CircuitRequested, DataReceived, EndOfStream]
    b.accept_circuit(cid)
    b.send_data(cid, b"HTTP/1.1 200 OK\r\n\r\n")
    b.send_eof(cid)
    at_a, _ = link.pump()
    assert [type(e) for e in at_a] == [CircuitAccepted, DataReceived, EndOfStream, CircuitClosed]
    assert a.circuit_state(cid) is None and b.circuit_state(cid) is None


def test_optimistic_data_is_limited_to_the_initial_window(mode: str) -> None:
    a, _b, _link = connected(mode, acceptor=Settings(initial_window=100))
    cid = a.open_circuit(TCP)
    assert a.send_credit(cid) == 100
    with pytest.raises(LocalProtocolError) as exc:
        a.send_data(cid, bytes(101))
    assert exc.value.code == ErrorCode.FLOW_CONTROL_ERROR


def test_optimistic_data_of_a_refused_circuit_is_dropped_quietly(mode: str) -> None:
    a, b, link = connected(mode)
    cid = a.open_circuit(TCP)
    link.deliver(a, b)
    b.refuse_circuit(cid, ErrorCode.CONNECTION_REFUSED, "")
    a.send_data(cid, b"late")  # a has not seen OPEN_FAIL yet
    a.send_eof(cid)
    at_a, at_b = link.pump()
    assert of_type(at_b, DataReceived) == [] and of_type(at_b, EndOfStream) == []
    assert of_type(at_a, CircuitRefused)


def test_acceptor_cannot_send_before_accepting(mode: str) -> None:
    a, b, link = connected(mode)
    cid = a.open_circuit(TCP)
    link.pump()
    with pytest.raises(LocalProtocolError):
        b.send_data(cid, b"x")
    with pytest.raises(LocalProtocolError):
        b.send_eof(cid)


# ---------------------------------------------------------------- flow control


def test_flow_control_blocks_then_credit_granted(mode: str) -> None:
    a, b, link = connected(mode, acceptor=Settings(initial_window=1000))
    cid = open_accepted(a, b, link)
    a.send_data(cid, bytes(range(250)) * 4)
    assert a.send_credit(cid) == 0
    with pytest.raises(LocalProtocolError):
        a.send_data(cid, b"x")
    _, at_b = link.pump()
    assert len(received(at_b, cid)) == 1000
    b.consumed(cid, 1000)
    at_a, _ = link.pump()
    assert of_type(at_a, CreditGranted) == [CreditGranted(cid, 1000)]
    assert a.send_credit(cid) == 1000
    assert a.offsets(cid) == (1000, 0, 0) and b.offsets(cid) == (0, 1000, 1000)


def test_max_data_only_after_half_a_window(mode: str) -> None:
    a, b, link = connected(mode, acceptor=Settings(initial_window=1000))
    cid = open_accepted(a, b, link)
    a.send_data(cid, bytes(1000))
    link.pump()
    b.consumed(cid, 499)  # 501 left of the window: more than half, no update
    assert parse_frames(b.data_to_send()) == []
    b.consumed(cid, 1)  # exactly half used: one update to consumed + window
    (update,) = parse_frames(b.data_to_send())
    assert update.type == FrameType.MAX_DATA and int.from_bytes(update.payload) == 1500
    b.consumed(cid, 1)
    assert parse_frames(b.data_to_send()) == []
    link.b.data_to_send()
    a.receive_data(frame(FrameType.MAX_DATA, 0, cid, (1500).to_bytes(8, "big")))
    assert a.send_credit(cid) == 500


def test_stale_max_data_is_ignored(mode: str) -> None:
    a, b, link = connected(mode, acceptor=Settings(initial_window=1000))
    cid = open_accepted(a, b, link)
    events = a.receive_data(frame(FrameType.MAX_DATA, 0, cid, (5000).to_bytes(8, "big")))
    assert events == [CreditGranted(cid, 5000)]
    assert a.receive_data(frame(FrameType.MAX_DATA, 0, cid, (3000).to_bytes(8, "big"))) == []
    assert a.send_credit(cid) == 5000


def test_set_receive_window_grows_the_limit_at_once(mode: str) -> None:
    a, b, link = connected(mode, acceptor=Settings(initial_window=1000))
    cid = open_accepted(a, b, link)
    b.set_receive_window(cid, 4000)
    assert b.receive_window(cid) == 4000
    at_a, _ = link.pump()
    assert of_type(at_a, CreditGranted) == [CreditGranted(cid, 4000)]
    a.send_data(cid, bytes(4000))
    _, at_b = link.pump()
    assert len(received(at_b, cid)) == 4000
    b.set_receive_window(cid, 100)  # a shrink retracts nothing already advertised
    assert parse_frames(b.data_to_send()) == []
    b.consumed(cid, 4000)
    (update,) = parse_frames(b.data_to_send())
    assert int.from_bytes(update.payload) == 4100


def test_sending_beyond_the_advertised_limit_is_a_flow_control_error(mode: str) -> None:
    a, b, link = connected(mode, acceptor=Settings(initial_window=10))
    cid = open_accepted(a, b, link)
    with pytest.raises(RemoteProtocolError) as exc:
        b.receive_data(frame(FrameType.DATA, 0, cid, bytes(11)))
    assert exc.value.code == ErrorCode.FLOW_CONTROL_ERROR


# ---------------------------------------------------------------- half-close, reset


def test_half_close_from_the_opener_then_the_acceptor_retires(mode: str) -> None:
    a, b, link = connected(mode)
    cid = open_accepted(a, b, link)
    a.send_data(cid, b"request")
    a.send_eof(cid)
    _, at_b = link.pump()
    assert [type(e) for e in at_b] == [DataReceived, EndOfStream]
    assert a.circuit_state(cid) is CircuitState.OPEN  # only one direction is done
    b.send_data(cid, b"response after the request ended")
    at_a, _ = link.pump()
    assert received(at_a, cid) == b"response after the request ended"
    b.send_eof(cid)
    at_a, _ = link.pump()
    assert at_a == [EndOfStream(cid), CircuitClosed(cid)]
    assert a.circuit_state(cid) is None and b.circuit_state(cid) is None
    assert a.live_circuits == b.live_circuits == 0


def test_half_close_from_the_acceptor_first(mode: str) -> None:
    a, b, link = connected(mode)
    cid = open_accepted(a, b, link)
    b.send_eof(cid)
    at_a, _ = link.pump()
    assert at_a == [EndOfStream(cid)]
    a.send_data(cid, b"still flowing")
    a.send_eof(cid)
    _, at_b = link.pump()
    assert [type(e) for e in at_b] == [DataReceived, EndOfStream, CircuitClosed]
    assert a.circuit_state(cid) is None and b.circuit_state(cid) is None


def test_late_frames_for_a_retired_circuit_are_ignored(mode: str) -> None:
    a, b, link = connected(mode)
    cid = open_accepted(a, b, link)
    a.send_eof(cid)
    b.send_eof(cid)
    link.pump()
    assert a.circuit_state(cid) is None
    assert a.receive_data(frame(FrameType.MAX_DATA, 0, cid, (10**6).to_bytes(8, "big"))) == []
    assert a.receive_data(frame(FrameType.RST, 0, cid, b"\x00\x0a\x00\x00")) == []
    assert b.receive_data(frame(FrameType.FIN, 0, cid)) == []


def test_frames_for_never_opened_ids_are_circuit_id_errors() -> None:
    for cid in (3, 2):  # a's next own id, and a peer id b never opened
        a, _, _ = connected("whole")
        with pytest.raises(RemoteProtocolError) as exc:
            a.receive_data(frame(FrameType.DATA, 0, cid, b"x"))
        assert exc.value.code == ErrorCode.CIRCUIT_ID_ERROR


def test_reset_discards_queued_data_and_reaches_the_peer(mode: str) -> None:
    a, b, link = connected(mode)
    cid = open_accepted(a, b, link)
    a.send_data(cid, bytes(5000))
    a.reset_circuit(cid, ErrorCode.CONNECTION_REFUSED, "target went away")
    _, at_b = link.pump()
    assert at_b == [CircuitReset(cid, ErrorCode.CONNECTION_REFUSED, "target went away")]
    assert a.circuit_state(cid) is None and b.circuit_state(cid) is None
    a.reset_circuit(cid)  # idempotent
    assert a.data_to_send() == b""


def test_reset_of_a_pending_circuit_is_a_refusal(mode: str) -> None:
    a, b, link = connected(mode)
    cid = a.open_circuit(TCP)
    link.pump()
    b.reset_circuit(cid, ErrorCode.RESOURCE_LIMIT, "busy")
    at_a, _ = link.pump()
    assert at_a == [CircuitRefused(cid, ErrorCode.RESOURCE_LIMIT, "busy")]


def test_opener_reset_before_the_answer_cancels_the_request(mode: str) -> None:
    a, b, link = connected(mode)
    cid = a.open_circuit(TCP)
    link.deliver(a, b)
    a.reset_circuit(cid)
    b.accept_circuit(cid)  # crosses the RST on the wire
    at_a, at_b = link.pump()
    assert of_type(at_b, CircuitReset) == [CircuitReset(cid, ErrorCode.CANCELLED, "")]
    assert at_a == []  # the OPEN_OK for a retired id is ignored
    assert a.circuit_state(cid) is None and b.circuit_state(cid) is None


# ---------------------------------------------------------------- carrier frames


def test_ping_is_answered_with_the_same_payload(mode: str) -> None:
    a, _b, link = connected(mode)
    payload = a.ping()
    at_a, at_b = link.pump()
    assert at_b == [PingReceived(payload)] and at_a == [PongReceived(payload)]


def test_ping_flood_without_reading_pongs_is_an_error() -> None:
    _a, b, _link = connected("whole")
    flood = frame(FrameType.PING, 0, 0, bytes(8)) * (MAX_PENDING_CONTROL_BYTES // 17 + 2)
    with pytest.raises(RemoteProtocolError):
        b.receive_data(flood)


def test_goaway_refuses_new_circuits_and_keeps_old_ones(mode: str) -> None:
    a, b, link = connected(mode)
    old = open_accepted(a, b, link)
    late = a.open_circuit(TCP)  # crosses the GOAWAY
    b.goaway(ErrorCode.NO_ERROR, "maintenance")
    assert not b.can_open
    at_a, _ = link.pump()
    assert CircuitRefused(late, ErrorCode.GOING_AWAY, "the peer is going away") in at_a
    assert GoAwayReceived(old, ErrorCode.NO_ERROR, "maintenance") in at_a
    assert not a.can_open
    with pytest.raises(LocalProtocolError) as exc:
        a.open_circuit(TCP)
    assert exc.value.code == ErrorCode.GOING_AWAY
    a.send_data(old, b"old circuits continue")
    _, at_b = link.pump()
    assert received(at_b, old) == b"old circuits continue"
    a.send_eof(old)
    b.send_eof(old)
    link.pump()
    assert link.a.receive_eof() == [CarrierEnded(clean=True)]


def test_a_second_goaway_never_raises_the_last_id(mode: str) -> None:
    a, b, link = connected(mode)
    b.goaway()
    cid = a.open_circuit(TCP)  # sent before a saw the GOAWAY: refused, id above last
    link.deliver(a, b)
    b.goaway(ErrorCode.INTERNAL_ERROR, "shutting down harder")
    at_a, _ = link.pump()
    goaways = of_type(at_a, GoAwayReceived)
    assert [g.last_circuit_id for g in goaways] == [0, 0]  # type: ignore[attr-defined]
    assert of_type(at_a, CircuitRefused) == [
        CircuitRefused(cid, ErrorCode.GOING_AWAY, "the peer is going away")]


def test_eof_with_live_circuits_is_not_clean(mode: str) -> None:
    a, b, link = connected(mode)
    open_accepted(a, b, link)
    assert a.receive_eof() == [CarrierEnded(clean=False)]
    assert a.live_circuits == 0


# ---------------------------------------------------------------- ids


def test_ids_have_role_parity_and_increase(mode: str) -> None:
    a, b, link = connected(mode)
    mine = [a.open_circuit(TCP) for _ in range(3)]
    theirs = [b.open_circuit(TCP) for _ in range(3)]
    assert mine == [1, 3, 5] and theirs == [2, 4, 6]
    at_a, at_b = link.pump()
    assert [e.circuit_id for e in of_type(at_a, CircuitRequested)] == theirs  # type: ignore[attr-defined]
    assert [e.circuit_id for e in of_type(at_b, CircuitRequested)] == mine  # type: ignore[attr-defined]


def test_id_exhaustion_sends_goaway_and_refuses_further_opens(mode: str) -> None:
    a, b, link = connected(mode)
    a._next_local_id = MAX_CIRCUIT_ID - 2
    assert a.open_circuit(TCP) == MAX_CIRCUIT_ID - 2
    assert a.can_open
    last = a.open_circuit(TCP)
    assert last == MAX_CIRCUIT_ID
    assert not a.can_open
    with pytest.raises(LocalProtocolError) as exc:
        a.open_circuit(TCP)
    assert exc.value.code == ErrorCode.CIRCUIT_IDS_EXHAUSTED
    _, at_b = link.pump()
    assert [e.circuit_id for e in of_type(at_b, CircuitRequested)] == [  # type: ignore[attr-defined]
        MAX_CIRCUIT_ID - 2, MAX_CIRCUIT_ID]
    assert of_type(at_b, GoAwayReceived) == [
        GoAwayReceived(0, ErrorCode.CIRCUIT_IDS_EXHAUSTED, "circuit ids exhausted")]
    b.accept_circuit(last)  # the circuits already open still work
    b.send_data(last, b"ok")
    at_a, _ = link.pump()
    assert received(at_a, last) == b"ok"


def test_skipped_and_reused_peer_ids() -> None:
    _a, b, _ = connected("whole")
    from gateway_codecs.frames import encode_open
    b.receive_data(frame(FrameType.OPEN, 0, 7, encode_open(TCP)))  # skips 1, 3, 5
    assert b.receive_data(frame(FrameType.DATA, 0, 3, b"x")) == []  # skipped: closed
    with pytest.raises(RemoteProtocolError) as exc:
        b.receive_data(frame(FrameType.OPEN, 0, 5, encode_open(TCP)))
    assert exc.value.code == ErrorCode.CIRCUIT_ID_ERROR


def test_max_circuits_counts_only_the_peers_circuits(mode: str) -> None:
    a, b, link = connected(mode, acceptor=Settings(max_circuits=1))
    own = b.open_circuit(TCP)  # b's own circuit does not count against a's opens
    link.pump()
    a.accept_circuit(own)
    first = a.open_circuit(TCP)
    second = a.open_circuit(TCP)
    at_a, at_b = link.pump()
    assert of_type(at_a, CircuitRefused) == [
        CircuitRefused(second, ErrorCode.RESOURCE_LIMIT, "more than 1 circuits on one carrier")]
    assert b.circuit_state(first) is CircuitState.PENDING
    # b refused on its own: it says so, for its log.
    assert of_type(at_b, CircuitRequestRefused) == [
        CircuitRequestRefused(second, TCP, ErrorCode.RESOURCE_LIMIT, "more than 1 circuits on one carrier")]


# ---------------------------------------------------------------- datagrams


@pytest.mark.parametrize("size", [1, 1400, 9000, MAX_DATAGRAM])
def test_datagrams_keep_their_boundaries(mode: str, size: int) -> None:
    a, b, link = connected(mode)
    cid = open_accepted(a, b, link, UDP)
    grams = [bytes([i]) * size for i in range(3)]
    for g in grams:
        assert a.send_datagram(cid, g)
    assert b.send_datagram(cid, grams[0])
    at_a, at_b = link.pump()
    assert [e.data for e in of_type(at_b, DatagramReceived)] == grams  # type: ignore[attr-defined]
    assert of_type(at_a, DatagramReceived) == [DatagramReceived(cid, grams[0])]


def test_optimistic_datagram_before_the_answer(mode: str) -> None:
    a, _b, link = connected(mode)
    cid = a.open_circuit(UDP)
    assert a.send_datagram(cid, b"query")
    _, at_b = link.pump()
    assert at_b == [CircuitRequested(cid, UDP), DatagramReceived(cid, b"query")]


def test_datagram_queue_cap_drops_the_excess(mode: str) -> None:
    a, b, link = connected(mode, datagram_queue_bytes=3000)
    cid = open_accepted(a, b, link, UDP)
    assert a.send_datagram(cid, bytes(1400))
    assert a.send_datagram(cid, bytes(1400))
    assert not a.send_datagram(cid, bytes(1400))  # would make 4200 > 3000: dropped
    _, at_b = link.pump()
    assert len(of_type(at_b, DatagramReceived)) == 2
    assert a.send_datagram(cid, bytes(1400))  # the queue drained: room again


def test_oversized_datagram_is_refused_locally() -> None:
    a, b, link = connected("whole")
    cid = open_accepted(a, b, link, UDP)
    with pytest.raises(LocalProtocolError):
        a.send_datagram(cid, bytes(MAX_DATAGRAM + 1))


def test_udp_flow_closes_with_fin_both_ways(mode: str) -> None:
    a, b, link = connected(mode)
    cid = open_accepted(a, b, link, UDP)
    a.send_datagram(cid, b"last")
    a.send_eof(cid)
    b.send_eof(cid)
    at_a, at_b = link.pump()
    assert at_b == [DatagramReceived(cid, b"last"), EndOfStream(cid), CircuitClosed(cid)]
    assert at_a == [EndOfStream(cid), CircuitClosed(cid)]
    assert a.circuit_state(cid) is None and b.circuit_state(cid) is None


# ---------------------------------------------------------------- fairness


def test_a_bulk_circuit_delays_a_small_write_by_at_most_one_frame(mode: str) -> None:
    a, b, link = connected(mode, acceptor=Settings(initial_window=8 << 20))
    bulk = open_accepted(a, b, link)
    small = open_accepted(a, b, link)
    a.send_data(bulk, bytes(4 << 20))
    a.send_data(small, b"interactive keystroke")
    out = a.data_to_send()
    frames = parse_frames(out)
    first_small = next(i for i, f in enumerate(frames) if f.circuit_id == small)
    assert first_small <= 1
    assert all(len(f.payload) <= 65536 for f in frames)
    assert sum(len(f.payload) for f in frames if f.circuit_id == bulk) == 4 << 20
    # And it stays fair while the bulk circuit is mid-transfer, pulled in chunks.
    a.send_data(bulk, bytes(1 << 20))
    first_chunk = a.data_to_send(max_bytes=65536)
    a.send_data(small, b"another")
    frames = parse_frames(a.data_to_send(max_bytes=2 * 65536))
    assert [f.circuit_id for f in frames][:2] in ([bulk, small], [small, bulk])
    if mode == "bytewise":  # 5 MiB one byte at a time is slow, and splitting is covered
        return
    at_b = []
    for piece in (out, first_chunk):
        at_b += b.receive_data(piece)
    assert len(received(at_b, bulk)) == (4 << 20) + 65536


def test_control_frames_go_before_queued_payload() -> None:
    a, b, link = connected("whole")
    cid = open_accepted(a, b, link)
    a.send_data(cid, bytes(200_000))
    a.ping(b"rtt-rtt!")
    frames = parse_frames(a.data_to_send())
    assert frames[0].type == FrameType.PING
    assert frames[-1].type == FrameType.DATA


def test_protocol_error_closes_with_goaway_and_the_code() -> None:
    _a, b, _link = connected("whole")
    with pytest.raises(RemoteProtocolError):
        b.receive_data(frame(FrameType.HELLO, 0, 0, b"TNGW\x00\x01"))
    (goaway,) = parse_frames(b.data_to_send())
    assert goaway.type == FrameType.GOAWAY
    assert int.from_bytes(goaway.payload[4:6]) == ErrorCode.PROTOCOL_ERROR
    with pytest.raises(LocalProtocolError):
        b.receive_data(b"")


def test_open_host_name_longer_than_253_bytes_is_malformed() -> None:
    _, b, _ = connected("whole")
    payload = bytes([1, 0, 80, 3, 254]) + b"a" * 254 + bytes([0])
    with pytest.raises(RemoteProtocolError):
        b.receive_data(frame(FrameType.OPEN, 0, 1, payload))


def test_open_trailing_bytes_are_reserved_and_ignored() -> None:
    _, b, _ = connected("whole")
    from gateway_codecs.frames import encode_open
    events = b.receive_data(frame(FrameType.OPEN, 0x80, 1, encode_open(TCP) + b"future"))
    assert events == [CircuitRequested(1, TCP)]


_U64_1 = (1).to_bytes(8, "big")
VIOLATIONS = [
    ("second HELLO", FrameType.HELLO, 0, b"TNGW\x00\x01", ErrorCode.PROTOCOL_ERROR),
    ("reserved id bit", FrameType.PING, 1 << 31, bytes(8), ErrorCode.CIRCUIT_ID_ERROR),
    ("PING on a circuit", FrameType.PING, 1, bytes(8), ErrorCode.CIRCUIT_ID_ERROR),
    ("short PING", FrameType.PING, 0, bytes(7), ErrorCode.FRAME_SIZE_ERROR),
    ("DATA on id 0", FrameType.DATA, 0, b"x", ErrorCode.CIRCUIT_ID_ERROR),
    ("MAX_DATA of 7 bytes", FrameType.MAX_DATA, 1, bytes(7), ErrorCode.FRAME_SIZE_ERROR),
    ("FIN with payload", FrameType.FIN, 1, b"x", ErrorCode.FRAME_SIZE_ERROR),
    ("OPEN_OK on an open circuit", FrameType.OPEN_OK, 1, b"", ErrorCode.CIRCUIT_STATE_ERROR),
    ("OPEN with our parity", FrameType.OPEN, 3, b"", ErrorCode.CIRCUIT_ID_ERROR),
    ("GOAWAY raising its last id", FrameType.GOAWAY, 0,
     (4).to_bytes(4, "big") + b"\x00\x00\x00\x00", ErrorCode.PROTOCOL_ERROR),
    ("RST reason length past the end", FrameType.RST, 1, b"\x00\x0a\x00\x05ab",
     ErrorCode.FRAME_SIZE_ERROR),
]


@pytest.mark.parametrize("what,ftype,cid,payload,code", VIOLATIONS, ids=[v[0] for v in VIOLATIONS])
def test_violations_close_the_carrier_with_their_code(
        what: str, ftype: int, cid: int, payload: bytes, code: ErrorCode) -> None:
    a, b, link = connected("whole")
    open_accepted(a, b, link)  # circuit 1 is OPEN at a
    a.receive_data(frame(FrameType.GOAWAY, 0, 0, bytes(4) + b"\x00\x00\x00\x00")
                   if what.startswith("GOAWAY") else b"")
    with pytest.raises(RemoteProtocolError) as exc:
        a.receive_data(frame(ftype, 0, cid, payload))
    assert exc.value.code == code, what
    (goaway,) = parse_frames(a.data_to_send())
    assert goaway.type == FrameType.GOAWAY
    assert int.from_bytes(goaway.payload[4:6]) == code


# ---------------------------------------------------------------- resumption (SPEC.md §14)

RESUMABLE = OpenRequest(CircuitKind.TCP, "10.2.0.5", 5432, ("dc",), False,
                        Resumable(b"s" * 16, b"v" * 16))
RESUMES = Settings(capabilities=Capability.DATAGRAM | Capability.RESUME)


def test_resumable_opens_and_acks_flow_when_both_announce_resume(mode: str) -> None:
    a, b, link = connected(mode, RESUMES, RESUMES)
    assert a.resumable and b.resumable
    cid = open_accepted(a, b, link, RESUMABLE)  # the request arrives with its extension
    b.send_ack(cid, 42)
    at_a, _ = link.pump()
    assert of_type(at_a, Acknowledged) == [Acknowledged(cid, 42)]


def test_without_resume_on_both_sides_nothing_of_it_is_sent_or_understood(mode: str) -> None:
    a, b, link = connected(mode, RESUMES, Settings())
    assert not a.resumable
    with pytest.raises(LocalProtocolError):
        a.open_circuit(RESUMABLE)  # never sent to a peer that did not announce it
    cid = open_accepted(a, b, link)
    b.send_ack(cid, 1)
    assert not b.data_to_send()  # ACK is not sent to a peer without RESUME
    # A v1 receiver sees a resumable OPEN's flags and extension as reserved: ignored.
    plain = CarrierSession(Role.ACCEPTOR)
    plain.receive_data(CarrierSession(Role.DIALER).data_to_send())
    flags = int(OpenFlags.RESUMABLE)
    events = plain.receive_data(frame(FrameType.OPEN, flags, 1, encode_open(RESUMABLE)))
    (requested,) = of_type(events, CircuitRequested)
    assert requested.request == OpenRequest(CircuitKind.TCP, "10.2.0.5", 5432, ("dc",))
    assert plain.receive_data(frame(FrameType.ACK, 0, 1, (7).to_bytes(8, "big"))) == []


@pytest.mark.parametrize(("flags", "tail", "code"), [
    (OpenFlags.RESUMABLE, b"\x01" + b"s" * 16, ErrorCode.FRAME_SIZE_ERROR),  # verifier cut short
    (OpenFlags.RESUMING, b"\x02" + b"s" * 48, ErrorCode.FRAME_SIZE_ERROR),  # no delivered offset
    (OpenFlags.RESUMABLE, b"\x02" + b"s" * 56, ErrorCode.PROTOCOL_ERROR),  # tag of the other kind
    (OpenFlags.RESUMABLE | OpenFlags.RESUMING, b"\x01" + b"s" * 32, ErrorCode.PROTOCOL_ERROR),
])
def test_a_malformed_resumption_extension_is_a_protocol_error(flags: OpenFlags, tail: bytes,
                                                             code: ErrorCode) -> None:
    _, b, _ = connected("whole", RESUMES, RESUMES)
    payload = encode_open(OpenRequest(CircuitKind.TCP, "10.2.0.5", 5432)) + tail
    with pytest.raises(RemoteProtocolError) as caught:
        b.receive_data(frame(FrameType.OPEN, int(flags), 1, payload))
    assert caught.value.code == code


def test_ack_rules(mode: str) -> None:
    a, b, link = connected(mode, RESUMES, RESUMES)
    cid = open_accepted(a, b, link, RESUMABLE)
    with pytest.raises(RemoteProtocolError) as caught:
        a.receive_data(frame(FrameType.ACK, 0, cid, b"\x00" * 4))
    assert caught.value.code == ErrorCode.FRAME_SIZE_ERROR
    a2, b2, link2 = connected(mode, RESUMES, RESUMES)
    udp = a2.open_circuit(UDP)
    link2.pump()
    b2.accept_circuit(udp)
    link2.pump()
    assert a2.receive_data(frame(FrameType.ACK, 0, udp, (1).to_bytes(8, "big"))) == []  # ignored
    with pytest.raises(RemoteProtocolError) as caught:
        a2.receive_data(frame(FrameType.ACK, 0, 2, (1).to_bytes(8, "big")))  # never opened
    assert caught.value.code == ErrorCode.CIRCUIT_ID_ERROR


FINISHES = Settings(capabilities=Capability.DATAGRAM | Capability.RESUME | Capability.FIN_ACK)


def test_with_fin_ack_an_ack_rides_in_the_fin_and_a_complete_fin_retires_the_circuit(
        mode: str) -> None:
    a, b, link = connected(mode, FINISHES, FINISHES)
    assert a.completes_sessions and b.completes_sessions
    cid = open_accepted(a, b, link, RESUMABLE)
    assert a.send_eof(cid, delivered=3) is False  # (not COMPLETE)
    (fin,) = parse_frames(a.data_to_send())  # one frame, not ACK then FIN
    assert (fin.type, fin.flags, fin.payload) == (FrameType.FIN, FinFlags.ACK, (3).to_bytes(8, "big"))
    assert b.receive_data(frame(fin.type, fin.flags, cid, fin.payload)) == [
        EndOfStream(cid, delivered=3)]  # (to be taken as that ACK, then the FIN)
    assert b.live_circuits == 1  # a resumable circuit outlives plain FINs (RST NO_ERROR ends it)
    assert b.send_eof(cid, complete=True, delivered=9) is True
    (fin,) = parse_frames(b.data_to_send())
    assert fin.flags == FinFlags.ACK | FinFlags.COMPLETE
    assert b.live_circuits == 0  # retired as it left: both FINs, one COMPLETE
    assert a.receive_data(frame(fin.type, fin.flags, cid, fin.payload)) == [
        EndOfStream(cid, complete=True, delivered=9), CircuitClosed(cid)]
    assert a.live_circuits == 0


def test_rst_no_error_follows_the_queued_data_and_fin_any_other_rst_discards_them(mode: str) -> None:
    """RST NO_ERROR says the session is complete (§14): what was queued before it still
    goes, FIN included, and the RST after it; any other RST is an abort and goes alone."""
    a, b, link = connected(mode, FINISHES, FINISHES)
    ends = []
    for code in (ErrorCode.NO_ERROR, ErrorCode.CANCELLED):
        cid = open_accepted(a, b, link, RESUMABLE)
        a.send_data(cid, b"tail")
        a.send_eof(cid)
        a.reset_circuit(cid, code, "done")
        a.reset_circuit(cid, ErrorCode.INTERNAL_ERROR, "again")  # (the first reset counts)
        assert a.circuit_state(cid) is None and a.send_credit(cid) == 0
        with pytest.raises(LocalProtocolError):
            a.send_data(cid, b"more")
        ends.append([(f.type, f.payload[:4] if f.type == FrameType.DATA else b"")
                     for f in parse_frames(a.data_to_send())])
        assert a.live_circuits == 0
    assert ends == [[(FrameType.DATA, b"tail"), (FrameType.FIN, b""), (FrameType.RST, b"")],
                    [(FrameType.RST, b"")]]


def test_an_ack_that_cannot_ride_in_its_fin_goes_just_before_it(mode: str) -> None:
    a, b, link = connected(mode, FINISHES, FINISHES)
    cid = open_accepted(a, b, link, RESUMABLE)
    a.send_data(cid, b"tail")
    a.send_eof(cid, delivered=2)  # the FIN waits behind queued data; the ACK does not
    frames = [(f.type, f.flags) for f in parse_frames(a.data_to_send())]
    assert frames == [(FrameType.ACK, 0), (FrameType.DATA, 0), (FrameType.FIN, 0)]
    plain = open_accepted(a, b, link)  # not resumable: no ACK at all
    a.send_eof(plain, delivered=2)
    assert [f.type for f in parse_frames(a.data_to_send())] == [FrameType.FIN]


def test_without_fin_ack_on_both_sides_a_fin_carries_nothing_and_completes_nothing(mode: str) -> None:
    a, b, link = connected(mode, FINISHES, RESUMES)
    assert a.resumable and not a.completes_sessions
    cid = open_accepted(a, b, link, RESUMABLE)
    assert a.send_eof(cid, complete=True, delivered=3) is False  # (the caller owes RST NO_ERROR)
    frames = [(f.type, f.flags) for f in parse_frames(a.data_to_send())]
    assert frames == [(FrameType.ACK, 0), (FrameType.FIN, 0)]
    with pytest.raises(RemoteProtocolError) as caught:  # flags ignored: a payload on FIN is an error
        b.receive_data(frame(FrameType.FIN, int(FinFlags.ACK), cid, (3).to_bytes(8, "big")))
    assert caught.value.code == ErrorCode.FRAME_SIZE_ERROR


@pytest.mark.parametrize("payload", [b"", b"\x00" * 4, b"\x00" * 9])
def test_a_fin_saying_ack_must_carry_eight_bytes(payload: bytes) -> None:
    a, b, link = connected("whole", FINISHES, FINISHES)
    cid = open_accepted(a, b, link, RESUMABLE)
    with pytest.raises(RemoteProtocolError) as caught:
        b.receive_data(frame(FrameType.FIN, int(FinFlags.ACK), cid, payload))
    assert caught.value.code == ErrorCode.FRAME_SIZE_ERROR


def test_an_instance_id_is_announced_only_when_set_and_must_be_8_bytes() -> None:
    """SPEC.md §15: INSTANCE_ID (0x7) tells a tier's instances apart; absent, it is empty."""
    from gateway_codecs.hello import SettingId, decode_hello, encode_hello

    plain = encode_hello(Settings(node_name="hub"))
    assert decode_hello(plain).instance_id == b""
    tagged = encode_hello(Settings(node_name="hub", instance_id=b"\x01" * 8))
    assert decode_hello(tagged).instance_id == b"\x01" * 8
    short = plain + SettingId.INSTANCE_ID.to_bytes(2, "big") + (4).to_bytes(2, "big") + b"abcd"
    with pytest.raises(RemoteProtocolError, match="0x7 must be 8 bytes"):
        decode_hello(short)
    with pytest.raises(ValueError):
        Settings(instance_id=b"\x01" * 3)


# ---------------------------------------------------------------- origin (SPEC.md §16)

ORIGINS = Settings(capabilities=Capability.DATAGRAM | Capability.ORIGIN)
WITH_ORIGIN = OpenRequest(CircuitKind.TCP, "service:echo", 0, ("dc",), False, None,
                          Origin(("198.18.0.10", 51234), ("127.0.0.1", 7), ProxyHeader.V2))


def test_an_origin_reaches_a_peer_that_announced_it(mode: str) -> None:
    a, b, link = connected(mode, ORIGINS, ORIGINS)
    assert a.carries_origin and b.carries_origin
    open_accepted(a, b, link, WITH_ORIGIN)  # the request arrives with its origin, exactly


def test_without_origin_on_both_sides_it_is_never_sent_and_ignored_if_it_comes(mode: str) -> None:
    a, _, _ = connected(mode, ORIGINS, Settings())
    assert not a.carries_origin
    with pytest.raises(LocalProtocolError):
        a.open_circuit(WITH_ORIGIN)  # never sent to a peer that did not announce it
    plain = CarrierSession(Role.ACCEPTOR)
    plain.receive_data(CarrierSession(Role.DIALER).data_to_send())
    events = plain.receive_data(frame(FrameType.OPEN, int(OpenFlags.ORIGIN), 1, encode_open(WITH_ORIGIN)))
    (requested,) = of_type(events, CircuitRequested)
    assert requested.request == OpenRequest(CircuitKind.TCP, "service:echo", 0, ("dc",))


@pytest.mark.parametrize(("tail", "code"), [
    (b"\x03\x01\x01\xc6\x12", ErrorCode.FRAME_SIZE_ERROR),  # source address cut short
    (b"\x01\x01" + bytes(14), ErrorCode.PROTOCOL_ERROR),  # not the origin tag
    (b"\x03\x03" + bytes(14), ErrorCode.PROTOCOL_ERROR),  # PROXY header version 3
    (b"\x03\x01\x03\x04name" + bytes(8), ErrorCode.PROTOCOL_ERROR),  # a name is no client address
])
def test_a_malformed_origin_extension_is_a_protocol_error(tail: bytes, code: ErrorCode) -> None:
    _, b, _ = connected("whole", ORIGINS, ORIGINS)
    payload = encode_open(OpenRequest(CircuitKind.TCP, "10.2.0.5", 5432)) + tail
    with pytest.raises(RemoteProtocolError) as caught:
        b.receive_data(frame(FrameType.OPEN, int(OpenFlags.ORIGIN), 1, payload))
    assert caught.value.code == code
