"""A test-only fault injector: a relay that flips one payload byte in transit.

Enabled only by the environment variable TUNNELGATE_TEST_FLIP_BYTE=N on a relay
gateway: byte N of every relayed TCP circuit (counted from the entry side), and byte
N mod len of every relayed datagram from the entry side, is inverted. It exists to
prove that `end_to_end = true` turns tampering into an integrity error. It logs a
warning at start so it can never be on silently.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

log = logging.getLogger("tunnelgate.faults")
ENV = "TUNNELGATE_TEST_FLIP_BYTE"


def fault_injection_offset() -> int | None:
    raw = os.environ.get(ENV)
    if raw is None:
        return None
    offset = int(raw)
    log.warning("%s=%d: this relay will corrupt relayed payload (test fault injector)", ENV, offset)
    return offset


def byte_flipper(offset: int) -> Callable[[bytes | memoryview, int], bytes | memoryview]:
    """A bridge transform inverting byte `offset` of the stream (counted from the entry)."""

    def flip(data: bytes | memoryview, position: int) -> bytes | memoryview:
        if position <= offset < position + len(data):
            i = offset - position
            return bytes(data[:i]) + bytes([data[i] ^ 0xFF]) + bytes(data[i + 1:])
        return data

    return flip


def datagram_flipper(offset: int) -> Callable[[bytes], bytes]:
    """A datagram relay transform inverting byte `offset mod len` of every datagram."""

    def flip(data: bytes) -> bytes:
        if not data:
            return data
        i = offset % len(data)
        return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]

    return flip
