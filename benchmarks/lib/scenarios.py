"""The measurements. Each scenario takes a started contender and returns {metric: value}.

Every loop is bounded by a count and a deadline; every socket operation has a timeout.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import socket
import statistics
import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass

from .contenders import Contender
from .procs import HOST, cpu_seconds, rss_bytes
from .targets import Targets

GB = 1e9
MIB = 1 << 20
OP_TIMEOUT = 5.0  # seconds for any single socket operation


class ScenarioError(RuntimeError):
    pass


@dataclass
class Settings:
    rounds: int = 3
    bulk_seconds: int = 5
    udp_seconds: int = 5
    fair_seconds: int = 5
    pingpong_n: int = 2000
    seq_sessions: int = 1000
    conc_workers: int = 50
    conc_per_worker: int = 40
    memory_counts: tuple[int, ...] = (1000, 10000)
    udp_bitrate: str = "0"  # iperf3 -b: 0 is unlimited

    @classmethod
    def quick(cls) -> Settings:
        return cls(rounds=2, bulk_seconds=1, udp_seconds=1, fair_seconds=1,
                   seq_sessions=300, conc_per_worker=10)


# ---- iperf3 -----------------------------------------------------------------------------


def iperf3(targets: Targets, port: int, seconds: int, *extra: str) -> dict:
    """One iperf3 client run (JSON); on any failure restart the server and raise."""
    argv = ["iperf3", "-c", HOST, "-p", str(port), "-J", "-t", str(max(1, int(seconds))),
            "--connect-timeout", "5000", *extra]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 20)
        data = json.loads(done.stdout or "{}")
    except (subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
        targets.restart_iperf()
        raise ScenarioError(f"iperf3 {' '.join(extra)}: {type(exc).__name__}") from exc
    if data.get("error") or done.returncode != 0 or "end" not in data:
        targets.restart_iperf()
        why = data.get("error") or done.stderr.strip() or f"exit {done.returncode}"
        raise ScenarioError(f"iperf3 {' '.join(extra)}: {why}")
    return data


def bulk(targets: Targets, c: Contender, streams: int, seconds: int) -> dict[str, float | None]:
    pids = c.relay_pids()
    cpu0 = cpu_seconds(pids)
    data = iperf3(targets, c.ports["iperf"], seconds, "-P", str(streams))
    cpu = cpu_seconds(pids) - cpu0
    received = data["end"]["sum_received"]
    gbytes = received["bytes"] / GB
    return {
        f"bulk{streams}_mbps": received["bits_per_second"] / 1e6,
        f"bulk{streams}_cpu_s_per_gb": cpu / gbytes if pids and gbytes > 0 else None,
    }


# A relay that buffers (every tunnel does) may still be delivering the tail of the
# previous unlimited-rate UDP test to the shared iperf3 server when the next test starts;
# iperf3 then takes a stale datagram for the new client's UDP "connect" and the new
# client waits forever. Letting the relays drain first avoids that artefact.
UDP_SETTLE_S = 0.5


def udp(targets: Targets, c: Contender, seconds: int,
        bitrate: str = "0") -> dict[str, float | None]:
    time.sleep(UDP_SETTLE_S)
    data = iperf3(targets, c.ports["iperf"], seconds, "-u", "-b", bitrate, "-l", "1400")
    received = data["end"]["sum_received"]
    return {"udp_mbps": received["bits_per_second"] / 1e6,
            "udp_loss_pct": received.get("lost_percent")}


# ---- latency and sessions ---------------------------------------------------------------


def _connect(port: int) -> socket.socket:
    s = socket.create_connection((HOST, port), timeout=OP_TIMEOUT)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _recv_exact(s: socket.socket, n: int) -> None:
    got = 0
    while got < n:
        chunk = s.recv(n - got)
        if not chunk:
            raise ScenarioError("connection closed by the far end")
        got += len(chunk)


def latency(c: Contender, n: int, deadline: float = 60.0) -> dict[str, float]:
    """64-byte ping-pong over one connection: median and p99 round trip in microseconds."""
    msg = os.urandom(64)
    rtts: list[int] = []
    with _connect(c.ports["echo"]) as s:
        for _ in range(50):  # warm-up: caches, windows, lazy allocations
            s.sendall(msg)
            _recv_exact(s, len(msg))
        stop = time.monotonic() + deadline
        for _ in range(n):
            t0 = time.perf_counter_ns()
            s.sendall(msg)
            _recv_exact(s, len(msg))
            rtts.append(time.perf_counter_ns() - t0)
            if time.monotonic() > stop:
                break
    rtts.sort()
    return {"lat_median_us": statistics.median(rtts) / 1000,
            "lat_p99_us": rtts[min(len(rtts) - 1, int(len(rtts) * 0.99))] / 1000}


def _one_session(port: int) -> None:
    with _connect(port) as s:
        s.sendall(b"x")
        _recv_exact(s, 1)


def sessions_sequential(c: Contender, count: int, deadline: float = 60.0) -> dict[str, float]:
    port, done, errors = c.ports["echo"], 0, 0
    t0 = time.monotonic()
    for _ in range(count):
        try:
            _one_session(port)
            done += 1
        except (OSError, ScenarioError):
            errors += 1
        if time.monotonic() - t0 > deadline:
            break
    _check_errors("sequential sessions", done, errors)
    return {"sess_seq_per_s": done / (time.monotonic() - t0)}


async def _async_session(port: int) -> None:
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        writer.write(b"x")
        await reader.readexactly(1)
    finally:
        writer.close()
        await writer.wait_closed()


async def _concurrent(port: int, workers: int, per_worker: int, deadline: float) -> tuple[int, int]:
    counts = [0, 0]  # done, errors

    async def worker() -> None:
        for _ in range(per_worker):
            try:
                await asyncio.wait_for(_async_session(port), OP_TIMEOUT)
                counts[0] += 1
            except (TimeoutError, OSError, asyncio.IncompleteReadError):
                counts[1] += 1

    tasks = [asyncio.create_task(worker()) for _ in range(workers)]
    _, pending = await asyncio.wait(tasks, timeout=deadline)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return counts[0], counts[1]


def sessions_concurrent(c: Contender, workers: int, per_worker: int,
                        deadline: float = 60.0) -> dict[str, float]:
    t0 = time.monotonic()
    done, errors = asyncio.run(_concurrent(c.ports["echo"], workers, per_worker, deadline))
    _check_errors("concurrent sessions", done, errors)
    return {"sess_conc50_per_s": done / (time.monotonic() - t0)}


def _check_errors(what: str, done: int, errors: int) -> None:
    if errors > max(1, (done + errors) // 100):
        raise ScenarioError(f"{what}: {errors} of {done + errors} failed")


# ---- fairness ---------------------------------------------------------------------------


def _fill_until_blocked(s: socket.socket, quiet: float = 1.0, limit_s: float = 10.0,
                        cap: int = 512 * MIB) -> tuple[int, bool]:
    """Send into a circuit whose far end never reads; return (bytes, blocked?)."""
    s.setblocking(False)
    chunk = b"\0" * 65536
    sent, last, start = 0, time.monotonic(), time.monotonic()
    while sent < cap and time.monotonic() - start < limit_s:
        try:
            sent += s.send(chunk)
            last = time.monotonic()
        except BlockingIOError:
            if time.monotonic() - last > quiet:
                return sent, True
            select.select([], [s], [], 0.1)
    return sent, False


def fairness(targets: Targets, c: Contender, seconds: int) -> dict[str, float | None]:
    """Bulk throughput of one circuit while a sibling circuit on the same carrier is stalled."""
    stalled = _connect(c.ports["stall"])
    try:
        buffered, blocked = _fill_until_blocked(stalled)
        if not blocked:
            raise ScenarioError(f"the stalled circuit never blocked ({buffered / MIB:.0f} MiB "
                                "accepted): no per-circuit flow control?")
        data = iperf3(targets, c.ports["iperf"], seconds, "-P", "1")
    finally:
        # RST, not FIN: drop what the relays still hold for the stalled target.
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        stalled.close()
    return {"fair_mbps": data["end"]["sum_received"]["bits_per_second"] / 1e6,
            "fair_stalled_mib": buffered / MIB}


# ---- memory -----------------------------------------------------------------------------


async def _open_circuits(port: int, n: int, keep: list, deadline: float) -> int:
    """Open ``n`` more echo-verified connections and keep them in ``keep``; return failures."""
    gate = asyncio.Semaphore(100)
    failures = [0]

    async def one() -> None:
        async with gate:
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(HOST, port),
                                                        OP_TIMEOUT * 2)
                writer.write(b"x")
                await asyncio.wait_for(reader.readexactly(1), OP_TIMEOUT * 2)
                keep.append(writer)
            except (TimeoutError, OSError, asyncio.IncompleteReadError):
                failures[0] += 1

    tasks = [asyncio.create_task(one()) for _ in range(n)]
    _, pending = await asyncio.wait(tasks, timeout=deadline)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    return failures[0] + len(pending)


async def _memory(c: Contender, counts: tuple[int, ...], log: Callable[[str], None]) -> dict:
    gateways = c.gateways()
    idle = {role: rss_bytes(p.pid) for role, p in gateways.items()}
    keep: list[asyncio.StreamWriter] = []
    out: dict[str, float | None] = {}
    try:
        for n in sorted(counts):
            t0 = time.monotonic()
            failed = await _open_circuits(c.ports["echo"], n - len(keep), keep, deadline=180)
            log(f"    {len(keep)} idle circuits open ({failed} failed) "
                f"in {time.monotonic() - t0:.1f} s")
            if failed > n // 100:
                raise ScenarioError(f"only {len(keep)} of {n} circuits opened")
            for role, proc in gateways.items():
                now, base = rss_bytes(proc.pid), idle.get(role)
                ok = now is not None and base is not None
                out[f"mem_{role}_{n}_b_per_circ"] = (now - base) / len(keep) if ok else None
    finally:
        for writer in keep:
            writer.transport.abort()
    return out


def memory(c: Contender, counts: tuple[int, ...], log: Callable[[str], None]) -> dict:
    """RSS growth per idle circuit of each gateway process, at each count."""
    return asyncio.run(_memory(c, counts, log))
