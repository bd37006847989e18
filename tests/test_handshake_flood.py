"""Floods of carriers that never authenticate (issue 9, item 3): a real gateway process
with a plain and a TLS carrier listener; hundreds of connections from several loopback
source addresses that send nothing. The gateway caps concurrent unauthenticated
handshakes (per listener and per source, logged), keeps little per connection until the
peer's HELLO (no 256 KiB read buffer), and its memory comes back to where it was once
the flood is over. A real peer still gets its carrier afterwards.
"""

from __future__ import annotations

import select
import socket
import time
from pathlib import Path

from tests.gateways import GatewayProcess, free_port, keygen, running, wait_until

SOURCES = [f"127.0.0.{i}" for i in range(2, 11)]  # all of 127/8 is loopback on Linux
PER_SOURCE = 100  # beyond the per-source cap (64); 576 admitted, beyond the listener cap (512)
ROUNDS = 3
SLACK_MB = 16  # what a round may leave behind (allocator noise), far below the ~100 MB of a leak


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _flood(port: int) -> None:
    """Open PER_SOURCE silent connections from each source; wait until the gateway has
    closed every one of them (refused at once, or at its handshake timeout)."""
    socks = []
    for source in SOURCES:
        for _ in range(PER_SOURCE):
            s = socket.socket()
            s.bind((source, 0))
            s.settimeout(5)
            s.connect(("127.0.0.1", port))
            socks.append(s)
    deadline = time.monotonic() + 30
    open_ = set(socks)
    while open_:
        assert time.monotonic() < deadline, f"{len(open_)} silent connections still open after 30 s"
        readable, _, _ = select.select(list(open_)[:1000], [], [], 1.0)
        for s in readable:
            try:
                s.recv(4096)  # b"" (closed) or a TLS alert; either way the gateway is done
            except OSError:
                pass
            open_.discard(s)
            s.close()


def test_silent_carrier_floods_are_capped_and_leave_no_memory_behind(tmp_path: Path) -> None:
    for name in ("hub", "edge"):
        keygen(tmp_path, name)
    plain_port, tls_port = free_port(), free_port()
    hub = GatewayProcess(tmp_path, "hub", f"""
[gateway]
name = "hub"
key = "hub.key"
listen = ["tcp://127.0.0.1:{plain_port}", "tls://127.0.0.1:{tls_port}"]
handshake_timeout = 1.0

[[peer]]
name = "edge"
cert = "edge.crt"
""")
    edge = GatewayProcess(tmp_path, "edge", f"""
[gateway]
name = "edge"
key = "edge.key"
reconnect_min = 0.2
reconnect_max = 0.5

[[peer]]
name = "hub"
cert = "hub.crt"
dial = "tls://127.0.0.1:{tls_port}"
""")
    with running(hub):
        assert hub.proc is not None
        pid = hub.proc.pid
        _flood(plain_port)
        _flood(tls_port)  # warm-up: allocator arenas, OpenSSL's first contexts
        before = _rss_mb(pid)
        after = []
        for _ in range(ROUNDS):
            _flood(plain_port)
            _flood(tls_port)
            after.append(_rss_mb(pid))
        print(f"RSS {before:.1f} MB before, after each round {after}")
        assert max(after) - before < SLACK_MB, (before, after)
        log = hub.log()
        assert "per source" in log and "refused" in log
        assert "open on this listener (limit 512)" in log, "the per-listener cap was never reached"
        with running(edge):
            wait_until(lambda: "up (peer edge)" in hub.log(), 10, "a real peer's carrier after the flood")
