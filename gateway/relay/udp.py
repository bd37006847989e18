"""Datagram relaying: one function moves whole datagrams both ways with an idle timeout.

Every UDP flow is relayed by `DatagramFlow`, without a task per datagram: between a
local socket and a circuit (entry and exit, plain or end-to-end, where sealing is a
transform on each datagram), and, twice, between a middle relay's two circuits
(`bridge_datagrams`). Nothing here ever blocks the carrier: circuits drop (and count)
instead.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import trio

from gateway.carriers.circuit import DatagramCircuit
from gateway.carriers.writes import write_batch
from gateway.errors import SessionError
from gateway.relay.outcomes import describe_abnormal_end, describe_error, is_cancellation
from gateway.relay.sessions import SessionRecord
from gateway_codecs import ErrorCode

MAX_UDP_PAYLOAD = 65535  # receive buffer: any datagram fits (65,507 over IPv4)
# Errors a UDP send can report for an earlier datagram (ICMP): the flow goes on.
_TRANSIENT = {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENOBUFS, errno.EAGAIN, errno.EMSGSIZE}
# On the exit's connected socket, ECONNREFUSED (ICMP port unreachable) says the target's
# port is closed: the flow ends there. Carrying on would hand what is still in flight to
# whatever binds the port next (a restarted server would take a stale datagram of the old
# flow for a new client's first one: iperf3's UDP handshake then answers the wrong flow).
TARGET_CLOSED = "target port closed (ICMP port unreachable); flow ended"


@dataclass
class DatagramCounts:
    a_to_b: int = 0
    b_to_a: int = 0
    bytes_a_to_b: int = 0
    bytes_b_to_a: int = 0
    idle: bool = False
    error: BaseException | None = None


@contextmanager
def flow_record(record: SessionRecord, counts: DatagramCounts, outward_is_a_to_b: bool = True
                ) -> Iterator[None]:
    """Finish a UDP flow's session record with its real counts however the flow ends.

    A flow has no end of its own: an idle timeout, the far side closing it, or the gateway
    shutting down are normal ends (a note, not an error); a broken circuit, a failed
    end-to-end handshake or a bug are errors. `outward_is_a_to_b`: whether `counts`'
    a->b direction is the one towards the target."""
    ended_by: BaseException | None = None
    try:
        yield
    except trio.TooSlowError:
        counts.error = counts.error or SessionError("end-to-end handshake timed out")
    except trio.BrokenResourceError as exc:
        counts.error = counts.error or exc
    except BaseException as exc:
        ended_by = exc
        raise
    finally:
        a_to_b, b_to_a = counts.bytes_a_to_b, counts.bytes_b_to_a
        sent, back = (a_to_b, b_to_a) if outward_is_a_to_b else (b_to_a, a_to_b)
        if ended_by is not None:
            error, note = ("", "gateway shut down") if is_cancellation(ended_by) \
                else (describe_abnormal_end(ended_by), "")
        elif counts.error is not None:
            error, note = describe_error(counts.error), ""
        else:
            error, note = "", "idle timeout" if counts.idle else ""
        record.finish(sent, back, error, note)
        ended_by = None  # no cycle through this frame


# Datagrams read from a socket per wakeup, in one write batch: one TLS write carries
# them all.
SOCKET_BATCH = 64


class Sealing(Protocol):
    """End-to-end protection of a flow's datagrams (e2e.SealedFlow): a transform on it."""

    def seal(self, datagram: bytes) -> bytes: ...
    def open(self, sealed: bytes) -> bytes | None: ...  # None: forged, corrupted or replayed


FORGED = "end-to-end datagram failed authentication (tampered or replayed)"


