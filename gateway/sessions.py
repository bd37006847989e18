"""Session accounting: one log line when a session opens and one when it closes.

It also counts live sessions, so a draining gateway knows when it may exit.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import trio

log = logging.getLogger("tunnelgate.session")


class SessionRecord:
    def __init__(self, role: str, what: str, circuit_id: int) -> None:
        self.role = role
        self.what = what
        self.circuit_id = circuit_id
        self.started = trio.current_time()
        self.sent = 0
        self.received = 0
        self.error = ""
        self.finished = False

    def finish(self, sent: int, received: int, error: str = "") -> None:
        """`sent` went towards the target side, `received` came back from it."""
        self.sent, self.received, self.error, self.finished = sent, received, error, True


class SessionLog:
    def __init__(self) -> None:
        self.active = 0
        self.total = 0
        self._idle = trio.Event()
        self._idle.set()

    @contextmanager
    def track(self, role: str, what: str, circuit: object, drains: bool = True
              ) -> Iterator[SessionRecord]:
        """Log the session's open and close; `drains`: a shutdown waits for it to end.

        UDP flows do not drain: they have no end of their own but the idle timeout.
        """
        record = SessionRecord(role, what, getattr(circuit, "id", 0))
        self.total += 1
        if drains:
            self.active += 1
            if self._idle.is_set():
                self._idle = trio.Event()
        log.info("%s session open: %s (circuit %d)", role, what, record.circuit_id)
        try:
            yield record
        finally:
            if drains:
                self.active -= 1
                if self.active == 0:
                    self._idle.set()
            duration = trio.current_time() - record.started
            outcome = f"error: {record.error}" if record.error else "ok"
            log.info("%s session closed: %s (circuit %d): %d B out, %d B back, %.3f s, %s",
                     role, record.what, record.circuit_id, record.sent, record.received, duration, outcome)

    async def wait_idle(self) -> None:
        await self._idle.wait()
