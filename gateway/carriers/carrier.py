"""A carrier: one connection to a peer gateway, driving one sans-IO `CarrierSession`.

Three tasks live in the carrier's nursery: the reader (the only one that feeds the
session bytes and turns events into circuit wake-ups), the writer, and the keepalive
(PING every interval; silence for `keepalive_timeout` declares the carrier dead).

The carrier owns its writes: circuits queue frames and call `queued()`; `flush` then
takes everything the session has queued (control frames first, then payload round
robin) as one coalesced write, without waiting, either at once or when the current
`write_batch` ends (see writes.py: one write per carrier per relay wake-up or UDP
burst). Only when the socket is full does the writer task take over, waiting for it
to drain. That saves a task switch per message (latency) and keeps bulk transfers at
one write per 256 KiB.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from gateway.carriers.circuit import Circuit, DatagramCircuit, _CircuitBase
from gateway.carriers.transport import CarrierTransport, TransportBroken
from gateway.carriers.writes import linger, queued, write_batch
from gateway.errors import CarrierLost, CircuitBroken, OpenRefused
from gateway.logs import Throttle
from gateway_codecs import (
    Acknowledged,
    CarrierEnded,
    CarrierSession,
    CircuitAccepted,
    CircuitClosed,
    CircuitKind,
    CircuitRefused,
    CircuitRequested,
    CircuitRequestRefused,
    CircuitReset,
    CreditGranted,
    DatagramReceived,
    DataReceived,
    EndOfStream,
    ErrorCode,
    Event,
    GoAwayReceived,
    HandshakeComplete,
    OpenRequest,
    PingReceived,
    PongReceived,
    ProtocolError,
    RemoteProtocolError,
    Role,
    Settings,
)

log = logging.getLogger("tunnelgate.carrier")

READ_SIZE = 256 * 1024  # one batch takes several full frames: fewer wakeups per byte
# After HELLO, until a batch fills it: an idle or interactive carrier's buffer (a relay
# tier holds one carrier per edge: 256 KiB each was most of an idle edge's cost). A
# carrier that fills it grows to READ_SIZE, and shrinks back after IDLE_BATCHES small ones.
IDLE_READ_SIZE = 32 * 1024
IDLE_BATCHES = 256
# Until the peer's HELLO is read: a HELLO frame is at most MAX_HELLO_PAYLOAD (SPEC.md §3),
# and a carrier that never says hello must cost little (a flood of them, many little).
HELLO_READ_SIZE = 8 * 1024
READ_MIN_ROOM = 16 * 1024  # stop batching when less than a TLS record would fit
# A read up to this size is dispatched as one write batch; a bigger one is bulk.
BATCHED_READ = 16 * 1024  # one TLS record
WRITE_CHUNK = 256 * 1024  # payload per write: big enough to amortize a TLS record
# batch, small enough that a late small write on another circuit waits little.

AnyCircuit = Circuit | DatagramCircuit
RequestHandler = Callable[["Carrier", AnyCircuit], Awaitable[None]]


@dataclass(frozen=True)
class Timing:
    handshake_timeout: float = 10.0
    keepalive_interval: float = 10.0
    keepalive_timeout: float = 30.0


class Carrier:
    """One live carrier to `peer_name`; opens circuits and serves the peer's."""

    def __init__(self, transport: CarrierTransport, role: Role, settings: Settings,
                 timing: Timing, on_request: RequestHandler, peer_name: str | None,
                 description: str, session_nursery: trio.Nursery | None = None) -> None:
        self.transport = transport
        self.session = CarrierSession(role, settings)
        self.timing = timing
        self.peer_name = peer_name
        self.peer_instance = ""  # the peer process's INSTANCE_ID in hex ("" if not announced)
        self.up_since = 0.0  # wall-clock time its HELLO exchange completed (0: not yet)
        self.direction = "dialed" if role is Role.DIALER else "accepted"
        self.description = description
        self.circuits: dict[int, AnyCircuit] = {}
        self.rtt: float | None = None
        self.close_reason = "closed"
        # The peer ended the carrier after GOAWAY with no circuit left: it had everything
        # we sent (a completed session's last RST included).
        self.ended_cleanly = False
        self.read_error: BaseException | None = None
        self.closed = trio.Event()
        self._on_request = on_request
        # Where the peer's sessions run. Not the carrier's own nursery: the carrier's end
        # must reach a session as its circuit breaking (RST, with the reason), never as a
        # cancellation the session could take for a normal end.
        self._session_nursery = session_nursery
        self._established = trio.Event()
        self._wake = trio.Event()  # the writer task waits for the socket only when it is full
        self._pending: memoryview | None = None  # bytes taken from the session, not yet written
        self._write_blocked = False
        self._lingering = 0  # bytes of queued frames that wait for the next write (lingers)
        self._last_heard = trio.current_time()
        self._pings: dict[bytes, float] = {}
        self._nursery: trio.Nursery | None = None
        self._refusals_log = Throttle()  # OPENs the session refused itself: the peer can flood them

    def __repr__(self) -> str:
        return f"<Carrier {self.description}>"

    # ------------------------------------------------------------------ lifecycle

    async def run(self, on_ready: Callable[[Carrier], None] | None = None) -> None:
        """Handshake, call `on_ready`, then serve until the link ends or is closed.

        Raises CarrierLost if the HELLO exchange does not complete; otherwise returns
        when the carrier is over, with the reason in `close_reason`.
        """
        handshake_failed = False
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._writer)
                nursery.start_soon(self._reader_then_stop, nursery.cancel_scope)
                with trio.move_on_after(self.timing.handshake_timeout) as handshake:
                    await self._established.wait()
                if handshake.cancelled_caught:
                    self.close_reason = "no HELLO within the handshake timeout"
                    self.session.goaway(ErrorCode.PROTOCOL_ERROR, self.close_reason)  # flushed below
                if not self._established.is_set():
                    handshake_failed = True
                    nursery.cancel_scope.cancel()
                else:
                    if on_ready is not None:
                        on_ready(self)
                    nursery.start_soon(self._keepalive, nursery.cancel_scope)
        except Exception as exc:
            # A bug in this carrier's handling (not bad input: that is a ProtocolError)
            # ends this carrier, with the traceback logged, and nothing else.
            self._internal_error(exc)
        finally:
            self.closed.set()
            lost = CarrierLost(ErrorCode.CANCELLED, f"carrier {self.description} lost: {self.close_reason}")
            for circuit in list(self.circuits.values()):
                circuit.on_broken(lost)
            self.circuits.clear()
            self._write_blocked = False
            self.flush()  # a GOAWAY saying why, if the socket takes it now
            self.transport.close()
        # The reader ending before HELLO (e.g. a TLS 1.3 server refusing our certificate
        # after our handshake "completed") cancels the nursery: the carrier never came up.
        if handshake_failed or not self._established.is_set():
            raise CarrierLost(ErrorCode.PROTOCOL_ERROR, self.close_reason) from self.read_error

    def _internal_error(self, exc: BaseException) -> None:
        log.error("carrier %s: internal error; closing it", self.description, exc_info=exc)
        self.close_reason = f"internal error: {exc!r}"[:200]
        try:
            self.session.goaway(ErrorCode.INTERNAL_ERROR, "internal error")
        except ProtocolError:
            pass

    async def _serve_request(self, circuit: AnyCircuit) -> None:
        """Run the request handler; a bug in one session must not take the carrier down."""
        try:
            await self._on_request(self, circuit)
        except Exception:
            log.exception("carrier %s: handler for circuit %d failed", self.description, circuit.id)
            try:
                circuit.reset(ErrorCode.INTERNAL_ERROR, "internal error at the far gateway")
            except Exception:  # this task runs in the gateway's nursery: nothing may escape
                log.exception("carrier %s: could not reset circuit %d", self.description, circuit.id)

    def close(self, reason: str, code: ErrorCode = ErrorCode.NO_ERROR) -> None:
        """Send GOAWAY with `reason` and tear the carrier down now."""
        self.close_reason = reason
        try:
            self.session.goaway(code, reason)
        except ProtocolError:
            pass
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    def goaway(self, reason: str = "draining") -> None:
        """Stop accepting the peer's new circuits; existing ones continue."""
        self.session.goaway(ErrorCode.NO_ERROR, reason)
        self.flush()

    @property
    def usable(self) -> bool:
        return not self.closed.is_set() and self.session.can_open

    @property
    def takes_circuits(self) -> bool:
        """The far side accepts circuits (its HELLO's MAX_CIRCUITS is not 0)."""
        settings = self.session.peer_settings
        return settings is None or settings.max_circuits > 0

    # ------------------------------------------------------------------ circuits

    def open(self, request: OpenRequest) -> AnyCircuit:
        """Open a circuit now (OPEN is queued; data may follow before OPEN_OK: inside a
        `write_batch` both leave in one write)."""
        try:
            cid = self.session.open_circuit(request)
        except ProtocolError as exc:
            raise OpenRefused(exc.code, f"carrier to {self.peer_name} cannot open: {exc}") from exc
        cls = DatagramCircuit if request.kind is CircuitKind.UDP else Circuit
        circuit = cls(self, cid, request)
        self.circuits[cid] = circuit
        self.queued()
        return circuit

    def queued(self) -> None:
        """Frames were queued in the session: written now, or when the batch ends."""
        queued(self)

    @property
    def lingering(self) -> int:
        return self._lingering

    def lingers(self) -> None:
        """Frames were queued that may wait for the next write (writes.linger); the
        reader's end-of-read flush leaves them (unless more was queued since)."""
        self._lingering = self.session.pending_output
        linger(self)

    def adopt(self, circuit: _CircuitBase) -> None:
        """A circuit attached here from another carrier (Circuit.attach)."""
        assert isinstance(circuit, Circuit | DatagramCircuit)
        self.circuits[circuit.id] = circuit

    def forget(self, circuit: _CircuitBase) -> None:
        if self.circuits.get(circuit.id) is circuit:
            del self.circuits[circuit.id]

    def flush(self) -> None:
        """Write what the session has queued, from the calling task, as far as the socket
        takes it without blocking; the writer task finishes the rest when it drains.

        Writing inline saves a task switch per message (latency), and a writer that only
        runs when the socket is full keeps bulk transfers to one syscall per chunk.
        """
        if self._write_blocked or (self.closed.is_set() and self._nursery is None):
            return
        transport = self.transport
        while True:
            pending = self._pending
            if not pending:
                self._lingering = 0
                data = self.session.data_to_send(WRITE_CHUNK)
                if not data:
                    self._pending = None
                    if transport.backlogged:  # a framing transport holds bytes: push them
                        pending = memoryview(b"")
                    else:
                        return
                else:
                    pending = memoryview(data)
            try:
                sent = transport.try_send(pending)
            except TransportBroken as exc:
                self._pending = None
                self._fail(f"write failed: {exc}")
                return
            if sent is None:
                self._pending = pending
                self._write_blocked = True
                self._wake.set()
                return
            self._pending = pending[sent:]

    def _fail(self, reason: str) -> None:
        if not self.closed.is_set():
            self.close_reason = reason
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def _writer(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = trio.Event()
            while self._write_blocked:
                await self.transport.wait_writable()
                self._write_blocked = False
                self.flush()

    async def _reader_then_stop(self, scope: trio.CancelScope) -> None:
        try:
            await self._reader()
        finally:
            scope.cancel()

    async def _reader(self) -> None:
        session = self.session
        transport = self.transport
        buffer = memoryview(bytearray(HELLO_READ_SIZE))
        self.flush()  # our HELLO
        drained = False
        small_batches = 0
        while True:
            # TLS hands over one record (<= 16 KiB) per read: keep reading until the
            # buffer is nearly full or nothing is ready, then parse the batch at once.
            if drained:
                await transport.wait_readable()
            filled = 0
            ended = drained = False
            size = len(buffer)
            try:
                while filled < max(size - READ_MIN_ROOM, 1):
                    room = size - filled
                    n = transport.try_recv_into(buffer[filled:])
                    if n is None:
                        drained = True  # next time, wait before trying (saves a syscall)
                        break
                    if n == 0:
                        ended = True
                        break
                    filled += n
                    if transport.looks_drained(n, room):
                        # A short read: most likely nothing more has arrived. Skipping the
                        # read that would say so saves a syscall and an exception per
                        # message; if more did arrive, the wait returns at once.
                        drained = True
                        break
            except TransportBroken as exc:
                self.read_error = _without_tracebacks(exc)
                self.close_reason = f"read failed: {exc}"
                return
            if not filled and not ended:
                continue
            if filled:
                self._last_heard = trio.current_time()
            if ended and not filled:
                clean = any(isinstance(e, CarrierEnded) and e.clean for e in session.receive_eof())
                self.ended_cleanly = clean
                self.close_reason = "closed by peer after GOAWAY" if clean else "peer closed the link"
                return
            try:
                events = session.receive_data(buffer[:filled], borrow=True)
            except RemoteProtocolError as exc:
                self.close_reason = f"protocol violation by peer: {exc}"
                log.warning("carrier %s: %s; closing it", self.description, self.close_reason)
                return
            if filled > BATCHED_READ:
                # Bulk: what the events make a bridged circuit send leaves at once, so the
                # next hop works while this one parses the rest.
                for event in events:
                    self._dispatch(event)
            else:
                # A few control frames and small messages (session set-up and teardown, a
                # relay's end-to-end ACKs and FINs): one write per carrier for all of them.
                with write_batch():
                    for event in events:
                        self._dispatch(event)
            if session.pending_output > self._lingering:
                self.flush()  # PONGs, credit updates, refusals
            if self._established.is_set():
                # The peer has said HELLO (over TLS, its certificate was checked before):
                # size the buffer to the traffic. (Nothing refers to the old buffer: its
                # events were handled, split frames copied.)
                if size == HELLO_READ_SIZE:
                    buffer = memoryview(bytearray(IDLE_READ_SIZE))
                elif size < READ_SIZE and filled >= size - READ_MIN_ROOM:
                    buffer = memoryview(bytearray(READ_SIZE))  # bulk: big batches
                    small_batches = 0
                elif size == READ_SIZE and filled < IDLE_READ_SIZE - READ_MIN_ROOM:
                    small_batches += 1
                    if small_batches >= IDLE_BATCHES:
                        buffer = memoryview(bytearray(IDLE_READ_SIZE))
                        small_batches = 0
                else:
                    small_batches = 0
            if filled >= size - READ_MIN_ROOM:
                # More is probably waiting: let the circuits just fed run first. Otherwise
                # the next read finds nothing and waiting for the socket yields anyway.
                await trio.lowlevel.checkpoint()

    def _dispatch(self, event: Event) -> None:
        match event:
            case DataReceived(circuit_id=cid, data=data):
                c = self.circuits.get(cid)
                if isinstance(c, Circuit):
                    c.on_data(data)
            case DatagramReceived(circuit_id=cid, data=data):
                c = self.circuits.get(cid)
                if isinstance(c, DatagramCircuit):
                    c.on_datagram(data)
            case CreditGranted(circuit_id=cid) | EndOfStream(circuit_id=cid) if (
                c := self.circuits.get(cid)) is not None:
                if isinstance(event, CreditGranted):
                    c.on_credit()
                elif isinstance(c, Circuit):
                    c.on_eof(event.complete, event.delivered)
                else:
                    c.on_eof()
            case CircuitAccepted(circuit_id=cid) if (c := self.circuits.get(cid)) is not None:
                c.on_accepted()
            case Acknowledged(circuit_id=cid, delivered=delivered):
                c = self.circuits.get(cid)
                if isinstance(c, Circuit):
                    c.on_ack(delivered)
            case CircuitRefused(circuit_id=cid, code=code, reason=reason):
                c = self.circuits.pop(cid, None)
                if c is not None:
                    c.on_broken(OpenRefused(code, reason))
            case CircuitReset(circuit_id=cid, code=code, reason=reason):
                c = self.circuits.pop(cid, None)
                if c is not None:
                    c.on_broken(CircuitBroken(code, reason or "reset by the far side"))
            case CircuitRequested(circuit_id=cid, request=request):
                cls = DatagramCircuit if request.kind is CircuitKind.UDP else Circuit
                circuit = cls(self, cid, request)
                self.circuits[cid] = circuit
                nursery = self._session_nursery or self._nursery
                assert nursery is not None
                nursery.start_soon(self._serve_request, circuit)
            case CircuitRequestRefused(circuit_id=cid, request=request, code=code, reason=reason):
                if (left_out := self._refusals_log.due()) is not None:
                    log.warning("carrier %s: refused circuit %d (%s %s:%d): %s: %s%s", self.description,
                                cid, request.kind.name.lower(), request.host[:64], request.port,
                                ErrorCode.describe(code), reason,
                                f" ({left_out} more refused since the last such line)" if left_out else "")
            case PongReceived(payload=payload):
                sent = self._pings.pop(payload, None)
                if sent is not None:
                    self.rtt = trio.current_time() - sent
            case GoAwayReceived(code=code, reason=reason):
                log.info("carrier %s: peer is going away (%s%s)", self.description,
                         ErrorCode.describe(code), f": {reason}" if reason else "")
            case HandshakeComplete(peer=peer):
                if self.peer_name is None:
                    self.peer_name = peer.node_name or None
                elif peer.node_name and peer.node_name != self.peer_name:
                    # Its certificate decides who it is; a HELLO naming another gateway is
                    # a misconfiguration (or an attempt) the operator should see.
                    log.warning("carrier %s: HELLO names %r, but the certificate is peer %s's;"
                                " taken as %s", self.description, peer.node_name[:64],
                                self.peer_name, self.peer_name)
                self.peer_instance = peer.instance_id.hex()
                self._established.set()
            case PingReceived() | CircuitClosed():
                pass

    async def _keepalive(self, scope: trio.CancelScope) -> None:
        interval = self.timing.keepalive_interval
        timeout = self.timing.keepalive_timeout
        tick = min(interval, 1.0)
        next_ping = trio.current_time()
        while True:
            now = trio.current_time()
            if now - self._last_heard > timeout:
                self.close_reason = f"keepalive timeout: nothing heard for {timeout:g} s"
                log.warning("carrier %s: %s", self.description, self.close_reason)
                self.session.goaway(ErrorCode.KEEPALIVE_TIMEOUT, self.close_reason)
                scope.cancel()
                return
            if now >= next_ping:
                if len(self._pings) > 16:
                    self._pings.clear()
                self._pings[self.session.ping(os.urandom(8))] = now
                self.flush()
                next_ping = now + interval
            await trio.sleep(tick)


def _without_tracebacks(exc: BaseException) -> BaseException:
    """`exc` kept for its message and cause only: a traceback holds the frames it passed
    (the reader's, with the carrier and its buffer), and a carrier that stores it would
    then be freed only by the cyclic garbage collector."""
    seen: BaseException | None = exc
    while seen is not None:
        seen.__traceback__ = None
        seen = seen.__cause__ or seen.__context__
    return exc
