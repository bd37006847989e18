"""systemd readiness (issue 12): a gateway started with $NOTIFY_SOCKET says READY=1 once
listening, WATCHDOG=1 at half $WATCHDOG_USEC, and STOPPING=1 when SIGTERM starts the
drain; read from a real unix datagram socket standing in for systemd."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from tests.gateways import pair_configs


def _messages(sock: socket.socket, until: float) -> list[str]:
    got = []
    while time.monotonic() < until:
        sock.settimeout(max(0.01, until - time.monotonic()))
        try:
            got.append(sock.recv(4096).decode())
        except TimeoutError:
            break
    return got


def test_ready_watchdog_and_stopping_reach_the_notify_socket(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(str(path))
        exit_gw, _ = pair_configs(tmp_path)
        exit_gw.env = {"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "200000"}
        exit_gw.start()
        try:
            first = _messages(systemd, time.monotonic() + 1.0)
            assert first and first[0].startswith("READY=1\nSTATUS=listening"), first
            assert sum(m == "WATCHDOG=1" for m in first) >= 4, first  # every 0.1 s
            assert exit_gw.stop() == 0
            rest = _messages(systemd, time.monotonic() + 0.5)
            assert any(m.startswith("STOPPING=1\nSTATUS=draining") for m in rest), rest
        finally:
            exit_gw.kill()
