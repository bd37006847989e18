"""Test fixtures for the sans-IO codec: a fake link between two sessions, frame parsing.

The link moves whatever one session's `data_to_send` returns into the other's
`receive_data`, cut the way its mode says: whole, one byte at a time, at random
points, or at random points lent through one reused buffer (`borrow=True`, the way the
gateway's reader calls it). Every back-to-back test runs in all modes, so no feature may
depend on how the byte stream happens to be split, nor keep a lent buffer.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from gateway_codecs import CarrierSession, DataReceived, Event, HandshakeComplete, Role, Settings

LINK_MODES = ("whole", "bytewise", "random", "lent")
_HEADER = struct.Struct("!IBI")


def chunks(data: bytes, mode: str, rng: random.Random) -> Iterator[bytes]:
    """Cut `data` as a link in `mode` would deliver it."""
    if mode == "whole":
        if data:
            yield data
    elif mode == "bytewise":
        for i in range(len(data)):
            yield data[i : i + 1]
    elif mode in ("random", "lent"):
        pos = 0
        while pos < len(data):
            step = rng.choice((1, 2, 3, 7, 9, 10, 100, 4096, 70000))
            yield data[pos : pos + step]
            pos += step
    else:  # pragma: no cover
        raise ValueError(mode)


class Link:
    """Two sessions back to back; `pump` runs until neither has anything to send."""

    def __init__(self, a: CarrierSession, b: CarrierSession, mode: str, seed: int = 0) -> None:
        self.a = a
        self.b = b
        self.mode = mode
        self.rng = random.Random(seed)
        self.events: dict[int, list[Event]] = {id(a): [], id(b): []}
        self.lent_views = 0  # DATA payloads that came as views of the lent buffer
        self._buffer = bytearray(128 * 1024)

    def deliver(self, src: CarrierSession, dst: CarrierSession) -> list[Event]:
        """Move what `src` has queued now into `dst`; the events `dst` produced."""
        out: list[Event] = []
        for piece in chunks(src.data_to_send(), self.mode, self.rng):
            out += self._lend(dst, piece) if self.mode == "lent" else dst.receive_data(piece)
        self.events[id(dst)] += out
        return out

    def _lend(self, dst: CarrierSession, piece: bytes) -> list[Event]:
        """Feed `piece` through the reused buffer, copy what was lent, then scribble over
        the buffer: any view the session kept would now read garbage."""
        view = memoryview(self._buffer)[: len(piece)]
        view[:] = piece
        events = dst.receive_data(view, borrow=True)
        for i, event in enumerate(events):
            if isinstance(event, DataReceived) and isinstance(event.data, memoryview):
                self.lent_views += 1
                events[i] = DataReceived(event.circuit_id, bytes(event.data))
        view[:] = b"\xa5" * len(piece)
        view.release()
        return events

    def pump(self) -> tuple[list[Event], list[Event]]:
        """Deliver both ways until quiet; (events at a, events at b) from this call."""
        at_a: list[Event] = []
        at_b: list[Event] = []
        for _ in range(10_000):
            got_b = self.deliver(self.a, self.b)
            got_a = self.deliver(self.b, self.a)
            at_a += got_a
            at_b += got_b
            if not got_a and not got_b and not self.a.pending_output and not self.b.pending_output:
                return at_a, at_b
        raise AssertionError("link never went quiet")


def connected(mode: str, dialer: Settings | None = None, acceptor: Settings | None = None,
              seed: int = 0, **kwargs: int) -> tuple[CarrierSession, CarrierSession, Link]:
    """A dialer and an acceptor with the HELLO exchange done."""
    a = CarrierSession(Role.DIALER, dialer, **kwargs)
    b = CarrierSession(Role.ACCEPTOR, acceptor, **kwargs)
    link = Link(a, b, mode, seed)
    at_a, at_b = link.pump()
    assert any(isinstance(e, HandshakeComplete) for e in at_a)
    assert any(isinstance(e, HandshakeComplete) for e in at_b)
    return a, b, link


@dataclass(frozen=True)
class Frame:
    type: int
    flags: int
    circuit_id: int
    payload: bytes


def parse_frames(data: bytes) -> list[Frame]:
    """Split a complete byte string into frames (the test's independent reading of §2)."""
    frames = []
    pos = 0
    while pos < len(data):
        length_type, flags, cid = _HEADER.unpack_from(data, pos)
        length = length_type >> 8
        frames.append(Frame(length_type & 0xFF, flags, cid, data[pos + 9 : pos + 9 + length]))
        pos += 9 + length
    assert pos == len(data), "trailing partial frame"
    return frames


def of_type(events: list[Event], cls: type[Event]) -> list[Event]:
    return [e for e in events if isinstance(e, cls)]
