"""Logging to stderr with UTC ISO-8601 timestamps, so lines from several hosts sort together.

systemd and container runtimes collect stderr; no files, no rotation here.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, Protocol


class _UTCFormatter(logging.Formatter):
    """``2026-11-25T04:13:33.123Z LEVEL name: message``."""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{stamp}.{int(record.msecs):03d}Z"


def level_for(verbosity: int) -> int:
    """0 -> INFO (the default), 1+ (-v) -> DEBUG, negative (-q) -> WARNING."""
    if verbosity > 0:
        return logging.DEBUG
    if verbosity < 0:
        return logging.WARNING
    return logging.INFO


# What log calls may attach (`extra=`) for the JSON format: the event's own fields.
EVENT_FIELDS = ("event", "role", "tunnel", "peer", "instance", "circuit", "direction", "address",
                "bytes_out", "bytes_back", "duration", "outcome", "reason", "code", "target")


class _JsonFormatter(_UTCFormatter):
    """One JSON object per line: ts, level, logger, event (the call's own, else "log"),
    message (the text line's message), and the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {"ts": self.formatTime(record), "level": record.levelname,
                                    "logger": record.name, "event": "log"}
        fields = record.__dict__
        for key in EVENT_FIELDS:
            if key in fields:
                entry[key] = fields[key]
        entry["message"] = record.getMessage()
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(verbosity: int = 0, log_format: str = "text") -> None:
    """Send every logger's records to stderr at the level ``verbosity`` asks for, as text
    lines or (``log_format="json"``) one JSON object per line."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_UTCFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level_for(verbosity))


class Throttle:
    """At most one log line per `interval` seconds for one kind of event, with the count
    of those not logged: an event a peer can cause at will must not become a log flood."""

    __slots__ = ("_last", "interval", "suppressed")

    def __init__(self, interval: float = 1.0) -> None:
        self.interval = interval
        self.suppressed = 0
        self._last = -interval

    def due(self) -> int | None:
        """None: stay quiet (counted); else log now, with this many left out since the last."""
        now = time.monotonic()
        if now - self._last < self.interval:
            self.suppressed += 1
            return None
        self._last = now
        left_out, self.suppressed = self.suppressed, 0
        return left_out


class _HasPeer(Protocol):
    def getpeername(self) -> Any: ...


def format_address(sockaddr: tuple[Any, ...]) -> str:
    """``host:port``, or ``[host]:port`` for IPv6: how addresses appear in log lines."""
    host, port = sockaddr[0], sockaddr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def peer_address(sock: _HasPeer) -> str:
    """The connected peer of `sock`, for a log line (``?`` once it is gone)."""
    try:
        return format_address(sock.getpeername())
    except OSError:
        return "?"
