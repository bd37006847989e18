"""A middle relay keeps per-circuit flow control end to end (three gateways on loopback).

entry -> hub -> exit: a circuit whose target stops reading fills its credit on every
leg and then stops; another circuit crossing the same two carriers keeps moving.
"""

from __future__ import annotations

from pathlib import Path

from tests.gateways import GatewayProcess, free_port, keygen, running
from tests.netutil import BulkHandler, StallHandler, TcpServer, stalled_circuit_beside_bulk

TIMING = "keepalive_interval = 1.0\nkeepalive_timeout = 4.0\nreconnect_max = 1.0\ndrain_timeout = 5.0\n"


def chain(folder: Path, stuck_port: int, bulk_port: int) -> tuple[GatewayProcess, ...]:
    for name in ("entry", "hub", "exit"):
        keygen(folder, name)
    hub_port = free_port()
    hub = GatewayProcess(folder, "hub", f"""
[gateway]
name = "hub"
key = "hub.key"
listen = ["tls://127.0.0.1:{hub_port}"]
{TIMING}
[[peer]]
name = "entry"
cert = "entry.crt"
route = ["exit"]
[[peer]]
name = "exit"
cert = "exit.crt"
""")
    exit_gw = GatewayProcess(folder, "exit", f"""
[gateway]
name = "exit"
key = "exit.key"
{TIMING}
[[peer]]
name = "hub"
cert = "hub.crt"
dial = "tls://127.0.0.1:{hub_port}"
allow = ["tcp://127.0.0.1:*"]
""")
    entry = GatewayProcess(folder, "entry", f"""
[gateway]
name = "entry"
key = "entry.key"
{TIMING}
[[peer]]
name = "hub"
cert = "hub.crt"
dial = "tls://127.0.0.1:{hub_port}"
[[tunnel]]
name = "stuck"
listen = "tcp://127.0.0.1:0"
via = ["hub", "exit"]
target = "127.0.0.1:{stuck_port}"
[[tunnel]]
name = "bulk"
listen = "tcp://127.0.0.1:0"
via = ["hub", "exit"]
target = "127.0.0.1:{bulk_port}"
""")
    return hub, exit_gw, entry


def test_a_stalled_circuit_through_a_relay_does_not_stop_another(tmp_path: Path) -> None:
    stall = StallHandler()
    handler = BulkHandler(reply=20 * 1024 * 1024, seed=6)
    with TcpServer(stall) as stuck_target, TcpServer(handler) as bulk_target:
        hub, exit_gw, entry = chain(tmp_path, stuck_target.port, bulk_target.port)
        with running(hub, exit_gw, entry):
            exit_gw.wait_log("up (peer hub)")
            entry.wait_log("up (peer hub)")
            stalled_circuit_beside_bulk(entry.tunnel_port("stuck"), entry.tunnel_port("bulk"),
                                        stall, handler)
            hub.wait_log("relay session closed", count=1)
