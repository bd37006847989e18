"""``tunnelgate bench``: throughput, latency, session rate and UDP loss through a tunnel,
measured against the far gateway's built-in services.

The command runs this config's gateway in its own process as a client only (no carrier
or admin listener, ``max_circuits = 0``, every peer allowed nothing) with four tunnels of
its own on loopback ports, and drives them with plain sockets. So what it measures is
the whole path a client's bytes take (local socket, entry, carriers and relays, the
exit's service, and back), with nothing to set up on the far side but ``service:*`` in
its ``allow`` list. Every phase runs for ``--duration`` seconds, one after the other.
"""

from __future__ import annotations

import json
import logging
import math
import socket
import statistics
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import trio
from pydantic import BaseModel
from tqdm import tqdm

from gateway.app import Gateway, sole_exception
from gateway.config import NAME_RE, Config, TunnelConfig, load_config
from gateway.errors import ConfigError, TunnelgateError

log = logging.getLogger("tunnelgate.bench")

M = TypeVar("M", bound=BaseModel)

PHASES = ("latency", "sessions", "upload", "download", "udp")
SAMPLE_INTERVAL = 0.1  # s per throughput sample (the plot's resolution)
LATENCY_PAYLOAD = 64
CHUNK = 256 * 1024  # bytes per send or receive in the throughput phases
OP_TIMEOUT = 10.0  # s one send, receive or connect may take before the phase fails
DRAIN_TIMEOUT = 30.0  # s the upload's bytes in flight get to reach service:discard
UDP_GRACE = 1.0  # s echoes are waited for after the last datagram
UDP_SEQ = 8  # bytes of sequence number at the start of each datagram
READY_TIMEOUT = 10.0  # s the in-process gateway gets to bind its tunnels
PROBE_GRACE = 5.0  # s beyond handshake_timeout the first echo may take
MAX_ROUND_TRIPS = 1_000_000  # per phase: every loop stops at a count as well as a deadline
MAX_SESSIONS = 1_000_000
MAX_SESSION_FAILURES = 100
MAX_UDP_ERRORS = 10_000
MB = 1e6  # decimal: MB/s x 8 = Mbit/s


class BenchError(TunnelgateError):
    """The bench could not measure: no carrier, the session refused, a phase stalled."""


class BenchInterrupted(BenchError):
    """SIGINT or SIGTERM while measuring (the in-process gateway caught it and drained)."""


@dataclass(frozen=True)
class BenchOptions:
    """The command line, checked (argparse bounds the numbers)."""

    config: Path
    via: list[str]
    duration: float = 5.0
    end_to_end: bool = False
    concurrency: int = 1
    udp_rate: int = 1000
    udp_size: int = 512
    json_file: Path | None = None
    plot_file: Path | None = None


# ------------------------------------------------------------------ results


@dataclass
class Series:
    """Bytes per SAMPLE_INTERVAL since `start` (perf_counter): the plot's throughput curve.
    Grows by one slot per interval elapsed, so it is bounded by the phase's length."""

    start: float = field(default_factory=time.perf_counter)
    counts: list[int] = field(default_factory=list)
    last: float = 0.0  # when the latest bytes were counted

    def add(self, nbytes: int, now: float) -> None:
        slot = max(0, int((now - self.start) / SAMPLE_INTERVAL))
        if slot >= len(self.counts):
            self.counts.extend([0] * (slot + 1 - len(self.counts)))
        self.counts[slot] += nbytes
        self.last = now

    def rates(self) -> list[tuple[float, float]]:
        """(seconds into the phase, MB/s) per sample; the last one over the part of its
        interval that was measured (left out if that is too short to mean anything)."""
        points = [((i + 1) * SAMPLE_INTERVAL, n / SAMPLE_INTERVAL / MB) for i, n in enumerate(self.counts)]
        if points:
            width = self.last - self.start - (len(points) - 1) * SAMPLE_INTERVAL
            points.pop()
            if width >= SAMPLE_INTERVAL / 4:
                points.append((self.last - self.start, self.counts[-1] / width / MB))
        return points


