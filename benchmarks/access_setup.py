"""What naming the destination costs: new sessions per second through a fixed-target
tunnel, a SOCKS5 listener and an HTTP CONNECT listener, on the same gateways, in the
same run (issue 13).

Each session: connect, (the proxy handshake, as curl does it: SOCKS5 greeting, answer,
CONNECT request, answer; or the HTTP CONNECT request and its 200), one byte echoed,
close. The fixed tunnel sends its byte at once (the OPEN is optimistic); an access
listener must wait for the exit's OPEN_OK before it can answer. Rounds interleave the
three kinds, so machine noise hits them alike.

    python benchmarks/access_setup.py [--chain] [--rounds 3] [--count 2000] [--workers 50]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lib.contenders import Tunnelgate
from lib.procs import HOST, raise_nofile
from lib.targets import Targets

KINDS = ("fixed", "socks5", "http")
DEADLINE = 60.0


def _socks_request(port: int) -> bytes:
    return b"\x05\x01\x00\x01" + socket.inet_aton(HOST) + port.to_bytes(2, "big")


def _http_request(port: int) -> bytes:
    return f"CONNECT {HOST}:{port} HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode()


def _recv_exact(s: socket.socket, n: int) -> bytes:
    got = b""
    while len(got) < n:
        chunk = s.recv(n - len(got))
        if not chunk:
            raise ConnectionError("closed by the far end")
        got += chunk
    return got


def _recv_head(s: socket.socket) -> bytes:
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        chunk = s.recv(1)
        if not chunk:
            raise ConnectionError("closed by the far end")
        head += chunk
    return head


def one_session(kind: str, port: int, target: int) -> None:
    with socket.create_connection((HOST, port), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if kind == "socks5":
            s.sendall(b"\x05\x01\x00")
            _recv_exact(s, 2)
            s.sendall(_socks_request(target))
            if _recv_exact(s, 10)[1] != 0:
                raise ConnectionError("SOCKS5 request refused")
        elif kind == "http":
            s.sendall(_http_request(target))
            if not _recv_head(s).startswith(b"HTTP/1.1 200"):
                raise ConnectionError("CONNECT refused")
        s.sendall(b"x")
        _recv_exact(s, 1)


async def _async_session(kind: str, port: int, target: int) -> None:
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        if kind == "socks5":
            writer.write(b"\x05\x01\x00")
            await reader.readexactly(2)
            writer.write(_socks_request(target))
            if (await reader.readexactly(10))[1] != 0:
                raise ConnectionError("SOCKS5 request refused")
        elif kind == "http":
            writer.write(_http_request(target))
            if not (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200"):
                raise ConnectionError("CONNECT refused")
        writer.write(b"x")
        await reader.readexactly(1)
    finally:
        writer.close()
        await writer.wait_closed()


def sequential(kind: str, port: int, target: int, count: int) -> float:
    t0 = time.monotonic()
    done = 0
    for _ in range(count):
        one_session(kind, port, target)
        done += 1
        if time.monotonic() - t0 > DEADLINE:
            break
    return done / (time.monotonic() - t0)


def concurrent(kind: str, port: int, target: int, workers: int, per_worker: int) -> float:
    async def run() -> int:
        done = 0

        async def worker() -> None:
            nonlocal done
            for _ in range(per_worker):
                await asyncio.wait_for(_async_session(kind, port, target), 10)
                done += 1

        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(workers))), DEADLINE)
        return done

    t0 = time.monotonic()
    done = asyncio.run(run())
    return done / (time.monotonic() - t0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chain", action="store_true", help="entry -> hub -> exit instead of entry -> exit")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--count", type=int, default=2000, help="sequential sessions per kind and round")
    parser.add_argument("--workers", type=int, default=50)
    parser.add_argument("--per-worker", type=int, default=40)
    args = parser.parse_args()
    raise_nofile(65536)
    workdir = Path(tempfile.mkdtemp(prefix="tg-access-bench-"))
    targets = Targets(workdir)
    targets.start()
    gateways = Tunnelgate(workdir, "tg-access", "tls", chain=args.chain, access=True)
    results: dict[str, dict[str, list[float]]] = {k: {"seq": [], "conc": []} for k in KINDS}
    try:
        gateways.start([f for f in targets.forwards if f.name == "echo"])
        ports = {"fixed": gateways.ports["echo"], "socks5": gateways.ports["echo-socks5"],
                 "http": gateways.ports["echo-http"]}
        for kind in KINDS:  # warm-up: carriers, caches
            sequential(kind, ports[kind], targets.echo_port, 100)
        for r in range(args.rounds):
            for kind in KINDS:
                results[kind]["seq"].append(sequential(kind, ports[kind], targets.echo_port, args.count))
                results[kind]["conc"].append(concurrent(kind, ports[kind], targets.echo_port,
                                                        args.workers, args.per_worker))
            print(f"round {r + 1}: " + ", ".join(
                f"{k} {results[k]['seq'][-1]:.0f}/{results[k]['conc'][-1]:.0f}" for k in KINDS), flush=True)
    finally:
        gateways.stop()
        targets.stop()
    route = "entry -> hub -> exit" if args.chain else "entry -> exit"
    print(f"\nsessions per second, {route}, median of {args.rounds} rounds (ratio to fixed):")
    print(f"{'kind':8} {'sequential':>18} {f'{args.workers} concurrent':>20}")
    base = {m: statistics.median(results["fixed"][m]) for m in ("seq", "conc")}
    for kind in KINDS:
        seq, conc = (statistics.median(results[kind][m]) for m in ("seq", "conc"))
        print(f"{kind:8} {seq:10.0f} ({seq / base['seq']:.2f}) {conc:12.0f} ({conc / base['conc']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
