"""The built-in services (RFC 862, 863, 864, 867, 868) on one end of a real socket pair.

Each test runs a service on one end, the way an exit will, and drives the other end as
a plain client would: half-closes, stops reading, closes early, floods datagrams. Every
wait is bounded by `trio.fail_after` and every loop by a count.
"""

from __future__ import annotations

import hashlib
import random
import re
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import trio

from gateway.security.policy import SERVICE_NAMES
from gateway.services import standard
from gateway.services.standard import (
    CHUNK,
    RFC868_EPOCH,
    daytime_line,
    is_service_target,
    serve_datagrams,
    serve_stream,
    service_name,
    time_bytes,
)

MiB = 1024 * 1024
TIMEOUT = 20  # a generous bound on any one exchange, on a busy 2-core machine


# ---------------------------------------------------------------- RFC 864, independently

# The RFC's example, verbatim: its first three lines.
RFC864_FIRST_LINES = [
    "!\"#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`abcdefgh",
    "\"#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`abcdefghi",
    "#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`abcdefghij",
]
# ... and one from the middle of it, where the ring wraps through "~" and the space.
RFC864_WRAP_LINE = "9:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`abcdefghijklmnopqrstuvwxyz{|}~ !"


def rfc864_line(n: int) -> bytes:
    """Line n (from 0) as the RFC's example orders the ring: "!" first, the space last."""
    ring = [chr(c) for c in range(33, 127)] + [" "]
    return ("".join(ring[(n + i) % 95] for i in range(72)) + "\r\n").encode()


