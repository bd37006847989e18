"""Sessions survive carrier loss and relay restarts (issue 11): edge -> hub -> dc in
network namespaces, 20 concurrent TCP uploads of 16 MiB (10 plain, 10 end-to-end), each
answered with its sha256 and a 1 MiB reply. Mid-transfer the route breaks: hub is
SIGKILLed and restarted, a carrier is reset (`ss -K`), hub-dc is blackholed for longer
than the keepalive timeout, or hub is restarted with SIGTERM. Every session must still
deliver every byte once, in order, both ways: the client and the target see a pause.
"""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from pathlib import Path

import pytest

from gateway.relay.resume import RESUME_WINDOW
from tests.chains import (
    CARRIER_PORT,
    UPLOADS,
    chain_gateways,
    start_chain,
    start_hash_server,
    start_plain_and_e2e_chain,
    tunnel,
    uploads_completed,
)
from tests.gateways import GatewayProcess
from tests.netns import Topology, read_line, topology

pytestmark = [pytest.mark.netns]

TARGET_PORT = 9200
TCP_E2E, TCP_PLAIN = 8100, 8200
SESSIONS = 20
UPLOAD = 16 << 20
REPLY = 1 << 20



def _chain(stack: ExitStack, folder: Path, hosts: tuple[str, ...]
           ) -> tuple[Topology, dict[str, GatewayProcess]]:
    topo = stack.enter_context(topology(*hosts))
    dc = topo.addr("dc", hosts[-2])
    start_hash_server(topo, "dc", dc, folder, reply_size=REPLY, port=TARGET_PORT)
    gateways = start_plain_and_e2e_chain(stack, topo, folder, f"{dc}:{TARGET_PORT}", (TCP_E2E, TCP_PLAIN), 30)
    return topo, gateways


def _break(how: str, topo: Topology, gateways: dict[str, GatewayProcess]) -> None:
    relay = "mid" if "mid" in gateways else "hub"
    hub = gateways[relay]
    if how == "sigkill-hub":
        hub.kill()
        time.sleep(1.0)
        hub.start()
    elif how == "ss-kill-carrier":
        topo.exec("edge", "ss", "-K", "dst", topo.addr("hub", "edge"), "dport", "=", str(CARRIER_PORT))
    elif how == "blackhole-hub-dc":
        topo.cut(relay, "dc", how="nft")  # silent: the keepalive (1 s / 3 s) finds it dead
        time.sleep(5.0)
        topo.restore(relay, "dc")
    elif how == "sigterm-hub":
        assert hub.stop() == 0  # hands its sessions back at once, so the drain is short
        hub.start()
    else:
        raise ValueError(how)


# 3 hosts: every way of breaking hub. 4 hosts (edge -> hub -> mid -> dc): the relay next
# to the exit (mid) is killed and restarted, or its link to dc blackholed.
CASES = [(("edge", "hub", "dc"), how) for how in ("sigkill-hub", "ss-kill-carrier", "blackhole-hub-dc",
                                                   "sigterm-hub")] + [
    (("edge", "hub", "mid", "dc"), how) for how in ("sigkill-hub", "blackhole-hub-dc")]


@pytest.mark.parametrize(("hosts", "how"), CASES, ids=[f"{len(h)}-hosts-{how}" for h, how in CASES])
def test_every_session_survives_the_route_breaking_mid_transfer(tmp_path: Path, hosts: tuple[str, ...],
                                                                how: str) -> None:
    with ExitStack() as stack:
        topo, gateways = _chain(stack, tmp_path, hosts)
        ports = [TCP_PLAIN if i % 2 else TCP_E2E for i in range(SESSIONS)]
        clients = topo.spawn_python("edge", UPLOADS, ",".join(map(str, ports)), str(UPLOAD), str(REPLY),
                                    ready_line=False)
        assert read_line(clients, 60) == b"started\n"
        # Past its first RESUME_WINDOW at the target, a session is known resumable at both
        # ends (the entry sends no further before the exit's ACK confirms it): break now.
        topo.wait_receiving("dc", TARGET_PORT, SESSIONS, RESUME_WINDOW + (1 << 20))
        _break(how, topo, gateways)
        edge, dc = gateways["edge"], gateways["dc"]
        uploads_completed(clients, UPLOAD, SESSIONS, edge, dc)
        # The break reached the sessions (no session slipped through untouched).
        assert edge.log().count("resumed (") + dc.log().count("resumed (") >= SESSIONS, how


# Answers every datagram with the address and port it came from (the exit's socket).
UDP_SOURCE_SERVER = r"""
import socket, sys
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
while True:
    data, peer = sock.recvfrom(65535)
    sock.sendto(f"{peer[0]}:{peer[1]}".encode(), peer)
"""

