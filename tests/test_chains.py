"""Relays chained across hosts (network namespaces): sessions cross 3- and 4-gateway
chains both ways, each hop enforces its own policy, and a cut link heals.

Hosts sit in a line joined by veth links with no forwarding, so the target in the
last namespace cannot be reached from the first except through the gateways.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.chains import (
    DNS_ANSWER,
    DNS_PORT,
    HASH_PORT,
    KEEPALIVE_INTERVAL,
    KEEPALIVE_TIMEOUT,
    chain_gateways,
    copy_keys,
    dig,
    direct_connect,
    hash_round_trip,
    start_chain,
    start_dnsmasq,
    start_hash_server,
    tunnel,
    wait_chain_up,
)
from tests.gateways import GatewayProcess, running, wait_until
from tests.netns import Topology, topology

pytestmark = [pytest.mark.netns]

MIB = 1 << 20
BIG = 50 * MIB
TCP_PORT, UDP_PORT = 8000, 8053  # tunnel listeners, on 127.0.0.1 in the entry's namespace


@dataclass
class Chain:
    topo: Topology
    gateways: dict[str, GatewayProcess]
    folder: Path

    @property
    def first(self) -> str:
        return self.topo.hosts[0]

    @property
    def last(self) -> str:
        return self.topo.hosts[-1]

    def far_addr(self, host: str) -> str:
        """`host`'s address on its only link (first or last host)."""
        i = self.topo.hosts.index(host)
        neighbour = self.topo.hosts[1] if i == 0 else self.topo.hosts[-2]
        return self.topo.addr(host, neighbour)


def build_chain(stack: ExitStack, folder: Path, hosts: tuple[str, ...],
                dialer: dict[int, str]) -> Chain:
    """Targets (hashing server, dnsmasq) at both ends; a TCP and a UDP tunnel declared at
    each end, to the target at the other end; both ends allow only their own targets."""
    topo = stack.enter_context(topology(*hosts))
    first, last = hosts[0], hosts[-1]
    chain = Chain(topo, {}, folder)
    tunnels, allow = {}, {}
    for entry, exit_ in ((first, last), (last, first)):
        addr = chain.far_addr(exit_)
        start_hash_server(topo, exit_, addr, folder)
        start_dnsmasq(topo, exit_, addr, folder)
        via = list(hosts[1:]) if entry == first else list(reversed(hosts[:-1]))
        tunnels[entry] = (tunnel("tcp", f"tcp://127.0.0.1:{TCP_PORT}", via, f"{addr}:{HASH_PORT}")
                          + tunnel("udp", f"udp://127.0.0.1:{UDP_PORT}", via, f"{addr}:{DNS_PORT}"))
        neighbour = hosts[-2] if exit_ == last else hosts[1]
        allow[(exit_, neighbour)] = [f"tcp://{addr}:{HASH_PORT}", f"udp://{addr}:{DNS_PORT}"]
    chain.gateways = chain_gateways(topo, folder, dialer=dialer, allow=allow, tunnels=tunnels)
    start_chain(stack, topo, chain.gateways)
    return chain


# 3 hosts: both spokes dial the hub. 4 hosts: edge dials hub, hub dials mid, dc dials mid.
SHAPES = {
    "3-hosts": (("edge", "hub", "dc"), {1: "right"}),
    "4-hosts": (("edge", "hub", "mid", "dc"), {2: "right"}),
}


@pytest.fixture(scope="module", params=sorted(SHAPES))
def chain(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chain]:
    hosts, dialer = SHAPES[request.param]
    with ExitStack() as stack:
        yield build_chain(stack, tmp_path_factory.mktemp(request.param), hosts, dialer)


def test_targets_are_unreachable_without_the_tunnel(chain: Chain) -> None:
    for src, dst in ((chain.first, chain.last), (chain.last, chain.first)):
        dst_addr = chain.far_addr(dst)
        # The target is up (reachable inside its own namespace) ...
        assert direct_connect(chain.topo, dst, dst_addr, HASH_PORT) == "connected"
        # ... and a direct connect from the other end fails: no route.
        outcome = direct_connect(chain.topo, src, dst_addr, HASH_PORT)
        assert outcome.startswith("failed:") and "Network is unreachable" in outcome, outcome


@pytest.mark.slow
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_tcp_50_mib_crosses_the_chain_intact(chain: Chain, direction: str) -> None:
    entry = chain.first if direction == "forward" else chain.last
    result = hash_round_trip(chain.topo, entry, "127.0.0.1", TCP_PORT, BIG, seed=len(direction))
    assert result["error"] is None, result
    assert result["line"] == f"{result['sent_sha']} {BIG}", result
    print(f"{len(chain.topo.hosts)} hosts {direction}: 50 MiB in {result['seconds']:.2f} s")


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_udp_dns_query_crosses_the_chain(chain: Chain, direction: str) -> None:
    entry = chain.first if direction == "forward" else chain.last
    assert dig(chain.topo, entry, "127.0.0.1", UDP_PORT) == DNS_ANSWER
    # Two more flows: each new client port is a new circuit through every hop.
    assert dig(chain.topo, entry, "127.0.0.1", UDP_PORT) == DNS_ANSWER
    assert dig(chain.topo, entry, "127.0.0.1", UDP_PORT) == DNS_ANSWER


