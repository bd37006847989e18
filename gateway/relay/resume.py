"""Resumable sessions: a TCP session that outlives the carriers under it (SPEC.md §14).

The two endpoints of a session (entry and exit) keep a sequenced, acknowledged byte
stream over whatever circuit currently joins them; relays keep nothing but the live
circuit. Each endpoint's circuit port counts what it sent and what it delivered, keeps
what the far end has not acknowledged (at most `RESUME_WINDOW`), and acknowledges what
it delivered (ACK, end to end). When a carrier under the session is lost (or a relay
says ROUTE_LOST), the port *parks*: the engine stops moving bytes, the local socket
stays open. The entry then opens a RESUMING circuit over any carrier to its first hop;
the exit checks the one-time secret and the route, and both ends retransmit from what
the other reports delivered. Not resumed within `resume_timeout`: the session ends as
broken, as it did before resumption existed.

`Resumption` is a mix-in over the five circuit primitives of `CircuitPort` (ports.py),
so plain and end-to-end TLS sessions resume alike (TLS sees one exactly-once stream).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import trio

from gateway.carriers.circuit import CarrierLink, Circuit, DatagramCircuit
from gateway.carriers.writes import flush_lingering, write_batch
from gateway.errors import CarrierLost, CircuitBroken, OpenRefused, SessionError
from gateway.relay.ports import CircuitPort, EndedRelay, Outgoing, Relay, TlsPort
from gateway_codecs import ErrorCode, OpenRequest, Resumable, Resuming

if TYPE_CHECKING:
    from gateway.carriers.carrier import AnyCircuit, Carrier

log = logging.getLogger("tunnelgate.resume")

# Units (bytes, and one for the FIN) a session may have sent and not had acknowledged:
# what its replay buffer holds at most. The largest window a circuit auto-tunes to
# (circuit.MAX_AUTOTUNED_WINDOW): acknowledgements cross every relay, so a smaller one
# would pace a bulk transfer below what the circuits allow (1 MiB cost a 3-host chain
# about a quarter of its single-stream throughput).
RESUME_WINDOW = 4 << 20
WINDOW_SLACK = 1024  # "the window is full": less room than a TLS record's overhead, and then some
ACK_EVERY = RESUME_WINDOW // 4  # acknowledge at once after this much; else one to two ACK_DELAYs later
ACK_DELAY = 0.2  # s: also the sweep period for parked sessions' deadlines
RETRY_FIRST, RETRY_MAX = 0.2, 2.0  # s between resumption attempts (doubling)
DEFAULT_CAPACITY = 256 << 20  # resume_buffer: 64 bulk sessions' full windows


def verifier_of(secret: bytes) -> bytes:
    return hashlib.sha256(secret).digest()[:16]


class ResumeState:
    """One endpoint's half of a resumable session (sequence numbers, replay, secrets)."""

    __slots__ = ("aborted", "ack_sent", "acked", "confirmed", "delivered", "disabled", "eof_delivered",
                 "fin_sent", "last_active", "lost_reason", "next_secret", "parked_until", "replay",
                 "replay_base", "request", "resend", "resend_fin", "secret", "sent", "session_id",
                 "tried_next", "verifier", "via")

    def __init__(self, session_id: bytes, request: OpenRequest) -> None:
        self.session_id = session_id
        self.request = request  # the target (entry: and route, no origin; exit: the OPEN as it came)
        self.sent = 0  # stream bytes sent (the FIN is one more unit: fin_sent)
        self.fin_sent = False
        self.acked = 0  # units the far end has delivered (its ACKs)
        self.replay: deque[bytes] | None = None  # bytes [replay_base, sent), unacknowledged
        self.replay_base = 0
        self.resend: deque[bytes] | None = None  # after a resumption: replay still to resend
        self.resend_fin = False
        self.delivered = 0  # units of the far end's stream delivered here
        self.eof_delivered = False
        self.ack_sent = 0
        self.confirmed = False  # the exit keeps the session resumable (its first ACK came)
        self.disabled = False  # no longer resumable here (resume_buffer full, or no ACK came)
        self.aborted = False  # the session broke here (RST to the local socket)
        self.last_active = 0.0  # when it last added to its replay (the sweep's clock)
        self.parked_until: float | None = None  # parked: deadline to be resumed by
        self.lost_reason = ""
        # entry: the current secret, and the next one offered in an unanswered attempt
        self.secret = b""
        self.next_secret: bytes | None = None
        self.tried_next = False
        self.verifier = b""  # exit: what the next resumption must reveal the preimage of
        self.via = ""  # entry: the first hop's peer name

    @property
    def unacked(self) -> int:
        return self.sent + self.fin_sent - self.acked

    @property
    def waits_for_the_exit(self) -> bool:
        """An entry whose session runs through relays, with an exit that resumes (it
        acknowledged: the session may have stopped being resumable here since): the exit
        ends it, not us. Our last word (a FIN, an ACK, an RST) could be lost on a carrier beyond our
        first hop with no one left to tell us (the relays' part would be over), and the
        exit would wait for a resumption that never comes. The exit's last word is safe:
        we are still waiting for it, and whichever relay's part is not over says
        ROUTE_LOST if it is lost, so we resume (SPEC.md §14)."""
        return bool(self.via and self.request.route and (self.confirmed or (self.disabled and self.acked)))


