"""TCP tunnels end to end: real gateway processes, real sockets, curl and iperf3.

Each test starts its own `entry` (dials) and `exit` (listens) gateway pair on
loopback with its targets in threads (tests/netutil.py); every socket and
subprocess has a timeout, and waits are on conditions, never on fixed sleeps.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.gateways import pair_configs, running, wait_until
from tests.netutil import (
    IO_TIMEOUT,
    BulkHandler,
    HttpServer,
    Iperf3Server,
    MiB,
    StallHandler,
    TcpServer,
    bulk_exchange,
    echo_handler,
    iperf3_client,
    pattern_sha256,
    recv_exactly,
    recv_until_eof,
    stalled_circuit_beside_bulk,
    tunnel_toml,
)

BULK = 100 * MiB


def _bulk_both_ways(tunnel_port: int, handler: BulkHandler) -> None:
    """BULK bytes each way at once; both hashes must match the known data."""
    n, sha = bulk_exchange(tunnel_port, BULK, seed=1)
    assert n == BULK
    assert sha == pattern_sha256(BULK, 2), "the reply from the target arrived corrupted"
    wait_until(lambda: bool(handler.received), 30, "the target to see the client's EOF")
    assert handler.received == [(BULK, pattern_sha256(BULK, 1))], "the target got corrupted data"


@pytest.mark.slow
def test_bulk_100_mib_each_way_through_a_forward_tunnel(tmp_path: Path) -> None:
    handler = BulkHandler(reply=BULK, seed=2)
    with TcpServer(handler) as target:
        exit_gw, entry = pair_configs(tmp_path, tunnels_on_entry=tunnel_toml("bulk", "tcp", target.port))
        with running(exit_gw, entry):
            entry.wait_log("up (peer exit)")
            _bulk_both_ways(entry.tunnel_port("bulk"), handler)
            # One line per session close, with the byte counts both ways.
            entry.wait_log(f"{BULK} B out, {BULK} B back")
            exit_gw.wait_log(f"{BULK} B out, {BULK} B back")


@pytest.mark.slow
def test_bulk_100_mib_each_way_through_a_reverse_tunnel(tmp_path: Path) -> None:
    """The tunnel is declared on the gateway that was dialed: sessions enter at `exit`
    and leave at `entry`, against the carrier's direction."""
    handler = BulkHandler(reply=BULK, seed=2)
    with TcpServer(handler) as target:
        exit_gw, entry = pair_configs(
            tmp_path, tunnels_on_exit=tunnel_toml("back", "tcp", target.port, via="entry"))
        with running(exit_gw, entry):
            exit_gw.wait_log("up (peer entry)")
            _bulk_both_ways(exit_gw.tunnel_port("back"), handler)
            exit_gw.wait_log(f"{BULK} B out, {BULK} B back")


def test_curl_fetches_a_page_through_the_tunnel(tmp_path: Path) -> None:
    body = os.urandom(3 * MiB + 17)
    with HttpServer(body) as web:
        exit_gw, entry = pair_configs(tmp_path, tunnels_on_entry=tunnel_toml("web", "tcp", web.port))
        with running(exit_gw, entry):
            entry.wait_log("up (peer exit)")
            url = f"http://127.0.0.1:{entry.tunnel_port('web')}/index.bin"
            out = subprocess.run(["curl", "-sS", "--fail", "--noproxy", "*", "--max-time", "30", url],
                                 capture_output=True, timeout=40)
            assert out.returncode == 0, out.stderr.decode(errors="replace")
            assert len(out.stdout) == len(body)
            assert hashlib.sha256(out.stdout).digest() == hashlib.sha256(body).digest()
            # Both ends count the session's bytes alike, the request curl sent before the
            # entry accepted it (it leaves with OPEN) included.
            entry.wait_log("entry session closed")
            exit_gw.wait_log("exit session closed")
            entry_counts = _byte_counts(entry.log(), "entry session closed")
            assert entry_counts == _byte_counts(exit_gw.log(), "exit session closed")
            sent, back = entry_counts
            assert sent > len("GET /index.bin HTTP/1.1\r\n") and back > len(body)


def _byte_counts(log: str, marker: str) -> tuple[int, int]:
    """(bytes out, bytes back) from a gateway's one session-close log line."""
    line = next(line for line in log.splitlines() if marker in line)
    match = re.search(r": (\d+) B out, (\d+) B back", line)
    assert match, line
    return int(match.group(1)), int(match.group(2))