# --- policy ---------------------------------------------------------------------------------


def _refusal_line(gw: GatewayProcess, tunnel_name: str, code: str) -> str:
    """The entry's log line saying tunnel `tunnel_name`'s session was refused with `code`."""
    def found() -> bool:
        return any(f"tunnel {tunnel_name} " in ln and "refused" in ln and code in ln
                   for ln in gw.log().splitlines())

    wait_until(found, 10, f"{code} for tunnel {tunnel_name} in {gw.name}'s log")
    return next(ln for ln in gw.log().splitlines()
                if f"tunnel {tunnel_name} " in ln and "refused" in ln and code in ln)


def test_each_hop_refuses_by_its_own_policy_and_the_entry_logs_who_and_why(tmp_path: Path) -> None:
    """hub forbids dc to route through it, limits routes to 2 more hops; dc (which
    calls hub "core") allows one target only and sees a route back to "core" as a loop."""
    with topology("edge", "hub", "dc") as topo, ExitStack() as stack:
        dc_addr, edge_addr = topo.addr("dc", "hub"), topo.addr("edge", "hub")
        start_hash_server(topo, "dc", dc_addr, tmp_path)
        start_hash_server(topo, "edge", edge_addr, tmp_path)
        ok, denied = f"{dc_addr}:{HASH_PORT}", f"{dc_addr}:{HASH_PORT + 1}"
        edge_tunnels = (tunnel("ok", "tcp://127.0.0.1:8001", ["hub", "dc"], ok)
                        + tunnel("target", "tcp://127.0.0.1:8002", ["hub", "dc"], denied)
                        + tunnel("loop", "tcp://127.0.0.1:8003", ["hub", "dc", "core"], ok)
                        + tunnel("long", "tcp://127.0.0.1:8004", ["hub", "dc", "x", "y"], ok))
        back = f"{edge_addr}:{HASH_PORT}"
        dc_tunnels = (tunnel("back", "tcp://127.0.0.1:8005", ["core", "edge"], back)
                      + tunnel("ghost", "tcp://127.0.0.1:8006", ["core", "nosuch"], back))
        gateways = chain_gateways(
            topo, tmp_path, dialer={1: "right"},
            alias={("dc", "hub"): "core"},
            allow={("dc", "hub"): [f"tcp://{ok}"], ("edge", "hub"): [f"tcp://{edge_addr}:{HASH_PORT}"]},
            route={("hub", "dc"): []},  # dc may not route through hub anywhere
            extra={"hub": "max_route_length = 2\n"},
            tunnels={"edge": edge_tunnels, "dc": dc_tunnels})
        start_chain(stack, topo, gateways)
        edge, dc = gateways["edge"], gateways["dc"]

        # The allowed route works (so the refusals below are policy, not plumbing).
        good = hash_round_trip(topo, "edge", "127.0.0.1", 8001, MIB)
        assert good["line"] == f"{good['sent_sha']} {MIB}", good

        cases = [
            (edge, "edge", 8002, "target", "FORBIDDEN_TARGET",
             f"dc: tcp://{denied} is not in the allow list"),
            (edge, "edge", 8003, "loop", "ROUTE_LOOP", "dc: route core loops"),
            (edge, "edge", 8004, "long", "ROUTE_TOO_LONG",
             "hub: route of 3 more hops exceeds the limit of 2"),
            (dc, "dc", 8005, "back", "FORBIDDEN_ROUTE", "hub: peer dc may not route through hub to edge"),
            # A name hub does not know gets the same answer as a peer it may not reach:
            # the refusal must not tell dc which gateways hub has.
            (dc, "dc", 8006, "ghost", "FORBIDDEN_ROUTE", "hub: peer dc may not route through hub to nosuch"),
        ]
        for gw, host, port, name, code, reason in cases:
            result = hash_round_trip(topo, host, "127.0.0.1", port, 1000)
            assert result["line"] == "" and result["rest_len"] == 0, (name, result)  # nothing got through
            line = _refusal_line(gw, name, code)
            assert reason in line, (name, line)
        # No session ever reached a forbidden target.
        assert (tmp_path / f"hash-dc-{HASH_PORT}.log").read_text().count("\n") == 1
        assert not (tmp_path / f"hash-edge-{HASH_PORT}.log").exists()


# --- link cut ---------------------------------------------------------------------------------

CUT_SECONDS = 6.0


def _count(gw: GatewayProcess, *words: str) -> int:
    return sum(all(w in ln for w in words) for ln in gw.log().splitlines())


