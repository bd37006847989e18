"""The carrier session: one state machine per carrier, sans-IO.

Feed it bytes with `receive_data`, act on the events it returns, call its methods to
open circuits and send, and write out whatever `data_to_send` returns. It never blocks
and never touches a socket; the gateway owns every await.

Outgoing frames leave in two classes: control frames (HELLO, OPEN, OPEN_OK, MAX_DATA,
PING...) first, in order, then circuit payload round-robin, one frame per circuit per
turn, so a circuit with megabytes queued delays a small write on another circuit by at
most one frame.
"""

from __future__ import annotations

import enum
import os
from collections import deque
from dataclasses import dataclass, field, replace

from .errors import ErrorCode, LocalProtocolError, ProtocolError, RemoteProtocolError
from .events import (
    Acknowledged,
    CarrierEnded,
    CircuitAccepted,
    CircuitClosed,
    CircuitRefused,
    CircuitRequested,
    CircuitRequestRefused,
    CircuitReset,
    CreditGranted,
    DatagramReceived,
    DataReceived,
    EndOfStream,
    Event,
    GoAwayReceived,
    HandshakeComplete,
    PingReceived,
    PongReceived,
)
from .flow import ReceiveWindow, SendCredit
from .frames import (
    HEADER,
    HEADER_SIZE,
    MAX_CIRCUIT_ID,
    MAX_DATAGRAM,
    CircuitKind,
    FinFlags,
    FrameType,
    OpenRequest,
    decode_goaway,
    decode_open,
    decode_reason,
    decode_u64,
    encode_goaway,
    encode_open,
    encode_reason,
    encode_u64,
    frame,
    header,
)
from .hello import (
    MAX_HELLO_PAYLOAD,
    PROTOCOL_VERSION,
    Capability,
    Settings,
    decode_hello,
    encode_hello,
)

PING_SIZE = 8
# A peer that keeps sending PINGs while never reading our PONGs is flooding us.
MAX_PENDING_CONTROL_BYTES = 1 << 20
# Datagrams are not flow-controlled (they may be dropped); cap what one flow may queue.
DEFAULT_DATAGRAM_QUEUE_BYTES = 256 * 1024


_DATA = FrameType.DATA.value
_TCP = CircuitKind.TCP
_FIN_ACKS, _FIN_COMPLETE = int(FinFlags.ACK), int(FinFlags.COMPLETE)


class Role(enum.Enum):
    DIALER = "dialer"  # opens odd circuit ids
    ACCEPTOR = "acceptor"  # opens even circuit ids


class CircuitState(enum.Enum):
    OPENING = "opening"  # we sent OPEN, no answer yet (we may already send DATA)
    PENDING = "pending"  # the peer sent OPEN, we have not answered
    OPEN = "open"


_OPENING = CircuitState.OPENING


class _Circuit:
    """Book-keeping for one live circuit. Slots: idle circuits must stay small."""

    __slots__ = (
        "complete",
        "credit",
        "dgram_bytes",
        "fin_queued",
        "fin_sent",
        "id",
        "kind",
        "local",
        "queue",
        "queued",
        "remote_fin",
        "reset_after",
        "resumable",
        "state",
        "window",
    )

    def __init__(self, cid: int, kind: CircuitKind, local: bool, state: CircuitState,
                 send_limit: int, window: int) -> None:
        self.id = cid
        self.kind = kind
        self.local = local
        self.state = state
        self.credit = SendCredit(send_limit)
        self.window = ReceiveWindow(window)
        # Created on first use: most idle circuits never queue anything (memory).
        self.queue: deque[bytes | memoryview] | None = None
        self.queued = 0  # stream bytes waiting in `queue`
        self.dgram_bytes = 0  # datagram bytes waiting in `queue`
        self.fin_queued = False
        self.fin_sent = False
        self.remote_fin = False
        # A resumable session's circuit (§14) is not retired by FIN both ways: ACKs still
        # flow after the FINs, and RST NO_ERROR ends it once the session is complete;
        # unless a FIN said COMPLETE (FIN_ACK capability).
        self.resumable = False
        self.complete = False
        self.reset_after: bytes | None = None  # RST NO_ERROR, once the queued data has left


@dataclass(slots=True)
class CircuitSnapshot:
    """A stream circuit's state off any carrier (`detach_circuit` / `attach_circuit`):
    its offsets and credit belong to the session, not to one connection.

    Offsets are absolute and continue on the next carrier: `sent` counts every byte
    handed to `send_data` (the `unsent` ones included, which were queued but never
    framed), `received`/`consumed` what arrived and what the application took."""

    kind: CircuitKind
    sent: int
    send_limit: int
    received: int
    consumed: int
    receive_limit: int
    window: int
    fin_queued: bool
    fin_sent: bool
    remote_fin: bool
    unsent: list[bytes] = field(default_factory=list)


