"""The carriers' write coalescer: frames queued during a batch leave in one write per carrier.

Circuits never write: they queue frames in their carrier's session and call
`carrier.queued()`. Outside a batch that writes at once (a task that sends, then
awaits). Inside a batch (`with write_batch():` around a relay's wake-up, a UDP
listener's burst, an accept that opens a circuit and sends the client's first bytes)
each carrier is only marked; when the outermost batch ends, every marked carrier writes
once: aioquic's `_transmit_soon`, without a scheduler round. A carrier reader's dispatch
of a small read is a batch too (a relay's forwarded ACK and FIN leave together); of a
bulk read it is not, so a middle relay's onward writes start while the rest of the read
is parsed (see carrier.py).
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Protocol

from trio.lowlevel import RunVar


class Writer(Protocol):
    """What the coalescer needs of a carrier: write what its session has queued."""

    def flush(self) -> None: ...


class _Writes:
    __slots__ = ("depth", "dirty", "lingering")

    def __init__(self) -> None:
        self.depth = 0
        self.dirty: dict[Writer, None] = {}  # insertion-ordered: flushed in the order touched
        self.lingering: dict[Writer, None] = {}  # frames that may wait for the next write


log = logging.getLogger("tunnelgate.carrier")
_WRITES: RunVar[_Writes] = RunVar("tunnelgate_writes")


def _writes() -> _Writes:
    try:
        return _WRITES.get()
    except LookupError:
        writes = _Writes()
        _WRITES.set(writes)
        return writes


def queued(carrier: Writer) -> None:
    """`carrier` has frames queued: write them now, or at the end of the current batch."""
    writes = _writes()
    if writes.depth:
        writes.dirty[carrier] = None
    else:
        carrier.flush()


def linger(carrier: Writer) -> None:
    """`carrier` has frames queued that nobody waits for (a complete session's last RST):
    they leave with its next write, or at the latest with `flush_lingering`. Under load
    they ride along with other traffic and cost no write and no wake-up of their own."""
    _writes().lingering[carrier] = None


def flush_lingering() -> None:
    """Write what `linger` left waiting (called periodically: it bounds the wait)."""
    writes = _writes()
    lingering, writes.lingering = writes.lingering, {}
    for carrier in lingering:
        try:
            carrier.flush()  # a no-op when an ordinary write took the frames meanwhile
        except Exception:
            log.exception("carrier %s: write failed", carrier)


class write_batch:
    """Defer every carrier write until the outermost batch ends; then one write each.

    A class, not @contextmanager: it runs for every message, and a generator costs more.
    """

    __slots__ = ("_writes",)

    def __enter__(self) -> None:
        self._writes = writes = _writes()
        writes.depth += 1

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        writes = self._writes
        writes.depth -= 1
        if writes.depth == 0 and writes.dirty:
            dirty = writes.dirty
            writes.dirty = {}
            for carrier in dirty:
                try:
                    carrier.flush()
                except Exception:  # flush reports its failures itself; one must not stop the rest
                    log.exception("carrier %s: write failed", carrier)