class DatagramFlow:
    """One UDP flow between a local socket and a circuit, every role's and every kind's:
    entry and exit, plain or end-to-end (`sealing`, a transform on each datagram).

    Datagrams from the circuit go to the local socket from the carrier's reader task
    (`circuit.sink`, a non-blocking send: dropped if the socket is full, as UDP would);
    datagrams from the local socket are read in batches by whoever owns that socket and
    queued in one write batch. No task switch per datagram in either direction. A
    datagram that fails authentication resets the flow with INTEGRITY_ERROR: a relay
    that tampers is an attack, and the operator must see it rather than a quiet loss.
    """

    def __init__(self, circuit: DatagramCircuit, send_local: Callable[[bytes], object],
                 counts: DatagramCounts | None = None, ends_when_refused: bool = False,
                 sealing: Sealing | None = None) -> None:
        self.circuit = circuit
        self.ends_when_refused = ends_when_refused  # the exit's connected socket: see TARGET_CLOSED
        self.sealing = sealing
        self.counts = counts if counts is not None else DatagramCounts()
        self.last = trio.current_time()
        self.dropped = 0
        self._send_local = send_local
        circuit.attach_sink(self._to_local)

    def rebind(self, circuit: DatagramCircuit) -> None:
        """Carry on over another circuit (the flow was resumed after its route was lost)."""
        self.circuit = circuit
        self.counts.error = None
        self.last = trio.current_time()
        circuit.attach_sink(self._to_local)

    def _to_local(self, data: bytes) -> None:
        self.last = trio.current_time()
        if self.sealing is not None:
            opened = self.sealing.open(data)
            if opened is None:
                if self.circuit.broken is None:
                    self.circuit.reset(ErrorCode.INTEGRITY_ERROR, FORGED)
                return
            data = opened
        self.counts.b_to_a += 1
        self.counts.bytes_b_to_a += len(data)
        try:
            self._send_local(data)
        except OSError as exc:
            # Full socket buffer or an ICMP error from an earlier datagram: dropped, as
            # UDP would. Never raised: this runs in the carrier's reader task.
            self.dropped += 1
            if exc.errno == errno.ECONNREFUSED and self.ends_when_refused:
                self._target_closed()

    def _target_closed(self) -> None:
        if self.circuit.broken is None:
            self.circuit.reset(ErrorCode.CONNECTION_REFUSED, TARGET_CLOSED)

    def from_local(self, data: bytes) -> None:
        """Queue a datagram from the local side (the caller's write batch sends it)."""
        self.last = trio.current_time()
        wire = data if self.sealing is None else self.sealing.seal(data)
        try:
            queued = self.circuit.send(wire)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            queued = False  # the flow is ending: dropped, as UDP would (never raised to the listener)
        if queued:
            self.counts.a_to_b += 1
            self.counts.bytes_a_to_b += len(data)
        else:
            self.dropped += 1

    async def run(self, idle_timeout: float, local: socket.socket | None = None) -> DatagramCounts:
        """Until the far side ends the flow, it breaks, or `idle_timeout` of silence.

        With `local` (a connected socket: the exit side), also read it in batches.
        """
        circuit = self.circuit
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_cancel_when_ended, circuit, nursery.cancel_scope)
                while True:
                    with trio.move_on_at(self.last + idle_timeout) as waiting:
                        if local is None:
                            await trio.sleep_forever()
                        await trio.lowlevel.wait_readable(local)
                    if waiting.cancelled_caught:
                        if trio.current_time() >= self.last + idle_timeout:
                            self.counts.idle = True
                            nursery.cancel_scope.cancel()
                            break
                        continue
                    assert local is not None
                    self._drain(local)
        finally:
            circuit.sink = None
        if circuit.broken is not None:
            error = trio.BrokenResourceError(str(circuit.broken))
            error.__cause__ = circuit.broken
            self.counts.error = error
        return self.counts

    def _drain(self, local: socket.socket) -> None:
        with write_batch():  # the burst leaves in one write
            for _ in range(SOCKET_BATCH):
                try:
                    data = local.recv(MAX_UDP_PAYLOAD)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    if exc.errno == errno.ECONNREFUSED:
                        self._target_closed()
                        return
                    if exc.errno not in _TRANSIENT:
                        raise
                    continue
                self.from_local(data)


async def bridge_datagrams(a: DatagramCircuit, b: DatagramCircuit, idle_timeout: float,
                           counts: DatagramCounts,
                           transform: Callable[[bytes], bytes] | None = None) -> None:
    """A middle relay's UDP flow: what arrives on `a` goes into `b` and back, straight from
    the carriers' readers (two `DatagramFlow`s whose "local side" is the other circuit),
    until either leg ends or breaks, or `idle_timeout` of silence. `transform` rewrites
    what goes a -> b (the test-only fault injector). Counts and the error go to `counts`."""

    def into(circuit: DatagramCircuit, change: Callable[[bytes], bytes] | None) -> Callable[[bytes], None]:
        def send(data: bytes) -> None:
            try:
                circuit.send(change(data) if change is not None else data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # that leg is ending: dropped, as UDP would (this runs in a reader)
        return send

    down = DatagramFlow(a, into(b, transform))
    up = DatagramFlow(b, into(a, None))
    try:
        async with trio.open_nursery() as nursery:
            for leg in (a, b):
                nursery.start_soon(_cancel_when_ended, leg, nursery.cancel_scope)
            while True:
                quiet_until = max(down.last, up.last) + idle_timeout
                await trio.sleep_until(quiet_until)
                if trio.current_time() >= max(down.last, up.last) + idle_timeout:
                    counts.idle = True
                    nursery.cancel_scope.cancel()
    finally:
        a.sink = b.sink = None
        counts.a_to_b, counts.bytes_a_to_b = down.counts.b_to_a, down.counts.bytes_b_to_a
        counts.b_to_a, counts.bytes_b_to_a = up.counts.b_to_a, up.counts.bytes_b_to_a
    for leg in (a, b):
        if leg.broken is not None and counts.error is None:
            error = trio.BrokenResourceError(str(leg.broken))
            error.__cause__ = leg.broken
            counts.error = error


async def _cancel_when_ended(circuit: DatagramCircuit, scope: trio.CancelScope) -> None:
    await circuit.ended.wait()
    scope.cancel()
