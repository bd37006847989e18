"""A relay tier (issue 15, SPEC.md §15): three instances of `hub` (one name, one key)
behind haproxy in TCP mode; edge keeps `connections = 3` carriers through it, to
distinct instances; every instance dials dc. 20 concurrent 16 MiB uploads (half end to
end), answered with their sha256 and 1 MiB each, from edge through the tier to dc.
Mid-transfer one instance is SIGKILLed (then restarted) or restarted with SIGTERM:
every session must complete, resumed over the other instances; the restarted instance
rejoins (edge reaches it again through the load balancer) and takes new circuits.

    edge -- lb (haproxy) --+-- hub1 --+
                           +-- hub2 --+-- dc (target 127.0.0.1:9200)
                           +-- hub3 --+
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from gateway.relay.resume import RESUME_WINDOW
from tests.chains import (
    CARRIER_PORT,
    TIMERS,
    UPLOADS,
    copy_keys,
    hash_round_trip,
    start_hash_server,
    tunnel,
    uploads_completed,
)
from tests.gateways import GatewayProcess, running, wait_until
from tests.netns import Topology, read_line, topology

pytestmark = [pytest.mark.netns]

HUBS = ("hub1", "hub2", "hub3")
PAIRS = [("edge", "lb")] + [("lb", h) for h in HUBS] + [(h, "dc") for h in HUBS]
TARGET = f"127.0.0.1:{9200}"
TCP_E2E, TCP_PLAIN = 8100, 8200
SESSIONS = 20
UPLOAD = 16 << 20
REPLY = 1 << 20
INSTANCE_UP = re.compile(r"up \(peer hub\), instance ([0-9a-f]{16})")

HAPROXY = """global
    maxconn 1000
defaults
    mode tcp
    timeout connect 2s
    timeout client 1h
    timeout server 1h
    retries 3
    option redispatch
frontend tier
    bind {front}:{port}
    default_backend hubs
