"""The admin endpoint (issue 12): curl against /metrics, /status and /healthz of real
gateways, over loopback TCP (entry) and a unix socket (exit); the metrics are parsed
with prometheus-client's own parser and must agree with what the test's clients did;
`tunnelgate status` prints the same as a table; /healthz says 503 while draining."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.gateways import GatewayProcess, echo_server, free_port, pair_configs, running, wait_until

SIZES = [1, 1000, 65536, 300_000, 1 << 20]


def _round_trip(port: int, size: int) -> int:
    data = os.urandom(size)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        sender = threading.Thread(target=lambda: (c.sendall(data), c.shutdown(socket.SHUT_WR)))
        sender.start()
        got = bytearray()
        while chunk := c.recv(65536):
            got += chunk
        sender.join()
    assert got == data
    return len(got)


def _curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["curl", "-sS", "--max-time", "10", *args], capture_output=True, text=True,
                          timeout=20)


def _samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def _with_admin(gw: GatewayProcess, admin: str) -> None:
    text = gw.config_path.read_text().replace("[gateway]\n", f'[gateway]\nadmin = "{admin}"\n', 1)
    gw.config_path.write_text(text)


def test_metrics_status_and_health_agree_with_the_traffic(tmp_path: Path) -> None:
    echo = echo_server()
    tunnels = (f'[[tunnel]]\nname = "echo"\nlisten = "tcp://127.0.0.1:0"\nvia = ["exit"]\n'
               f'target = "127.0.0.1:{echo.getsockname()[1]}"\n'
               f'[[tunnel]]\nname = "denied"\nlisten = "tcp://127.0.0.1:0"\nvia = ["exit"]\n'
               f'target = "127.0.0.1:1"\n'
               f'[[tunnel]]\nname = "udp-denied"\nlisten = "udp://127.0.0.1:0"\nvia = ["exit"]\n'
               f'target = "127.0.0.1:9"\n')
    exit_gw, entry = pair_configs(tmp_path, tunnels_on_entry=tunnels,
                                  allow=f'["tcp://127.0.0.1:{echo.getsockname()[1]}"]')
    admin_port = free_port()
    _with_admin(entry, f"127.0.0.1:{admin_port}")
    unix = tmp_path / "exit-admin.sock"
    _with_admin(exit_gw, f"unix:{unix}")
    base = f"http://127.0.0.1:{admin_port}"
    with echo, running(exit_gw, entry):
        entry.wait_log("up (peer exit)")
        assert entry.ready["admin"] == [["127.0.0.1", admin_port]]
        assert stat.S_IMODE(os.stat(unix).st_mode) == 0o600  # the operator's only

        moved = sum(_round_trip(entry.tunnel_port("echo"), size) for size in SIZES)
        with socket.create_connection(("127.0.0.1", entry.tunnel_port("denied")), timeout=10) as c:
            c.settimeout(10)
            try:
                assert c.recv(10) == b""
            except ConnectionResetError:
                pass  # refused: the client gets a reset
        # A refused UDP client's next datagrams (within REFUSED_HOLD, 1 s) are dropped at
        # the listener, and counted.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.sendto(b"first", ("127.0.0.1", entry.tunnel_port("udp-denied")))
            wait_until(lambda: any("udp-denied" in ln and "session closed" in ln
                                   for ln in entry.log().splitlines()), 10, "the refused flow's end")
            for _ in range(4):
                udp.sendto(b"dropped", ("127.0.0.1", entry.tunnel_port("udp-denied")))
        for gw in (entry, exit_gw):
            gw.wait_log("session closed", count=len(SIZES) + (2 if gw is entry else 0))

        def udp_dropped() -> float:
            return _value(_samples(_curl(f"{base}/metrics").stdout), "tunnelgate_udp_datagrams_dropped_total",
                          role="entry", tunnel="udp-denied")

        wait_until(lambda: udp_dropped() >= 4, 10, "4 dropped datagrams in /metrics")

        at_entry = _curl(f"{base}/metrics")
        assert at_entry.returncode == 0, at_entry.stderr
        m = _samples(at_entry.stdout)
        assert _value(m, "tunnelgate_sessions_total", role="entry", tunnel="echo", outcome="ok") == len(SIZES)
        assert _value(m, "tunnelgate_session_bytes_total", role="entry", tunnel="echo",
                      direction="out") == moved
        assert _value(m, "tunnelgate_session_bytes_total", role="entry", tunnel="echo",
                      direction="back") == moved
        assert _value(m, "tunnelgate_sessions_open", role="entry", tunnel="echo") == 0
        assert _value(m, "tunnelgate_refusals_total", code="FORBIDDEN_TARGET") == 2  # TCP and UDP
        assert _value(m, "tunnelgate_carriers_up", peer="exit") == 1
        assert _value(m, "tunnelgate_carrier_connects_total", peer="exit", direction="dialed") == 1
        info = [k for k in m if k[0] == "tunnelgate_info"]
        assert len(info) == 1 and ("name", "entry") in info[0][1]

        at_exit = _curl("--unix-socket", str(unix), "http://localhost/metrics")
        assert at_exit.returncode == 0, at_exit.stderr
        x = _samples(at_exit.stdout)
        assert _value(x, "tunnelgate_sessions_total", role="exit", tunnel="", outcome="ok") == len(SIZES)
        assert _value(x, "tunnelgate_session_bytes_total", role="exit", tunnel="", direction="out") == moved
        assert _value(x, "tunnelgate_refusals_total", code="FORBIDDEN_TARGET") == 2
        assert _value(x, "tunnelgate_carrier_connects_total", peer="entry", direction="accepted") == 1

        status = json.loads(_curl(f"{base}/status").stdout)
        assert status["name"] == "entry" and status["fingerprint"].startswith("SHA256:")
        (carrier,) = status["carriers"]
        assert carrier["peer"] == "exit" and carrier["direction"] == "dialed" and carrier["instance"]
        echo_row = next(t for t in status["tunnels"] if t["name"] == "echo")
        assert echo_row["sessions_ok"] == len(SIZES) and echo_row["bytes_back"] == moved

        table = subprocess.run([sys.executable, "-m", "gateway", "status", str(entry.config_path)],
                               capture_output=True, text=True, timeout=30)
        assert table.returncode == 0, table.stderr
        assert "PEER" in table.stdout and "exit" in table.stdout and f" {moved} " in table.stdout + " "
        as_json = subprocess.run([sys.executable, "-m", "gateway", "status", str(exit_gw.config_path),
                                  "--json"], capture_output=True, text=True, timeout=30)
        assert as_json.returncode == 0, as_json.stderr
        assert json.loads(as_json.stdout)["name"] == "exit"

        assert _curl("-o", "/dev/null", "-w", "%{http_code}", f"{base}/nope").stdout == "404"
        assert _curl("-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", f"{base}/metrics").stdout == "405"
        assert _curl(f"{base}/healthz").stdout == "ok\n"

        # Draining: /healthz says 503 until the last session is gone.
        held = socket.create_connection(("127.0.0.1", entry.tunnel_port("echo")), timeout=10)
        held.sendall(b"x")
        assert held.recv(1) == b"x"
        assert entry.proc is not None
        entry.proc.send_signal(signal.SIGTERM)
        wait_until(lambda: _curl("-o", "/dev/null", "-w", "%{http_code}", f"{base}/healthz").stdout == "503",
                   10, "/healthz to answer 503 while draining")
        held.close()
        assert entry.proc.wait(20) == 0


def test_an_admin_address_in_use_is_a_one_line_config_error(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        exit_gw, _ = pair_configs(tmp_path)
        _with_admin(exit_gw, f"127.0.0.1:{taken.getsockname()[1]}")
        out = subprocess.run([sys.executable, "-m", "gateway", "run", str(exit_gw.config_path)],
                             capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().endswith("address already in use"), out.stderr
    assert "gateway.admin: cannot listen on 127.0.0.1:" in out.stderr