def test_cut_link_carriers_die_within_keepalive_timeout_and_come_back(tmp_path: Path) -> None:
    with ExitStack() as stack:
        chain = build_chain(stack, tmp_path, ("edge", "hub", "dc"), {1: "right"})
        topo, edge, hub = chain.topo, chain.gateways["edge"], chain.gateways["hub"]
        assert dig(topo, "edge", "127.0.0.1", UDP_PORT) == DNS_ANSWER
        ups = {gw.name: _count(gw, "carrier", "up (peer") for gw in (edge, hub)}
        deaths = {gw.name: _count(gw, "keepalive timeout") for gw in (edge, hub)}

        cut_at = time.monotonic()
        topo.cut("edge", "hub")
        try:
            dead_after = {}
            limit = KEEPALIVE_TIMEOUT + KEEPALIVE_INTERVAL + 1.0  # + check tick and log slack
            for gw, peer in ((edge, "hub"), (hub, "edge")):
                wait_until(lambda gw=gw: _count(gw, "keepalive timeout") > deaths[gw.name],
                           limit - (time.monotonic() - cut_at), f"{gw.name} to declare {peer} dead")
                dead_after[gw.name] = time.monotonic() - cut_at
            timeout_lines = [ln for gw in (edge, hub) for ln in gw.log().splitlines()
                             if "keepalive timeout" in ln]
            assert any("to hub" in ln for ln in timeout_lines), timeout_lines
            assert any("from edge" in ln for ln in timeout_lines), timeout_lines
            print(f"carrier declared dead after {dead_after}")
            time.sleep(max(0.0, CUT_SECONDS - (time.monotonic() - cut_at)))  # the outage itself
        finally:
            topo.restore("edge", "hub")
        restored_at = time.monotonic()
        for gw in (edge, hub):
            wait_until(lambda gw=gw: _count(gw, "carrier", "up (peer") > ups[gw.name], 15,
                       f"{gw.name}'s carrier to come back")
        print(f"carrier back {time.monotonic() - restored_at:.2f} s after the link")
        assert _count(edge, "carrier", "up (peer hub)") == ups["edge"] + 1

        result = hash_round_trip(topo, "edge", "127.0.0.1", TCP_PORT, 4 * MIB, seed=9)
        assert result["line"] == f"{result['sent_sha']} {4 * MIB}", result
        assert dig(topo, "edge", "127.0.0.1", UDP_PORT) == DNS_ANSWER
        reverse = hash_round_trip(topo, "dc", "127.0.0.1", TCP_PORT, 4 * MIB, seed=10)
        assert reverse["line"] == f"{reverse['sent_sha']} {4 * MIB}", reverse


# --- the README's worked example -----------------------------------------------------------

EXAMPLE = Path(__file__).resolve().parent.parent / "deploy" / "examples" / "three-hosts"


def test_the_readme_three_host_example_works_as_written(tmp_path: Path) -> None:
    """deploy/examples/three-hosts as shipped, with only its addresses swapped for the
    namespaces' (hub.example.net, the datacenter and office services)."""
    with topology("edge", "hub", "dc") as topo, ExitStack() as stack:
        dc_addr, edge_addr = topo.addr("dc", "hub"), topo.addr("edge", "hub")
        start_hash_server(topo, "dc", dc_addr, tmp_path, port=5432)
        start_dnsmasq(topo, "dc", dc_addr, tmp_path, port=53)
        start_hash_server(topo, "edge", edge_addr, tmp_path, port=22)
        copy_keys(tmp_path, ["edge", "hub", "dc"])
        swap = {"db.dc.internal": dc_addr, "10.2.0.53": dc_addr, "10.1.0.10": edge_addr}
        gateways = {}
        for host in ("edge", "hub", "dc"):
            text = (EXAMPLE / f"{host}.toml").read_text()
            if host != "hub":  # each spoke dials the hub's address on its own link
                text = text.replace("hub.example.net", topo.addr("hub", host))
            for old, new in swap.items():
                text = text.replace(old, new)
            gateways[host] = GatewayProcess(tmp_path, host, text, netns=topo.ns[host])
        stack.enter_context(running(*gateways.values()))
        wait_chain_up(topo, gateways)

        result = hash_round_trip(topo, "edge", "127.0.0.1", 5432, 4 * MIB)  # the "postgres" tunnel
        assert result["line"] == f"{result['sent_sha']} {4 * MIB}", result
        assert dig(topo, "edge", "127.0.0.1", 5353) == DNS_ANSWER  # "dns"
        back = hash_round_trip(topo, "dc", "127.0.0.1", 2222, MIB)  # "office-ssh", the reverse one
        assert back["line"] == f"{back['sent_sha']} {MIB}", back
        # (Written when each exit session closes, just after the client has its reply.)
        gateways["dc"].wait_log("end-to-end with edge")
        gateways["edge"].wait_log("end-to-end with dc")
