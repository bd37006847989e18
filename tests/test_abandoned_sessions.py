"""A session whose target never reads is released when its client resets (issue 9,
item 2): the circuit's window is full, so nothing reads the client's socket; its RST must
still end the session at both gateways (and reset the target) within a second or two,
plain and end-to-end alike. And a session the drain deadline cuts short is reset at
both ends, never closed as if complete. Real gateway processes on loopback.
"""

from __future__ import annotations

import signal
import socket
import struct
import threading
from pathlib import Path

import pytest

from tests.gateways import pair_configs, running, wait_until
from tests.netutil import IO_TIMEOUT, MiB, TcpServer, push_until_blocked, tunnel_toml

TCP_STATE_CLOSE = 7  # tcpi_state, the first byte of struct tcp_info


class NeverReads:
    """Accept, keep the connection, never read from it."""

    def __init__(self) -> None:
        self.conns: list[socket.socket] = []
        self.done = threading.Event()

    def __call__(self, conn: socket.socket) -> None:
        self.conns.append(conn)
        self.done.wait(IO_TIMEOUT)


def _tcp_state(sock: socket.socket) -> int:
    return int(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0])


def _fill_then_reset(port: int) -> int:
    """Push into the tunnel until it pushes back; then reset. Returns bytes sent."""
    client = socket.create_connection(("127.0.0.1", port), timeout=1.0)
    sent = push_until_blocked(client, b"r" * 65536, 512 * MiB)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()  # RST
    return sent


@pytest.mark.parametrize("end_to_end", [False, True], ids=["plain", "end-to-end"])
def test_a_client_reset_releases_a_session_whose_target_never_reads(tmp_path: Path,
                                                                    end_to_end: bool) -> None:
    target = NeverReads()
    with TcpServer(target) as server:
        extra = "end_to_end = true\n" if end_to_end else ""
        exit_gw, entry = pair_configs(tmp_path, tunnels_on_entry=tunnel_toml("stuck", "tcp", server.port,
                                                                             extra=extra))
        try:
            with running(exit_gw, entry):
                entry.wait_log("up (peer exit)")
                sent = _fill_then_reset(entry.tunnel_port("stuck"))
                assert sent > 0
                for gw in (entry, exit_gw):
                    gw.wait_log("session closed", timeout=5)
                    closed = [ln for ln in gw.log().splitlines() if "session closed" in ln]
                    assert "error: connection broken" in closed[0] or "error: CANCELLED" in closed[0], closed
                wait_until(lambda: bool(target.conns) and _tcp_state(target.conns[0]) == TCP_STATE_CLOSE,
                           5, "the target's connection to be reset")
        finally:
            target.done.set()


class Holds:
    """Echo what arrives; report how the connection ended ("eof" or "reset")."""

    def __init__(self) -> None:
        self.ends: list[str] = []

    def __call__(self, conn: socket.socket) -> None:
        try:
            while data := conn.recv(65536):
                conn.sendall(data)
            self.ends.append("eof")
        except ConnectionResetError:
            self.ends.append("reset")


@pytest.mark.parametrize("end_to_end", [False, True], ids=["plain", "end-to-end"])
def test_sessions_still_open_at_the_drain_deadline_are_reset_at_both_ends(tmp_path: Path,
                                                                          end_to_end: bool) -> None:
    """SIGTERM, then a session that does not finish within drain_timeout: at the deadline
    the client and the target both get RST (the session did not complete), and the log
    line says why, with the bytes it carried."""
    target = Holds()
    with TcpServer(target) as server:
        extra = "end_to_end = true\n" if end_to_end else ""
        exit_gw, entry = pair_configs(
            tmp_path, tunnels_on_entry=tunnel_toml("t", "tcp", server.port, extra=extra),
            gateway_extra="keepalive_interval = 1.0\nkeepalive_timeout = 4.0\n"
                          "reconnect_max = 1.0\ndrain_timeout = 1.0\n")
        with running(exit_gw, entry):
            entry.wait_log("up (peer exit)")
            with socket.create_connection(("127.0.0.1", entry.tunnel_port("t")), timeout=IO_TIMEOUT) as c:
                c.sendall(b"x" * 1000)
                got = 0
                while got < 1000:
                    got += len(c.recv(65536))
                assert entry.proc is not None
                entry.proc.send_signal(signal.SIGTERM)
                with pytest.raises(ConnectionResetError):
                    while c.recv(100):
                        pass
            assert entry.proc.wait(20) == 0
            wait_until(lambda: bool(target.ends), 10, "the target's connection to end")
            assert target.ends == ["reset"]
            closed = [ln for ln in entry.log().splitlines() if "entry session closed" in ln]
            assert len(closed) == 1 and ": 1000 B out, 1000 B back," in closed[0], closed
            assert "error: " in closed[0] and "shut down" in closed[0], closed
