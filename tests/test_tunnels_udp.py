"""UDP tunnels end to end: datagram boundaries, thousands of flows, iperf3 -u.

UDP through the tunnel rides on a TCP carrier, so on loopback nothing should be lost
as long as the senders pace themselves (the listener's socket buffer is the only place
a burst can overflow): the flow test sends in batches and expects every echo.
"""

from __future__ import annotations

import os
import resource
import selectors
import socket
import struct
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from tests.gateways import pair_configs, running
from tests.netutil import Iperf3Server, UdpEcho, free_tcp_udp_port, iperf3_client, tunnel_toml

SIZES = (1, 1400, 9000, 65507)  # 65,507: the largest UDP payload over IPv4


def _round_trip_each_size(port: int, echo: UdpEcho) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.settimeout(10)
        u.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        for size in SIZES:
            datagram = os.urandom(size)
            u.sendto(datagram, ("127.0.0.1", port))
            back = u.recv(65535)
            # One datagram in, the same one datagram out: never merged, split or cut.
            assert len(back) == size and back == datagram, f"{size}-byte datagram came back as {len(back)}"
        # Several at once, all sizes: each arrives whole and in its own datagram.
        batch = [os.urandom(size) for size in SIZES * 3]
        for datagram in batch:
            u.sendto(datagram, ("127.0.0.1", port))
        got = [u.recv(65535) for _ in batch]
        assert sorted(got) == sorted(batch)
    # The target saw exactly the datagrams that were sent, one by one.
    assert [len(d) for d in echo.datagrams[: len(SIZES)]] == list(SIZES)
    assert sorted(echo.datagrams[len(SIZES):]) == sorted(batch)


def test_datagram_sizes_keep_their_boundaries_both_ways(tmp_path: Path) -> None:
    with UdpEcho(keep=True) as echo:
        exit_gw, entry = pair_configs(tmp_path, tunnels_on_entry=tunnel_toml("u", "udp", echo.port))
        with running(exit_gw, entry):
            entry.wait_log("up (peer exit)")
            _round_trip_each_size(entry.tunnel_port("u"), echo)


def test_datagram_sizes_through_a_reverse_udp_tunnel(tmp_path: Path) -> None:
    with UdpEcho(keep=True) as echo:
        exit_gw, entry = pair_configs(
            tmp_path, tunnels_on_exit=tunnel_toml("u", "udp", echo.port, via="entry"))
        with running(exit_gw, entry):
            exit_gw.wait_log("up (peer entry)")
            _round_trip_each_size(exit_gw.tunnel_port("u"), echo)