class Resumption:
    """Mix-in for `CircuitPort` and `TlsPort`: sequence, acknowledge, park, resume."""

    __slots__ = ()
    # Provided by the concrete port classes below (slots) and by CircuitPort.
    circuit: Circuit
    resume: ResumeState
    table: ResumeTable
    relay: Relay
    outgoing: Outgoing
    pushes: bool
    _transport_flushed: Callable[[], bool]

    def bind(self, relay: Relay, outgoing: Outgoing) -> None:
        super().bind(relay, outgoing)  # type: ignore[misc]
        # (The concrete classes below hold these in their slots; mypy checks a mix-in's
        # assignments against its own empty __slots__.)
        self.relay = relay  # type: ignore[misc]
        self.outgoing = outgoing  # type: ignore[misc]
        self.pushes = self.circuit.sink is not None  # type: ignore[misc]
        self._hook(self.circuit)
        self.table.track(self)
        if self.resume.ack_sent < 0:
            self.table.ack_due.add(self)  # the exit's first ACK: the sweep sends it if nothing did

    def _hook(self, circuit: Circuit) -> None:
        circuit.watcher = self.relay.on_event
        circuit.sink = self._pushed if self.pushes else None
        circuit.ack_listener = self._on_ack
        if circuit.peer_delivered >= 0:  # the exit's first ACK came before the engine
            self._on_ack(circuit.peer_delivered)

    # ---- what arrives
    def _pushed(self, data: bytes | memoryview) -> int:
        sent = self.outgoing.push(data)
        if sent:
            self._delivered(sent)
        return sent

    def _delivered(self, n: int) -> None:
        state = self.resume
        state.delivered += n
        if state.delivered - state.ack_sent >= ACK_EVERY:
            self._ack()
        else:
            self.table.ack_due.add(self)

    def _ack(self) -> None:
        state = self.resume
        if state.parked_until is None:
            state.ack_sent = state.delivered
            self.circuit.send_ack(state.delivered)

    def _on_ack(self, delivered: int) -> None:
        state = self.resume
        if delivered >= state.replay_base:
            # The exit holds the session from here on. (An ACK below our replay base came
            # before the exit finished the end-to-end handshake: it could not resume yet.)
            state.confirmed = not state.disabled
        if delivered > state.acked:
            sent = state.sent + state.fin_sent
            was_full = sent - state.acked > RESUME_WINDOW - WINDOW_SLACK
            state.acked = delivered if delivered < sent else sent
            self._trim(min(state.acked, state.sent))
            if was_full or (state.fin_sent and state.acked == sent
                            and (state.eof_delivered or self.circuit.fin_received)):
                # Room again; or everything of ours acknowledged after the far end's FIN
                # came: perhaps the session's end (the pass also finds a FIN that waits
                # unread behind TLS records). Else a pass would change nothing: most ACKs
                # cost none, and the ACK an exit sends just before its FIN leaves the pass
                # to that FIN.
                self.relay.on_event()

    def _trim(self, upto: int) -> None:
        """Forget replay bytes below `upto` (the far end has them)."""
        state = self.resume
        replay = state.replay
        while replay and state.replay_base < upto:
            chunk = replay[0]
            if state.replay_base + len(chunk) <= upto:
                replay.popleft()
                state.replay_base += len(chunk)
                self.table.buffered -= len(chunk)
            else:
                cut = upto - state.replay_base
                replay[0] = chunk[cut:]
                state.replay_base = upto
                self.table.buffered -= cut
        if not replay:
            state.replay = None

    # ---- the primitives (see CircuitPort)
    def _credit(self) -> int:
        state = self.resume
        if state.parked_until is not None:
            return 0
        if state.resend is not None or state.resend_fin:
            self._resend()
            if state.resend is not None or state.resend_fin:
                return 0
        credit = self.circuit.send_credit
        if state.confirmed or (self.circuit.peer_delivered >= 0 and not state.disabled):
            # (The exit acknowledges, but has not yet confirmed the end-to-end handshake.)
            unacked = state.sent + state.fin_sent - state.acked  # (state.unacked, inline: hot)
            if unacked > RESUME_WINDOW - credit:
                credit = RESUME_WINDOW - unacked
        return credit

    def _send(self, data: bytes | memoryview) -> int:
        state = self.resume
        if state.parked_until is not None:
            return 0
        if state.resend is not None:
            self._resend()  # what the far end lost goes first
            if state.resend is not None:
                return 0
        if not isinstance(data, bytes):
            data = bytes(data)  # one copy, shared by the carrier's queue and the replay
        sent = self.circuit.try_send(data)
        if sent:
            state.sent += sent
            if state.disabled:
                state.replay_base = state.sent
                return sent
            chunk = data if sent == len(data) else data[:sent]
            if state.replay is None:
                state.replay = deque()
            state.replay.append(chunk)
            table = self.table
            table.buffered += sent
            state.last_active = table.clock
            if not state.confirmed and state.sent - state.replay_base > RESUME_WINDOW:
                self._not_resumable("the exit never acknowledged it")
            elif table.buffered > table.capacity:
                table.shed()
        return sent

    def _take(self, max_bytes: int) -> bytes | None:
        if self.resume.parked_until is not None:
            # Frozen while parked: the resumption tells the far end how far we got, and it
            # sends everything after that again (what the old circuit still holds too).
            return None
        data = self.circuit.take_nowait(max_bytes)
        if data:
            self._delivered(len(data))
        return data

    def _ended(self) -> bool:
        state = self.resume
        if state.parked_until is not None:
            return False
        if state.eof_delivered:
            # Taken already (every byte before it too): perhaps on an earlier circuit,
            # while the local socket was full, and a circuit resumed on after that does
            # not carry that FIN again.
            return True
        if not self.circuit.at_eof:
            return False
        if not state.eof_delivered:
            state.eof_delivered = True
            state.delivered += 1
            if self.circuit.fin_complete:
                pass  # the far end completed the session: it waits for nothing of ours
            elif state.fin_sent and (state.unacked or state.resend is not None or state.waits_for_the_exit):
                # FINs crossed, or the exit ends the session: no FIN or RST of ours will
                # carry it, and the far end waits for it.
                self._ack()
            else:
                # Not at once: if our side is complete too, the session ends now and its RST
                # NO_ERROR says "everything delivered"; else our own FIN, usually soon (a
                # server closing in turn), carries this ACK in the same write. The sweep
                # sends it if neither comes in one to two ACK_DELAYs.
                self.table.ack_due.add(self)
        return True

    def _send_eof(self) -> None:
        state = self.resume
        state.fin_sent = True
        if state.parked_until is not None or state.resend is not None:
            state.resend_fin = True  # after what is still to be resent
            return
        circuit = self.circuit
        if circuit.carrier.session.completes_sessions:
            # FIN_ACK: what is due rides in the FIN (no frame of its own); and after the far
            # end's FIN, with everything of ours acknowledged, this FIN completes the
            # session: no RST NO_ERROR, no engine pass at any hop (SPEC.md §14). Not an
            # entry's through relays (`waits_for_the_exit`): the target might never get
            # its FIN; the exit's RST NO_ERROR says that it did.
            delivered = -1
            if state.delivered != state.ack_sent:
                delivered = state.ack_sent = state.delivered
            # (And only once our local socket has everything, its FIN included.)
            complete = (state.eof_delivered and self.outgoing.closed and state.acked >= state.sent
                        and not (state.via and state.request.route))
            circuit.end_now(complete, delivered)
            return
        if state.ack_sent < 0 or (state.eof_delivered and state.delivered != state.ack_sent):
            # The far end waits for the ACK of its FIN to complete: it rides with ours; and
            # an exit's first ACK goes no later than its FIN (SPEC.md §14). (Before the far
            # end's FIN, what is due waits: our RST NO_ERROR at the end, or the sweep.)
            self._ack()
        self.circuit.end_now()

    def flush(self) -> None:
        if self.resume.parked_until is None:
            if self.resume.resend is not None or self.resume.resend_fin:
                self._resend()
            super().flush()  # type: ignore[misc]

    def _resend(self) -> None:
        state = self.resume
        queue = state.resend
        while queue:
            chunk = queue[0]
            sent = self.circuit.try_send(chunk)
            if sent < len(chunk):
                queue[0] = chunk[sent:]
                return
            queue.popleft()
        state.resend = None
        if state.resend_fin:
            state.resend_fin = False
            self.circuit.end_now()

    # ---- Port
    def check(self) -> None:
        broken = self.circuit.broken
        state = self.resume
        if broken is None:
            if not state.eof_delivered and self.circuit.fin_received:
                self._ended()  # the FIN counts (TLS ends its stream with close_notify first)
            return
        if state.parked_until is not None:
            return
        if self.circuit.fin_complete or self.circuit.complete_sent:
            # A FIN said COMPLETE: nothing more crosses this circuit (what is left is a
            # local socket draining). Its loss changes nothing; a lost COMPLETE of ours
            # is what TIME_WAIT and the exit's CompletedExit are for.
            return
        if broken.code == ErrorCode.NO_ERROR and not isinstance(broken, CarrierLost) and state.fin_sent \
                and (state.eof_delivered or self.circuit.fin_received):
            # The far end completed the session (SPEC.md §14): it has delivered all of ours.
            # (Its RST; or a relay's refusal of a resumption it answered so at once.) Not
            # before its FIN came: then something lost what it sent, and the session broke.
            state.acked = state.sent + 1
            self._trim(state.sent)
            return
        if route_lost(broken):
            if state.waits_for_the_exit and state.eof_delivered and state.acked == state.sent + 1:
                # Everything crossed both ways; all that is missing is the exit's word
                # that it has our ACK of its FIN. Our part is over (the client has it
                # all); the exit is told in the background, as from TIME_WAIT.
                self.table.confirm_completed(state)
                return
            if state.confirmed or (state.replay_base == 0 and not state.disabled):
                # Confirmed by the exit's ACK; or a plain session whose every byte is still
                # in the replay: the exit may hold it before its first ACK came (it answers
                # a resumption it cannot take with RESUME_REFUSED).
                self._park(broken)
                return
            if not state.disabled:
                raise SessionError(f"{broken}, before the exit had confirmed the session resumable")
        raise broken

    @property
    def flushed(self) -> bool:
        state = self.resume
        if state.parked_until is not None:
            return False  # (a session waiting to resume is not over)
        circuit = self.circuit
        # (An entry whose exit never acknowledged does not wait for it: that exit does not
        # resume. An exit always does: the entry acknowledges what it delivered, even
        # once the session is no longer resumable; else its RST NO_ERROR could overtake
        # its last bytes waiting at a relay, which would drop them with that RST.)
        acknowledged = (not state.confirmed and bool(state.via)) or (
            state.sent + state.fin_sent == state.acked and state.resend is None) or circuit.complete_sent
        if state.waits_for_the_exit and circuit.broken is None and not circuit.fin_complete:
            return False  # until the exit's RST NO_ERROR (or FIN COMPLETE) ends the session
        return acknowledged and self._transport_flushed()

    def abort(self, code: int, reason: str) -> None:
        self.resume.aborted = True
        self.table.forget(self)
        super().abort(code, reason)  # type: ignore[misc]

    def unbind(self, ended: EndedRelay) -> None:
        # (Nothing pushes into it any more: its circuit's hooks went with close.)
        self.relay = ended  # type: ignore[misc]
        self.outgoing = ended  # type: ignore[misc,assignment]

    def close(self) -> None:
        """The session is complete: RST NO_ERROR retires its circuit at every hop (a
        resumable circuit outlives its FINs, for the last ACKs; SPEC.md §14), unless a
        FIN that said COMPLETE did."""
        table = self.table
        table.forget(self)
        state = self.resume
        circuit = self.circuit
        if circuit.complete_sent:
            # Our FIN said COMPLETE: it is all the far end still waits for. Kept a while
            # in case it is lost: the entry resumes the session then, to send it again
            # (TIME_WAIT), and the exit answers the entry's resumption with it.
            if state.aborted:
                pass  # (broken since: nothing to confirm)
            elif state.via:
                table.time_wait(state, circuit.carrier)
            else:
                table.completed_exit(state)
        elif not circuit.fin_complete:
            if circuit.broken is not None or state.aborted:
                pass  # (ended by the far end's RST NO_ERROR, or complete when its route was lost)
            elif state.via:
                if state.confirmed:
                    # A direct entry's RST is the exit's only word that its FIN arrived: if
                    # the carrier dies before that RST got through, the exit waits for a
                    # resumption (TIME_WAIT).
                    table.time_wait(state, circuit.carrier)
            else:
                # The exit's RST is the entry's word that the session is complete; if it
                # is lost, the entry resumes the session, and finds it here.
                table.completed_exit(state)
            circuit.retire()
        super().close()  # type: ignore[misc]

    # ---- losing and regaining the route
    def _park(self, lost: CircuitBroken) -> None:
        state = self.resume
        state.parked_until = trio.current_time() + self.table.timeout
        state.lost_reason = str(lost)
        log.info("session %s: route lost (%s); waiting up to %g s to resume", self.relay.record.what,
                 lost, self.table.timeout)
        self.table.park(self)

    def resume_on(self, circuit: Circuit, far_delivered: int) -> None:
        """Carry on over `circuit`: the far end has delivered `far_delivered` units of our
        stream; everything after that is sent again, then what comes next."""
        state = self.resume
        if far_delivered < state.replay_base:
            # The far end lacks bytes we no longer hold (sent before the session became
            # resumable: the end-to-end handshake). Nothing to do but end it.
            circuit.reset(ErrorCode.RESUME_REFUSED, "the session cannot be resumed from there")
            self.give_up(f"cannot resume: the far end has {far_delivered} of {state.sent} units,"
                         f" and what is missing is no longer held")
            return
        old = self.circuit
        old.sink = old.watcher = old.ack_listener = None
        if old.broken is None:  # still up at this end: the far end has moved on
            old.reset(ErrorCode.ROUTE_LOST, "the session resumed on another circuit")
        old.abort("the session resumed on another circuit")  # its unread bytes come again
        self.circuit = circuit  # type: ignore[misc]
        state.parked_until = None
        self.table.unpark(self)
        if far_delivered > state.acked:
            state.acked = min(far_delivered, state.sent + state.fin_sent)
            self._trim(min(state.acked, state.sent))
        state.resend = deque(state.replay) if state.replay else None
        state.resend_fin = state.fin_sent and state.acked < state.sent + 1
        state.ack_sent = state.delivered  # the far end learned it in the exchange
        self._hook(circuit)
        log.info("session %s: resumed (%d B and%s FIN to send again)", self.relay.record.what,
                 state.sent - state.replay_base, "" if state.resend_fin else " no")
        self.relay.on_event()

    def give_up(self, reason: str) -> None:
        """End the session as broken (RST to the local socket), with `reason` logged."""
        self.table.forget(self)
        self.relay.fail(SessionError(reason))

    def _not_resumable(self, why: str) -> None:
        """Keep the session, but not resumable: no more replay or parking."""
        log.warning("session %s: no longer resumable: %s", self.relay.record.what, why)
        state = self.resume
        state.confirmed = False
        state.disabled = True
        self.table.buffered -= sum(map(len, state.replay or ()))
        state.replay = None
        state.replay_base = state.sent


