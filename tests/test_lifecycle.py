"""A gateway's life: the far side dies and comes back, SIGTERM drains, a bad config stops it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.gateways import GatewayProcess, keygen, pair_configs, running, wait_until
from tests.netutil import IO_TIMEOUT, TcpServer, echo_handler, recv_exactly, recv_until_eof, tunnel_toml


def _echo_session(port: int, payload: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as c:
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)
        assert recv_until_eof(c) == payload


def _refused(port: int) -> bool:
    """True if nothing listens on 127.0.0.1:port any more (a connect is refused)."""
    with socket.socket() as s:
        s.settimeout(5)
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_far_gateway_killed_and_restarted_carrier_comes_back(tmp_path: Path) -> None:
    with TcpServer(echo_handler) as target:
        exit_gw, entry = pair_configs(tmp_path, tunnels_on_entry=tunnel_toml("t", "tcp", target.port))
        with running(exit_gw, entry):
            entry.wait_log("up (peer exit)")
            port = entry.tunnel_port("t")
            _echo_session(port, b"before" * 1000)
            exit_gw.kill()  # SIGKILL: no GOAWAY, no close_notify
            entry.wait_log(f"carrier to exit at tls://127.0.0.1:{exit_gw.carrier_port()} down: ")
            exit_gw.start()  # same config, same carrier port
            entry.wait_log("up (peer exit)", count=2, timeout=30)
            _echo_session(port, os.urandom(256 * 1024))
            assert entry.proc is not None and entry.proc.poll() is None


def test_sessions_whose_carrier_dies_are_reset_at_both_ends_not_ended(tmp_path: Path) -> None:
    """A broken tunnel must not look like a complete reply: the client gets an RST, not
    a FIN (which would say "that was all"), once the session could not be resumed (the
    exit is gone for good) within `resume_timeout`."""
    with TcpServer(echo_handler) as target:
        exit_gw, entry = pair_configs(tmp_path, tunnels_on_entry=tunnel_toml("t", "tcp", target.port),
                                      gateway_extra="resume_timeout = 1.0\n")
        with running(exit_gw, entry):
            _reset_when(entry, exit_gw.kill)  # the carrier breaks under an open session
            entry.wait_log("entry session closed")
            assert "error: not resumed within 1 s after the route was lost (CANCELLED: carrier" in entry.log()


def test_sigterm_drains_open_sessions_refuses_new_ones_and_exits_0(tmp_path: Path) -> None:
    with TcpServer(echo_handler) as target:
        exit_gw, entry = pair_configs(
            tmp_path, tunnels_on_entry=tunnel_toml("t", "tcp", target.port),
            gateway_extra="keepalive_interval = 1.0\nkeepalive_timeout = 4.0\n"
                          "reconnect_max = 1.0\ndrain_timeout = 30.0\n")
        with running(exit_gw, entry):
            entry.wait_log("up (peer exit)")
            port = entry.tunnel_port("t")
            assert entry.proc is not None
            with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as c:
                c.sendall(b"first")
                assert recv_exactly(c, 5) == b"first"
                entry.proc.send_signal(signal.SIGTERM)
                entry.wait_log("SIGTERM received: draining (up to 30 s, 1 sessions open)")
                # New connections are refused: the tunnel's listener is closed.
                wait_until(lambda: _refused(port), 10, "the tunnel listener to close")
                # The open session keeps working, both ways, for as long as it lasts.
                for i in range(5):
                    payload = os.urandom(64 * 1024) + bytes([i])
                    c.sendall(payload)
                    assert recv_exactly(c, len(payload)) == payload
                assert entry.proc.poll() is None, "the gateway quit with a session still open"
                c.shutdown(socket.SHUT_WR)
                assert recv_until_eof(c) == b""
            # Its last session done, the gateway exits 0 without waiting for the deadline.
            assert entry.proc.wait(20) == 0
            log = entry.log()
            assert "drain deadline reached" not in log
            assert "gateway entry stopped (1 sessions served)" in log
            assert "entry session closed: tunnel t" in log


def test_check_on_a_bad_config_exits_2_with_the_precise_message(tmp_path: Path) -> None:
    keygen(tmp_path, "gw")
    (tmp_path / "bad.toml").write_text("""
[gateway]
name = "gw"
key = "gw.key"

[[peer]]
name = "far"
fingerprint = "SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
dial = "tls://127.0.0.1:7443"