def rfc864_stream(size: int) -> bytes:
    lines = b"".join(rfc864_line(n) for n in range(95))
    return (lines * (size // len(lines) + 1))[:size]


# ---------------------------------------------------------------- harness

class Service:
    """A service running as a task on one end of a socket pair, as an exit would run it."""

    def __init__(self) -> None:
        self.done = trio.Event()
        self.error: BaseException | None = None

    async def run(self, serve: Callable[[], Awaitable[None]]) -> None:
        try:
            await serve()
        except Exception as exc:  # recorded: a service must never raise
            self.error = exc
        finally:
            self.done.set()

    async def ended(self, within: float = 5.0) -> None:
        with trio.fail_after(within):
            await self.done.wait()
        assert self.error is None, f"the service raised {self.error!r}"


@asynccontextmanager
async def stream_service(name: str) -> AsyncIterator[tuple[trio.socket.SocketType, Service]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    service = Service()
    client = trio.socket.from_stdlib_socket(theirs)
    with client, trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(service.run, lambda: serve_stream(name, ours))
            yield client, service
            nursery.cancel_scope.cancel()


@asynccontextmanager
async def datagram_service(name: str, idle: float = 30.0
                           ) -> AsyncIterator[tuple[trio.socket.SocketType, Service]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    service = Service()
    client = trio.socket.from_stdlib_socket(theirs)
    with client, trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(service.run, lambda: serve_datagrams(name, ours, idle))
            yield client, service
            nursery.cancel_scope.cancel()


async def send_all(sock: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[await sock.send(view):]


async def read_to_eof(sock: trio.socket.SocketType, limit: int = 64 * MiB) -> bytes:
    """Everything until the peer's FIN (no more than `limit`: a bound, not an expectation)."""
    got = bytearray()
    while len(got) <= limit:
        data = await sock.recv(CHUNK)
        if not data:
            return bytes(got)
        got += data
    raise AssertionError(f"more than {limit} bytes and still no EOF")


async def read_exactly(sock: trio.socket.SocketType, size: int) -> bytes:
    got = bytearray()
    while len(got) < size:
        data = await sock.recv(min(CHUNK, size - len(got)))
        assert data, f"EOF after {len(got)} of {size} bytes"
        got += data
    return bytes(got)


# ---------------------------------------------------------------- target names

@pytest.mark.parametrize(("host", "name"), [
    ("service:echo", "echo"), ("service:discard", "discard"), ("service:chargen", "chargen"),
    ("service:daytime", "daytime"), ("service:time", "time"),
    ("service:ECHO", None), ("Service:echo", None), ("service:echo ", None), ("service:", None),
    ("service:ntp", None), ("echo", None), ("xservice:echo", None), ("service:echo:7", None),
    ("example.com", None), ("", None),
])
def test_service_targets_are_exact_lower_case_names(host: str, name: str | None) -> None:
    assert service_name(host) == name
    assert is_service_target(host) is (name is not None)


def test_the_five_services() -> None:
    assert frozenset({"echo", "discard", "chargen", "daytime", "time"}) == SERVICE_NAMES


async def test_an_unknown_service_is_refused_and_its_socket_closed() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with theirs, pytest.raises(ValueError, match="qotd"):
        await serve_stream("qotd", ours)
    assert ours.fileno() == -1
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with theirs, pytest.raises(ValueError, match="qotd"):
        await serve_datagrams("qotd", ours, 1.0)
    assert ours.fileno() == -1


# ---------------------------------------------------------------- echo, TCP

async def test_echo_round_trips_megabytes_then_half_closes() -> None:
    """The client writes 8 MiB while reading, half-closes, and gets every byte back then FIN."""
    payload = random.Random(862).randbytes(8 * MiB)
    async with stream_service("echo") as (client, service):
        got = hashlib.sha256()
        count = 0

        async def write() -> None:
            await send_all(client, payload)
            client.shutdown(socket.SHUT_WR)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(write)
            for _ in range(16 * MiB):  # bounded; ends at the FIN
                data = await client.recv(CHUNK)
                if not data:
                    break
                got.update(data)
                count += len(data)
        assert count == len(payload)
        assert got.hexdigest() == hashlib.sha256(payload).hexdigest()
        await service.ended()
        assert await client.recv(1) == b""  # FIN, and the service closed cleanly: no reset


async def test_echo_keeps_half_close() -> None:
    async with stream_service("echo") as (client, service):
        await send_all(client, b"hello\r\n")
        client.shutdown(socket.SHUT_WR)
        assert await read_to_eof(client) == b"hello\r\n"
        await service.ended()


async def test_echo_stops_reading_when_the_client_stops_reading() -> None:
    """Backpressure: a client that writes without reading stalls after the socket buffers
    and one chunk; nothing is lost, and the echo resumes when it reads."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    buffers = sum(s.getsockopt(socket.SOL_SOCKET, opt) for s in (ours, theirs)
                  for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF))
    service = Service()
    theirs.setblocking(False)
    chunk = random.Random(7).randbytes(CHUNK)
    written = stalls = 0
    with theirs, trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(service.run, lambda: serve_stream("echo", ours))
            for _ in range(10_000):  # 625 MiB at most: far more than any bounded buffer
                try:
                    written += theirs.send(chunk[written % CHUNK:])
                    stalls = 0
                except BlockingIOError:
                    stalls += 1
                    if stalls == 20:  # a second of nothing accepted: stalled
                        break
                    await trio.sleep(0.05)
            assert stalls == 20, f"wrote {written} bytes and the echo never pushed back"
            assert written <= buffers + 2 * CHUNK, f"{written} bytes taken: the echo buffers them"
            assert not service.done.is_set()

            client = trio.socket.from_stdlib_socket(theirs)
            back = await read_exactly(client, written)
            assert back == (chunk * (written // CHUNK + 1))[:written]
            client.shutdown(socket.SHUT_WR)
            assert await read_to_eof(client) == b""
            await service.ended()


async def test_echo_ends_quietly_when_the_client_goes_away() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    service = Service()
    theirs.setblocking(False)
    with trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(service.run, lambda: serve_stream("echo", ours))
            # As much as the buffers take, never reading: the service is left blocked in
            # a write, which the close then breaks (EPIPE).
            for _ in range(1000):
                try:
                    theirs.send(bytes(CHUNK))
                except BlockingIOError:
                    break
                await trio.sleep(0)
            await trio.sleep(0.2)
            assert not service.done.is_set()
            theirs.close()
            await service.ended()


# ---------------------------------------------------------------- discard, TCP

async def test_discard_reads_everything_and_answers_nothing() -> None:
    async with stream_service("discard") as (client, service):
        # 16 MiB without reading anything: the service keeps reading, nothing stalls.
        await send_all(client, bytes(16 * MiB))
        client.shutdown(socket.SHUT_WR)
        assert await read_to_eof(client) == b""  # FIN only
        await service.ended()


# ---------------------------------------------------------------- chargen, TCP

async def test_chargen_sends_the_rfc864_pattern() -> None:
    async with stream_service("chargen") as (client, service):
        data = await read_exactly(client, 3 * 95 * 74 + 100)  # three turns of the ring and a bit
        lines = data.split(b"\r\n")
        assert [line.decode() for line in lines[:3]] == RFC864_FIRST_LINES
        assert lines[:285] == [rfc864_line(n)[:-2] for n in range(285)]
        assert RFC864_WRAP_LINE.encode() in lines
        assert all(len(line) == 72 for line in lines[:-1])
        assert data == rfc864_stream(len(data))
        assert not service.done.is_set()


async def test_chargen_runs_as_fast_as_the_client_reads_and_stops_when_it_closes() -> None:
    async with stream_service("chargen") as (client, service):
        data = await read_exactly(client, 8 * MiB)
        assert data == rfc864_stream(len(data))  # big writes, and still one unbroken pattern
        client.close()
        await service.ended()


async def test_chargen_goes_on_after_the_client_half_closes() -> None:
    """A half-close ends what the client sends, not what it receives (RFC 864: until the
    caller terminates the connection)."""
    async with stream_service("chargen") as (client, service):
        await send_all(client, b"ignored input\r\n" * 1000)
        client.shutdown(socket.SHUT_WR)
        data = await read_exactly(client, 2 * MiB)
        assert data == rfc864_stream(len(data))
        assert not service.done.is_set()
        client.close()
        await service.ended()


async def test_chargen_drops_what_the_client_sends() -> None:
    """Input is read and dropped, so a client writing a lot never stalls."""
    async with stream_service("chargen") as (client, service):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send_all, client, bytes(8 * MiB))
            await read_exactly(client, 1 * MiB)
        client.close()
        await service.ended()


# ---------------------------------------------------------------- daytime and time, TCP

_DAYTIME = re.compile(r"([A-Z][a-z]+day), ([A-Z][a-z]+) (\d{1,2}), (\d{4}) (\d\d:\d\d:\d\d)-UTC\r\n")


def parse_daytime(line: bytes) -> datetime:
    match = _DAYTIME.fullmatch(line.decode("ascii"))
    assert match, f"not an RFC 867 line: {line!r}"
    weekday, month, day, year, clock = match.groups()
    when = datetime.strptime(f"{month} {day} {year} {clock}", "%B %d %Y %H:%M:%S").replace(tzinfo=UTC)
    assert when.strftime("%A") == weekday
    return when


def test_daytime_line_format() -> None:
    when = datetime(2026, 12, 6, 4, 0, 0, tzinfo=UTC).timestamp()
    assert daytime_line(when) == b"Sunday, December 6, 2026 04:00:00-UTC\r\n"
    assert parse_daytime(daytime_line(0)) == datetime(1970, 1, 1, tzinfo=UTC)


def test_time_counts_from_1900_and_wraps_in_2036() -> None:
    assert time_bytes(0) == struct.pack("!I", 2_208_988_800)  # RFC 868's own examples
    assert time_bytes(datetime(1983, 5, 1, tzinfo=UTC).timestamp()) == struct.pack("!I", 2_629_584_000)
    wrap = datetime(2036, 2, 7, 6, 28, 16, tzinfo=UTC).timestamp()
    assert time_bytes(wrap - 1) == b"\xff\xff\xff\xff"
    assert time_bytes(wrap) == b"\x00\x00\x00\x00"


async def test_daytime_answers_today_then_fin() -> None:
    async with stream_service("daytime") as (client, service):
        line = await read_to_eof(client)
        now = datetime.now(UTC)
        when = parse_daytime(line)
        assert abs(now - when) < timedelta(seconds=5)
        assert when.date() in {now.date(), (now - timedelta(seconds=5)).date()}
        client.close()
        await service.ended()


async def test_time_answers_four_bytes_then_fin() -> None:
    async with stream_service("time") as (client, service):
        answer = await read_to_eof(client)
        assert len(answer) == 4
        (seconds,) = struct.unpack("!I", answer)
        expected = (time.time() + RFC868_EPOCH) % 2**32
        assert abs(seconds - expected) <= 2
        client.close()
        await service.ended()


async def test_daytime_with_input_closes_cleanly() -> None:
    """A client that typed something first still gets the line and a FIN, not a reset
    (the service drains input before closing), and the service ends when it closes."""
    async with stream_service("daytime") as (client, service):
        await send_all(client, b"what time is it?\r\n")
        await trio.sleep(0.1)  # the service has answered and holds unread input
        parse_daytime(await read_to_eof(client))
        await send_all(client, b"more after the FIN\r\n")
        client.shutdown(socket.SHUT_WR)
        await service.ended(within=2)
        assert await client.recv(1) == b""  # no ECONNRESET


async def test_daytime_lingers_no_longer_than_linger(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(standard, "LINGER", 0.3)
    async with stream_service("time") as (client, service):
        started = trio.current_time()
        assert len(await read_to_eof(client)) == 4
        await service.ended(within=3)  # the client never closes: the service does
        assert trio.current_time() - started >= 0.25


async def test_trio_sockets_are_accepted_too() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with theirs, trio.fail_after(TIMEOUT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_stream, "time", trio.socket.from_stdlib_socket(ours))
            client = trio.socket.from_stdlib_socket(theirs)
            assert len(await read_to_eof(client)) == 4
            client.close()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    service_end = trio.socket.from_stdlib_socket(ours)
    with theirs, service_end, trio.fail_after(TIMEOUT):  # closing it after the service: harmless
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_datagrams, "time", service_end, 0.2)
            client = trio.socket.from_stdlib_socket(theirs)
            assert len(await exchange(client, b"")) == 4


# ---------------------------------------------------------------- UDP

async def exchange(client: trio.socket.SocketType, datagram: bytes) -> bytes:
    await client.send(datagram)
    return await client.recv(65535)


async def receive_within(client: trio.socket.SocketType, within: float = 0.3) -> bytes | None:
    """The next datagram, or None if none comes within `within` seconds."""
    with trio.move_on_after(within):
        return await client.recv(65535)
    return None


async def test_udp_echo_returns_each_datagram_unchanged() -> None:
    sizes = [0, 1, 72, 512, 1400, 9000, 65000]
    rng = random.Random(862)
    async with datagram_service("echo") as (client, _):
        for size in sizes:
            datagram = rng.randbytes(size)
            assert await exchange(client, datagram) == datagram
        burst = [rng.randbytes(size) for size in sizes]
        for datagram in burst:
            await client.send(datagram)
        assert [await client.recv(65535) for _ in burst] == burst  # whole, one each, in order


async def test_udp_discard_answers_nothing() -> None:
    async with datagram_service("discard", idle=5) as (client, service):
        for _ in range(20):
            await client.send(b"x" * 100)
        assert await receive_within(client) is None
        assert not service.done.is_set()


async def test_udp_chargen_answers_a_random_length_of_the_pattern() -> None:
    pattern = rfc864_stream(2 * 95 * 74)
    line_starts = {pattern[n * 74:n * 74 + 512] for n in range(95)}
    async with datagram_service("chargen") as (client, _):
        answers = [await exchange(client, b"") for _ in range(60)]
    assert all(len(a) <= 512 for a in answers)
    assert len({len(a) for a in answers}) > 10  # random lengths
    for answer in answers:
        assert any(start.startswith(answer) for start in line_starts), answer[:80]


async def test_udp_daytime_and_time_answer_each_datagram() -> None:
    async with datagram_service("daytime") as (client, _):
        for _ in range(3):
            when = parse_daytime(await exchange(client, b"?"))
            assert abs(datetime.now(UTC) - when) < timedelta(seconds=5)
    async with datagram_service("time") as (client, _):
        for _ in range(3):
            (seconds,) = struct.unpack("!I", await exchange(client, b""))
            assert abs(seconds - (time.time() + RFC868_EPOCH) % 2**32) <= 2


async def test_udp_flow_ends_after_idle_and_not_before() -> None:
    async with datagram_service("echo", idle=0.4) as (client, service):
        last = trio.current_time()
        for _ in range(8):  # 0.8 s of traffic, a datagram every 0.1 s: never idle
            await trio.sleep(0.1)
            assert await exchange(client, b"ping") == b"ping"
            last = trio.current_time()
        assert not service.done.is_set()
        await service.ended(within=3)
        assert trio.current_time() - last >= 0.35


async def test_udp_flow_ends_when_an_answer_finds_the_peer_closed() -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    theirs.send(b"ping")
    theirs.close()
    with trio.fail_after(2):  # long before the idle timeout
        await serve_datagrams("echo", ours, idle=60)
    assert ours.fileno() == -1


async def test_udp_never_waits_for_a_client_that_does_not_read() -> None:
    """Answers that do not fit in the client's queue are dropped; the service goes on
    reading. (Were it to wait for room instead, the client's sends would stall too.)"""
    sent = 2000  # far more answers than a datagram socket's queue holds
    async with datagram_service("echo") as (client, service):
        for n in range(sent):
            await client.send(n.to_bytes(2, "big"))
        drained = []
        for _ in range(sent):
            answer = await receive_within(client)
            if answer is None:
                break
            drained.append(answer)
        assert 0 < len(drained) < sent, "nothing was dropped: the queue never filled"
        assert drained == sorted(drained)  # the survivors, in order
        assert not service.done.is_set()
        assert await exchange(client, b"still there?") == b"still there?"


# ---------------------------------------------------------------- a reference client

SOCAT = shutil.which("socat")


@asynccontextmanager
async def unix_listener(name: str) -> AsyncIterator[str]:
    """A UNIX socket serving `name` to one client: socat's way in."""
    with tempfile.TemporaryDirectory(prefix="tg-svc-") as folder:
        path = str(Path(folder) / "s")
        listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with listener:
            await listener.bind(path)
            listener.listen(1)

            async def serve_one() -> None:
                conn, _ = await listener.accept()
                await serve_stream(name, conn)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(serve_one)
                yield path


@pytest.mark.skipif(SOCAT is None, reason="socat is not installed")
async def test_socat_echo_and_daytime() -> None:
    assert SOCAT is not None
    payload = random.Random(1).randbytes(2 * MiB)
    with trio.fail_after(TIMEOUT):
        async with unix_listener("echo") as path:
            # socat half-closes at the end of its stdin and waits (-t) for the echo's FIN.
            done = await trio.run_process([SOCAT, "-t", "15", "-", f"UNIX-CONNECT:{path}"],
                                          stdin=payload, capture_stdout=True)
        assert hashlib.sha256(done.stdout).digest() == hashlib.sha256(payload).digest()
        async with unix_listener("daytime") as path:
            done = await trio.run_process([SOCAT, "-u", f"UNIX-CONNECT:{path}", "-"],
                                          capture_stdout=True)
        parse_daytime(done.stdout)


@pytest.mark.skipif(SOCAT is None, reason="socat is not installed")
async def test_socat_chargen_until_it_goes_away() -> None:
    assert SOCAT is not None
    wanted = 100 * 74
    with trio.fail_after(TIMEOUT):
        async with unix_listener("chargen") as path:
            process = await trio.lowlevel.open_process([SOCAT, "-u", f"UNIX-CONNECT:{path}", "-"],
                                                       stdout=subprocess.PIPE)
            assert process.stdout is not None
            try:
                got = bytearray()
                for _ in range(wanted):  # bounded: each read brings at least a byte
                    if len(got) >= wanted:
                        break
                    got += await process.stdout.receive_some(CHUNK)
                assert bytes(got[:wanted]) == rfc864_stream(wanted)
            finally:
                process.kill()  # the client goes away; leaving unix_listener waits for the service
                await process.wait()
                await process.stdout.aclose()
