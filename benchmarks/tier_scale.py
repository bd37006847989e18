"""Many edges on one relay tier: memory per edge carrier and per idle session at a relay.

    .venv/bin/python benchmarks/tier_scale.py [--edges 100] [--instances 2] [--sessions 10]

On loopback: a tier of `--instances` gateways named hub (one key), dc behind it (every
instance dials dc), and `--edges` edge gateways (real processes, each with its own key),
each keeping `connections = instances` carriers to the tier (a `dial` list of every
instance). Then every edge opens `--sessions` idle TCP sessions through the tier to a
target at dc that accepts and holds them. Each instance's RSS is read at three points
(alone; with every edge's carrier up; with the idle sessions open) and reported per
carrier and per relayed session (two circuits at a relay: one per leg). Every wait has
a deadline.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from lib.procs import HOST, free_port, raise_nofile, rss_bytes

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gateway.security.identity import write_identity  # noqa: E402

DEADLINE = 120.0


def _python() -> str:
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


class Gateway:
    def __init__(self, folder: Path, name: str, text: str) -> None:
        self.name = name
        self.config = folder / f"{name}.toml"
        self.config.write_text(text)
        self.ready = folder / f"{name}.ready"
        self.log = folder / f"{name}.log"
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen([_python(), "-m", "gateway", "run", str(self.config), "-q",
                                          "--ready-file", str(self.ready)],
                                         stdout=log, stderr=subprocess.STDOUT, cwd=folder)

    def wait_ready(self, deadline: float) -> None:
        while not self.ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start:\n{self.log.read_text()[-2000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _holder(port: int, held: list[socket.socket]) -> None:
    """The target: accepts connections and keeps them open (idle sessions)."""
    server = socket.create_server((HOST, port), backlog=4096)
    while True:
        conn, _ = server.accept()
        held.append(conn)


def _established(port: int) -> int:
    out = subprocess.run(["ss", "-Htn", "state", "established", f"sport = :{port}"],
                         capture_output=True, text=True, timeout=10).stdout
    return len(out.splitlines())


def _say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--edges", type=int, default=100)
    p.add_argument("--instances", type=int, default=2)
    p.add_argument("--sessions", type=int, default=10, help="idle sessions per edge")
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args()
    raise_nofile(65536)
    folder = Path(tempfile.mkdtemp(prefix="tg-tier-scale-"))
    gateways: list[Gateway] = []
    held: list[socket.socket] = []
    try:
        for name in ["hub", "dc"] + [f"edge{i:03d}" for i in range(args.edges)]:
            write_identity(folder / name)
        target = free_port()
        threading.Thread(target=_holder, args=(target, held), daemon=True).start()
        timers = "keepalive_interval = 5\nkeepalive_timeout = 15\nreconnect_min = 0.2\nreconnect_max = 2\n"
        dc_port = free_port()
        hub_ports = [free_port() for _ in range(args.instances)]
        dc = Gateway(folder, "dc", f'[gateway]\nname = "dc"\nkey = "dc.key"\n'
                     f'listen = ["tls://{HOST}:{dc_port}"]\n{timers}\n'
                     f'[[peer]]\nname = "hub"\ncert = "hub.crt"\nallow = ["tcp://{HOST}:{target}"]\n')
        gateways.append(dc)
        dc.wait_ready(time.monotonic() + 20)
        edge_peers = "".join(f'[[peer]]\nname = "edge{i:03d}"\ncert = "edge{i:03d}.crt"\nroute = ["dc"]\n\n'
                             for i in range(args.edges))
        hubs = []
        for n, port in enumerate(hub_ports):
            hub = Gateway(folder, f"hub-{n}", f'[gateway]\nname = "hub"\nkey = "hub.key"\n'
                          f'listen = ["tls://{HOST}:{port}"]\nmax_circuits = 65536\n{timers}\n'
                          f'[[peer]]\nname = "dc"\ncert = "dc.crt"\ndial = "tls://{HOST}:{dc_port}"\n\n'
                          + edge_peers)
            gateways.append(hub)
            hubs.append(hub)
        for hub in hubs:
            hub.wait_ready(time.monotonic() + 20)
        deadline = time.monotonic() + DEADLINE
        while _established(dc_port) < args.instances:  # every instance's carrier to dc
            if time.monotonic() > deadline:
                raise RuntimeError("the tier's carriers to dc did not come up")
            time.sleep(0.1)
        time.sleep(1.0)
        alone = [rss_bytes(h.proc.pid) or 0 for h in hubs]
        _say(f"tier up: {args.instances} instances; starting {args.edges} edges")

        dial = json.dumps([f"tls://{HOST}:{port}" for port in hub_ports])
        edge_ports = []
        for i in range(args.edges):
            port = free_port()
            edge_ports.append(port)
            gateways.append(Gateway(folder, f"edge{i:03d}", f'[gateway]\nname = "edge{i:03d}"\n'
                                    f'key = "edge{i:03d}.key"\n{timers}\n'
                                    f'[[peer]]\nname = "hub"\ncert = "hub.crt"\ndial = {dial}\n'
                                    f"connections = {args.instances}\n\n"
                                    f'[[tunnel]]\nname = "idle"\nlisten = "tcp://{HOST}:{port}"\n'
                                    f'via = ["hub", "dc"]\ntarget = "{HOST}:{target}"\n'))
        for gw in gateways[1 + args.instances:]:
            gw.wait_ready(deadline)
        _say("edges started")
        want = args.edges  # carriers per instance: every edge keeps one to each
        while min(_established(port) for port in hub_ports) < want:
            if time.monotonic() > deadline:
                raise RuntimeError(f"carriers per instance: {[_established(p) for p in hub_ports]}"
                                   f" of {want}")
            time.sleep(0.2)
        time.sleep(2.0)
        with_edges = [rss_bytes(h.proc.pid) or 0 for h in hubs]
        _say(f"every edge has its {args.instances} carriers; opening {args.sessions} idle sessions each")
        carriers = [_established(port) for port in hub_ports]

        clients = []
        for port in edge_ports:
            for _ in range(args.sessions):
                clients.append(socket.create_connection((HOST, port), timeout=10))
        total = args.edges * args.sessions
        while len(held) < total:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(held)} of {total} idle sessions reached the target")
            time.sleep(0.1)
        time.sleep(2.0)
        with_sessions = [rss_bytes(h.proc.pid) or 0 for h in hubs]
        per_instance = [h.log.read_text().count("relay session open") for h in hubs]
        if not any(per_instance):  # -q hides the open lines: count the legs instead
            per_instance = [0] * len(hubs)
        figures = {"edges": args.edges, "instances": args.instances, "idle_sessions": total,
                   "carriers_per_instance": carriers,
                   "rss_alone": alone, "rss_with_edges": with_edges, "rss_with_sessions": with_sessions,
                   "bytes_per_edge_carrier": [round((w - a) / max(1, c))
                                              for a, w, c in zip(alone, with_edges, carriers, strict=True)],
                   "bytes_per_idle_session_all_instances": round(
                       (sum(with_sessions) - sum(with_edges)) / max(1, total))}
        print(json.dumps(figures, indent=2))
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2))
        for c in clients + held:
            c.close()
        return 0
    finally:
        for gw in gateways:  # all at once: each drains for itself
            if gw.proc.poll() is None:
                gw.proc.terminate()
        for gw in gateways:
            gw.stop()
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