backend hubs
    balance leastconn
{servers}
"""


def _haproxy(stack: ExitStack, topo: Topology, folder: Path) -> None:
    if shutil.which("haproxy") is None:
        pytest.skip("haproxy is not installed (apt-get install haproxy)")
    servers = "\n".join(f"    server {h} {topo.addr(h, 'lb')}:{CARRIER_PORT}" for h in HUBS)
    config = folder / "haproxy.cfg"
    config.write_text(HAPROXY.format(front=topo.addr("lb", "edge"), port=CARRIER_PORT, servers=servers))
    topo.spawn("lb", "haproxy", "-db", "-f", str(config), log=folder / "haproxy.log")
    topo.wait_listening("lb", "tcp", CARRIER_PORT)


def _gateways(topo: Topology, folder: Path) -> dict[str, GatewayProcess]:
    copy_keys(folder, ["edge", "hub", "dc"])
    timers = f"{TIMERS}resume_timeout = 30\n"
    tunnels = (tunnel("e2e", f"tcp://127.0.0.1:{TCP_E2E}", ["hub", "dc"], TARGET, end_to_end=True)
               + tunnel("plain", f"tcp://127.0.0.1:{TCP_PLAIN}", ["hub", "dc"], TARGET))
    edge = (f'[gateway]\nname = "edge"\nkey = "edge.key"\n{timers}\n'
            f'[[peer]]\nname = "hub"\ncert = "hub.crt"\n'
            f'dial = "tls://{topo.addr("lb", "edge")}:{CARRIER_PORT}"\nconnections = 3\n\n'
            f'[[peer]]\nname = "dc"\ncert = "dc.crt"\n\n{tunnels}')
    dc_listen = [f"tls://{topo.addr('dc', h)}:{CARRIER_PORT}" for h in HUBS]
    dc = (f'[gateway]\nname = "dc"\nkey = "dc.key"\nlisten = {json.dumps(dc_listen)}\n{timers}\n'
          f'[[peer]]\nname = "hub"\ncert = "hub.crt"\nallow = ["tcp://{TARGET}"]\n\n'
          f'[[peer]]\nname = "edge"\ncert = "edge.crt"\n')
    gateways = {"edge": GatewayProcess(folder, "edge", edge, netns=topo.ns["edge"]),
                "dc": GatewayProcess(folder, "dc", dc, netns=topo.ns["dc"])}
    for h in HUBS:  # the same config but for the addresses: what a Deployment's replicas run
        text = (f'[gateway]\nname = "hub"\nkey = "hub.key"\n'
                f'listen = ["tls://{topo.addr(h, "lb")}:{CARRIER_PORT}"]\n{timers}\n'
                f'[[peer]]\nname = "edge"\ncert = "edge.crt"\nroute = ["dc"]\n\n'
                f'[[peer]]\nname = "dc"\ncert = "dc.crt"\n'
                f'dial = "tls://{topo.addr("dc", h)}:{CARRIER_PORT}"\n')
        gateways[h] = GatewayProcess(folder, h, text, netns=topo.ns[h])
    return gateways


def _instances(edge: GatewayProcess) -> list[str]:
    """The hub instances edge's carriers came up to, in order (duplicates are closed
    before they count as up, so each line is a distinct instance at that time)."""
    return INSTANCE_UP.findall(edge.log())


def _wait_tier_up(gateways: dict[str, GatewayProcess], expected: int = 3) -> None:
    edge = gateways["edge"]
    wait_until(lambda: len(set(_instances(edge))) >= expected, 30,
               f"edge's carriers to {expected} distinct hub instances")
    for h in HUBS:
        gateways[h].wait_log("up (peer dc)")


@contextmanager
def _tier(tmp_path: Path) -> Iterator[tuple[Topology, dict[str, GatewayProcess]]]:
    with ExitStack() as stack:
        topo = stack.enter_context(topology("edge", "lb", *HUBS, "dc", pairs=PAIRS))
        _haproxy(stack, topo, tmp_path)
        start_hash_server(topo, "dc", "127.0.0.1", tmp_path, reply_size=REPLY, port=9200)
        gateways = _gateways(topo, tmp_path)
        stack.enter_context(running(gateways["dc"], *(gateways[h] for h in HUBS), gateways["edge"]))
        _wait_tier_up(gateways)
        yield topo, gateways


def _relayed(hub: GatewayProcess, since: int = 0) -> int:
    return hub.log()[since:].count("relay session open")


@pytest.mark.parametrize("how", ["sigkill", "sigterm"])
def test_sessions_survive_losing_a_tier_instance_which_then_rejoins(tmp_path: Path, how: str) -> None:
    with _tier(tmp_path) as (topo, gateways):
        edge, dc = gateways["edge"], gateways["dc"]
        ports = [TCP_PLAIN if i % 2 else TCP_E2E for i in range(SESSIONS)]
        # Paced to last a few seconds: every session is still uploading at the break.
        clients = topo.spawn_python("edge", UPLOADS, ",".join(map(str, ports)), str(UPLOAD), str(REPLY),
                                    "0.04", ready_line=False)
        assert read_line(clients, 60) == b"started\n"
        topo.wait_receiving("dc", 9200, SESSIONS, RESUME_WINDOW + (1 << 20))
        carried = {h: _relayed(gateways[h]) for h in HUBS}
        assert sum(carried.values()) == SESSIONS and all(carried.values()), carried  # spread
        victim = gateways["hub1"]
        mark = len(victim.log())
        if how == "sigkill":
            victim.kill()
        else:
            assert victim.stop() == 0  # hands its sessions back at once: a short drain
        victim.start()
        uploads_completed(clients, UPLOAD, SESSIONS, edge, dc)
        assert edge.log().count("resumed (") >= 1  # hub1's sessions moved on to hub2 and hub3

        # The restarted instance (a new instance id) rejoins through the load balancer...
        _wait_tier_up(gateways, expected=4)
        victim.wait_log("up (peer edge)")
        # ...and, having the fewest circuits, takes new ones.
        for seed in range(6):
            result = hash_round_trip(topo, "edge", "127.0.0.1", TCP_PLAIN, 64 << 10, seed=seed)
            assert result["error"] is None and result["line"].endswith(f" {64 << 10}"), result
        assert _relayed(victim, mark) >= 1, victim.log()[mark:]