@contextmanager
def _open_files(at_least: int) -> Iterator[None]:
    """Raise RLIMIT_NOFILE for this process (and the gateways it starts) if needed."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < at_least:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(at_least, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _exchange(socks: list[socket.socket], indexes: range, port: int, round_: int,
              selector: selectors.BaseSelector, timeout: float) -> set[int]:
    """Send one datagram from each socket in `indexes`; return the indexes whose echo did not
    come back within `timeout` (a wrong echo fails the test at once)."""
    expect = {i: struct.pack(">II", i, round_) + bytes([i % 251]) * (64 + i % 200) for i in indexes}
    for i in indexes:
        socks[i].sendto(expect[i], ("127.0.0.1", port))
    waiting = set(indexes)
    deadline = time.monotonic() + timeout
    while waiting and (left := deadline - time.monotonic()) > 0:
        for key, _ in selector.select(left):
            i = key.data
            data = socks[i].recv(65535)
            assert data == expect[i], f"flow {i} got someone else's datagram"
            waiting.discard(i)
    return waiting


def test_2000_concurrent_udp_flows(tmp_path: Path) -> None:
    flows, batch = 2000, 100
    with _open_files(flows + 2000), UdpEcho() as echo, ExitStack() as stack:
        exit_gw, entry = pair_configs(tmp_path, tunnels_on_entry=tunnel_toml("u", "udp", echo.port))
        with running(exit_gw, entry):
            entry.wait_log("up (peer exit)")
            port = entry.tunnel_port("u")
            selector = stack.enter_context(selectors.DefaultSelector())
            socks: list[socket.socket] = []
            for i in range(flows):
                s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
                s.bind(("127.0.0.1", 0))
                s.setblocking(False)
                selector.register(s, selectors.EVENT_READ, i)
                socks.append(s)
            lost: dict[int, set[int]] = {}
            for round_ in (1, 2):  # round 2: every one of the 2,000 flows is still open
                for start in range(0, flows, batch):
                    missing = _exchange(socks, range(start, min(flows, start + batch)), port, round_,
                                        selector, timeout=10)
                    if missing:
                        lost.setdefault(round_, set()).update(missing)
            assert not lost, f"echoes missing per round: { {r: len(m) for r, m in lost.items()} }"
            # Each client flow had its own circuit and its own socket at the exit, and
            # kept it for round 2 (flows end only after udp_idle_timeout).
            assert len(echo.peers) == flows
            assert echo.received == 2 * flows
            assert entry.log().count("entry session open: tunnel u udp") == flows
            assert "session closed: tunnel u udp" not in entry.log()


def test_iperf3_udp_through_the_tunnel(tmp_path: Path) -> None:
    """iperf3 needs its TCP control connection and its UDP stream on the same port:
    two tunnels, TCP and UDP, listen on one port number."""
    with Iperf3Server() as server:
        port = free_tcp_udp_port()
        tunnels = (tunnel_toml("ctl", "tcp", server.port, listen_port=port)
                   + tunnel_toml("data", "udp", server.port, listen_port=port))
        exit_gw, entry = pair_configs(tmp_path, tunnels_on_entry=tunnels)
        with running(exit_gw, entry):
            entry.wait_log("up (peer exit)")
            result = iperf3_client(port, "-u", "-b", "50M", "-l", "1400", "-t", "2")
            end = result["end"]
            assert isinstance(end, dict)
            sent, received = end["sum_sent"], end["sum_received"]  # received: the server's count
            packets, lost, pct = received["packets"], received["lost_packets"], received["lost_percent"]
            sys.stderr.write(f"iperf3 -u through the tunnel: {sent['packets']} packets sent at"
                             f" {sent['bits_per_second'] / 1e6:.1f} Mbit/s; the server counted"
                             f" {lost} of {packets} lost ({pct:.2f}%)\n")
            assert received["bytes"] > 0 and packets - lost > 0, "the iperf3 server received nothing"
            assert pct < 50


def _closed_lines(gw_log: str) -> list[str]:
    return [ln for ln in gw_log.splitlines() if "session closed" in ln and "udp" in ln]


def test_udp_flows_are_logged_with_their_bytes_and_an_idle_expiry_is_no_error(tmp_path: Path) -> None:
    """One flow expires (entry's idle timeout 0.5 s; the exit's is 60 s, so the exit sees
    the entry close it); another (idle timeout 30 s) is still open at SIGTERM. Both ends log the bytes
    really carried; neither end of a normal end says "error" or warns."""
    with UdpEcho() as echo:
        tunnels = (tunnel_toml("u", "udp", echo.port, extra="udp_idle_timeout = 0.5\n")
                   + tunnel_toml("long", "udp", echo.port, extra="udp_idle_timeout = 30\n"))
        exit_gw, entry = pair_configs(tmp_path, tunnels_on_entry=tunnels)
        with running(exit_gw, entry):
            entry.wait_log("up (peer exit)")
            port = entry.tunnel_port("u")
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
                c.settimeout(5)
                for size in (100, 200, 300):
                    c.sendto(b"e" * size, ("127.0.0.1", port))
                    assert len(c.recv(65535)) == size
            for gw in (entry, exit_gw):
                gw.wait_log("session closed", timeout=10)
            expired_at_entry, closed_at_exit = _closed_lines(entry.log())[0], _closed_lines(exit_gw.log())[0]
            assert ": 600 B out, 600 B back," in expired_at_entry and "ok (idle timeout)" in expired_at_entry
            assert ": 600 B out, 600 B back," in closed_at_exit and closed_at_exit.endswith(", ok")
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:  # open at shutdown
                c.settimeout(5)
                c.sendto(b"s" * 50, ("127.0.0.1", entry.tunnel_port("long")))
                assert len(c.recv(65535)) == 50
                entry.stop()
        shut = _closed_lines(entry.log())[1]
        assert ": 50 B out, 50 B back," in shut and "ok (gateway shut down)" in shut, shut
        for gw in (entry, exit_gw):
            assert not [ln for ln in gw.log().splitlines() if "WARNING" in ln and "NO_ERROR" in ln]


def test_a_flow_whose_target_port_closed_ends_and_never_reaches_its_next_owner(tmp_path: Path) -> None:
    """The target closes its port (ICMP port unreachable at the exit): that flow ends
    (both ends log why), and what the client sends next opens a new flow. A server that
    binds the port again never gets a datagram from the old flow's socket."""
    port = free_tcp_udp_port()
    first = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    first.bind(("127.0.0.1", port))
    first.settimeout(5)
    tunnel = tunnel_toml("u", "udp", port, extra="udp_idle_timeout = 60\n")
    exit_gw, entry = pair_configs(tmp_path, tunnels_on_entry=tunnel)
    with running(exit_gw, entry), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
        entry.wait_log("up (peer exit)")
        client.settimeout(5)
        tunnel_addr = ("127.0.0.1", entry.tunnel_port("u"))
        client.sendto(b"hello", tunnel_addr)
        data, old_flow = first.recvfrom(100)
        assert data == b"hello"
        first.close()
        client.sendto(b"into the void", tunnel_addr)  # ICMP port unreachable at the exit
        exit_gw.wait_log("target port closed", timeout=10)
        entry.wait_log("target port closed", timeout=10)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as second:
            second.bind(("127.0.0.1", port))
            second.settimeout(5)
            client.sendto(b"again", tunnel_addr)
            data, new_flow = second.recvfrom(100)
            assert data == b"again" and new_flow != old_flow
            second.sendto(b"answer", new_flow)
            assert client.recv(100) == b"answer"
        assert entry.log().count("entry session open: tunnel u udp") == 2