class ResumableCircuitPort(Resumption, CircuitPort):
    __slots__ = ("outgoing", "pushes", "relay", "resume", "table")

    def __init__(self, circuit: Circuit, state: ResumeState, table: ResumeTable) -> None:
        super().__init__(circuit)
        self.resume = state
        self.table = table


class ResumableTlsPort(Resumption, TlsPort):
    __slots__ = ("outgoing", "pushes", "relay", "resume", "table")


def make_resumable(port: CircuitPort, state: ResumeState, table: ResumeTable) -> CircuitPort:
    """The same port (plain or TLS inside), with resumption. The session's offsets count
    from the circuit's first byte, so both ends agree on them whatever crossed before
    (an end-to-end TLS handshake)."""
    circuit = port.circuit
    state.sent = state.replay_base = circuit.bytes_sent
    state.delivered = state.ack_sent = circuit.bytes_received
    if not isinstance(port, TlsPort):
        if not state.via:
            # The exit's first ACK says "resumable" (SPEC.md §14). It is not sent at once:
            # an ACK due anyway takes its place (the one before our FIN, in a short
            # session), else the sweep sends it one to two ACK_DELAYs later.
            state.ack_sent = -1
        return ResumableCircuitPort(port.circuit, state, table)
    tls = ResumableTlsPort(port.circuit, port._ssl, port._in, port._out)
    tls.resume, tls.table = state, table
    if not state.via:
        # The exit, past the handshake: acknowledge it at once. The entry counts its
        # session resumable only from an ACK that covers its handshake (`_on_ack`).
        circuit.send_ack(state.delivered)
    return tls


