"""The smallest end-to-end check: one TCP and one UDP session through two real gateways."""

from __future__ import annotations

import socket
from pathlib import Path

from tests.gateways import pair_configs, running


def test_tcp_and_udp_round_trip_through_two_gateways(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as target, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp_target:
        udp_target.bind(("127.0.0.1", 0))
        tport = target.getsockname()[1]
        uport = udp_target.getsockname()[1]
        tunnels = f"""
[[tunnel]]
name = "t"
listen = "tcp://127.0.0.1:0"
via = ["exit"]
target = "127.0.0.1:{tport}"
[[tunnel]]
name = "u"
listen = "udp://127.0.0.1:0"
via = ["exit"]
target = "127.0.0.1:{uport}"
"""
        exit_gw, entry = pair_configs(tmp_path, tunnels_on_entry=tunnels)
        with running(exit_gw, entry):
            entry.wait_log("up (peer exit)")
            with socket.create_connection(("127.0.0.1", entry.tunnel_port("t")), timeout=10) as c:
                c.sendall(b"ping")
                c.shutdown(socket.SHUT_WR)
                server, _ = target.accept()
                with server:
                    server.settimeout(10)
                    assert server.recv(100) == b"ping"
                    assert server.recv(100) == b""  # the client's half-close arrived
                    server.sendall(b"pong")
                c.settimeout(10)
                assert c.recv(100) == b"pong"
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                u.settimeout(10)
                u.sendto(b"x" * 1400, ("127.0.0.1", entry.tunnel_port("u")))
                udp_target.settimeout(10)
                data, addr = udp_target.recvfrom(65535)
                assert data == b"x" * 1400
                udp_target.sendto(b"y" * 9000, addr)
                assert u.recv(65535) == b"y" * 9000
