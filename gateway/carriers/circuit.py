"""Circuits as trio streams: the one abstraction every relay role is built from.

A `Circuit` is a `trio.abc.HalfCloseableStream` over one TCP-kind circuit of a
carrier; a `DatagramCircuit` carries whole UDP datagrams. Both are fed by their
carrier's reader task (synchronously, from session events) and write by asking the
carrier's session to queue frames and then `carrier.queued()` (the carrier writes them
at once, or at the end of the current write batch).
A circuit may also push what arrives straight into a sink (`sink`, set by the relay
engine or `splice`) and take pushes itself (`try_send`): that is how relays avoid a task
switch per message.
"""

from __future__ import annotations

import operator
from collections import deque
from collections.abc import Callable
from typing import Protocol

import trio
from trio.lowlevel import ParkingLot

from gateway.errors import CircuitBroken, OpenRefused
from gateway.stream_abilities import Abortable, NonBlockingSink, PushSource
from gateway_codecs import (
    MAX_DATAGRAM,
    CarrierSession,
    CircuitSnapshot,
    ErrorCode,
    LocalProtocolError,
    OpenRequest,
)

# A UDP flow's inbound queue: datagrams beyond this are dropped and counted, so a
# slow UDP target never makes the carrier's reader wait.
DATAGRAM_QUEUE_BYTES = 256 * 1024
# Window auto-tuning (see Circuit._acknowledge): the cap bounds what one circuit may
# buffer; idle or slow readers never grow, so a stalled circuit keeps a small window.
MAX_AUTOTUNED_WINDOW = 4 * 1024 * 1024
DEFAULT_RTT = 0.05  # before the first PONG
MIN_TUNING_SPAN = 0.002  # on loopback an RTT is microseconds: do not let noise decide
# Shared, always empty, never appended to: an idle circuit allocates no queue (a deque
# costs ~600 bytes, a good part of an idle circuit's footprint).
_NO_DATA: deque[bytes] = deque(maxlen=0)


class CarrierLink(Protocol):
    """What a circuit needs of the carrier it is on (carrier.Carrier): its session, a way
    to say frames are queued, to be forgotten, and the round-trip time for auto-tuning.
    A protocol, not an import: the carrier imports circuits, never the reverse."""

    session: CarrierSession
    rtt: float | None
    closed: trio.Event  # set once the carrier is down
    ended_cleanly: bool  # ...by the peer, after GOAWAY, with everything we sent read

    @property
    def lingering(self) -> int: ...  # bytes of queued frames that wait for the next write
    def queued(self) -> None: ...
    def lingers(self) -> None: ...
    def forget(self, circuit: _CircuitBase) -> None: ...
    def adopt(self, circuit: _CircuitBase) -> None: ...