# A usable carrier to the named peer, waiting for one until the deadline (None: none
# came), other than the given one where there is a choice (a relay tier's instances).
CarrierFinder = Callable[[str, float, "Carrier | None"], Awaitable["Carrier | None"]]


class ResumeTable:
    """The gateway's resumable sessions: the exit's by session id, the parked ones with
    their deadlines, and ACKs due; `run` is its one task (the sweep)."""

    def __init__(self, timeout: float, find_carrier: CarrierFinder | None = None,
                 handshake_timeout: float = 10.0, capacity: int = DEFAULT_CAPACITY,
                 time_wait: float = 13.0) -> None:
        self.timeout = timeout
        self.capacity = capacity  # bytes all replay buffers may hold (resume_buffer)
        self.clock = 0.0  # trio time at the last sweep: "when" for idleness, cheaply
        self.live: set[Resumption] = set()  # every resumable port, for shedding
        self.find_carrier = find_carrier
        self.handshake_timeout = handshake_timeout
        self.exits: dict[bytes, Resumption | CompletedExit] = {}
        self.flows: dict[bytes, FlowSlot] = {}  # the exit's resumable UDP flows
        self.parked: set[Resumption] = set()
        # ACKs due, in two generations: one marked now is sent at the sweep after next
        # (ACK_DELAY to twice that later), so a session shorter than ACK_DELAY never
        # needs an ACK of its own: its FINs and final RST say it all.
        self.ack_due: set[Resumption] = set()
        self.ack_aging: set[Resumption] = set()
        self.buffered = 0  # bytes in every replay buffer of this gateway
        # At the entry, sessions completed by our RST NO_ERROR, by the carrier it left on,
        # oldest first, kept `time_wait_for` s (longer than a dead carrier takes to be
        # found): if that carrier is lost meanwhile, the RST may have been lost with it.
        self.time_wait_for = time_wait
        self.completed: dict[CarrierLink, deque[tuple[float, ResumeState]]] = {}
        # At the exit, sessions it completed (FIN COMPLETE, its RST NO_ERROR), oldest first, kept
        # as long as the entry may come back for that FIN (resume_timeout, and the time a
        # dead carrier takes to be found).
        self.completed_exits: deque[CompletedExit] = deque()
        self.confirming: set[ResumeState] = set()  # (confirm_completed's, until they end)
        self._nursery: trio.Nursery | None = None

    @property
    def enabled(self) -> bool:
        return self.timeout > 0

    def track(self, port: Resumption) -> None:
        self.live.add(port)
        if not port.resume.via:  # the exit of the session: resumptions find it by id
            self.exits[port.resume.session_id] = port

    def forget(self, port: Resumption) -> None:
        self.live.discard(port)
        state = port.resume
        if not state.via and self.exits.get(state.session_id) is port:
            del self.exits[state.session_id]
        if state.parked_until is not None:
            self.parked.discard(port)
        self.ack_due.discard(port)
        self.ack_aging.discard(port)
        if state.replay:
            self.buffered -= sum(map(len, state.replay))
            state.replay = None
        if self.confirming:
            self.confirming.discard(state)

    def accept(self, circuit: AnyCircuit) -> str:
        """The exit's answer to a RESUMING OPEN whose route its policy admitted: resume
        the session on `circuit` (OPEN_OK, ACK of what we delivered, then retransmission;
        a UDP flow just continues) and return "", or return why not, changing nothing."""
        ticket = circuit.request.resume
        assert isinstance(ticket, Resuming)
        slot = self.flows.get(ticket.session_id)
        if slot is not None and isinstance(circuit, DatagramCircuit):
            refused = _check_ticket(slot.state, circuit.request, ticket)
            if not refused:
                circuit.accept()
                slot.state.verifier = ticket.next_verifier
                slot.hand_over(circuit)
            return refused
        port = self.exits.get(ticket.session_id)
        if port is None or not isinstance(circuit, Circuit):
            return "no such session to resume (unknown or expired)"
        state = port.resume if isinstance(port, Resumption) else port
        refused = _check_ticket(state, circuit.request, ticket)
        if refused:
            return refused
        if isinstance(port, Resumption) and ticket.delivered < port.resume.replay_base:
            # The entry lacks bytes we no longer hold (sent before the session became
            # resumable: the end-to-end handshake). Refused before OPEN_OK, so that the
            # entry ends the session with this reason, not a retry.
            refused = (f"cannot resume: the far end has {ticket.delivered} of {port.resume.sent}"
                       " units, and what is missing is no longer held")
            port.give_up(refused)
            return refused
        if isinstance(port, CompletedExit) and ticket.delivered < port.sent:
            return "the session was completed with every byte acknowledged; the far end lacks some"
        with write_batch():
            circuit.accept()
            circuit.send_ack(state.delivered)
            state.verifier = ticket.next_verifier
            port.resume_on(circuit, ticket.delivered)
        return ""


    def shed(self) -> None:
        """Over `capacity`: the longest-idle sessions stop being resumable (their replay
        is dropped, logged) until the rest fits in nine tenths of it."""
        for port in sorted(self.live, key=lambda p: p.resume.last_active):
            if self.buffered <= self.capacity * 9 // 10:
                return
            if port.resume.replay and port.resume.parked_until is None:
                port._not_resumable(f"resume_buffer ({self.capacity} B) is full; it was the longest idle")

    def park(self, port: Resumption) -> None:
        self.parked.add(port)
        self.ack_due.discard(port)
        self.ack_aging.discard(port)
        if port.resume.via and self._nursery is not None:  # the entry: go and resume it
            self._nursery.start_soon(self._resume_entry, port)

    def unpark(self, port: Resumption) -> None:
        self.parked.discard(port)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            while True:
                await trio.sleep(ACK_DELAY)
                self.sweep(trio.current_time())

    def completed_exit(self, state: ResumeState) -> None:
        """A session the exit completed (FIN COMPLETE, or its RST NO_ERROR): kept for the
        entry's resumption, if that word is lost."""
        completed = CompletedExit(state, trio.current_time() + self.timeout + self.time_wait_for)
        self.exits[state.session_id] = completed
        self.completed_exits.append(completed)

    def confirm_completed(self, state: ResumeState) -> None:
        """An entry's session complete but for the exit's last word, whose route was
        lost: tell the exit (a resumption saying everything was delivered), once (the
        session may take a while to end: a slow client still reading)."""
        if state not in self.confirming and self._nursery is not None:
            self.confirming.add(state)
            self._nursery.start_soon(self._confirm_completed, state)

    def time_wait(self, state: ResumeState, carrier: CarrierLink) -> None:
        """A session the entry completed: kept a while, in case its last RST is lost."""
        state.replay = state.resend = None
        done = self.completed.get(carrier)
        if done is None:
            done = self.completed[carrier] = deque()
        done.append((trio.current_time() + self.time_wait_for, state))

    def _check_completed(self, now: float) -> None:
        """TIME_WAIT (TCP's, for the same reason): the exit learns that its FIN arrived
        only from our RST NO_ERROR. When the carrier that took it is lost soon after,
        resume each such session, saying everything was delivered: the exit, if it was
        still waiting, completes it (and ends it `ok`); if it had the RST, it refuses."""
        exits = self.completed_exits
        while exits and exits[0].until < now:
            completed = exits.popleft()
            if self.exits.get(completed.session_id) is completed:
                del self.exits[completed.session_id]
        for carrier, done in list(self.completed.items()):
            while done and done[0][0] < now:
                done.popleft()
            if carrier.closed.is_set():
                if not carrier.ended_cleanly and self._nursery is not None:  # (else the RSTs got there)
                    for _, state in done:
                        self._nursery.start_soon(self._confirm_completed, state)
                done.clear()
            if not done:
                del self.completed[carrier]

    async def _confirm_completed(self, state: ResumeState) -> None:
        opened = await self.reopen(state, trio.current_time() + self.timeout, lambda: True)
        if isinstance(opened, str):
            log.debug("completed session %s: no resumption needed (%s)", state.session_id.hex(),
                      opened or "out of time")
            return
        circuit, far_delivered = opened
        if not isinstance(circuit, Circuit):
            circuit.reset(ErrorCode.NO_ERROR, "session complete")
        elif circuit.broken is not None:
            pass  # the exit completed it on our answer (its RST NO_ERROR came at once)
        elif far_delivered <= state.sent:  # our FIN (it said COMPLETE) was lost: again
            log.info("completed session %s: its last FIN was lost; sent again", state.session_id.hex())
            circuit.end_complete()
            self.time_wait(state, circuit.carrier)  # (and this one may be lost too)
        else:
            circuit.retire()  # the exit has what it waited for: the session is complete

    def sweep(self, now: float) -> None:
        """Send the ACKs that are due; end parked sessions past their deadline; resume
        completed sessions whose last RST may have been lost."""
        self.clock = now
        flush_lingering()  # complete sessions' RSTs that found no write to ride with
        self._check_completed(now)
        with write_batch():
            due, self.ack_aging, self.ack_due = self.ack_aging, self.ack_due, set()
            for port in due:
                if port.resume.delivered != port.resume.ack_sent:
                    port._ack()
            for port in [p for p in self.parked if (p.resume.parked_until or now) < now]:
                port.give_up(f"not resumed within {self.timeout:g} s after the route was lost"
                             f" ({port.resume.lost_reason})")

    async def _resume_entry(self, port: Resumption) -> None:
        """The entry of a parked session: a RESUMING circuit to the exit, then carry on."""
        state = port.resume
        assert state.parked_until is not None
        opened = await self.reopen(state, state.parked_until, lambda: port in self.parked)
        if isinstance(opened, str):
            if opened:
                port.give_up(f"resumption refused: {opened}")
            return  # "": out of time; the sweep ends it
        circuit, far_delivered = opened
        assert isinstance(circuit, Circuit)
        with write_batch():
            port.resume_on(circuit, far_delivered)

    async def reopen(self, state: ResumeState, deadline: float, wanted: Callable[[], bool]
                     ) -> tuple[AnyCircuit, int] | str:
        """At the entry: open a RESUMING circuit to the exit over any carrier to the first
        hop, retrying (hops not back yet) until it is accepted or `deadline` passes or
        `wanted()` turns false. Returns the circuit with what the exit has delivered of
        ours (a stream's first ACK; 0 for a UDP flow), "" when out of time or no longer
        wanted, or why it was refused for good."""
        delay = RETRY_FIRST
        assert self.find_carrier is not None
        tried: Carrier | None = None  # the last carrier that could not resume it: another next
        while wanted() and trio.current_time() < deadline:
            carrier = await self.find_carrier(state.via, deadline, tried)
            if carrier is None or not wanted():
                continue
            tried = carrier
            outcome = await self._attempt(state, carrier)
            if not isinstance(outcome, str):
                if wanted():
                    return outcome
                outcome[0].reset(ErrorCode.CANCELLED, "the session ended meanwhile")
                return ""
            if outcome:
                return outcome
            await trio.sleep(delay)
            delay = min(delay * 2, RETRY_MAX)
        return ""

    async def _attempt(self, state: ResumeState, carrier: Carrier) -> tuple[AnyCircuit, int] | str:
        """One RESUMING OPEN: the circuit and what the exit delivered, "" to try again
        later, or why it was refused for good."""
        if not carrier.session.resumable:
            return f"the carrier to {state.via} does not support resumption"
        secret = state.secret
        if state.next_secret is None:
            state.next_secret = os.urandom(16)
        request = state.request.evolve(resume=Resuming(state.session_id, secret,
                                                         verifier_of(state.next_secret), state.delivered))
        try:
            circuit = carrier.open(request)
        except OpenRefused:
            return ""
        try:
            with trio.fail_after(self.handshake_timeout * 2):
                await circuit.wait_open()
                far_delivered = await circuit.wait_ack() if isinstance(circuit, Circuit) else 0
        except trio.TooSlowError:
            circuit.reset(ErrorCode.CONNECT_TIMEOUT, "no answer to the resumption in time")
            return ""
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            cause = exc.__cause__
            if isinstance(cause, CircuitBroken) and not isinstance(cause, CarrierLost) \
                    and cause.code == ErrorCode.NO_ERROR and isinstance(circuit, Circuit) \
                    and state.fin_sent and state.eof_delivered:
                # The exit completed the session at once: what it lacked was what this
                # resumption told it (our ACK of its FIN). Its RST NO_ERROR came right after
                # OPEN_OK, or a relay refused the circuit with it (the leg beyond broke
                # before the relay could accept). NO_ERROR ends a session only when every
                # unit of ours was delivered (SPEC.md §14): resumed, and over.
                far_delivered = (circuit.peer_delivered if circuit.peer_delivered >= 0
                                 else state.sent + state.fin_sent)
            elif isinstance(cause, OpenRefused) and cause.code == ErrorCode.RESUME_REFUSED:
                if not state.tried_next and state.next_secret is not None:
                    # An earlier attempt may have been accepted with its answer lost: the
                    # exit then expects that attempt's next secret. Try it, once.
                    state.tried_next = True
                    state.secret, state.next_secret = state.next_secret, None
                    return ""
                return str(cause)
            else:
                return ""  # a hop not back yet, a carrier lost meanwhile: later
        state.secret, state.next_secret, state.tried_next = state.next_secret or secret, None, False
        return circuit, far_delivered

    # ---- UDP flows: resumed without retransmission (datagrams in flight may be lost)
    def track_flow(self, state: ResumeState) -> FlowSlot:
        slot = FlowSlot(state)
        self.flows[state.session_id] = slot
        return slot

    def forget_flow(self, slot: FlowSlot) -> None:
        if self.flows.get(slot.state.session_id) is slot:
            del self.flows[slot.state.session_id]


