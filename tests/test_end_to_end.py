"""`end_to_end = true` across a 3-host chain (edge -> hub -> dc, network namespaces).

The entry and the exit run TLS 1.3 (TCP) or sealed datagrams (UDP) inside the circuit,
so the middle relay handles only ciphertext. To prove it matters, hub runs with the
test-only fault injector TUNNELGATE_TEST_FLIP_BYTE=N (it inverts byte N of what it
relays from the entry side): without end_to_end the corrupted bytes reach the target;
with it, the session fails with an integrity error and no wrong byte is delivered.
"""

from __future__ import annotations

import random
from contextlib import ExitStack
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path

import pytest

from tests.chains import (
    DNS_ANSWER,
    DNS_PORT,
    HASH_PORT,
    chain_gateways,
    dig,
    hash_round_trip,
    start_chain,
    start_dnsmasq,
    start_hash_server,
    start_udp_hash_server,
    tunnel,
    udp_hash_exchange,
)
from tests.gateways import GatewayProcess, wait_until
from tests.netns import Topology, topology

pytestmark = [pytest.mark.netns]

MIB = 1 << 20
UDP_HASH_PORT = 9053
REPLY = 256 * 1024  # bytes the hashing server sends back after its hash line
FLIP_ENV = "TUNNELGATE_TEST_FLIP_BYTE"
# Ports of the tunnel listeners on 127.0.0.1 in edge's (or dc's, for "back") namespace.
TCP_E2E, DNS_E2E, UDP_E2E, TCP_PLAIN, UDP_PLAIN, TCP_BACK = 8100, 8153, 8154, 8200, 8254, 8300
INTEGRITY_WORDS = ("INTEGRITY_ERROR", "failed authentication")


@dataclass
class Setup:
    topo: Topology
    gateways: dict[str, GatewayProcess]
    tcp_record: Path
    udp_record: Path


def e2e_chain(stack: ExitStack, folder: Path, flip: int | None = None) -> Setup:
    """edge -> hub -> dc with end-to-end and plain tunnels from edge to dc's targets
    (and one end-to-end tunnel back from dc to edge); hub tampers if `flip` is set."""
    topo = stack.enter_context(topology("edge", "hub", "dc"))
    dc, edge = topo.addr("dc", "hub"), topo.addr("edge", "hub")
    tcp_record = start_hash_server(topo, "dc", dc, folder, reply_size=REPLY)
    udp_record = start_udp_hash_server(topo, "dc", dc, UDP_HASH_PORT, folder)
    start_dnsmasq(topo, "dc", dc, folder)
    start_hash_server(topo, "edge", edge, folder, reply_size=REPLY)
    via = ["hub", "dc"]
    edge_tunnels = (
        tunnel("tcp_e2e", f"tcp://127.0.0.1:{TCP_E2E}", via, f"{dc}:{HASH_PORT}", end_to_end=True)
        + tunnel("dns_e2e", f"udp://127.0.0.1:{DNS_E2E}", via, f"{dc}:{DNS_PORT}", end_to_end=True)
        + tunnel("udp_e2e", f"udp://127.0.0.1:{UDP_E2E}", via, f"{dc}:{UDP_HASH_PORT}", end_to_end=True)
        + tunnel("tcp_plain", f"tcp://127.0.0.1:{TCP_PLAIN}", via, f"{dc}:{HASH_PORT}")
        + tunnel("udp_plain", f"udp://127.0.0.1:{UDP_PLAIN}", via, f"{dc}:{UDP_HASH_PORT}"))
    dc_tunnels = tunnel("back", f"tcp://127.0.0.1:{TCP_BACK}", ["hub", "edge"], f"{edge}:{HASH_PORT}",
                        end_to_end=True)
    gateways = chain_gateways(
        topo, folder, dialer={1: "right"},
        allow={("dc", "hub"): [f"tcp://{dc}:{HASH_PORT}", f"udp://{dc}:{DNS_PORT}",
                               f"udp://{dc}:{UDP_HASH_PORT}"],
               ("edge", "hub"): [f"tcp://{edge}:{HASH_PORT}"]},
        known={"edge": ["dc"], "dc": ["edge"]},  # the end-to-end peers know each other's key
        tunnels={"edge": edge_tunnels, "dc": dc_tunnels},
        env={"hub": {FLIP_ENV: str(flip)}} if flip is not None else None)
    start_chain(stack, topo, gateways)
    if flip is not None:
        assert FLIP_ENV in gateways["hub"].log()  # the injector announces itself
    return Setup(topo, gateways, tcp_record, udp_record)


