"""The standard small services (RFC 862, 863, 864, 867, 868) on one end of a socket pair.

A gateway serves the targets `service:echo`, `service:discard`, `service:chargen`,
`service:daytime` and `service:time` without opening a port of its own: the exit makes a
`socket.socketpair()` (SOCK_STREAM for TCP, SOCK_DGRAM for UDP), relays one end exactly
as if it were the connected target, and runs `serve_stream` or `serve_datagrams` on the
other end as a task. So these functions see one connected socket, never a listener.

Every service owns the socket it is given and closes it when it ends, however it ends.
The peer resetting or closing ends a service quietly (that is how a client says "enough");
only cancellation leaves as an exception. A service never buffers more than one chunk:
TCP flow control reaches the client end to end, and a full datagram queue drops a reply,
as UDP would.

Half-close, TCP (the tunnel relays FIN and RST faithfully, so the client sees what a
direct connection would give it):

- echo: after the client's EOF, what was read is written back, then FIN.
- discard: reads until the client's EOF, then FIN.
- chargen: the client's EOF is not the end (RFC 864: "until the calling user terminates
  the connection"; a half-closed client may still be reading, e.g. `nc -N host 19 <
  /dev/null | head`). It sends until a write fails because the client closed or reset.
- daytime, time: the answer, FIN, then input is discarded until the client's EOF, for
  at most `LINGER` seconds, before closing: closing with unread input would turn the
  close into a reset, which the relay would pass on as a broken session.
"""

from __future__ import annotations

import errno
import random
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import trio

from gateway.relay.localsock import LocalStream
from gateway.security.policy import SERVICE_NAMES, SERVICE_PREFIX

CHUNK = 64 * 1024  # what a stream service reads at once, and so all it ever holds
LINGER = 10.0  # daytime/time: how long to wait for the client's EOF after answering
DATAGRAM_BATCH = 64  # datagrams handled per wake-up before yielding to other tasks
MAX_DATAGRAM = 65535
RFC868_EPOCH = 2208988800  # seconds from 1900-01-01 to 1970-01-01 (UTC)

AnySocket = socket.socket | trio.socket.SocketType


def service_name(host: str) -> str | None:
    """The service a target host names (`service:echo` -> "echo"); None if it names none.

    Exact and lower-case only: a near miss must stay an ordinary host name to the policy,
    never silently become a built-in service."""
    if not host.startswith(SERVICE_PREFIX):
        return None
    name = host[len(SERVICE_PREFIX):]
    return name if name in SERVICE_NAMES else None


def is_service_target(host: str) -> bool:
    """Whether a target host is one of the built-in services."""
    return service_name(host) is not None


# ---------------------------------------------------------------- the data

_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December")


def daytime_line(now: float | None = None) -> bytes:
    """RFC 867's answer, in its suggested form: "Sunday, December 6, 2026 04:00:00-UTC".

    UTC, and English names whatever the process locale: the line is for any client."""
    t = datetime.fromtimestamp(time.time() if now is None else now, UTC)
    return (f"{_DAYS[t.weekday()]}, {_MONTHS[t.month - 1]} {t.day}, {t.year} "
            f"{t:%H:%M:%S}-UTC\r\n").encode("ascii")


def time_bytes(now: float | None = None) -> bytes:
    """RFC 868's answer: seconds since 1900-01-01 UTC, 32 bits big-endian, modulo 2**32
    (the counter wraps in February 2036; clients are expected to unwrap it)."""
    seconds = int(time.time() if now is None else now) + RFC868_EPOCH
    return struct.pack("!I", seconds % 2**32)


LINE_WIDTH = 72
_LINE_LEN = LINE_WIDTH + 2  # with CRLF
_RING = bytes(range(32, 127))  # the 95 printing characters, space first


def _chargen_cycle() -> bytes:
    """The 95 lines of RFC 864's pattern, one full turn of the ring.

    Line n holds 72 consecutive characters of the ring from n + 1: the RFC's own example
    starts with "!" (the space comes last in its ring), and so does this."""
    twice = _RING * 2
    return b"".join(twice[start:start + LINE_WIDTH] + b"\r\n"
                    for start in ((n + 1) % len(_RING) for n in range(len(_RING))))


CHARGEN_CYCLE = _chargen_cycle()  # 95 * 74 = 7,030 bytes
# Whole cycles, so that consecutive writes continue the pattern: one 70 KB write per wake-up.
_CHARGEN_BLOCK = CHARGEN_CYCLE * -(-CHUNK // len(CHARGEN_CYCLE))
_CHARGEN_TWICE = CHARGEN_CYCLE * 2  # any line start plus 512 bytes fits in it


# ---------------------------------------------------------------- TCP

def _plain(sock: AnySocket) -> socket.socket:
    """The socket as a plain one (what the relay's own sockets are); a trio socket is
    detached, so only one object ever closes the descriptor."""
    if isinstance(sock, trio.socket.SocketType):
        return socket.socket(fileno=sock.detach())
    return sock


async def _echo(stream: LocalStream) -> None:
    """RFC 862: what is read is written back, one chunk at a time: a client that stops
    reading stops us reading, so the buffering is one chunk and the kernel's."""
    while data := await stream.receive_some(CHUNK):
        await stream.send_all(data)
    await stream.send_eof()


async def _discard(stream: LocalStream) -> None:
    """RFC 863: read and drop until the client's EOF, then FIN."""
    while await stream.receive_some(CHUNK):
        pass
    await stream.send_eof()


async def _chargen(stream: LocalStream) -> None:
    """RFC 864: the pattern, as fast as the client reads, until the client closes or
    resets; what it sends is read and dropped (never left to fill its send buffer)."""
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_drain_input, stream, nursery.cancel_scope)
        try:
            while True:
                await stream.send_all(_CHARGEN_BLOCK)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client closed or reset: the normal end
        nursery.cancel_scope.cancel()