[[tunnel]]
name = "web"
listen = "tcp://127.0.0.1"
via = ["far"]
target = "127.0.0.1:80"
""")
    out = subprocess.run([sys.executable, "-m", "gateway", "check", "bad.toml"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 2
    assert out.stderr.strip() == ("bad.toml: tunnel[0].listen: expected tcp://HOST:PORT,"
                                  " udp://HOST:PORT, socks5://HOST:PORT or http://HOST:PORT,"
                                  " got 'tcp://127.0.0.1'")
    assert out.stdout == ""


def test_sigterm_on_the_far_gateway_sends_goaway_and_lets_the_session_finish(tmp_path: Path) -> None:
    with TcpServer(echo_handler) as target:
        exit_gw, entry = pair_configs(
            tmp_path, tunnels_on_entry=tunnel_toml("t", "tcp", target.port),
            gateway_extra="keepalive_interval = 1.0\nkeepalive_timeout = 4.0\nhandshake_timeout = 2.0\n"
                          "reconnect_max = 1.0\ndrain_timeout = 30.0\n")
        with running(exit_gw, entry):
            entry.wait_log("up (peer exit)")
            port = entry.tunnel_port("t")
            assert exit_gw.proc is not None
            with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as c:
                c.sendall(b"first")
                assert recv_exactly(c, 5) == b"first"
                exit_gw.proc.send_signal(signal.SIGTERM)
                entry.wait_log("peer is going away")
                # No new circuit goes to a draining gateway: the new session is closed.
                with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as late:
                    late.sendall(b"too late")
                    try:
                        assert late.recv(100) == b""
                    except ConnectionResetError:
                        pass
                entry.wait_log("refused: ")
                assert target.accepted == 1
                # The session opened before the drain still works both ways.
                payload = os.urandom(512 * 1024)
                c.sendall(payload)
                assert recv_exactly(c, len(payload)) == payload
                assert exit_gw.proc.poll() is None
                c.shutdown(socket.SHUT_WR)
                assert recv_until_eof(c) == b""
            assert exit_gw.proc.wait(20) == 0
            assert "drain deadline reached" not in exit_gw.log()


def test_a_peer_without_resumption_interoperates_as_before(tmp_path: Path) -> None:
    """An exit that does not announce RESUME (`resume_timeout = 0`): sessions work as
    they always did, and a broken carrier resets them at once (nothing to resume)."""
    with TcpServer(echo_handler) as target:
        exit_gw, entry = pair_configs(tmp_path, tunnels_on_entry=tunnel_toml("t", "tcp", target.port))
        text = exit_gw.config_path.read_text()
        exit_gw.config_path.write_text(text.replace("[gateway]\n", "[gateway]\nresume_timeout = 0\n", 1))
        with running(exit_gw, entry):
            _reset_when(entry, exit_gw.kill, os.urandom(256 * 1024))  # at once, not after resume_timeout
            entry.wait_log("entry session closed")
            assert "route lost" not in entry.log() and "error: CANCELLED: carrier" in entry.log()


def test_sessions_an_exit_shuts_down_are_reset_not_parked_at_the_entry(tmp_path: Path) -> None:
    """At the drain deadline the exit resets its open sessions before it closes its
    carriers: the entry hears a reset (the session is over), not a lost carrier (which a
    resumable session would wait out for resume_timeout)."""
    def echo_until_reset(conn: socket.socket) -> None:
        with contextlib.suppress(ConnectionResetError):  # the exit resets the target too
            echo_handler(conn)

    with TcpServer(echo_until_reset) as target:
        exit_gw, entry = pair_configs(tmp_path, tunnels_on_entry=tunnel_toml("t", "tcp", target.port),
                                      gateway_extra="drain_timeout = 0.5\nresume_timeout = 30\n")
        with running(exit_gw, entry):
            def stop_exit() -> None:
                assert exit_gw.stop() == 0

            _reset_when(entry, stop_exit)  # within IO_TIMEOUT, not resume_timeout (30 s)
            entry.wait_log("entry session closed")
            assert "route lost" not in entry.log() and "gateway shut down" in entry.log()


def _reset_when(entry: GatewayProcess, break_it: Callable[[], object], payload: bytes = b"ping") -> None:
    """Echo `payload` through entry's tunnel "t", `break_it()`, then the client must get
    a reset (within IO_TIMEOUT), never a clean end."""
    entry.wait_log("up (peer exit)")
    with socket.create_connection(("127.0.0.1", entry.tunnel_port("t")), timeout=IO_TIMEOUT) as c:
        c.sendall(payload)
        assert recv_exactly(c, len(payload)) == payload
        break_it()
        with pytest.raises(ConnectionResetError):
            while c.recv(100):
                pass
