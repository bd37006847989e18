"""The relay engine: every TCP session of the gateway, in every role, is a `StreamRelay`.

An entry (client socket <-> circuit), an exit (circuit <-> target socket), a middle
relay (circuit <-> circuit) and end-to-end sessions (TLS inside the circuit) differ
only in their two ports (ports.py). The engine moves bytes between them without a task:
it reacts, synchronously, to socket readiness (readiness.py) and to circuit events
delivered by the carriers' readers, inside a write batch (one write per carrier per
wake-up).

States and transitions, in one place (h11's `_state.py` rule). A session has two
directions, client -> target and target -> client; each is

    OPEN      bytes move: read at most min(room of dst, CHUNK) from src, write to dst;
              what dst did not take is `pending` and src is not read until it has;
              dst without room: src pauses (a socket leaves the read set; a circuit
              keeps its bytes, and so its credit, until dst's room event)
    DRAINING  src ended (EOF read) with bytes still pending for dst
    CLOSED    everything went on, then the EOF: dst.write_eof() (FIN, SHUT_WR,
              close_notify + FIN), exactly once

and the session is

    RELAYING  until one of:
    ENDED     both directions CLOSED and both ports flushed: ports closed cleanly,
              record "ok" with the byte counts
    BROKEN    any port raised (a socket error, a circuit reset or lost carrier, a TLS
              record failing authentication), an internal error, or the gateway shut
              down: every port aborts (RST, the circuit's code and reason passed on to
              the other circuit), record "error: <reason>" with the real counts

A broken session never looks complete to either end: BROKEN never writes an EOF.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from gateway.carriers.writes import write_batch
from gateway.errors import CarrierLost, CircuitBroken, GatewayShutdown, SessionError
from gateway.relay.ports import CHUNK, CircuitPort, EndedRelay, Port
from gateway.relay.readiness import Readiness, open_readiness
from gateway.relay.sessions import SessionRecord
from gateway_codecs import ErrorCode

log = logging.getLogger("tunnelgate.relay")

# What a transform does (the test-only fault injector): rewrite bytes at their offset in
# the client -> target direction, keeping their number.
Transform = Callable[[bytes | memoryview, int], bytes | memoryview]
SessionEnd = Callable[[BaseException | None], None]

OPEN, DRAINING, CLOSED = "open", "draining", "closed"
RELAYING, ENDED, BROKEN = "relaying", "ended", "broken"


class Direction:
    """One direction of a session: src -> dst, with its state and byte count."""

    __slots__ = ("dst", "moved", "pending", "relay", "src", "state", "transform")

    def __init__(self, relay: StreamRelay, src: Port, dst: Port, transform: Transform | None) -> None:
        self.relay: StreamRelay | EndedRelay = relay
        self.src = src
        self.dst = dst
        self.transform = transform
        self.state = OPEN
        self.pending: bytes | memoryview | None = None  # read from src, not yet taken by dst
        self.moved = 0

    @property
    def closed(self) -> bool:
        return self.state is CLOSED

    def pump(self) -> None:
        """Move what can move now (OPEN, DRAINING), then pass the EOF on (-> CLOSED)."""
        src, dst = self.src, self.dst
        while True:
            data = self.pending
            if data is None:
                if self.state is not OPEN:
                    break
                room = dst.room()
                if room <= 0:
                    src.pause_reading()
                    break
                data = src.read(room if room < CHUNK else CHUNK)
                if data is None:
                    break
                if not data:
                    self.state = DRAINING
                    break
                if self.transform is not None:
                    data = self.transform(data, self.moved)
            sent = dst.write(data)
            self.moved += sent
            if sent < len(data):
                self.pending = memoryview(data)[sent:] if sent else data
                break
            self.pending = None
        if self.state is DRAINING and self.pending is None:
            self.state = CLOSED
            dst.write_eof()

    def push(self, data: bytes | memoryview) -> int:
        """Bytes arriving on a circuit src, offered by its carrier's reader before they are
        queued: written to dst at once while nothing waits before them. Returns how many
        dst took (the circuit queues the rest, holding back their credit)."""
        relay = self.relay
        if relay.state is not RELAYING or self.pending is not None:
            return 0
        try:
            if self.transform is not None:
                data = self.transform(data, self.moved)
            sent = self.dst.write(data)
        except (CircuitBroken, SessionError) as exc:
            relay.fail(exc)
            return 0
        except Exception as exc:
            relay.internal_error(exc)
            return 0
        self.moved += sent
        return sent


class StreamRelay:
    """One session between two ports; see the module docstring for its states."""

    __slots__ = ("a", "b", "backward", "engine", "forward", "on_end", "record", "state")

    def __init__(self, engine: RelayEngine, client_side: Port, target_side: Port,
                 record: SessionRecord, on_end: SessionEnd | None, transform: Transform | None) -> None:
        self.engine = engine
        self.a = client_side
        self.b = target_side
        self.record = record
        self.on_end = on_end
        self.state = RELAYING
        self.forward = Direction(self, client_side, target_side, transform)
        self.backward = Direction(self, target_side, client_side, None)

    @property
    def ended(self) -> bool:
        return self.state is not RELAYING

    @property
    def is_relay_hop(self) -> bool:
        """Both ends are circuits: a middle relay."""
        return type(self.a) is CircuitPort and type(self.b) is CircuitPort

    def start(self) -> None:
        self.a.bind(self, self.forward)
        self.b.bind(self, self.backward)
        self.on_event()  # what either end had before the engine took over

    # ---- events (each is an entry point: nothing may escape into the caller)
    def on_event(self) -> None:
        """Something changed on a circuit (data, credit, EOF, reset) or a port started."""
        self._run(self.forward, self.backward)

    def moved_from(self, port: Port) -> None:
        """`port` became readable: only its outgoing direction can move."""
        self._run(self.forward if port is self.a else self.backward)

    def moved_to(self, port: Port) -> None:
        """`port` can take bytes again: only its incoming direction can move."""
        self._run(self.backward if port is self.a else self.forward)

    def _run(self, *directions: Direction) -> None:
        if self.state is not RELAYING:
            return
        with write_batch():  # whatever this event makes any carrier send: one write
            self._step(directions)

    def _step(self, directions: tuple[Direction, ...]) -> None:
        try:
            self.a.check()
            self.b.check()
            for direction in directions:
                direction.pump()
                if direction.state is CLOSED and not direction.dst.flushed:
                    direction.dst.flush()  # credit came for what waits behind the EOF
            if self.forward.state is CLOSED and self.backward.state is CLOSED \
                    and self.a.flushed and self.b.flushed:
                self._end(None)
        except (CircuitBroken, SessionError) as exc:
            both_fins = self.forward.state is CLOSED and self.backward.state is CLOSED
            resumed_hop = (type(exc) is CircuitBroken and isinstance(self.a, CircuitPort)
                           and self.is_relay_hop and self.a.resumable_route)
            if isinstance(exc, CircuitBroken) and exc.code == ErrorCode.NO_ERROR \
                    and (both_fins or resumed_hop):
                # A resumable session's end, after both FINs; at a middle relay RST
                # NO_ERROR is that end even without them (a circuit the session resumed
                # on after its FINs had crossed: the endpoints have everything).
                self._complete(exc)
            else:
                self.fail(exc)
            # A circuit keeps its reset (circuit.broken): without its traceback, which
            # holds this frame and so the session, it leaves no cycle behind.
            exc.__traceback__ = None
        except Exception as exc:
            self.internal_error(exc)

    def _complete(self, end: CircuitBroken) -> None:
        """RST NO_ERROR after both FINs: the endpoints have everything (SPEC.md §14).
        Pass it on and end as complete. On to a circuit it lingers for the carrier's next
        write (`Circuit.retire`): nothing waits on it, and a relay saves a write."""
        for port in (self.a, self.b):
            try:
                if isinstance(port, CircuitPort):
                    port.circuit.retire()
                else:
                    port.abort(ErrorCode.NO_ERROR, end.reason)
            except Exception:
                log.exception("relayed session %s: could not close a port", self.record.what)
        self._end(None)

    # ---- the end
    def internal_error(self, exc: Exception) -> None:
        """A bug in one session ends that session (logged with its traceback), no other."""
        log.error("relayed session %s: internal error; ending it", self.record.what, exc_info=exc)
        self.fail(CircuitBroken(ErrorCode.INTERNAL_ERROR, f"internal error: {exc}"))

    def fail(self, error: BaseException) -> None:
        """BROKEN: abort both ports (RST), so neither far end takes what it got for the
        whole session; a circuit's code and reason travel on to the other circuit."""
        if self.state is not RELAYING:
            return
        if isinstance(error, CircuitBroken):
            code, reason = error.code, error.reason
        else:
            code, reason = ErrorCode.CANCELLED, str(error) or "the other side of the relay broke"
        # A middle relay that loses a carrier, or shuts down, under a resumable session
        # tells the endpoints the route is lost, not the session: they resume it.
        route_lost = (isinstance(error, CarrierLost | GatewayShutdown) and self.is_relay_hop
                      and isinstance(self.a, CircuitPort) and self.a.resumable_route)
        for port in (self.a, self.b):
            try:
                port.abort(ErrorCode.ROUTE_LOST if route_lost else code, reason)
            except Exception:
                log.exception("relayed session %s: could not abort a port", self.record.what)
        self._end(error)

    def _end(self, error: BaseException | None) -> None:
        self.state = ENDED if error is None else BROKEN
        self.engine.sessions.discard(self)
        for port in (self.a, self.b):
            try:
                port.close()
            except Exception:
                log.exception("relayed session %s: could not close a port", self.record.what)
        record = self.record
        record.finish(self.forward.moved, self.backward.moved,
                      "" if error is None else (str(error) or type(error).__name__))
        record.__exit__(None, None, None)
        try:
            if self.on_end is not None:
                self.on_end(error)
        finally:
            # Cut the references back to this session, so that it is freed now, sockets
            # and circuits included, not by the cyclic garbage collector (EndedRelay).
            ended = EndedRelay(record)
            for port in (self.a, self.b):
                port.unbind(ended)
            self.forward.relay = self.backward.relay = ended
            self.on_end = None