class CompletedExit:
    """The exit's memory of a session it completed, with a FIN saying COMPLETE or with
    its RST NO_ERROR (SPEC.md §14): if that is lost, the entry resumes the session, and
    this answers with the FIN again. Only what that takes (a few hundred bytes, mostly
    the keys and the target)."""

    __slots__ = ("delivered", "request", "sent", "session_id", "until", "verifier")

    def __init__(self, state: ResumeState, until: float) -> None:
        self.session_id = state.session_id
        self.verifier = state.verifier
        self.request = state.request
        self.sent = state.sent
        self.delivered = state.delivered
        self.until = until

    def resume_on(self, circuit: Circuit, far_delivered: int) -> None:
        """Our FIN again (ResumeTable.accept refused a `far_delivered` below `sent`): if
        the entry had it already, a FIN on a new circuit is harmless, and it ends that
        circuit as any complete session's."""
        if far_delivered == self.sent:
            log.info("completed session %s: its last FIN was lost; sent again", self.session_id.hex())
        circuit.end_complete()


class FlowSlot:
    """The exit's end of a resumable UDP flow: where a RESUMING circuit for it lands."""

    __slots__ = ("arrived", "circuit", "state")

    def __init__(self, state: ResumeState) -> None:
        self.state = state
        self.circuit: DatagramCircuit | None = None
        self.arrived = trio.Event()

    def hand_over(self, circuit: DatagramCircuit) -> None:
        self.circuit = circuit
        self.arrived.set()

    async def wait(self, deadline: float) -> DatagramCircuit | None:
        """The next circuit of this flow, if one comes by `deadline`."""
        with trio.move_on_at(deadline):
            await self.arrived.wait()
        circuit, self.circuit = self.circuit, None
        self.arrived = trio.Event()
        return circuit