class _CircuitBase:
    """What stream and datagram circuits share: identity, answer state, breakage."""

    def __init__(self, carrier: CarrierLink, circuit_id: int, request: OpenRequest) -> None:
        self.carrier = carrier
        self.id = circuit_id
        self.request = request
        self.broken: CircuitBroken | None = None
        self._closed = False  # aclose() was called on this end
        self._answered = False  # OPEN_OK/OPEN_FAIL seen (opener) or sent (acceptor)
        self._lot = ParkingLot()  # readers/writers waiting for data, credit or an answer
        self._inbound: deque[bytes] = _NO_DATA  # replaced by a real deque on first data
        self._inbound_bytes = 0

    def _wake(self) -> None:
        """Wake the tasks parked on this circuit. Mostly there are none (the engine drives
        its circuits without a task), and an empty lot's unpark_all still costs."""
        if self._lot:
            self._lot.unpark_all()

    def _enqueue(self, data: bytes) -> None:
        """Queue inbound data for the reader task and wake it."""
        if self._inbound is _NO_DATA:
            self._inbound = deque()
        self._inbound.append(data)
        self._inbound_bytes += len(data)
        self._wake()

    # ---- opener side
    async def wait_open(self) -> None:
        """Wait for OPEN_OK; raises OpenRefused or CarrierLost otherwise."""
        if self._answered:
            await trio.lowlevel.checkpoint()
        while not self._answered:
            await self._lot.park()
        self._raise_if_broken()

    # ---- acceptor side
    def accept(self) -> None:
        self._raise_if_broken()
        self.carrier.session.accept_circuit(self.id)
        self._answered = True
        self.carrier.queued()

    def refuse(self, code: int, reason: str) -> None:
        if self.broken is None:
            self.carrier.session.refuse_circuit(self.id, code, reason)
            self.carrier.queued()
        self._fail(OpenRefused(code, reason))
        self.carrier.forget(self)

    # ---- fed by the carrier's reader
    def on_accepted(self) -> None:
        self._answered = True
        self._wake()

    def on_broken(self, error: CircuitBroken) -> None:
        self._fail(error)

    def _fail(self, error: CircuitBroken) -> None:
        if self.broken is None:
            self.broken = error
        self._answered = True
        self._wake()

    def _raise_if_broken(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this circuit was closed")
        if self.broken is not None:
            raise trio.BrokenResourceError(str(self.broken)) from self.broken

    def reset(self, code: int = ErrorCode.CANCELLED, reason: str = "") -> None:
        """Abort both directions now (RST); further use raises."""
        if self.broken is None:
            self.carrier.session.reset_circuit(self.id, code, reason)
            self.carrier.queued()
            self._fail(CircuitBroken(code, reason or "reset locally"))
        self.carrier.forget(self)

    def retire(self) -> None:
        """The session over this circuit is complete: RST NO_ERROR, which nothing waits
        on urgently, so it leaves with the carrier's next write (writes.linger)."""
        if self.broken is None:
            session = self.carrier.session
            # Nothing queued but other lingering frames: it lingers with them. Else it
            # goes with the write that takes what is queued.
            alone = session.pending_output <= self.carrier.lingering
            session.reset_circuit(self.id, ErrorCode.NO_ERROR, "session complete")
            if alone:
                self.carrier.lingers()
            else:
                self.carrier.queued()
            self._fail(CircuitBroken(ErrorCode.NO_ERROR, "session complete"))
        self.carrier.forget(self)


class Circuit(_CircuitBase, trio.abc.HalfCloseableStream, PushSource, NonBlockingSink, Abortable):
    """A TCP-kind circuit as a half-closeable byte stream with per-circuit credit."""

    def __init__(self, carrier: CarrierLink, circuit_id: int, request: OpenRequest) -> None:
        super().__init__(carrier, circuit_id, request)
        self.fin_received = False  # the far side's FIN arrived (bytes before it may still wait)
        # FIN_ACK (SPEC.md §14): a FIN said COMPLETE, received or sent: the session over
        # this circuit ended without RST NO_ERROR, and the circuit retires with the FINs.
        self.fin_complete = False
        self.complete_sent = False
        # The ACK that rode in the far side's FIN (-1: none). A middle relay passes it on
        # in the FIN it forwards (`passes_fin_ack`), not as an ACK of its own.
        self.fin_delivered = -1
        self.passes_fin_ack = False
        self._eof_sent = False
        self.bytes_sent = 0
        self.bytes_received = 0
        self._sending = False
        self._receiving = False
        # Optional non-blocking writer of inbound bytes (a local socket's send), used
        # while nothing is queued: data then leaves from the carrier's reader task,
        # without waking the task that reads this circuit. Returns bytes written.
        self.sink: Callable[[bytes | memoryview], int] | None = None
        self.sunk = 0
        # Optional callback for the relay engine (it runs without a task): called after
        # EOF, new credit or breakage, and data queued without a sink, from the reader.
        self.watcher: Callable[[], None] | None = None
        self._window = carrier.session.local_settings.initial_window
        # Off any carrier (detach): offsets and credit wait here until attach.
        self._parked: CircuitSnapshot | None = None
        # End-to-end acknowledgements (ACK, RESUME capability): the highest the far
        # endpoint reported (-1: none yet), and who hears of them (a resumable port, or
        # a relay passing them on to its other leg).
        self.peer_delivered = -1
        self.ack_listener: Callable[[int], None] | None = None
        self._tuning_bytes = 0
        self._tuning_since = 0.0  # bytes the sink wrote (the reader of this circuit never saw them)

    # ---- fed by the carrier's reader (synchronous, in the reader task)
    def on_data(self, data: bytes | memoryview) -> None:
        """Bytes for this circuit. A memoryview is lent by the carrier's read buffer:
        written to the sink at once, or copied before it is queued."""
        if self._closed:
            self.reset(ErrorCode.CANCELLED, "data arrived after the circuit was closed")
            return
        if self.sink is not None and self._inbound is _NO_DATA:
            written = self.sink(data)
            if written:
                self.sunk += written
                self.bytes_received += written
                # Credit flows back as if a reader had taken the bytes: flow control
                # still ends at the local socket's buffer.
                self._acknowledge(written)
                if written == len(data):
                    return
                data = data[written:]
        self._enqueue(bytes(data))
        if self.sink is None and self.watcher is not None:
            self.watcher()  # a relay that takes bytes only from the queue (TLS inside)

    def on_eof(self, complete: bool = False, delivered: int = -1) -> None:
        """FIN; with FIN_ACK, the ACK that rode in it (`delivered`), as if it came first."""
        if delivered >= 0:
            self.fin_delivered = delivered
            if not self.passes_fin_ack:
                self.on_ack(delivered)
        self.fin_received = True
        self.fin_complete = complete
        if self._closed:
            self.carrier.forget(self)
        self._wake()
        if self.watcher is not None:
            self.watcher()

    def on_credit(self) -> None:
        self._wake()
        if self.watcher is not None:
            self.watcher()

    def on_ack(self, delivered: int) -> None:
        if delivered > self.peer_delivered:
            self.peer_delivered = delivered
            self._wake()
            if self.ack_listener is not None:
                self.ack_listener(delivered)

    def send_ack(self, delivered: int) -> None:
        """ACK: our end delivered `delivered` units of the far end's stream (a relay: the
        next hop said so). Sent only where RESUME was negotiated."""
        if self.broken is None and self._parked is None:
            self.carrier.session.send_ack(self.id, delivered)
            self.carrier.queued()

    async def wait_ack(self) -> int:
        """The first ACK (a resumable session's exit sends one right after OPEN_OK)."""
        await trio.lowlevel.checkpoint()
        while self.peer_delivered < 0:
            self._raise_if_broken()
            await self._lot.park()
        return self.peer_delivered

    def on_broken(self, error: CircuitBroken) -> None:
        super().on_broken(error)
        if self.watcher is not None:
            self.watcher()

    @property
    def send_credit(self) -> int:
        """Bytes this end may send now (the peer's window); none while detached."""
        if self._parked is not None:
            return 0
        return self.carrier.session.send_credit(self.id)

    # ---- a circuit belongs to its session, not to one carrier
    @property
    def detached(self) -> bool:
        return self._parked is not None

    def detach(self) -> None:
        """Take this circuit off its carrier, keeping its identity, offsets and credit
        (the carrier broke, or drains). Meanwhile sends wait (no credit), reads go on from
        what arrived, and an EOF waits for `attach`. Bytes the carrier lost in flight
        are not recovered here: resumption (end-to-end acknowledgements) does that."""
        self._raise_if_broken()
        self._parked = self.carrier.session.detach_circuit(self.id)
        self.carrier.forget(self)

    def attach(self, carrier: CarrierLink, circuit_id: int | None = None) -> int:
        """Continue on `carrier` where the circuit left off: under a new id of ours, or
        under the peer's `circuit_id` (it attached first). Returns the id."""
        parked = self._parked
        if parked is None:
            raise trio.ClosedResourceError("this circuit is not detached")
        self.id = carrier.session.attach_circuit(parked, circuit_id)
        self.carrier = carrier
        self._parked = None
        carrier.adopt(self)
        carrier.queued()
        self.on_credit()  # waiting senders and the relay engine carry on
        return self.id

    @property
    def at_eof(self) -> bool:
        """The far side ended its half and every byte before that has been taken."""
        return self.fin_received and not self._inbound

    def _acknowledge(self, n: int) -> None:
        """Give `n` bytes of credit back, and auto-tune the window (no protocol change:
        MAX_DATA carries absolute offsets, the window size is ours alone).

        If the reader took a whole window within two round trips, the sender was
        waiting for credit, not for the reader: double the window, up to a cap.
        """
        if self._parked is not None:
            self._parked.consumed += n  # acknowledged on the next carrier
            return
        session = self.carrier.session
        session.consumed(self.id, n)
        self._tuning_bytes += n
        window = self._window
        if self._tuning_bytes >= window:
            now = trio.current_time()
            rtt = self.carrier.rtt or DEFAULT_RTT
            if window < MAX_AUTOTUNED_WINDOW and now - self._tuning_since < max(2 * rtt, MIN_TUNING_SPAN):
                self._window = min(window * 2, MAX_AUTOTUNED_WINDOW)
                session.set_receive_window(self.id, self._window)
            self._tuning_bytes = 0
            self._tuning_since = now

    # ---- trio.abc.HalfCloseableStream
    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is already sending on this circuit")
        self._sending = True
        try:
            if self._eof_sent and not self._closed:
                raise trio.ClosedResourceError("send_all after send_eof")
            self._raise_if_broken()
            # The session keeps references until the writer runs: never a caller's
            # mutable buffer.
            view = memoryview(data if isinstance(data, bytes) else bytes(data))
            while view:
                credit = self.send_credit
                if credit <= 0:
                    await self._lot.park()
                    self._raise_if_broken()
                    continue
                chunk = view[:credit]
                self.carrier.session.send_data(self.id, chunk)
                self.bytes_sent += len(chunk)
                view = view[credit:]
                self.carrier.queued()
            await trio.lowlevel.checkpoint()
        finally:
            self._sending = False

    def try_send(self, data: bytes | bytearray | memoryview) -> int:
        """Queue what the credit allows now, without blocking; 0 if nothing fits (or a
        send_all is holding earlier bytes). Lets a relay push circuit to circuit."""
        if self._sending or self._eof_sent or self._closed or self.broken is not None \
                or self._parked is not None:
            return 0
        session = self.carrier.session
        credit = session.send_credit(self.id)
        if credit <= 0:
            return 0
        if not isinstance(data, bytes):
            data = bytes(data)  # the session keeps a reference until the write: immutable only
        chunk = data if len(data) <= credit else memoryview(data)[:credit]
        session.send_data(self.id, chunk)
        self.bytes_sent += len(chunk)
        self.carrier.queued()
        return len(chunk)

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()
        self._raise_if_broken()
        while self.send_credit <= 0:
            await self._lot.park()
            self._raise_if_broken()

    async def send_eof(self) -> None:
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this circuit")
        if self._closed:
            raise trio.ClosedResourceError("this circuit was closed")
        await trio.lowlevel.checkpoint()
        self.end_now()

    def end_now(self, complete: bool = False, delivered: int = -1) -> None:
        """send_eof without waiting: FIN once (raises if the circuit broke). `complete`:
        this FIN completes a resumable session (SPEC.md §14): it says COMPLETE where the
        carrier has FIN_ACK (`complete_sent`). (Elsewhere it is a plain FIN, and the
        caller owes the RST NO_ERROR that says the same.)
        `delivered` >= 0: an ACK that goes with it (in it, with FIN_ACK)."""
        if self._eof_sent:
            return
        self._raise_if_broken()
        self._eof_sent = True
        self._send_eof(complete, delivered)

    def end_complete(self) -> None:
        """Our last word in a complete resumable session, sent again to an end that may
        have lost it: FIN saying COMPLETE, or FIN and RST NO_ERROR where the carrier has
        no FIN_ACK (SPEC.md §14)."""
        self.end_now(True)
        if self.complete_sent:
            self.close_now()
        else:
            self.retire()

    def _send_eof(self, complete: bool = False, delivered: int = -1) -> None:
        if self._parked is not None:
            self._parked.fin_queued = True  # FIN follows on the next carrier
            return
        self.complete_sent = self.carrier.session.send_eof(self.id, complete, delivered)
        self.carrier.queued()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._receiving:
            raise trio.BusyResourceError("another task is already receiving on this circuit")
        if max_bytes is not None:
            max_bytes = operator.index(max_bytes)
            if max_bytes < 1:
                raise ValueError("max_bytes must be >= 1")
        self._receiving = True
        try:
            # The checkpoint comes first: from taking the data to the caller's next await
            # nothing else runs, so a sink (see on_data) never overtakes bytes in hand.
            await trio.lowlevel.checkpoint()
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("this circuit was closed")
                if self._inbound:
                    return self._take(max_bytes)
                if self.fin_received:
                    return b""
                self._raise_if_broken()
                await self._lot.park()
        finally:
            self._receiving = False

    def take_nowait(self, max_bytes: int) -> bytes | None:
        """Queued bytes (up to `max_bytes`) without waiting; None if nothing is queued."""
        return self._take(max_bytes) if self._inbound else None

    def _take(self, max_bytes: int | None) -> bytes:
        inbound = self._inbound
        first = inbound.popleft()
        if max_bytes is not None and len(first) > max_bytes:
            data = first[:max_bytes]
            inbound.appendleft(first[max_bytes:])
        elif inbound:
            # Hand over several frames at once: fewer wakeups and writes per byte.
            parts = [first]
            size = len(first)
            while inbound and (max_bytes is None or size + len(inbound[0]) <= max_bytes):
                piece = inbound.popleft()
                parts.append(piece)
                size += len(piece)
            data = b"".join(parts)
        else:
            data = first
        if not inbound:
            self._inbound = _NO_DATA  # an idle circuit keeps no queue
        n = len(data)
        self._inbound_bytes -= n
        self.bytes_received += n
        if self.broken is None:
            self._acknowledge(n)
            self.carrier.queued()
        return data

    async def aclose(self) -> None:
        """Close like a TCP socket: FIN if everything received was read, else RST.

        After a graceful close the circuit waits for the peer's FIN; data arriving
        meanwhile has no reader, so it resets the circuit (as TCP answers with RST).
        """
        self.close_now()
        await trio.lowlevel.checkpoint()

    def close_now(self) -> None:
        """aclose without waiting."""
        if not self._closed:
            self._closed = True
            if self.broken is not None:
                self.carrier.forget(self)
            elif self._inbound:
                self.reset(ErrorCode.CANCELLED, "closed with unread data")
            else:
                if not self._eof_sent:
                    self._eof_sent = True
                    self._send_eof()
                if self.fin_received:
                    self.carrier.forget(self)
            self._inbound.clear()
            self._wake()

    def abort(self, reason: str) -> None:
        """Reset now (both directions), e.g. because the other side of a splice broke."""
        if not self._closed or self.broken is None:
            self.reset(ErrorCode.CANCELLED, reason)
        self._closed = True
        self._wake()


class DatagramCircuit(_CircuitBase):
    """A UDP flow: whole datagrams both ways, dropped (and counted) rather than blocking."""

    def __init__(self, carrier: CarrierLink, circuit_id: int, request: OpenRequest) -> None:
        super().__init__(carrier, circuit_id, request)
        self.fin_received = False
        self.dropped_in = 0
        self.dropped_out = 0
        self.datagrams_sent = 0
        self.datagrams_received = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        # Optional non-blocking consumer of inbound datagrams (a UDP socket's send);
        # when set, `receive` is not used for that direction.
        self.sink: Callable[[bytes], None] | None = None
        self.ended = trio.Event()  # the far side closed the flow, or it broke

    def attach_sink(self, sink: Callable[[bytes], None]) -> None:
        """Deliver inbound datagrams to `sink` from now on, starting with any queued."""
        self.sink = sink
        while self._inbound:
            data = self._inbound.popleft()
            self._inbound_bytes -= len(data)
            self.datagrams_received += 1
            self.bytes_received += len(data)
            sink(data)

    def on_datagram(self, data: bytes) -> None:
        if self.sink is not None and not self._inbound:
            # Straight to the local socket from the carrier's reader: no task switch.
            self.datagrams_received += 1
            self.bytes_received += len(data)
            self.sink(data)
            return
        if self._inbound_bytes + len(data) > DATAGRAM_QUEUE_BYTES:
            self.dropped_in += 1
            return
        self._enqueue(data)

    def on_eof(self) -> None:
        self.fin_received = True
        self.ended.set()
        self._wake()

    def on_credit(self) -> None:
        pass

    def on_broken(self, error: CircuitBroken) -> None:
        if error.code == ErrorCode.NO_ERROR and type(error) is CircuitBroken:
            # RST with NO_ERROR: the far side ended the flow (its idle timeout), the way a
            # flow ends; not a failure. (A refusal or a lost carrier is one.)
            self.on_eof()
            return
        super().on_broken(error)

    def _fail(self, error: CircuitBroken) -> None:
        super()._fail(error)
        self.ended.set()

    def send(self, datagram: bytes) -> bool:
        """Queue one datagram for the carrier; False if it was dropped (queue full).
        Inside a `write_batch` (a listener's burst) many datagrams leave in one write."""
        self._raise_if_broken()
        if self.fin_received:
            self.dropped_out += 1  # the far side ended the flow: one in flight, dropped
            return False
        if len(datagram) > MAX_DATAGRAM:
            self.dropped_out += 1  # only an IPv6 jumbo-sized payload, sealed, gets here
            return False
        try:
            queued = self.carrier.session.send_datagram(self.id, datagram)
        except LocalProtocolError as exc:
            raise trio.BrokenResourceError(str(exc)) from exc
        if queued:
            self.datagrams_sent += 1
            self.bytes_sent += len(datagram)
            self.carrier.queued()
        else:
            self.dropped_out += 1
        return queued

    async def receive(self) -> bytes | None:
        """The next whole datagram, or None once the far side closed the flow."""
        while True:
            if self._closed:
                raise trio.ClosedResourceError("this flow was closed")
            if self._inbound:
                data = self._inbound.popleft()
                self._inbound_bytes -= len(data)
                self.datagrams_received += 1
                self.bytes_received += len(data)
                await trio.lowlevel.checkpoint()
                return data
            if self.fin_received:
                await trio.lowlevel.checkpoint()
                return None
            self._raise_if_broken()
            await self._lot.park()

    async def aclose(self) -> None:
        """End the flow: FIN if it is healthy (the far side ends its half), else nothing."""
        if not self._closed:
            if self.broken is None and self.carrier.session.circuit_state(self.id) is not None:
                if self.fin_received:
                    self.carrier.session.send_eof(self.id)
                else:
                    self.carrier.session.reset_circuit(self.id, ErrorCode.NO_ERROR, "flow closed")
                self.carrier.queued()
            self._closed = True
            self._wake()
            self.carrier.forget(self)
        await trio.lowlevel.checkpoint()
