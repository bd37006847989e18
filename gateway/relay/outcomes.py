"""How a session ended, in words for its one log line: the most specific reason in an
exception chain, and whether a task left because it was cancelled or because of a bug."""

from __future__ import annotations

import trio


def describe_error(exc: BaseException | None) -> str:
    """The most specific reason in an exception chain, for one log line."""
    if exc is None:
        return ""
    cause = exc.__cause__
    return str(cause) if cause is not None and str(cause) else (str(exc) or type(exc).__name__)


def is_cancellation(exc: BaseException) -> bool:
    """Cancelled, or a group of nothing but Cancelled (what a cancelled nursery raises)."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(trio.Cancelled)[1] is None
    return isinstance(exc, trio.Cancelled)


def describe_abnormal_end(exc: BaseException) -> str:
    """Why a session's task left early: cancelled (the gateway shut down) or a bug."""
    if is_cancellation(exc):
        return "cancelled: gateway shut down"
    if isinstance(exc, BaseExceptionGroup):
        rest = exc.split(trio.Cancelled)[1]
        exc = rest.exceptions[0] if rest is not None else exc
    return f"internal error: {exc!r}"