def route_lost(error: BaseException | None) -> bool:
    """A carrier under the circuit was lost (here, or a relay said ROUTE_LOST)."""
    return isinstance(error, CarrierLost) or (isinstance(error, CircuitBroken)
                                              and error.code == ErrorCode.ROUTE_LOST)


def _check_ticket(state: ResumeState | CompletedExit, request: OpenRequest, ticket: Resuming) -> str:
    if verifier_of(ticket.secret) != state.verifier:
        return "wrong or already used resumption secret"
    if request.evolve(resume=None, origin=None) != state.request.evolve(resume=None, origin=None):
        return "the resumption names another target"
    return ""


def open_state(request: OpenRequest, via: str) -> tuple[ResumeState, OpenRequest]:
    """A new resumable session at the entry: its state, and the OPEN that announces it."""
    random = os.urandom(32)  # one system call for both
    session_id, secret = random[:16], random[16:]
    verifier = verifier_of(secret)
    # RESUMING carries no origin (§16)
    state = ResumeState(session_id, request if request.origin is None else request.evolve(origin=None))
    state.secret = secret
    state.via = via
    return state, request.evolve(resume=Resumable(session_id, verifier))


def exit_state(request: OpenRequest) -> ResumeState:
    """The exit's half of a session (or UDP flow) the entry opened as resumable."""
    assert isinstance(request.resume, Resumable)
    state = ResumeState(request.resume.session_id, request)  # (compared without both at resumption)
    state.verifier = request.resume.verifier
    state.confirmed = True  # the exit holds the session from the start
    return state
