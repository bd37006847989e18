"""`bridge`: a middle relay's two circuits joined without a task.

On a relay hop both sides of a session are circuits, and circuits are fed by their
carriers' readers. So the whole relay is a reaction to circuit events: bytes arriving
on one leg go straight into the other as far as its credit allows (the rest waits in
the first leg's queue, holding back that leg's credit: flow control stays end to end);
new credit on a leg moves what waits; an EOF passes on once everything before it has;
a reset or a lost carrier on one leg resets the other with the same code and reason,
so the RST travels the whole chain. `splice()` does the same with two tasks per
session; this costs none (memory per idle relayed session: two circuits).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from gateway.carriers.circuit import Circuit
from gateway.errors import CircuitBroken
from gateway.relay.sessions import SessionRecord
from gateway.relay.splice import SPLICE_CHUNK
from gateway_codecs import ErrorCode

log = logging.getLogger("tunnelgate.relay")


Transform = Callable[[bytes | memoryview, int], bytes | memoryview]


class _Bridge:
    __slots__ = ("a", "a_to_b", "b", "b_to_a", "ended", "eof_a_to_b", "eof_b_to_a", "record",
                 "transform")

    def __init__(self, a: Circuit, b: Circuit, record: SessionRecord,
                 transform: Transform | None = None) -> None:
        self.a = a
        self.b = b
        self.record = record
        self.transform = transform
        self.a_to_b = 0
        self.b_to_a = 0
        self.eof_a_to_b = False
        self.eof_b_to_a = False
        self.ended = False

    def start(self) -> None:
        self.a.sink = self._push_a_to_b
        self.b.sink = self._push_b_to_a
        self.a.watcher = self.b.watcher = self.on_event
        self.on_event()  # what either leg queued before the bridge existed

    def _push_a_to_b(self, data: bytes | memoryview) -> int:
        if self.transform is not None:
            data = self.transform(data, self.a_to_b)
        sent = self.b.try_send(data)
        self.a_to_b += sent
        return sent

    def _push_b_to_a(self, data: bytes | memoryview) -> int:
        sent = self.a.try_send(data)
        self.b_to_a += sent
        return sent

    def _move(self, src: Circuit, dst: Circuit, transform: Transform | None = None,
              position: int = 0) -> int:
        """Move what `src` has queued into `dst` as far as its credit allows."""
        moved = 0
        while (credit := dst.send_credit) > 0:
            data: bytes | memoryview | None = src.take_nowait(min(credit, SPLICE_CHUNK))
            if data is None:
                break
            if transform is not None:
                data = transform(data, position + moved)
            moved += dst.try_send(data)
        return moved

    def on_event(self) -> None:
        """Data, credit, EOF or breakage on either leg (from a carrier's reader)."""
        if self.ended:
            return
        try:
            self._step()
        except Exception as exc:
            log.exception("relayed session %s: internal error; ending it", self.record.what)
            self._fail(CircuitBroken(ErrorCode.INTERNAL_ERROR, f"internal error: {exc}"))

    def _step(self) -> None:
        a, b = self.a, self.b
        for broken, other in ((a, b), (b, a)):
            if broken.broken is not None:
                # Pass the code and reason on: the far end's log says why, not "cancelled".
                other.reset(broken.broken.code, broken.broken.reason)
                self._end(broken.broken)
                return
        self.a_to_b += self._move(a, b, self.transform, self.a_to_b)
        self.b_to_a += self._move(b, a)
        if a.at_eof and not self.eof_a_to_b:
            self.eof_a_to_b = True
            b.end_now()
        if b.at_eof and not self.eof_b_to_a:
            self.eof_b_to_a = True
            a.end_now()
        if self.eof_a_to_b and self.eof_b_to_a:
            self._end(None)

    def _fail(self, error: CircuitBroken) -> None:
        for leg in (self.a, self.b):
            leg.reset(error.code, error.reason)
        self._end(error)

    def _end(self, error: CircuitBroken | None) -> None:
        if self.ended:
            return
        self.ended = True
        for leg in (self.a, self.b):
            leg.sink = None
            leg.watcher = None
            leg.close_now()
        self.record.finish(self.a_to_b, self.b_to_a, "" if error is None else str(error))
        self.record.__exit__(None, None, None)


def bridge(a: Circuit, b: Circuit, record: SessionRecord, transform: Transform | None = None) -> None:
    """Relay `a` <-> `b` until both directions ended or one leg broke. `record` is entered
    now and exited at the end, with the byte counts and the reason. `transform(data,
    offset)` rewrites what goes a -> b (the test-only fault injector: it runs inside this,
    the production path, never beside it)."""
    record.__enter__()
    _Bridge(a, b, record, transform).start()