class CarrierSession:
    """Protocol state for one carrier. See SPEC.md for the rules it enforces."""

    def __init__(self, role: Role, settings: Settings | None = None,
                 datagram_queue_bytes: int = DEFAULT_DATAGRAM_QUEUE_BYTES) -> None:
        self.role = role
        self.local_settings = settings or Settings()
        if not self.local_settings.session_id.strip(b"\0"):
            self.local_settings = _with_session_id(self.local_settings, os.urandom(16))
        self.peer_settings: Settings | None = None
        self.version = 0
        self.capabilities = Capability.NONE
        # The negotiated capabilities as plain flags: tested per frame, and enum.Flag's
        # operators cost a Python call each.
        self._resume = self._origin = self._datagram = self._fin_ack = False
        self._datagram_queue_bytes = datagram_queue_bytes
        self._circuits: dict[int, _Circuit] = {}
        self._peer_circuits = 0  # live circuits the peer opened: what max_circuits bounds
        self._next_local_id = 1 if role is Role.DIALER else 2
        self._highest_peer_id = 0
        self._inbound = bytearray()
        self._control: list[bytes] = []
        self._control_bytes = 0
        self._hello_sent = False  # our HELLO left in a data_to_send (kept on failure)
        self._ready: deque[_Circuit] = deque()  # circuits with queued payload, round robin
        self._in_ready: set[int] = set()
        self._goaway_sent_last: int | None = None
        self._goaway_received_last: int | None = None
        self._failed: ProtocolError | None = None
        self._ended = False
        self._queue_control(frame(FrameType.HELLO, 0, 0, encode_hello(self.local_settings)))

    # ---------------------------------------------------------------- properties

    @property
    def established(self) -> bool:
        return self.peer_settings is not None

    @property
    def can_open(self) -> bool:
        """False once the peer sent GOAWAY, we did, or ids ran out: dial a new carrier."""
        return (self.established and self._goaway_received_last is None
                and self._goaway_sent_last is None and self._failed is None
                and self._next_local_id <= MAX_CIRCUIT_ID)

    @property
    def live_circuits(self) -> int:
        return len(self._circuits)

    @property
    def pending_output(self) -> int:
        """Bytes `data_to_send` would return now (approximately: frame headers excluded)."""
        if not self._ready:  # (asked after every read and for every retired circuit)
            return self._control_bytes
        return self._control_bytes + sum(c.queued + c.dgram_bytes for c in self._ready)

    def send_credit(self, circuit_id: int) -> int:
        """How many stream bytes `send_data` accepts now on this circuit."""
        c = self._circuits.get(circuit_id)
        if c is None or c.fin_queued:
            return 0
        return c.credit.available

    def offsets(self, circuit_id: int) -> tuple[int, int, int]:
        """(bytes sent, bytes received, bytes consumed): the resumption acknowledgements."""
        c = self._live(circuit_id)
        return c.credit.sent, c.window.received, c.window.consumed

    def circuit_state(self, circuit_id: int) -> CircuitState | None:
        c = self._circuits.get(circuit_id)
        return None if c is None else c.state

    # ---------------------------------------------------------------- input

    def receive_data(self, data: bytes | bytearray | memoryview, *,
                     borrow: bool = False) -> list[Event]:
        """Parse every complete frame in `data` (plus what was buffered) into events.

        DATA payloads are copied out of `data` unless `borrow=True`: then they are
        memoryview slices of it, and the caller promises to use or copy them before it
        changes the buffer (a reader reusing one buffer saves a copy of every byte).
        Only a frame split across calls is buffered, and only that frame is copied.
        """
        if self._failed is not None:
            raise LocalProtocolError("the session already failed; close the carrier")
        if self._ended:
            raise LocalProtocolError("receive_data after receive_eof")
        view = data if isinstance(data, memoryview) else memoryview(data)
        events: list[Event] = []
        try:
            pos = self._complete_split_frame(view, events) if self._inbound else 0
            pos = self._parse_frames(view, pos, events, borrow)
        except RemoteProtocolError as exc:
            self._fail(exc)
            raise
        if pos < len(view):
            self._inbound += view[pos:]
        return events

    def _complete_split_frame(self, view: memoryview, events: list[Event]) -> int:
        """Finish the frame buffered from earlier input with the first bytes of `view`;
        return how many bytes of `view` that took."""
        buf = self._inbound
        taken = 0
        if len(buf) < HEADER_SIZE:
            taken = min(HEADER_SIZE - len(buf), len(view))
            buf += view[:taken]
            if len(buf) < HEADER_SIZE:
                return taken
        length_type = HEADER.unpack_from(buf)[0]
        total = HEADER_SIZE + self._checked_length(length_type)
        more = min(total - len(buf), len(view) - taken)
        buf += view[taken:taken + more]
        taken += more
        if len(buf) == total:
            whole = bytes(buf)
            buf.clear()
            self._parse_frames(memoryview(whole), 0, events, True)
        return taken

    def _checked_length(self, length_type: int) -> int:
        """The payload length of a frame header, if that frame may come now."""
        length = length_type >> 8
        if self.peer_settings is None:
            if length_type & 0xFF != FrameType.HELLO:
                raise RemoteProtocolError(
                    "the first frame must be HELLO (not a tunnelgate carrier?)")
            limit = MAX_HELLO_PAYLOAD  # until the HELLO is parsed we do not know the peer
        else:
            limit = self.local_settings.max_frame_payload
        if length > limit:
            raise RemoteProtocolError(f"frame of {length} bytes exceeds the {limit}-byte limit",
                                      ErrorCode.FRAME_SIZE_ERROR)
        return length

    def _parse_frames(self, view: memoryview, pos: int, events: list[Event],
                      borrow: bool) -> int:
        """Handle the complete frames in `view` from `pos`; return where the rest starts."""
        circuits = self._circuits
        end_of_data = len(view)
        unpack = HEADER.unpack_from
        limit = self.local_settings.max_frame_payload
        while end_of_data - pos >= HEADER_SIZE:
            length_type, flags, cid = unpack(view, pos)
            length = length_type >> 8
            if length > limit or self.peer_settings is None:
                length = self._checked_length(length_type)
            stop = pos + HEADER_SIZE + length
            if stop > end_of_data:
                break
            ftype = length_type & 0xFF
            if ftype == _DATA and cid in circuits:
                # Fast path for the bulk of the traffic: DATA on a live circuit whose
                # receiving direction is open. Everything else takes _handle_frame.
                c = circuits[cid]
                if (c.kind is _TCP and not c.remote_fin
                        and (c.state is not _OPENING or not c.local)):
                    window = c.window
                    window.received += length
                    if window.received > window.limit:
                        raise RemoteProtocolError(
                            f"peer sent to offset {window.received} on circuit {cid},"
                            f" beyond the advertised {window.limit}",
                            ErrorCode.FLOW_CONTROL_ERROR)
                    if length:
                        payload = view[pos + HEADER_SIZE:stop]
                        events.append(DataReceived(cid, payload if borrow else bytes(payload)))
                    pos = stop
                    continue
            payload_bytes = bytes(view[pos + HEADER_SIZE:stop])
            pos = stop
            self._handle_frame(ftype, flags, cid, payload_bytes, events)
        return pos

    def receive_eof(self) -> list[Event]:
        """The carrier's byte stream ended. Live circuits are gone with it."""
        self._ended = True
        clean = (self._goaway_received_last is not None and not self._circuits
                 and not self._inbound)
        self._circuits.clear()
        self._peer_circuits = 0
        self._ready.clear()
        self._in_ready.clear()
        return [CarrierEnded(clean)]

    # ---------------------------------------------------------------- output

    def data_to_send(self, max_bytes: int | None = None) -> bytes:
        """Frames to write, control first then payload round robin.

        `max_bytes` bounds the payload taken (control frames always go); a writer that
        pulls in chunks keeps a late small write on another circuit close to the front.
        """
        if not self._control and not self._ready:
            return b""  # the common "anything more?" question (HELLO is queued at start)
        out: list[bytes | memoryview] = list(self._control)
        self._control = []
        self._control_bytes = 0
        self._hello_sent = True
        if self._failed is not None:
            self._ready.clear()  # after a protocol error only the GOAWAY leaves
            self._in_ready.clear()
        budget = max_bytes if max_bytes is not None else -1
        ready = self._ready
        max_payload = (self.peer_settings.max_frame_payload if self.peer_settings
                       else 0)
        while ready and budget != 0:
            c = ready.popleft()
            if c.kind is CircuitKind.UDP:
                assert c.queue is not None
                dgram = c.queue.popleft()
                c.dgram_bytes -= len(dgram)
                out.append(header(FrameType.DATAGRAM, 0, c.id, len(dgram)))
                out.append(dgram)
                sent = len(dgram)
            else:
                sent = self._take_stream_frame(c, max_payload, out)
            if budget > 0:
                budget = max(0, budget - sent)
            if c.queue:
                ready.append(c)
            else:
                c.queue = None  # an idle circuit keeps no queue (memory)
                self._in_ready.discard(c.id)
                if c.fin_queued and not c.fin_sent:
                    out.append(self._fin_frame(c))
                if c.reset_after is not None:
                    out.append(c.reset_after)
                    self._drop(c)
        return b"".join(out)

    def _take_stream_frame(self, c: _Circuit, max_payload: int,
                           out: list[bytes | memoryview]) -> int:
        q = c.queue
        assert q is not None
        first = q[0]
        if len(first) >= max_payload:
            chunk = first[:max_payload]
            if len(first) == max_payload:
                q.popleft()
            else:
                q[0] = memoryview(first)[max_payload:]
            out.append(header(FrameType.DATA, 0, c.id, max_payload))
            out.append(chunk)
            c.queued -= max_payload
            return max_payload
        hdr_index = len(out)
        out.append(b"")
        size = 0
        while q and size < max_payload:
            piece = q[0]
            room = max_payload - size
            if len(piece) <= room:
                q.popleft()
                out.append(piece)
                size += len(piece)
            else:
                out.append(piece[:room])
                q[0] = memoryview(piece)[room:]
                size += room
        out[hdr_index] = header(FrameType.DATA, 0, c.id, size)
        c.queued -= size
        return size

    def _fin_frame(self, c: _Circuit, delivered: int = -1) -> bytes:
        """FIN leaves now: mark it sent and retire the circuit if that was the last step.
        `delivered` >= 0: it carries that ACK (FIN_ACK)."""
        c.fin_sent = True
        self._maybe_retire(c)
        flags = _FIN_COMPLETE if c.complete else 0
        if delivered < 0:
            return header(FrameType.FIN, flags, c.id, 0)
        return frame(FrameType.FIN, flags | _FIN_ACKS, c.id, encode_u64(delivered))

    # ---------------------------------------------------------------- circuits

    def open_circuit(self, request: OpenRequest) -> int:
        """Allocate the next id of our parity and queue OPEN. DATA may follow at once."""
        if not self.established:
            raise LocalProtocolError("cannot open a circuit before the HELLO exchange")
        if not self.can_open:
            code = (ErrorCode.CIRCUIT_IDS_EXHAUSTED if self._next_local_id > MAX_CIRCUIT_ID
                    else ErrorCode.GOING_AWAY)
            raise LocalProtocolError("this carrier accepts no new circuits", code)
        if request.kind is CircuitKind.UDP and not self._datagram:
            raise LocalProtocolError("the peer does not support UDP flows",
                                     ErrorCode.UNSUPPORTED_KIND)
        if request.resume is not None and not self._resume:
            raise LocalProtocolError("the peer does not support resumption",
                                     ErrorCode.UNSUPPORTED_KIND)
        if request.origin is not None and not self._origin:
            raise LocalProtocolError("the peer does not support the origin extension",
                                     ErrorCode.UNSUPPORTED_KIND)
        payload = encode_open(request)
        assert self.peer_settings is not None
        cid = self._next_local_id
        self._next_local_id += 2
        self._queue_control(frame(FrameType.OPEN, request.flags, cid, payload))
        c = self._circuits[cid] = _Circuit(cid, request.kind, True, CircuitState.OPENING,
                                           self.peer_settings.initial_window,
                                           self.local_settings.initial_window)
        c.resumable = request.resume is not None
        if self._next_local_id > MAX_CIRCUIT_ID:
            # That was our last id: drain this carrier; the gateway dials a new one.
            self.goaway(ErrorCode.CIRCUIT_IDS_EXHAUSTED, "circuit ids exhausted")
        return cid

    def detach_circuit(self, circuit_id: int) -> CircuitSnapshot:
        """Take an open circuit off this carrier without a frame (the carrier broke, or
        drains): its id is retired here, its state returned for `attach_circuit` on
        another carrier. Stream bytes queued but never framed travel in the snapshot;
        queued datagrams are dropped (datagrams may be lost)."""
        c = self._live(circuit_id)
        if c.state is not CircuitState.OPEN:
            raise LocalProtocolError(f"circuit {circuit_id} is not open", ErrorCode.CIRCUIT_STATE_ERROR)
        unsent = [bytes(piece) for piece in c.queue or ()] if c.kind is _TCP else []
        window, credit = c.window, c.credit
        snapshot = CircuitSnapshot(c.kind, credit.sent, credit.limit, window.received, window.consumed,
                                   window.limit, window.size, c.fin_queued, c.fin_sent, c.remote_fin,
                                   unsent)
        self._drop(c)
        return snapshot

    def attach_circuit(self, snapshot: CircuitSnapshot, circuit_id: int | None = None) -> int:
        """Continue a detached circuit on this carrier, with its offsets and credit: under
        the next id of our parity (None), or under `circuit_id` of the peer's parity
        (the peer attached its end first). Returns the id. Our receive limit is
        advertised again at once; a FIN queued before the detach, and never sent,
        follows the unsent bytes."""
        if not self.established:
            raise LocalProtocolError("cannot attach a circuit before the HELLO exchange")
        if circuit_id is None:
            if not self.can_open:
                raise LocalProtocolError("this carrier accepts no new circuits", ErrorCode.GOING_AWAY)
            circuit_id = self._next_local_id
            self._next_local_id += 2
            local = True
        else:
            if not self._is_peer_id(circuit_id) or circuit_id <= self._highest_peer_id \
                    or circuit_id > MAX_CIRCUIT_ID:
                raise LocalProtocolError(f"circuit id {circuit_id} is not a new id of the peer's",
                                         ErrorCode.CIRCUIT_ID_ERROR)
            self._highest_peer_id = circuit_id
            self._peer_circuits += 1
            local = False
        c = _Circuit(circuit_id, snapshot.kind, local, CircuitState.OPEN, snapshot.send_limit,
                     snapshot.window)
        c.credit.sent = snapshot.sent
        window = c.window
        window.received, window.consumed, window.limit = (snapshot.received, snapshot.consumed,
                                                          snapshot.receive_limit)
        c.fin_queued, c.fin_sent, c.remote_fin = snapshot.fin_queued, snapshot.fin_sent, snapshot.remote_fin
        self._circuits[circuit_id] = c
        if not c.remote_fin:
            # The last MAX_DATA may have been lost with the old carrier: say the limit
            # again (absolute offsets: a repeat is harmless).
            self._queue_control(frame(FrameType.MAX_DATA, 0, circuit_id, encode_u64(window.limit)))
        if snapshot.unsent:
            c.queue = deque(snapshot.unsent)
            c.queued = sum(map(len, snapshot.unsent))
            self._mark_ready(c)
        elif c.fin_queued and not c.fin_sent:
            self._queue_control(self._fin_frame(c))
        else:
            self._maybe_retire(c)
        return circuit_id

    def accept_circuit(self, circuit_id: int) -> None:
        c = self._circuits.get(circuit_id)
        if c is None:
            return  # reset by the peer meanwhile: nothing to answer
        if c.state is not CircuitState.PENDING:
            raise LocalProtocolError(f"circuit {circuit_id} is not awaiting an answer")
        c.state = CircuitState.OPEN
        self._queue_control(frame(FrameType.OPEN_OK, 0, circuit_id))
        self._maybe_retire(c)

    def refuse_circuit(self, circuit_id: int, code: ErrorCode | int, reason: str = "") -> None:
        c = self._circuits.get(circuit_id)
        if c is None:
            return
        if c.state is not CircuitState.PENDING:
            raise LocalProtocolError(f"circuit {circuit_id} is not awaiting an answer")
        self._queue_control(frame(FrameType.OPEN_FAIL, 0, circuit_id, encode_reason(code, reason)))
        self._drop(c)

    def _sendable(self, circuit_id: int, kind: CircuitKind, what: str) -> _Circuit:
        """The live circuit, if `what` may queue on it now; LocalProtocolError if not."""
        c = self._live(circuit_id)
        if c.kind is not kind:
            raise LocalProtocolError(f"{what} on a {c.kind.name} circuit")
        if c.state is CircuitState.PENDING:
            raise LocalProtocolError("accept the circuit before sending on it")
        if c.fin_queued:
            raise LocalProtocolError(f"{what} after send_eof", ErrorCode.CIRCUIT_STATE_ERROR)
        return c

    def send_data(self, circuit_id: int, data: bytes | memoryview) -> None:
        """Queue stream bytes; they must fit in `send_credit(circuit_id)`."""
        c = self._sendable(circuit_id, CircuitKind.TCP, "send_data")
        n = len(data)
        if not n:
            return
        c.credit.spend(n)
        if c.queue is None:
            c.queue = deque()
        c.queue.append(data)
        c.queued += n
        self._mark_ready(c)

    def send_datagram(self, circuit_id: int, data: bytes) -> bool:
        """Queue one whole datagram; False (dropped) if this flow's queue is full."""
        c = self._sendable(circuit_id, CircuitKind.UDP, "send_datagram")
        if len(data) > MAX_DATAGRAM:
            raise LocalProtocolError(f"datagram of {len(data)} bytes exceeds {MAX_DATAGRAM}")
        if c.dgram_bytes + len(data) > self._datagram_queue_bytes:
            return False
        if c.queue is None:
            c.queue = deque()
        c.queue.append(data)
        c.dgram_bytes += len(data)
        self._mark_ready(c)
        return True

    @property
    def resumable(self) -> bool:
        """Both sides announced RESUME: resumable OPENs and ACK frames may be sent."""
        return self._resume

    @property
    def completes_sessions(self) -> bool:
        """Both sides announced FIN_ACK (with RESUME): a FIN may carry an ACK and say
        COMPLETE (SPEC.md §14)."""
        return self._fin_ack

    @property
    def carries_origin(self) -> bool:
        """Both sides announced ORIGIN: OPENs may carry the session's origin (§16)."""
        return self._origin

    def send_ack(self, circuit_id: int, delivered: int) -> None:
        """Queue ACK: our endpoint delivered `delivered` units of the peer's stream (a
        relay passes on the ACK it received). Nothing without RESUME or a live circuit."""
        c = self._circuits.get(circuit_id)
        if c is None or c.kind is not _TCP or not self._resume:
            return
        self._queue_control(frame(FrameType.ACK, 0, circuit_id, encode_u64(delivered)))

    def consumed(self, circuit_id: int, n: int) -> None:
        """The application took `n` received bytes; MAX_DATA follows after half a window."""
        c = self._circuits.get(circuit_id)
        if c is None:
            return
        new_limit = c.window.consume(n)  # kept after FIN too: it is the resumption ack
        if new_limit is not None and not c.remote_fin:  # after FIN no credit is needed
            self._queue_control(frame(FrameType.MAX_DATA, 0, circuit_id, encode_u64(new_limit)))

    def set_receive_window(self, circuit_id: int, size: int) -> None:
        """Auto-tuning hook: grow (or later shrink) one circuit's receive window."""
        c = self._circuits.get(circuit_id)
        if c is None or c.remote_fin:
            return
        new_limit = c.window.resize(size)
        if new_limit is not None:
            self._queue_control(frame(FrameType.MAX_DATA, 0, circuit_id, encode_u64(new_limit)))

    def receive_window(self, circuit_id: int) -> int:
        return self._live(circuit_id).window.size

    def send_eof(self, circuit_id: int, complete: bool = False, delivered: int = -1) -> bool:
        """Half-close our direction; FIN follows the data already queued. A resumable
        circuit's (SPEC.md §14): `delivered` >= 0 is an ACK to send with it, in the FIN
        where FIN_ACK allows (else as an ACK frame just before); with FIN_ACK, `complete`
        says the session is complete (no RST NO_ERROR will follow). Returns whether the
        FIN says COMPLETE (without FIN_ACK it cannot: the caller owes that RST)."""
        c = self._circuits.get(circuit_id)
        if c is None or c.fin_queued:
            return False
        if c.state is CircuitState.PENDING:
            raise LocalProtocolError("accept the circuit before closing it")
        c.fin_queued = True
        carries = self._fin_ack and c.resumable and c.kind is _TCP
        if complete and carries:
            c.complete = True
        if delivered >= 0 and (not carries or c.queue):
            if c.resumable:
                self.send_ack(circuit_id, delivered)  # (it does not wait behind queued data)
            delivered = -1
        if not c.queue:
            self._queue_control(self._fin_frame(c, delivered))
        return c.complete

    def reset_circuit(self, circuit_id: int, code: ErrorCode | int = ErrorCode.CANCELLED,
                      reason: str = "") -> None:
        """Abort both directions; queued data is discarded. Idempotent (the first reset
        counts). NO_ERROR (a resumable session complete, §14) says everything was
        delivered, so it discards nothing: it follows the data and FIN already queued,
        and the circuit is closed to everything else at once, as by any reset."""
        c = self._circuits.get(circuit_id)
        if c is None:
            return
        if c.state is CircuitState.PENDING:
            self.refuse_circuit(circuit_id, code, reason)
            return
        rst = frame(FrameType.RST, 0, circuit_id, encode_reason(code, reason))
        if code == ErrorCode.NO_ERROR and c.queue:
            c.reset_after = rst  # (data_to_send, after the last of it)
            self._forget(c)
            return
        self._queue_control(rst)
        self._drop(c)

    # ---------------------------------------------------------------- carrier

    def ping(self, payload: bytes | None = None) -> bytes:
        payload = os.urandom(PING_SIZE) if payload is None else payload
        if len(payload) != PING_SIZE:
            raise LocalProtocolError("PING payload must be 8 bytes")
        if not self.established:
            raise LocalProtocolError("only HELLO may be sent before the peer's HELLO arrives")
        self._queue_control(frame(FrameType.PING, 0, 0, payload))
        return payload

    def goaway(self, code: ErrorCode | int = ErrorCode.NO_ERROR, reason: str = "") -> None:
        """Refuse circuits the peer opens from now on; ours and older ones continue."""
        if self._goaway_sent_last is not None:
            if code == ErrorCode.NO_ERROR:
                return
            last = self._goaway_sent_last  # a later GOAWAY may never raise the last id
        else:
            last = self._highest_peer_id
        self._goaway_sent_last = last
        self._queue_control(frame(FrameType.GOAWAY, 0, 0, encode_goaway(last, code, reason)))

    # ---------------------------------------------------------------- internals

    def _queue_control(self, data: bytes) -> None:
        self._control.append(data)
        self._control_bytes += len(data)

    def _mark_ready(self, c: _Circuit) -> None:
        if c.id not in self._in_ready:
            self._in_ready.add(c.id)
            self._ready.append(c)

    def _live(self, circuit_id: int) -> _Circuit:
        c = self._circuits.get(circuit_id)
        if c is None:
            raise LocalProtocolError(f"circuit {circuit_id} is not open",
                                     ErrorCode.CIRCUIT_STATE_ERROR)
        return c

    def _forget(self, c: _Circuit) -> None:
        if self._circuits.pop(c.id, None) is not None and not c.local:
            self._peer_circuits -= 1

    def _drop(self, c: _Circuit) -> None:
        self._forget(c)
        if c.id in self._in_ready:
            self._in_ready.discard(c.id)
            self._ready.remove(c)
        c.queue = None

    def _maybe_retire(self, c: _Circuit) -> bool:
        if c.fin_sent and c.remote_fin and c.state is CircuitState.OPEN and (not c.resumable
                                                                            or c.complete):
            self._forget(c)
            return True
        return False

    def _fail(self, exc: ProtocolError) -> None:
        self._failed = exc
        # Pending output is abandoned, except our HELLO if it never left: the peer
        # must see a HELLO first, or it cannot read the GOAWAY that says why.
        self._control = self._control[:1] if not self._hello_sent else []
        self._control_bytes = sum(map(len, self._control))
        self._ready.clear()
        self._in_ready.clear()
        last = (self._goaway_sent_last if self._goaway_sent_last is not None
                else self._highest_peer_id)
        self._goaway_sent_last = last
        self._queue_control(frame(FrameType.GOAWAY, 0, 0,
                                  encode_goaway(last, exc.code, str(exc.args[0]))))

    def _is_peer_id(self, cid: int) -> bool:
        return (cid & 1) == (0 if self.role is Role.DIALER else 1)

    def _lookup(self, cid: int, what: str) -> _Circuit | None:
        """The live circuit, or None for a retired id; an id never opened is an error."""
        if cid == 0:
            raise RemoteProtocolError(f"{what} on circuit 0", ErrorCode.CIRCUIT_ID_ERROR)
        c = self._circuits.get(cid)
        if c is not None:
            return c
        if self._is_peer_id(cid):
            if cid > self._highest_peer_id:
                raise RemoteProtocolError(f"{what} for circuit {cid}, which was never opened",
                                          ErrorCode.CIRCUIT_ID_ERROR)
        elif cid >= self._next_local_id:
            raise RemoteProtocolError(f"{what} for circuit {cid}, which we never opened",
                                      ErrorCode.CIRCUIT_ID_ERROR)
        return None  # retired: a late frame of a closed circuit, ignored

    def _handle_frame(self, ftype: int, flags: int, cid: int, payload: bytes,
                      events: list[Event]) -> None:
        if cid > MAX_CIRCUIT_ID:
            raise RemoteProtocolError("reserved bit of the circuit id is set",
                                      ErrorCode.CIRCUIT_ID_ERROR)
        if self.peer_settings is None:
            if ftype != FrameType.HELLO or cid != 0:
                raise RemoteProtocolError("the first frame must be HELLO on circuit 0")
            self._on_hello(payload, events)
            return
        if ftype == FrameType.DATA:
            c = self._lookup(cid, "DATA")
            if c is None:
                return
            if c.kind is not CircuitKind.TCP:
                raise RemoteProtocolError(f"DATA on UDP flow {cid}",
                                          ErrorCode.CIRCUIT_STATE_ERROR)
            if c.remote_fin:
                raise RemoteProtocolError(f"DATA after FIN on circuit {cid}",
                                          ErrorCode.CIRCUIT_STATE_ERROR)
            if c.local and c.state is CircuitState.OPENING:
                raise RemoteProtocolError(f"DATA before OPEN_OK on circuit {cid}",
                                          ErrorCode.CIRCUIT_STATE_ERROR)
            c.window.on_data(len(payload))
            if payload:
                events.append(DataReceived(cid, payload))
        elif ftype == FrameType.DATAGRAM:
            if len(payload) > MAX_DATAGRAM:
                raise RemoteProtocolError("DATAGRAM larger than 65,535 bytes",
                                          ErrorCode.FRAME_SIZE_ERROR)
            c = self._lookup(cid, "DATAGRAM")
            if c is None:
                return
            if c.kind is not CircuitKind.UDP:
                raise RemoteProtocolError(f"DATAGRAM on TCP circuit {cid}",
                                          ErrorCode.CIRCUIT_STATE_ERROR)
            if c.remote_fin or (c.local and c.state is CircuitState.OPENING):
                raise RemoteProtocolError(f"DATAGRAM in a closed direction of flow {cid}",
                                          ErrorCode.CIRCUIT_STATE_ERROR)
            events.append(DatagramReceived(cid, payload))
        elif ftype == FrameType.MAX_DATA:
            limit = decode_u64(payload)
            c = self._lookup(cid, "MAX_DATA")
            if c is None or c.kind is not CircuitKind.TCP:
                return
            if c.credit.raise_limit(limit) and not c.fin_queued:
                events.append(CreditGranted(cid, c.credit.available))
        elif ftype == FrameType.OPEN:
            self._on_open(cid, flags, payload, events)
        elif ftype == FrameType.ACK and self._resume:
            delivered = decode_u64(payload)
            c = self._lookup(cid, "ACK")
            if c is not None and c.kind is _TCP:
                events.append(Acknowledged(cid, delivered))
        elif ftype == FrameType.OPEN_OK:
            if payload:
                raise RemoteProtocolError("OPEN_OK carries no payload", ErrorCode.FRAME_SIZE_ERROR)
            c = self._lookup(cid, "OPEN_OK")
            if c is None:
                return
            if not c.local or c.state is not CircuitState.OPENING:
                raise RemoteProtocolError(f"unexpected OPEN_OK on circuit {cid}",
                                          ErrorCode.CIRCUIT_STATE_ERROR)
            c.state = CircuitState.OPEN
            events.append(CircuitAccepted(cid))
        elif ftype == FrameType.OPEN_FAIL:
            code, reason = decode_reason(payload)
            c = self._lookup(cid, "OPEN_FAIL")
            if c is None:
                return
            if not c.local or c.state is not CircuitState.OPENING:
                raise RemoteProtocolError(f"unexpected OPEN_FAIL on circuit {cid}",
                                          ErrorCode.CIRCUIT_STATE_ERROR)
            self._drop(c)
            events.append(CircuitRefused(cid, _code(code), reason))
        elif ftype == FrameType.FIN:
            acked = -1
            if flags & _FIN_ACKS and self._fin_ack:
                if len(payload) != 8:
                    raise RemoteProtocolError("FIN with ACK carries 8 bytes", ErrorCode.FRAME_SIZE_ERROR)
                acked = decode_u64(payload)
            elif payload:
                raise RemoteProtocolError("FIN carries no payload", ErrorCode.FRAME_SIZE_ERROR)
            c = self._lookup(cid, "FIN")
            if c is None:
                return
            if c.remote_fin:
                raise RemoteProtocolError(f"second FIN on circuit {cid}",
                                          ErrorCode.CIRCUIT_STATE_ERROR)
            if c.local and c.state is CircuitState.OPENING:
                raise RemoteProtocolError(f"FIN before OPEN_OK on circuit {cid}",
                                          ErrorCode.CIRCUIT_STATE_ERROR)
            c.remote_fin = True
            if self._fin_ack and c.resumable:
                if flags & _FIN_COMPLETE:
                    c.complete = True
                if c.kind is not _TCP:
                    acked = -1
            else:
                acked = -1
            events.append(EndOfStream(cid, c.complete, acked))
            if self._maybe_retire(c):
                events.append(CircuitClosed(cid))
        elif ftype == FrameType.RST:
            code, reason = decode_reason(payload)
            c = self._lookup(cid, "RST")
            if c is None:
                return
            self._drop(c)
            events.append(CircuitReset(cid, _code(code), reason))
        elif ftype == FrameType.PING:
            self._check_carrier_frame(cid, "PING")
            if len(payload) != PING_SIZE:
                raise RemoteProtocolError("PING payload must be 8 bytes",
                                          ErrorCode.FRAME_SIZE_ERROR)
            if self._control_bytes > MAX_PENDING_CONTROL_BYTES:
                raise RemoteProtocolError("PING flood: our replies are not being read")
            self._queue_control(frame(FrameType.PONG, 0, 0, payload))
            events.append(PingReceived(payload))
        elif ftype == FrameType.PONG:
            self._check_carrier_frame(cid, "PONG")
            if len(payload) != PING_SIZE:
                raise RemoteProtocolError("PONG payload must be 8 bytes",
                                          ErrorCode.FRAME_SIZE_ERROR)
            events.append(PongReceived(payload))
        elif ftype == FrameType.GOAWAY:
            self._check_carrier_frame(cid, "GOAWAY")
            last, code, reason = decode_goaway(payload)
            if self._goaway_received_last is not None and last > self._goaway_received_last:
                raise RemoteProtocolError("GOAWAY raised its last circuit id")
            self._goaway_received_last = last
            for c in list(self._circuits.values()):
                if c.local and c.id > last and c.state is CircuitState.OPENING:
                    self._drop(c)
                    events.append(CircuitRefused(c.id, ErrorCode.GOING_AWAY,
                                                 "the peer is going away"))
            events.append(GoAwayReceived(last, _code(code), reason))
        elif ftype == FrameType.HELLO:
            raise RemoteProtocolError("a second HELLO")
        # Unknown frame types are ignored (SPEC.md §2): extensions are negotiated first.

    def _check_carrier_frame(self, cid: int, what: str) -> None:
        if cid != 0:
            raise RemoteProtocolError(f"{what} must use circuit 0", ErrorCode.CIRCUIT_ID_ERROR)

    def _on_hello(self, payload: bytes, events: list[Event]) -> None:
        peer = decode_hello(payload)
        self.version = min(peer.version, PROTOCOL_VERSION)
        self.peer_settings = peer
        self.capabilities = Capability(peer.capabilities & self.local_settings.capabilities)
        self._resume = bool(self.capabilities & Capability.RESUME)
        self._origin = bool(self.capabilities & Capability.ORIGIN)
        self._datagram = bool(self.capabilities & Capability.DATAGRAM)
        self._fin_ack = self._resume and bool(self.capabilities & Capability.FIN_ACK)
        events.append(HandshakeComplete(peer, self.version, self.capabilities))

    def _on_open(self, cid: int, flags: int, payload: bytes, events: list[Event]) -> None:
        if cid == 0 or not self._is_peer_id(cid) or cid <= self._highest_peer_id:
            raise RemoteProtocolError(f"OPEN with invalid or reused circuit id {cid}",
                                      ErrorCode.CIRCUIT_ID_ERROR)
        request = decode_open(payload, flags, self._resume, self._origin)
        self._highest_peer_id = cid
        assert self.peer_settings is not None
        refusal: tuple[ErrorCode, str] | None = None
        if self._goaway_sent_last is not None:
            refusal = (ErrorCode.GOING_AWAY, "this gateway is shutting down the carrier")
        elif self._peer_circuits >= self.local_settings.max_circuits:
            refusal = (ErrorCode.RESOURCE_LIMIT,
                       f"more than {self.local_settings.max_circuits} circuits on one carrier")
        elif request.kind is CircuitKind.UDP and not self._datagram:
            refusal = (ErrorCode.UNSUPPORTED_KIND, "UDP flows were not negotiated")
        if refusal is not None:
            self._queue_control(frame(FrameType.OPEN_FAIL, 0, cid, encode_reason(*refusal)))
            if self._control_bytes > MAX_PENDING_CONTROL_BYTES:
                raise RemoteProtocolError("OPEN flood: our refusals are not being read")
            events.append(CircuitRequestRefused(cid, request, *refusal))
            return
        c = self._circuits[cid] = _Circuit(cid, request.kind, False, CircuitState.PENDING,
                                           self.peer_settings.initial_window,
                                           self.local_settings.initial_window)
        c.resumable = request.resume is not None
        self._peer_circuits += 1
        events.append(CircuitRequested(cid, request))


def _code(value: int) -> ErrorCode | int:
    try:
        return ErrorCode(value)
    except ValueError:
        return value


def _with_session_id(s: Settings, session_id: bytes) -> Settings:
    return replace(s, session_id=session_id)