def _integrity_logged(*gateways: GatewayProcess) -> bool:
    return any(word in gw.log() for gw in gateways for word in INTEGRITY_WORDS)


def _recorded(record: Path) -> list[tuple[str, int]]:
    """(sha256, byte count) of each connection/datagram the target received."""
    if not record.exists():
        return []
    return [(ln.split()[0], int(ln.split()[1])) for ln in record.read_text().splitlines() if ln]


def test_end_to_end_tcp_and_udp_sessions_cross_three_hosts(tmp_path: Path) -> None:
    with ExitStack() as stack:
        s = e2e_chain(stack, tmp_path)
        topo, edge, dc = s.topo, s.gateways["edge"], s.gateways["dc"]
        for port, host, size in ((TCP_E2E, "edge", 20 * MIB), (TCP_BACK, "dc", 5 * MIB)):
            result = hash_round_trip(topo, host, "127.0.0.1", port, size, reply_size=REPLY)
            assert result["error"] is None, result
            assert result["line"] == f"{result['sent_sha']} {size}", result
            assert result["rest_complete"], result
        # The exits name the entry they authenticated inside the circuit (in the
        # session's close line: it may follow the client's end by the final RST's
        # linger at the relay, up to 0.2 s).
        dc.wait_log("end-to-end with edge", timeout=5)
        edge.wait_log("end-to-end with dc", timeout=5)

        assert dig(topo, "edge", "127.0.0.1", DNS_E2E) == DNS_ANSWER
        sizes = [1, 200, 1400, 8000, 60000]
        for answer in udp_hash_exchange(topo, "edge", "127.0.0.1", UDP_E2E, sizes):
            assert answer["reply"] == answer["expected"], answer
        assert not _integrity_logged(*s.gateways.values())


@pytest.mark.parametrize("offset", [200, 300_000], ids=["in-handshake", "in-data"])
def test_a_tampering_relay_cannot_deliver_wrong_data_end_to_end(tmp_path: Path, offset: int) -> None:
    size = 2 * MIB
    data = random.Random(5).randbytes(size)
    with ExitStack() as stack:
        s = e2e_chain(stack, tmp_path, flip=offset)
        topo, edge, dc = s.topo, s.gateways["edge"], s.gateways["dc"]

        # Without end_to_end the injector works: the target gets a corrupted stream.
        plain = hash_round_trip(topo, "edge", "127.0.0.1", TCP_PLAIN, size, seed=5, reply_size=REPLY)
        flipped = data[:offset] + bytes([data[offset] ^ 0xFF]) + data[offset + 1:]
        assert plain["line"] == f"{sha256(flipped).hexdigest()} {size}", plain
        assert _recorded(s.tcp_record)[-1][0] != plain["sent_sha"]

        # With end_to_end, the session fails: no hash line, no reply bytes, and what the
        # target received (if anything) is an intact prefix of what the client sent.
        before = len(_recorded(s.tcp_record))
        protected = hash_round_trip(topo, "edge", "127.0.0.1", TCP_E2E, size, seed=5, reply_size=REPLY)
        assert protected["line"] == "" and protected["rest_len"] == 0, protected
        wait_until(lambda: _integrity_logged(edge, dc), 10, "an integrity failure in edge's or dc's log")
        for digest, count in _recorded(s.tcp_record)[before:]:
            assert digest == sha256(data[:count]).hexdigest(), "the target received tampered bytes"
            assert count < size

        # UDP: plain datagrams arrive corrupted; sealed ones are never delivered wrong.
        plain_answers = udp_hash_exchange(topo, "edge", "127.0.0.1", UDP_PLAIN, [1000], wait=3)
        assert plain_answers[0]["reply"] is not None, plain_answers
        assert plain_answers[0]["reply"] != plain_answers[0]["expected"], plain_answers
        udp_before = len(_recorded(s.udp_record))
        sealed = udp_hash_exchange(topo, "edge", "127.0.0.1", UDP_E2E, [1000, 1000], wait=2)
        for answer in sealed:
            assert answer["reply"] in (None, answer["expected"]), sealed
        assert all(a["reply"] is None for a in sealed), sealed  # every datagram is tampered
        expected = {sha256(random.Random(100 + i).randbytes(1000)).hexdigest() for i in range(2)}
        assert all(d in expected for d, _ in _recorded(s.udp_record)[udp_before:])
        print(f"offset {offset}: edge/dc integrity lines:",
              [ln for gw in (edge, dc) for ln in gw.log().splitlines()
               if any(w in ln for w in INTEGRITY_WORDS)][:4])