# One client socket: one exchange, "before" printed; then, once the flag file exists,
# asks again every 0.2 s (datagrams may be lost while the route is down) until answered.
UDP_SOURCE_CLIENT = r"""
import json, os, socket, sys, time
port, flag = int(sys.argv[1]), sys.argv[2]
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.settimeout(3)
sock.sendto(b"before", ("127.0.0.1", port))
print(json.dumps({"before": sock.recv(100).decode()}), flush=True)
while not os.path.exists(flag):
    time.sleep(0.05)
sock.settimeout(0.2)
deadline = time.monotonic() + 20
after = None
while after is None and time.monotonic() < deadline:
    sock.sendto(b"after", ("127.0.0.1", port))
    try:
        after = sock.recv(100).decode()
    except OSError:
        pass
print(json.dumps({"after": after}), flush=True)
"""

UDP_PORT, UDP_TUNNEL = 9300, 8300


def test_a_udp_flow_keeps_its_mapping_across_a_carrier_reset(tmp_path: Path) -> None:
    """The edge-hub carrier is reset under a UDP flow: the flow resumes over the new
    carrier and the target sees the same source address and port (the exit kept its
    socket); datagrams sent while the route was down may be lost."""
    with ExitStack() as stack:
        topo = stack.enter_context(topology("edge", "hub", "dc"))
        dc = topo.addr("dc", "hub")
        topo.spawn_python("dc", UDP_SOURCE_SERVER, dc, str(UDP_PORT), log=tmp_path / "udp.err")
        tunnels = tunnel("udp", f"udp://127.0.0.1:{UDP_TUNNEL}", ["hub", "dc"], f"{dc}:{UDP_PORT}")
        gateways = chain_gateways(topo, tmp_path, dialer={1: "right"},
                                  allow={("dc", "hub"): [f"udp://{dc}:{UDP_PORT}"]},
                                  known={"edge": ["dc"], "dc": ["edge"]}, tunnels={"edge": tunnels})
        start_chain(stack, topo, gateways)
        flag = tmp_path / "route-broken"
        client = topo.spawn_python("edge", UDP_SOURCE_CLIENT, str(UDP_TUNNEL), str(flag), ready_line=False)
        stack.callback(client.kill)
        before = json.loads(read_line(client, 30))["before"]
        topo.exec("edge", "ss", "-K", "dst", topo.addr("hub", "edge"), "dport", "=", str(CARRIER_PORT))
        flag.touch()
        after = json.loads(read_line(client, 40))["after"]
        assert after == before, (before, after)
        gateways["edge"].wait_log("flow resumed")
        gateways["dc"].wait_log("flow resumed")



IPERF_PORT, IPERF_TUNNEL = 5201, 8400


def test_iperf3_udp_runs_through_a_relay_restart(tmp_path: Path) -> None:
    """A real client: iperf3 -u (a TCP control connection and a UDP flow, both through
    the chain) while hub is SIGKILLed and restarted mid-test. The test completes and the
    server reports the datagrams it got; those sent while the route was down are lost."""
    with ExitStack() as stack:
        topo = stack.enter_context(topology("edge", "hub", "dc"))
        dc = topo.addr("dc", "hub")
        topo.spawn("dc", "iperf3", "-s", "-1", "-B", dc, "-p", str(IPERF_PORT), log=tmp_path / "iperf3-s.log")
        topo.wait_listening("dc", "tcp", IPERF_PORT)
        target = f"{dc}:{IPERF_PORT}"
        tunnels = (tunnel("ctl", f"tcp://127.0.0.1:{IPERF_TUNNEL}", ["hub", "dc"], target)
                   + tunnel("data", f"udp://127.0.0.1:{IPERF_TUNNEL}", ["hub", "dc"], target))
        gateways = chain_gateways(topo, tmp_path, dialer={1: "right"},
                                  allow={("dc", "hub"): [f"tcp://{target}", f"udp://{target}"]},
                                  known={"edge": ["dc"], "dc": ["edge"]}, tunnels={"edge": tunnels})
        start_chain(stack, topo, gateways)
        client = topo.spawn("edge", "iperf3", "-c", "127.0.0.1", "-p", str(IPERF_TUNNEL), "-u", "-b", "5M",
                            "-t", "8", "-J", log=tmp_path / "iperf3-c.err")
        stack.callback(client.kill)
        time.sleep(2.5)
        hub = gateways["hub"]
        hub.kill()
        time.sleep(1.0)
        hub.start()
        out, _ = client.communicate(timeout=60)
        result = json.loads(out)
        assert "error" not in result, result.get("error")
        end = result["end"]["sum"]
        assert end["packets"] > 0 and end["lost_percent"] < 60, end  # most of 8 s got through
        gateways["edge"].wait_log("flow resumed")
        gateways["edge"].wait_log("resumed (")  # the control connection