class RelayEngine:
    """The gateway's one relay: `run` is its task (readiness), `relay` hands it a session."""

    def __init__(self, readiness: Readiness | None = None) -> None:
        self.readiness = readiness if readiness is not None else open_readiness()
        self.sessions: set[StreamRelay] = set()
        self.running = False

    def relay(self, client_side: Port, target_side: Port, record: SessionRecord,
              on_end: SessionEnd | None = None, transform: Transform | None = None) -> None:
        """Relay until both directions ended or one side broke. `record` is already open
        (SessionLog.open); it is finished and closed at the end, when `on_end(error)` is
        called. `transform` rewrites client -> target bytes (tests only)."""
        session = StreamRelay(self, client_side, target_side, record, on_end, transform)
        self.sessions.add(session)
        with write_batch():  # the circuit's OPEN and the client's first bytes: one write
            if not self.running:
                session.fail(GatewayShutdown("gateway shut down"))
                return
            try:
                session.start()
            except Exception as exc:  # a port that could not even be watched
                session.internal_error(exc)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; then break what is still open (the drain is over)."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.readiness.serve)
            self.running = True
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self.running = False
                self.end_all()

    def end_all(self) -> None:
        """The drain is over: break every session still open (RST both ways). Called
        before the carriers close, so the far ends hear it as a reset, not as a lost
        carrier (which a resumable session would wait out)."""
        with write_batch():
            for session in list(self.sessions):
                session.fail(GatewayShutdown("gateway shut down"))

    def end_tunnel(self, tunnel: str) -> int:
        """A reload removed `tunnel` and its drain is over: break its sessions still open
        (RST both ways). Returns how many."""
        ended = [s for s in self.sessions if s.record.tunnel == tunnel and s.record.role == "entry"]
        with write_batch():
            for session in ended:
                session.fail(SessionError(f"tunnel {tunnel} was removed from the config"))
        return len(ended)

    def release_relayed(self) -> int:
        """Shutting down: hand this relay's resumable sessions back to their endpoints
        now (RST ROUTE_LOST both ways), so they resume over another route or when this
        gateway is back, instead of waiting out the drain. Returns how many."""
        released = [s for s in self.sessions if s.is_relay_hop and isinstance(s.a, CircuitPort)
                    and s.a.resumable_route]
        with write_batch():
            for session in released:
                session.fail(GatewayShutdown("relay shutting down; the session moves on"))
        return len(released)
