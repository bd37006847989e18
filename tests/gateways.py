"""Test harness: real `python -m gateway run` processes with generated identities.

`GatewayProcess` writes a config, starts the gateway (optionally inside a network
namespace), waits for its --ready-file (never a sleep), and on stop sends SIGTERM and
checks it drained and exited 0. Logs are kept for assertions and failure reports.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

READY_TIMEOUT = 20.0


def keygen(folder: Path, name: str) -> str:
    """Make NAME.key/NAME.crt in `folder` with the real CLI; returns the fingerprint."""
    out = subprocess.run([sys.executable, "-m", "gateway", "keygen", str(folder / name)],
                         check=True, capture_output=True, text=True, timeout=30)
    return out.stdout.strip().splitlines()[-1]


def free_port(kind: int = socket.SOCK_STREAM, host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (for carrier addresses a peer must dial)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(step)


class GatewayProcess:
    def __init__(self, folder: Path, name: str, config_text: str,
                 netns: str | None = None, extra_args: tuple[str, ...] = ("-v",),
                 env: dict[str, str] | None = None) -> None:
        self.folder = folder
        self.name = name
        self.config_path = folder / f"{name}.toml"
        self.config_path.write_text(config_text)
        self.ready_path = folder / f"{name}.ready"
        self.log_path = folder / f"{name}.log"
        self.netns = netns
        self.extra_args = extra_args
        self.env = env  # added to the inherited environment (e.g. test-only fault injectors)
        self.proc: subprocess.Popen[bytes] | None = None
        self.ready: dict[str, Any] = {}

    def start(self) -> GatewayProcess:
        self.ready_path.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "gateway", "run", str(self.config_path),
               "--ready-file", str(self.ready_path), *self.extra_args]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        log = self.log_path.open("ab")
        env = {**os.environ, **self.env} if self.env else None
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.folder,
                                     start_new_session=True, env=env)
        log.close()
        try:
            wait_until(lambda: self.ready_path.exists() or self.proc.poll() is not None,  # type: ignore[union-attr]
                       READY_TIMEOUT, f"gateway {self.name} to be ready")
        except TimeoutError:
            self.kill()
            raise
        if not self.ready_path.exists():
            raise RuntimeError(f"gateway {self.name} exited {self.proc.returncode}:\n{self.log()}")
        self.ready = json.loads(self.ready_path.read_text())
        return self

    def tunnel_port(self, tunnel: str) -> int:
        return int(self.ready["tunnels"][tunnel][1])

    def carrier_port(self, index: int = 0) -> int:
        return int(self.ready["carriers"][index][0][1])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_log(self, text: str, timeout: float = 20.0, count: int = 1) -> None:
        wait_until(lambda: self.log().count(text) >= count, timeout,
                   f"{text!r} in {self.name}'s log")

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM, wait for the drain, return the exit code (kills after `timeout`)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@contextmanager
def running(*gateways: GatewayProcess) -> Iterator[tuple[GatewayProcess, ...]]:
    """Start gateways in order; always stop them, and show their logs if the test failed."""
    started: list[GatewayProcess] = []
    try:
        for gw in gateways:
            started.append(gw.start())
        yield gateways
    except BaseException:
        for gw in gateways:
            sys.stderr.write(f"----- log of {gw.name} -----\n{gw.log()[-6000:]}\n")
        raise
    finally:
        for gw in reversed(started):
            try:
                gw.stop()
            except subprocess.TimeoutExpired:
                sys.stderr.write(f"gateway {gw.name} did not drain in time; killed\n")


def pair_configs(folder: Path, *, transport: str = "tls", allow: str = '["tcp://127.0.0.1:*", "udp://127.0.0.1:*"]',
                 tunnels_on_entry: str = "", tunnels_on_exit: str = "",
                 gateway_extra: str = "keepalive_interval = 1.0\nkeepalive_timeout = 4.0\n"
                                  "reconnect_max = 1.0\ndrain_timeout = 5.0\n",
                 exit_port: int | None = None) -> tuple[GatewayProcess, GatewayProcess]:
    """Two gateways: `entry` dials `exit`; each allows the other to reach loopback."""
    for name in ("entry", "exit"):
        if not (folder / f"{name}.key").exists():
            keygen(folder, name)
    port = exit_port or free_port()
    exit_cfg = f"""
[gateway]
name = "exit"
key = "exit.key"
listen = ["{transport}://127.0.0.1:{port}"]
{gateway_extra}
[[peer]]
name = "entry"
cert = "entry.crt"
allow = {allow}
{tunnels_on_exit}
"""
    entry_cfg = f"""
[gateway]
name = "entry"
key = "entry.key"
{gateway_extra}
[[peer]]
name = "exit"
cert = "exit.crt"
dial = "{transport}://127.0.0.1:{port}"
allow = {allow}
{tunnels_on_entry}
"""
    return GatewayProcess(folder, "exit", exit_cfg), GatewayProcess(folder, "entry", entry_cfg)


def echo_server() -> socket.socket:
    """A TCP echo server on loopback (a thread per connection); close it to stop."""
    server = socket.create_server(("127.0.0.1", 0))

    def serve(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return server


def udp_echo_server() -> socket.socket:
    """A UDP echo server on 127.0.0.1 (a thread); close it to stop."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            try:
                data, peer = sock.recvfrom(65535)
                sock.sendto(data, peer)
            except OSError:
                return

    threading.Thread(target=serve, daemon=True).start()
    return sock


def loopback_chain(folder: Path, entry_tunnels: str, entry_scheme: str = "tls") -> tuple[GatewayProcess, ...]:
    """entry -> hub -> exit on loopback: entry and exit dial hub (entry over `entry_scheme`:
    tls or ws, hub listening on both); hub routes between them. Exit allows loopback TCP
    and the built-in services."""
    for name in ("entry", "hub", "exit"):
        keygen(folder, name)
    port, ws_port = free_port(), free_port()
    ws_scheme = "wss" if entry_scheme == "wss" else "ws"  # hub's WebSocket listener
    entry_dial = (f"tls://127.0.0.1:{port}" if entry_scheme == "tls"
                  else f"{ws_scheme}://127.0.0.1:{ws_port}/t")
    timers = "keepalive_interval = 1.0\nkeepalive_timeout = 4.0\nreconnect_max = 1.0\ndrain_timeout = 3.0\n"
    hub = f"""
[gateway]
name = "hub"
key = "hub.key"
listen = ["tls://127.0.0.1:{port}", "{ws_scheme}://127.0.0.1:{ws_port}/t"]
{timers}
[[peer]]
name = "entry"
cert = "entry.crt"
route = ["exit"]
[[peer]]
name = "exit"
cert = "exit.crt"
"""
    exit_cfg = f"""
[gateway]
name = "exit"
key = "exit.key"
{timers}
[[peer]]
name = "hub"
cert = "hub.crt"
dial = "tls://127.0.0.1:{port}"
allow = ["tcp://127.0.0.1:*", "service:*"]
[[peer]]
name = "entry"
cert = "entry.crt"
"""
    entry_cfg = f"""
[gateway]
name = "entry"
key = "entry.key"
{timers}
[[peer]]
name = "hub"
cert = "hub.crt"
dial = "{entry_dial}"
[[peer]]
name = "exit"
cert = "exit.crt"
{entry_tunnels}
"""
    return (GatewayProcess(folder, "hub", hub), GatewayProcess(folder, "exit", exit_cfg),
            GatewayProcess(folder, "entry", entry_cfg))