def test_iperf3_tcp_through_the_tunnel(tmp_path: Path) -> None:
    with Iperf3Server() as server:
        exit_gw, entry = pair_configs(tmp_path, tunnels_on_entry=tunnel_toml("perf", "tcp", server.port))
        with running(exit_gw, entry):
            entry.wait_log("up (peer exit)")
            result = iperf3_client(entry.tunnel_port("perf"), "-t", "2")
            end = result["end"]
            assert isinstance(end, dict)
            assert end["sum_received"]["bytes"] > 0
            assert end["sum_sent"]["bytes"] > 0


def test_200_concurrent_sessions_each_get_their_own_echo(tmp_path: Path) -> None:
    sessions = 200
    size = 16 * 1024
    with TcpServer(echo_handler) as target:
        exit_gw, entry = pair_configs(tmp_path, tunnels_on_entry=tunnel_toml("echo", "tcp", target.port))
        with running(exit_gw, entry):
            entry.wait_log("up (peer exit)")
            port = entry.tunnel_port("echo")
            all_connected = threading.Barrier(sessions, timeout=IO_TIMEOUT)
            results: dict[int, bool | BaseException] = {}

            def session(i: int) -> None:
                payload = struct.pack(">I", i) * (size // 4)
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as c:
                        all_connected.wait()  # all 200 are open before any sends
                        c.sendall(payload)
                        c.shutdown(socket.SHUT_WR)
                        results[i] = recv_until_eof(c) == payload
                except BaseException as exc:
                    results[i] = exc

            threads = [threading.Thread(target=session, args=(i,), daemon=True) for i in range(sessions)]
            for t in threads:
                t.start()
            deadline = time.monotonic() + 2 * IO_TIMEOUT
            for t in threads:
                t.join(max(0.0, deadline - time.monotonic()))
            assert not any(t.is_alive() for t in threads), "sessions still running at the deadline"
            bad = {i: r for i, r in results.items() if r is not True}
            assert len(results) == sessions and not bad, \
                f"{len(bad)} sessions failed: {list(bad.items())[:5]}"
            assert target.accepted == sessions
            target.check()


def test_half_close_client_still_gets_the_full_reply(tmp_path: Path) -> None:
    """The client shuts down its write side; the server replies 5 MiB only after it sees
    that EOF, and the client reads all of it (Comer & Stevens 6.17, partial close)."""
    reply = 5 * MiB
    handler = BulkHandler(reply=reply, seed=3, concurrent=False)
    with TcpServer(handler) as target:
        exit_gw, entry = pair_configs(tmp_path, tunnels_on_entry=tunnel_toml("hc", "tcp", target.port))
        with running(exit_gw, entry):
            entry.wait_log("up (peer exit)")
            n, sha = bulk_exchange(entry.tunnel_port("hc"), 1000, seed=4, half_close_first=True)
            assert (n, sha) == (reply, pattern_sha256(reply, 3))
            assert handler.received == [(1000, pattern_sha256(1000, 4))]


def test_a_stalled_circuit_does_not_stop_another_on_the_same_carrier(tmp_path: Path) -> None:
    stall = StallHandler()
    handler = BulkHandler(reply=20 * MiB, seed=6)
    with TcpServer(stall) as stuck_target, TcpServer(handler) as bulk_target:
        tunnels = (tunnel_toml("stuck", "tcp", stuck_target.port)
                   + tunnel_toml("bulk", "tcp", bulk_target.port))
        exit_gw, entry = pair_configs(tmp_path, tunnels_on_entry=tunnels)
        with running(exit_gw, entry):
            entry.wait_log("up (peer exit)")
            stalled_circuit_beside_bulk(entry.tunnel_port("stuck"), entry.tunnel_port("bulk"),
                                        stall, handler)


def test_plain_tcp_carrier_works_and_is_warned_about(tmp_path: Path) -> None:
    with TcpServer(echo_handler) as target:
        exit_gw, entry = pair_configs(tmp_path, transport="tcp",
                                      tunnels_on_entry=tunnel_toml("echo", "tcp", target.port))
        with running(exit_gw, entry):
            entry.wait_log("up (peer exit)")
            assert "WARNING tunnelgate.links: carrier to exit (tcp://127.0.0.1:" in entry.log()
            assert "is plain TCP: unencrypted and unauthenticated" in entry.log()
            assert "WARNING tunnelgate.links: carrier listener tcp://127.0.0.1:" in exit_gw.log()
            assert "is plain TCP: no encryption, no peer authentication" in exit_gw.log()
            with socket.create_connection(("127.0.0.1", entry.tunnel_port("echo")), timeout=IO_TIMEOUT) as c:
                payload = os.urandom(1 * MiB)
                c.sendall(payload)
                assert recv_exactly(c, len(payload)) == payload
                c.shutdown(socket.SHUT_WR)
                assert recv_until_eof(c) == b""
