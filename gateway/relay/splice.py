"""`splice(a, b)`: move bytes both ways between two half-closeable streams.

One function serves every role: edge (socket <-> circuit), exit (circuit <-> target
socket) and middle relay (circuit <-> circuit). An EOF on one side becomes send_eof on
the other (half-close, Comer & Stevens 6.17), so a client that shuts down its write side
still gets the full reply. A broken side aborts both.
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

from gateway.errors import SessionError
from gateway.relay.outcomes import describe_abnormal_end
from gateway.stream_abilities import Abortable, NonBlockingSink, PushSource

# Bytes per read. The circuit side hands over whole queued frames up to this much.
SPLICE_CHUNK = 256 * 1024


@dataclass
class SpliceResult:
    a_to_b: int = 0
    b_to_a: int = 0
    error: BaseException | None = None


async def splice(a: trio.abc.HalfCloseableStream, b: trio.abc.HalfCloseableStream,
                 result: SpliceResult | None = None) -> SpliceResult:
    """Relay until both directions finished or either side broke; then close both.

    Anything but both directions ending (a broken side, cancellation, a bug) aborts both
    sides (RST), never a clean close. Pass `result` to keep the counts and the reason
    when the call is cancelled.
    """
    if result is None:
        result = SpliceResult()

    async def pump(src: trio.abc.HalfCloseableStream, dst: trio.abc.HalfCloseableStream,
                   forward: bool, scope: trio.CancelScope) -> None:
        fast = dst if isinstance(dst, NonBlockingSink) else None
        try:
            while True:
                data = await src.receive_some(SPLICE_CHUNK)
                if not data:
                    # This task may have been rescheduled in the same batch in which the
                    # other direction broke and cancelled the session: an EOF read now
                    # may be a reset in disguise, and must not go on as a clean end.
                    await trio.lowlevel.checkpoint_if_cancelled()
                    await dst.send_eof()
                    return
                # Hand over without a second scheduling round when it fits at once (the
                # receive above already was this loop's checkpoint); wait only if not.
                taken = fast.try_send(data) if fast is not None else 0
                if taken < len(data):
                    await dst.send_all(memoryview(data)[taken:] if taken else data)
                if forward:
                    result.a_to_b += len(data)
                else:
                    result.b_to_a += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            if result.error is None:
                result.error = exc
            scope.cancel()

    # A circuit feeding a local socket writes into it from the carrier's reader while
    # the socket keeps up: no task switch per message. The pump takes over whatever the
    # socket could not take at once, and the end of the stream.
    pushing = [(src, dst) for src, dst in ((a, b), (b, a))
               if isinstance(src, PushSource) and isinstance(dst, NonBlockingSink)]
    for src, dst in pushing:
        src.sink = dst.try_send
    finished = False
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(pump, b, a, False, nursery.cancel_scope)
            # The other direction runs in this task: one task less per session (memory).
            await pump(a, b, True, nursery.cancel_scope)
        finished = True
    except BaseException as exc:
        # Cancelled (shutdown) or a bug: the session did not complete, and neither end
        # may take it for a complete one.
        if result.error is None:
            result.error = SessionError(describe_abnormal_end(exc))
        raise
    finally:
        for src, _ in pushing:
            src.sink = None
            if src is a:
                result.a_to_b += src.sunk
            else:
                result.b_to_a += src.sunk
        if not finished or result.error is not None:
            # One side broke: abort the other rather than let it look like a clean end.
            for side in (a, b):
                if isinstance(side, Abortable):
                    side.abort(str(result.error) or "the other side of the relay broke")
        with trio.move_on_after(2) as cleanup:
            cleanup.shield = True
            await a.aclose()
            await b.aclose()
    return result
