"""What runs before a session is handed to the relay engine: its end-to-end handshake.

The handshake needs a task (it waits, with a deadline); relaying does not. If it fails,
times out or is cancelled, the session ends as broken, the same as any broken session:
RST on the socket and on the circuit, never a close that could pass for a complete one.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import trio

from gateway.carriers.circuit import Circuit
from gateway.relay.localsock import LocalStream
from gateway.relay.outcomes import describe_abnormal_end, describe_error
from gateway.relay.sessions import SessionRecord
from gateway_codecs import ErrorCode

T = TypeVar("T")


def abort_unrelayed(stream: LocalStream, circuit: Circuit, reason: str,
                    code: int = ErrorCode.CANCELLED) -> None:
    """End a session that broke before its relaying started: RST on both ends."""
    if circuit.broken is None:
        circuit.reset(code, reason)
    circuit.close_now()
    stream.abort(reason)
    stream.close_now()


async def handshake_or_abort(handshake: Callable[[], Awaitable[T]], stream: LocalStream,
                             circuit: Circuit, record: SessionRecord,
                             warn: Callable[[str], None]) -> T | None:
    """Run a session's end-to-end handshake before it is relayed (`record` is open). If
    it fails or times out, the session ends as broken (RST both ways, END_TO_END_FAILED,
    its record closed with the reason) and this returns None; if it is cancelled, the
    same, and the cancel goes on."""
    try:
        return await handshake()
    except (trio.BrokenResourceError, trio.TooSlowError) as exc:
        reason = ("end-to-end handshake timed out" if isinstance(exc, trio.TooSlowError)
                  else describe_error(exc))
        warn(reason)
        record.finish(0, 0, reason)
        abort_unrelayed(stream, circuit, reason, ErrorCode.END_TO_END_FAILED)
        record.__exit__(None, None, None)
        return None
    except BaseException as exc:
        abort_unrelayed(stream, circuit, describe_abnormal_end(exc))
        record.__exit__(type(exc), exc, exc.__traceback__)
        raise