async def _drain_input(stream: LocalStream, scope: trio.CancelScope) -> None:
    """Drop what arrives; EOF changes nothing (a half-close), a reset ends the service."""
    try:
        while await stream.receive_some(CHUNK):
            pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        scope.cancel()


async def _daytime(stream: LocalStream) -> None:
    """RFC 867: one human-readable line of the date and time (UTC), then close."""
    await _answer_and_close(stream, daytime_line())


async def _time(stream: LocalStream) -> None:
    """RFC 868: four bytes, seconds since 1900 UTC, then close."""
    await _answer_and_close(stream, time_bytes())


async def _answer_and_close(stream: LocalStream, answer: bytes) -> None:
    await stream.send_all(answer)
    await stream.send_eof()
    with trio.move_on_after(LINGER):  # a lingering close: see the module docstring
        while await stream.receive_some(CHUNK):
            pass


_STREAM_SERVICES: dict[str, Callable[[LocalStream], Awaitable[None]]] = {
    "echo": _echo, "discard": _discard, "chargen": _chargen, "daytime": _daytime, "time": _time,
}


async def serve_stream(name: str, sock: AnySocket) -> None:
    """Serve the TCP flavour of service `name` on `sock`, a connected stream socket (an
    AF_UNIX socketpair end), until it is done; `sock` is closed on return.

    Raises ValueError for a name not in SERVICE_NAMES (the socket is closed all the same), and
    Cancelled; a client's reset or close is a normal end."""
    plain = _plain(sock)
    serve = _STREAM_SERVICES.get(name)
    if serve is None:
        plain.close()
        raise ValueError(f"no such service: {name!r}")
    stream = LocalStream(plain)
    try:
        await serve(stream)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass  # the client reset or went away: nothing to tell anyone
    finally:
        stream.close_now()


# ---------------------------------------------------------------- UDP

Reply = Callable[[bytes], bytes | None]  # a datagram in, the answer (None: no answer)


def _chargen_replies() -> Reply:
    """RFC 864 over UDP: a random 0..512 characters of the pattern per datagram, each
    answer starting one line further on (no continuity between answers is promised)."""
    line = 0

    def reply(_: bytes) -> bytes:
        nonlocal line
        start = line * _LINE_LEN
        line = (line + 1) % len(_RING)
        return _CHARGEN_TWICE[start:start + random.randint(0, 512)]
    return reply


def _replies(name: str) -> Reply:
    if name == "echo":
        return lambda data: data  # RFC 862: the datagram back, unchanged
    if name == "discard":
        return lambda data: None  # RFC 863: nothing
    if name == "chargen":
        return _chargen_replies()
    if name == "daytime":
        return lambda data: daytime_line()  # RFC 867: the line, per datagram
    if name == "time":
        return lambda data: time_bytes()  # RFC 868: the four bytes, per datagram
    raise ValueError(f"no such service: {name!r}")


# The peer end is gone: over a socketpair that is the flow's end (no one else can send).
_PEER_GONE = (errno.ECONNREFUSED, errno.ENOTCONN, errno.EPIPE, errno.ECONNRESET)


async def serve_datagrams(name: str, sock: AnySocket, idle: float) -> None:
    """Serve the UDP flavour of service `name` on `sock`, a connected datagram socket (an
    AF_UNIX SOCK_DGRAM socketpair end), each datagram one UDP packet; `sock` is closed on
    return.

    Ends after `idle` seconds without a datagram, or when an answer finds the peer end
    closed. Linux tells a datagram socketpair nothing when its peer closes, so a flow
    that received nothing since (discard: ever) ends at `idle`: the exit should cancel
    this task when it ends the flow. An answer that does not fit in the peer's queue is
    dropped, as UDP would; the service never waits for room.

    Raises ValueError for a name not in SERVICE_NAMES (the socket is closed all the same), and
    Cancelled."""
    plain = _plain(sock)
    with plain:
        reply = _replies(name)
        plain.setblocking(False)
        deadline = trio.current_time() + idle
        while True:
            with trio.move_on_at(deadline) as waiting:
                await trio.lowlevel.wait_readable(plain)
            if waiting.cancelled_caught:
                return  # idle
            for _ in range(DATAGRAM_BATCH):
                try:
                    data = plain.recv(MAX_DATAGRAM)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    return  # nothing else can arrive on a broken socket
                deadline = trio.current_time() + idle
                answer = reply(data)
                if answer is None:
                    continue
                try:
                    plain.send(answer)
                except (BlockingIOError, InterruptedError):
                    pass  # the peer's queue is full: dropped
                except OSError as exc:
                    if exc.errno in _PEER_GONE:
                        return
                    # ENOBUFS and the like: dropped, the flow goes on