@dataclass
class Throughput:
    nbytes: int = 0
    seconds: float = 0.0
    samples: Series = field(default_factory=Series)

    @property
    def mb_per_s(self) -> float:
        return self.nbytes / self.seconds / MB if self.seconds > 0 else 0.0


@dataclass
class Latency:
    rtts: list[float] = field(default_factory=list)  # seconds, in the order measured

    @property
    def median_ms(self) -> float:
        return statistics.median(self.rtts) * 1000 if self.rtts else 0.0

    @property
    def p99_ms(self) -> float:
        """Nearest rank: the smallest sample at or above 99% of them."""
        if not self.rtts:
            return 0.0
        ordered = sorted(self.rtts)
        return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)] * 1000


@dataclass
class Sessions:
    count: int = 0
    failed: int = 0
    seconds: float = 0.0

    @property
    def per_s(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else 0.0


@dataclass
class UdpLoss:
    sent: int = 0
    received: int = 0
    send_errors: int = 0
    send_seconds: float = 0.0

    @property
    def loss(self) -> float:
        return 1 - self.received / self.sent if self.sent else 1.0


@dataclass
class Results:
    latency: Latency = field(default_factory=Latency)
    sessions: Sessions = field(default_factory=Sessions)
    upload: Throughput = field(default_factory=Throughput)
    download: Throughput = field(default_factory=Throughput)
    udp: UdpLoss = field(default_factory=UdpLoss)


# ------------------------------------------------------------------ the bench gateway's config


def _replace(model: M, **changes: Any) -> M:
    """``model_copy(update=...)`` without what the original cached: a copy keeps a
    computed ``PeerConfig.policy`` of the old ``allow`` list."""
    fields = {name: getattr(model, name) for name in type(model).model_fields}
    return type(model).model_construct(model.model_fields_set | changes.keys(), **(fields | changes))


def bench_config(config: Config, via: list[str], end_to_end: bool) -> Config:
    """This config as a client-only gateway whose only tunnels are the bench's: it must not
    serve anyone (it shares the config's identity with a gateway that may be running)."""

    def fail(message: str, key: str = "bench --via") -> ConfigError:
        return ConfigError(str(config.path), key, message)

    for name in via:
        if not NAME_RE.match(name):
            raise fail(f"{name!r} is not a gateway name (1-63 letters, digits, '.', '_' or '-')")
    first = config.peer_named(via[0])
    if first is None or not first.dial:
        dialed = ", ".join(p.name for p in config.peer if p.dial) or "none"
        raise fail(f"{via[0]} is not dialed by this config (no [[peer]] dial; dialed peers: {dialed})")
    for i, hop in enumerate(via):
        if hop == config.gateway.name:
            raise fail(f"{hop} is this gateway itself: the route would loop")
        if hop in via[:i]:
            raise fail(f"{hop} appears twice: the route would loop")
    if len(via) > config.gateway.max_route_length:
        raise fail(f"{len(via)} hops, more than gateway.max_route_length ({config.gateway.max_route_length})")
    if end_to_end and config.peer_named(via[-1]) is None:
        raise fail(f"needs the exit gateway {via[-1]} declared as a [[peer]] (with its cert or"
                   " fingerprint) so its identity can be verified", key="bench --end-to-end")
    context = {"base_dir": config.path.parent}
    tunnels = [
        TunnelConfig.model_validate({"name": f"bench-{kind}-{service}", "listen": f"{kind}://127.0.0.1:0",
                                     "via": list(via), "target": f"service:{service}",
                                     "end_to_end": end_to_end}, context=context)
        for kind, service in (("tcp", "echo"), ("tcp", "discard"), ("tcp", "chargen"), ("udp", "echo"))
    ]
    gateway = _replace(config.gateway, listen=[], admin=None, max_circuits=0)
    peers = [_replace(peer, allow=[], route=[]) for peer in config.peer]
    return config.model_copy(update={"gateway": gateway, "peer": peers, "tunnel": tunnels})


# ------------------------------------------------------------------ progress and logging


class _Progress:
    """One bar over every phase (seconds of measuring), on stderr when it is a terminal;
    the phase's live figure beside it."""

    def __init__(self, duration: float) -> None:
        self.duration = duration
        self.bar = tqdm(total=len(PHASES) * duration, unit="s", disable=None, leave=False, file=sys.stderr,
                        bar_format="{desc:<9} {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}")
        self.index = -1
        self.since = time.perf_counter()
        self.status: Callable[[], str] = str
        self.bar.set_description_str("starting")  # dialing via[0] and the first echo

    def phase(self, name: str, status: Callable[[], str]) -> None:
        if self.bar.disable:
            return
        self.index = PHASES.index(name)
        self.since = time.perf_counter()
        self.status = status
        self.bar.set_description_str(name, refresh=False)

    def tick(self) -> None:
        if self.bar.disable or self.index < 0:
            return
        elapsed = min(time.perf_counter() - self.since, self.duration)
        self.bar.n = round(self.index * self.duration + elapsed, 2)
        self.bar.set_postfix_str(self.status(), refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


class _LogHandler(logging.Handler):
    """The in-process gateway's warnings: held while the first echo is tried (a failed
    dial or a refusal there is the one-line error we print), written above the bar after."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        self.holding = True
        self.held: deque[str] = deque(maxlen=32)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if self.holding:
                self.held.append(record.getMessage())
            else:
                tqdm.write(self.format(record), file=sys.stderr)
        except Exception:
            self.handleError(record)

    def last(self, marker: str = "", exclude: str | None = None) -> str | None:
        """The latest held line with `marker` in it (and not `exclude`)."""
        return next((line for line in reversed(self.held)
                     if marker in line and (exclude is None or exclude not in line)), None)


def _setup_logging() -> _LogHandler:
    handler = _LogHandler()
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    return handler


# ------------------------------------------------------------------ sockets


Address = tuple[str, int]


async def _connect(address: Address) -> trio.socket.SocketType:
    sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


async def _send_all(sock: trio.socket.SocketType, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:  # each send takes at least one byte
        view = view[await sock.send(view):]


async def _receive_exactly(sock: trio.socket.SocketType, buf: bytearray, size: int) -> None:
    view = memoryview(buf)[:size]
    while view:  # each receive takes at least one byte, or ends the loop with an error
        n = await sock.recv_into(view)
        if n == 0:
            raise BenchError("bench: service:echo closed the session early")
        view = view[n:]


def _closed_by_far_side(exc: BaseException) -> bool:
    return isinstance(exc, (ConnectionResetError, BrokenPipeError, BenchError))


# ------------------------------------------------------------------ the run


async def _wait_ready(path: Path) -> dict[str, Any]:
    with trio.fail_after(READY_TIMEOUT):
        # A bounded poll of one file the gateway writes once (atomically) at start-up.
        while not await trio.Path(path).exists():  # noqa: ASYNC110
            await trio.sleep(0.02)
    ready: dict[str, Any] = json.loads(await trio.Path(path).read_text())
    return ready


async def _first_echo(address: Address, gateway: Gateway, options: BenchOptions, logs: _LogHandler) -> None:
    """Retry one echo until it comes back: the carrier to via[0] may take a few dials.
    A refusal (the session's circuit ended with OPEN_FAIL at some hop) is final."""
    budget = gateway.config.gateway.handshake_timeout + PROBE_GRACE
    deadline = trio.current_time() + budget
    buf = bytearray(1)
    for _ in range(1000):  # and the deadline
        try:
            with trio.fail_at(deadline):
                sock = await _connect(address)
                with sock:
                    await _send_all(sock, b"?")
                    await _receive_exactly(sock, buf, 1)
                return
        except trio.TooSlowError:
            break
        except OSError as exc:
            if not _closed_by_far_side(exc):
                raise BenchError(f"bench: cannot reach the bench's own tunnel at {address}: {exc}") from exc
        except BenchError:
            pass
        await trio.sleep(0.2)  # the refusal is counted as its circuit ends, after the client's reset
        if gateway.peers.current(options.via[0]) is None and trio.current_time() < deadline:
            continue  # the entry gave up waiting for a carrier (NO_ROUTE): dials go on
        if gateway.sessions.refusals:
            line = logs.last(": refused: ") or ""
            reason = line.partition(": refused: ")[2] or ", ".join(gateway.sessions.refusals)
            hint = "; is service:* allowed for this gateway on the far side?" if (
                "FORBIDDEN_TARGET" in reason) else ""
            raise BenchError(f"bench: the session to service:echo via {','.join(options.via)} was refused"
                             f" ({reason}){hint}")
    last = logs.last(exclude="tunnel bench-")  # why the carrier is not up, not that sessions failed
    why = f" (last: {last})" if last else ""
    if gateway.peers.current(options.via[0]) is None:
        raise BenchError(f"bench: no carrier to {options.via[0]} came up within {budget:g} s{why}")
    raise BenchError(f"bench: no echo from service:echo via {','.join(options.via)} within {budget:g} s"
                     f"{why}; is service:* allowed for this gateway on the far side?")


async def _latency(address: Address, duration: float, result: Latency, progress: _Progress) -> None:
    """Sequential 64-byte echoes on one session: each sample is one round trip."""
    progress.phase("latency", lambda: f"{len(result.rtts)} round trips, median {result.median_ms:.3f} ms"
                   if result.rtts else "")
    payload, buf = bytes(range(LATENCY_PAYLOAD)), bytearray(LATENCY_PAYLOAD)
    with await _connect(address) as sock:
        end = time.perf_counter() + duration
        # The last round trip completes (nothing in flight at the close, so the session ends
        # cleanly); each is bounded on its own.
        while len(result.rtts) < MAX_ROUND_TRIPS and (start := time.perf_counter()) < end:
            try:
                with trio.fail_after(OP_TIMEOUT):
                    await _send_all(sock, payload)
                    await _receive_exactly(sock, buf, LATENCY_PAYLOAD)
            except trio.TooSlowError:
                raise BenchError(f"bench: latency: no echo within {OP_TIMEOUT:g} s") from None
            result.rtts.append(time.perf_counter() - start)
            if buf != payload:
                raise BenchError("bench: service:echo answered other bytes than it was sent")


async def _sessions(address: Address, duration: float, concurrency: int, result: Sessions,
                    progress: _Progress) -> None:
    """Open, echo one byte, close, as fast as `concurrency` clients can, each in turn."""
    progress.phase("sessions", lambda: f"{result.count} sessions")
    start = time.perf_counter()
    end = start + duration

    async def client() -> None:
        """Sessions in turn until the deadline; the last one completes (no reset at the end)."""
        buf = bytearray(1)
        while result.count < MAX_SESSIONS and time.perf_counter() < end:
            try:
                with trio.fail_after(OP_TIMEOUT):
                    with await _connect(address) as sock:
                        await _send_all(sock, b"s")
                        await _receive_exactly(sock, buf, 1)
                result.count += 1
            except (OSError, BenchError, trio.TooSlowError) as exc:
                result.failed += 1
                if result.failed >= MAX_SESSION_FAILURES:
                    raise BenchError(f"bench: {result.failed} sessions failed (last: {exc})") from exc
                await trio.sleep(0.01)

    async with trio.open_nursery() as nursery:
        for _ in range(concurrency):
            nursery.start_soon(client)
    result.seconds = time.perf_counter() - start


async def _upload(address: Address, duration: float, result: Throughput, progress: _Progress) -> None:
    """Send to service:discard for `duration`, then half-close and wait for its FIN: the
    time counted includes what was still in flight."""
    progress.phase("upload", lambda: _live_rate(result))
    chunk = memoryview(bytes(range(256)) * (CHUNK // 256))
    with await _connect(address) as sock:
        result.samples = series = Series()
        end = series.start + duration
        with trio.move_on_at(trio.current_time() + duration):
            for _ in range(1 << 40):  # the deadline ends it
                sent = await sock.send(chunk)
                now = time.perf_counter()
                result.nbytes += sent
                series.add(sent, now)
                if now >= end:
                    break
        try:
            with trio.fail_after(DRAIN_TIMEOUT):
                sock.shutdown(socket.SHUT_WR)
                while await sock.recv(4096):  # discard sends nothing but its FIN
                    pass
        except trio.TooSlowError:
            raise BenchError(f"bench: upload: service:discard did not answer the FIN within"
                             f" {DRAIN_TIMEOUT:g} s") from None
        result.seconds = time.perf_counter() - series.start


async def _download(address: Address, duration: float, result: Throughput, progress: _Progress) -> None:
    """Read service:chargen for `duration`."""
    progress.phase("download", lambda: _live_rate(result))
    buf = bytearray(CHUNK)
    with await _connect(address) as sock:
        result.samples = series = Series()
        end = series.start + duration
        with trio.move_on_at(trio.current_time() + duration):
            for _ in range(1 << 40):  # the deadline ends it
                n = await sock.recv_into(buf)
                now = time.perf_counter()
                if n == 0:
                    raise BenchError("bench: download: service:chargen closed the session")
                result.nbytes += n
                series.add(n, now)
                if now >= end:
                    break
        result.seconds = time.perf_counter() - series.start


def _live_rate(result: Throughput) -> str:
    elapsed = time.perf_counter() - result.samples.start
    return f"{result.nbytes / elapsed / MB:.1f} MB/s" if result.nbytes and elapsed > 0 else ""


async def _udp(address: Address, options: BenchOptions, result: UdpLoss, progress: _Progress) -> None:
    """Datagrams numbered 0..N-1 at --udp-rate to UDP service:echo; each number echoed
    counts once. Echoes are awaited until UDP_GRACE after the last send."""
    progress.phase("udp", lambda: f"{result.sent} sent, {result.received} back")
    total = max(1, round(options.udp_rate * options.duration))
    padding = bytes(options.udp_size - UDP_SEQ)
    back: set[int] = set()
    all_back = trio.Event()
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)  # losses are the tunnel's, not ours
        await sock.connect(address)
        await _udp_warm_up(sock)

        async def receive() -> None:
            errors = 0
            while len(back) < total:
                try:
                    data = await sock.recv(65536)
                except OSError:  # ICMP errors of earlier sends
                    errors += 1
                    if errors > MAX_UDP_ERRORS:
                        return
                    continue
                seq = int.from_bytes(data[:UDP_SEQ], "big")
                if len(data) == options.udp_size and seq < total:
                    back.add(seq)
                    result.received = len(back)
            all_back.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive)
            start = time.perf_counter()
            stop = start + options.duration + 1.0  # a rate the sender cannot keep stops here
            for seq in range(total):
                now = time.perf_counter()
                if now > stop:
                    break
                due = start + seq / options.udp_rate
                if due > now:
                    await trio.sleep(due - now)
                try:
                    await sock.send(seq.to_bytes(UDP_SEQ, "big") + padding)
                    result.sent += 1
                except OSError:
                    result.send_errors += 1
            result.send_seconds = time.perf_counter() - start
            with trio.move_on_after(UDP_GRACE):
                await all_back.wait()
            nursery.cancel_scope.cancel()
    result.received = len(back)  # only numbers that were sent come back


async def _udp_warm_up(sock: trio.socket.SocketType) -> None:
    """One echo before counting, so the flow's circuit is open when the count starts."""
    marker = b"\xff" * UDP_SEQ + b"warm-up"
    for _ in range(3):
        try:
            await sock.send(marker)
            with trio.move_on_after(0.5):
                while await sock.recv(65536) != marker:
                    pass
                return
        except OSError:
            await trio.sleep(0.1)
    log.warning("bench: no UDP echo through the tunnel before counting (is udp service:echo allowed?)")


async def _measure(config: Config, options: BenchOptions, logs: _LogHandler) -> Results:
    gateway = Gateway(config)
    results = Results()
    progress = _Progress(options.duration)
    try:
        with tempfile.TemporaryDirectory(prefix="tunnelgate-bench-") as folder:
            ready_path = Path(folder) / "ready.json"
            async with trio.open_nursery() as nursery:

                async def serve() -> None:
                    await gateway.run(ready_path)
                    raise BenchInterrupted("bench: interrupted")  # it returns only on a signal

                async def watch() -> None:
                    for _ in range(1 << 40):  # until cancelled with the rest
                        if gateway.view.draining:
                            raise BenchInterrupted("bench: interrupted")
                        progress.tick()
                        await trio.sleep(0.1)

                nursery.start_soon(serve)
                ready = await _wait_ready(ready_path)
                ports = {name: ("127.0.0.1", int(where[1])) for name, where in ready["tunnels"].items()}
                await _first_echo(ports["bench-tcp-echo"], gateway, options, logs)
                logs.holding = False
                nursery.start_soon(watch)
                duration = options.duration
                await _latency(ports["bench-tcp-echo"], duration, results.latency, progress)
                await _sessions(ports["bench-tcp-echo"], duration, options.concurrency, results.sessions,
                                progress)
                await _upload(ports["bench-tcp-discard"], duration, results.upload, progress)
                await _download(ports["bench-tcp-chargen"], duration, results.download, progress)
                await _udp(ports["bench-udp-echo"], options, results.udp, progress)
                progress.tick()
                # As the gateway's own shutdown does: the UDP flow (open until its idle timeout)
                # ends with a reset, which the exit does not park for resumption as it would
                # a session whose carrier was lost.
                gateway.relay.end_all()
                for carrier in gateway.peers.carriers():
                    carrier.goaway("tunnelgate bench finished")
                    carrier.close("tunnelgate bench finished")
                nursery.cancel_scope.cancel()
    finally:
        progress.close()
    return results


# ------------------------------------------------------------------ output


def format_table(options: BenchOptions, results: Results) -> str:
    """Plain aligned text: what, how much, and the counts behind it."""
    up, down, lat, ses, udp = (results.upload, results.download, results.latency, results.sessions,
                               results.udp)

    def mbit(t: Throughput) -> str:
        return f"{t.mb_per_s * 8:.1f} Mbit/s"

    rows = [
        ("upload to service:discard", f"{up.mb_per_s:.2f} MB/s", mbit(up),
         f"{up.nbytes / MB:.1f} MB in {up.seconds:.2f} s (drain included)"),
        ("download from service:chargen", f"{down.mb_per_s:.2f} MB/s", mbit(down),
         f"{down.nbytes / MB:.1f} MB in {down.seconds:.2f} s"),
        ("latency median (64 B echo)", f"{lat.median_ms:.3f} ms", "", f"{len(lat.rtts)} round trips"),
        ("latency p99", f"{lat.p99_ms:.3f} ms", "", ""),
        ("new sessions (1 B echo)", f"{ses.per_s:.0f} sessions/s", "",
         f"{ses.count} in {ses.seconds:.2f} s, concurrency {options.concurrency}"
         + (f", {ses.failed} failed" if ses.failed else "")),
        (f"UDP loss at {options.udp_rate}/s ({options.udp_size} B)", f"{udp.loss * 100:.2f} %", "",
         f"{udp.sent} sent, {udp.received} echoed" + (f", {udp.send_errors} send errors"
                                                      if udp.send_errors else "")),
    ]
    head = (f"tunnelgate bench: {options.config} via {','.join(options.via)}"
            f"{' (end to end)' if options.end_to_end else ''}, {options.duration:g} s per phase")
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [head]
    for what, value, also, note in rows:
        lines.append(f"  {what:<{widths[0]}}  {value:>{widths[1]}}  {also:>{widths[2]}}  {note}".rstrip())
    return "\n".join(lines)


def results_json(options: BenchOptions, results: Results) -> dict[str, Any]:
    """Every number in the table, the samples behind them, and what was run."""
    from gateway.admin.view import VERSION

    def throughput(t: Throughput) -> dict[str, Any]:
        return {"bytes": t.nbytes, "seconds": t.seconds, "mb_per_s": t.mb_per_s, "mbit_per_s": t.mb_per_s * 8,
                "samples": {"interval": SAMPLE_INTERVAL, "bytes": t.samples.counts}}

    lat, ses, udp = results.latency, results.sessions, results.udp
    return {
        "tunnelgate_version": VERSION,
        "config": str(options.config),
        "via": options.via,
        "end_to_end": options.end_to_end,
        "duration": options.duration,
        "upload": throughput(results.upload),
        "download": throughput(results.download),
        "latency": {"payload": LATENCY_PAYLOAD, "round_trips": len(lat.rtts), "median_ms": lat.median_ms,
                    "p99_ms": lat.p99_ms, "min_ms": min(lat.rtts, default=0) * 1000,
                    "max_ms": max(lat.rtts, default=0) * 1000,
                    "samples_ms": [round(rtt * 1000, 6) for rtt in lat.rtts]},
        "sessions": {"count": ses.count, "failed": ses.failed, "seconds": ses.seconds, "per_s": ses.per_s,
                     "concurrency": options.concurrency},
        "udp": {"rate": options.udp_rate, "size": options.udp_size, "sent": udp.sent,
                "received": udp.received, "send_errors": udp.send_errors, "send_seconds": udp.send_seconds,
                "loss": udp.loss},
    }


PLOT_MISSING = "--plot needs matplotlib: pip install 'tunnelgate[bench]'"


def plot_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_plot(options: BenchOptions, results: Results, path: Path) -> None:
    """Throughput over time (both directions, per SAMPLE_INTERVAL) and the latency histogram."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4.5), layout="constrained")
    rate, hist = figure.subplots(1, 2)
    for label, t in (("upload (to discard)", results.upload), ("download (from chargen)", results.download)):
        points = t.samples.rates()
        rate.plot([x for x, _ in points], [y for _, y in points], label=label)
    rate.set_xlabel("seconds into the phase")
    rate.set_ylabel(f"MB/s (per {SAMPLE_INTERVAL * 1000:.0f} ms)")
    rate.set_title("Throughput")
    rate.set_ylim(bottom=0)
    rate.legend()
    lat = results.latency
    ms = [rtt * 1000 for rtt in lat.rtts]
    top = lat.p99_ms * 3  # a few slow outliers would squeeze the rest into one bar
    slower = sum(1 for x in ms if x > top)
    hist.hist(ms, bins=60, range=(0, top) if ms else None)
    for value, style, name in ((lat.median_ms, "-", "median"), (lat.p99_ms, "--", "p99")):
        hist.axvline(value, color="black", linestyle=style, label=f"{name} {value:.3f} ms")
    hidden = f"; {slower} over {top:.2f} ms not shown" if slower else ""
    hist.set_xlabel(f"round trip (ms), 64 B echo{hidden}")
    hist.set_ylabel("round trips")
    hist.set_title("Latency")
    hist.legend()
    figure.suptitle(f"tunnelgate bench via {','.join(options.via)}")
    figure.savefig(path, format="png", dpi=100)


# ------------------------------------------------------------------ entry point


def run_bench(options: BenchOptions) -> int:
    """Load, check, measure, report. Config and usage mistakes raise ConfigError (exit 2)."""
    from gateway.process import tune_process

    def usage(message: str) -> int:
        print(f"tunnelgate: {message}", file=sys.stderr)
        return 2

    if options.plot_file is not None and not plot_available():
        return usage(PLOT_MISSING)
    for flag, out in (("--json", options.json_file), ("--plot", options.plot_file)):
        if out is not None and not out.parent.is_dir():
            return usage(f"bench {flag}: {out.parent} is not a folder")
    config = bench_config(load_config(options.config), options.via, options.end_to_end)
    logs = _setup_logging()
    tune_process()
    try:
        try:
            results = trio.run(_measure, config, options, logs)
        except BaseExceptionGroup as group:  # from inside nurseries: say the one that matters
            ours = group.subgroup(TunnelgateError)
            raise sole_exception(ours if ours is not None else group) from None
    except KeyboardInterrupt:
        return 130
    except BenchInterrupted as exc:
        print(f"tunnelgate: {exc}", file=sys.stderr)
        return 130
    print(format_table(options, results))
    try:
        if options.json_file is not None:
            options.json_file.write_text(json.dumps(results_json(options, results), indent=1) + "\n")
        if options.plot_file is not None:
            write_plot(options, results, options.plot_file)
    except OSError as exc:
        print(f"tunnelgate: bench: cannot write {exc.filename or 'the output'}: {exc.strerror or exc}",
              file=sys.stderr)
        return 1
    return 0
