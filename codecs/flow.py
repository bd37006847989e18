"""Per-circuit credit, QUIC style: limits are absolute byte offsets, never deltas.

Absolute offsets are idempotent (a repeated or reordered update is harmless) and they
double as acknowledgements: `ReceiveWindow.consumed` is exactly how far the application
has taken the stream, which a resumed circuit can use to know what to retransmit.
"""

from __future__ import annotations

from .errors import ErrorCode, LocalProtocolError, RemoteProtocolError


class ReceiveWindow:
    """What we allow the peer to send on one circuit, and when to tell it more."""

    __slots__ = ("consumed", "limit", "received", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self.limit = size  # the highest offset advertised so far (initial: HELLO's window)
        self.received = 0
        self.consumed = 0

    def on_data(self, n: int) -> None:
        self.received += n
        if self.received > self.limit:
            raise RemoteProtocolError(
                f"peer sent to offset {self.received}, beyond the advertised {self.limit}",
                ErrorCode.FLOW_CONTROL_ERROR,
            )

    def consume(self, n: int) -> int | None:
        """Record `n` bytes taken by the reader; returns a new limit to advertise, if due.

        An update is due once half the window has been used since the last one: one
        MAX_DATA per half window, not one per read.
        """
        if n < 0 or self.consumed + n > self.received:
            raise LocalProtocolError("consumed more than was received")
        self.consumed += n
        if self.limit - self.consumed <= self.size // 2:
            self.limit = self.consumed + self.size
            return self.limit
        return None

    def resize(self, size: int) -> int | None:
        """Auto-tuning hook: change the window; a larger limit is advertised at once.

        A shrink only takes effect at later updates: an advertised limit is never
        retracted (the peer may already be sending up to it).
        """
        if size < 1:
            raise LocalProtocolError("window must be at least 1 byte")
        self.size = size
        if self.consumed + size > self.limit:
            self.limit = self.consumed + size
            return self.limit
        return None


class SendCredit:
    """How far the peer lets us send on one circuit."""

    __slots__ = ("limit", "sent")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.sent = 0

    @property
    def available(self) -> int:
        return self.limit - self.sent

    def spend(self, n: int) -> None:
        if n > self.limit - self.sent:
            raise LocalProtocolError(
                f"{n} bytes exceed the {self.limit - self.sent} bytes of credit",
                ErrorCode.FLOW_CONTROL_ERROR,
            )
        self.sent += n

    def raise_limit(self, limit: int) -> bool:
        """Apply a MAX_DATA; smaller or equal limits are stale and ignored."""
        if limit <= self.limit:
            return False
        self.limit = limit
        return True
