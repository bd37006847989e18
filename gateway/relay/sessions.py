"""Session accounting: one log line when a session opens and one when it closes.

It also counts live sessions, so a draining gateway knows when it may exit.
"""

from __future__ import annotations

import logging
from collections import Counter
from types import TracebackType

import trio

from gateway.relay.outcomes import describe_abnormal_end

log = logging.getLogger("tunnelgate.session")


class SessionRecord:
    """One session, as a context manager: logs its open on enter, its close on exit.

    A plain class with slots rather than @contextmanager: thousands of idle sessions
    each hold one, and a generator-based manager costs several times the memory.
    """

    __slots__ = ("circuit_id", "closed", "drains", "error", "log", "note", "received", "role", "sent",
                 "started", "tunnel", "what")

    def __init__(self, sessions: SessionLog, role: str, what: str, circuit_id: int,
                 drains: bool, tunnel: str = "") -> None:
        self.log = sessions
        self.role = role
        self.tunnel = tunnel  # the entry's tunnel name ("" at exits and relays): metrics
        self.what = what
        self.circuit_id = circuit_id
        self.drains = drains
        self.started = 0.0
        self.sent = 0
        self.received = 0
        self.error = ""
        self.note = ""
        self.closed = False  # exited: a second exit (a failing clean-up's fallback) is a no-op

    def finish(self, sent: int, received: int, error: str = "", note: str = "") -> None:
        """`sent` went towards the target side, `received` came back from it. `error`: why
        it broke; `note`: how a normal end came about (a UDP flow's idle timeout)."""
        self.sent, self.received, self.error, self.note = sent, received, error, note

    def __enter__(self) -> SessionRecord:
        self.started = trio.current_time()
        self.log.opened(self)
        if log.isEnabledFor(logging.INFO):
            log.info("%s session open: %s (circuit %d)", self.role, self.what, self.circuit_id,
                     extra={"event": "session_open", "role": self.role, "tunnel": self.tunnel,
                            "circuit": self.circuit_id, "target": self.what})
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self.closed:
            return
        self.closed = True
        self.log.closed(self)
        if value is not None and not self.error and not self.note:
            # Left by an exception, not through finish(): never an "ok".
            self.error = describe_abnormal_end(value)
        self.log.outcome(self)
        if log.isEnabledFor(logging.INFO):
            duration = trio.current_time() - self.started
            outcome = (f"error: {self.error}" if self.error
                       else f"ok ({self.note})" if self.note else "ok")
            log.info("%s session closed: %s (circuit %d): %d B out, %d B back, %.3f s, %s",
                     self.role, self.what, self.circuit_id, self.sent, self.received, duration,
                     outcome,
                     extra={"event": "session_closed", "role": self.role, "tunnel": self.tunnel,
                            "circuit": self.circuit_id, "target": self.what, "bytes_out": self.sent,
                            "bytes_back": self.received, "duration": round(duration, 6),
                            "outcome": "reset" if self.error else "ok",
                            "reason": self.error or self.note})


class SessionLog:
    """Every session's record passes here: live and total counts (the drain waits on
    them), and per (role, tunnel) what the admin endpoint's metrics report, updated once
    per session, never per byte."""

    def __init__(self) -> None:
        self.active = 0
        self.total = 0
        self.open_by: Counter[tuple[str, str]] = Counter()  # (role, tunnel) -> open now
        self.ended: Counter[tuple[str, str, str]] = Counter()  # (role, tunnel, "ok"|"reset")
        self.bytes_out: Counter[tuple[str, str]] = Counter()  # of ended sessions, to the target
        self.bytes_back: Counter[tuple[str, str]] = Counter()
        self.refusals: Counter[str] = Counter()  # error code name -> sessions refused
        self.udp_dropped: Counter[tuple[str, str]] = Counter()  # (role, tunnel) -> datagrams
        self._idle = trio.Event()
        self._idle.set()

    def track(self, role: str, what: str, circuit: object, drains: bool = True,
              tunnel: str = "") -> SessionRecord:
        """A record to enter for the session's lifetime; `drains`: shutdown waits for it.

        UDP flows do not drain: they have no end of their own but the idle timeout.
        """
        return SessionRecord(self, role, what, getattr(circuit, "id", 0), drains, tunnel)

    def open(self, role: str, what: str, circuit: object, tunnel: str = "") -> SessionRecord:
        """`track` and enter at once: for a session the relay engine will close."""
        return self.track(role, what, circuit, tunnel=tunnel).__enter__()

    def opened(self, record: SessionRecord) -> None:
        self.total += 1
        self.open_by[record.role, record.tunnel] += 1
        if record.drains:
            self.active += 1
            if self._idle.is_set():
                self._idle = trio.Event()

    def closed(self, record: SessionRecord) -> None:
        key = record.role, record.tunnel
        self.open_by[key] -= 1
        self.bytes_out[key] += record.sent
        self.bytes_back[key] += record.received
        if record.drains:
            self.active -= 1
            if self.active == 0:
                self._idle.set()

    def outcome(self, record: SessionRecord) -> None:
        """Counted once its error is known (at the very end of its exit)."""
        self.ended[record.role, record.tunnel, "reset" if record.error else "ok"] += 1

    def refused(self, code: str) -> None:
        """A session refused before it began (OPEN_FAIL at any hop), by error code."""
        self.refusals[code] += 1

    async def wait_idle(self) -> None:
        await self._idle.wait()
