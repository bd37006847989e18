"""Carriers that go where a raw TLS port can't (issue 14): WebSocket (ws://, wss://),
behind nginx as a TLS-terminating reverse proxy, through HTTP CONNECT forward proxies
(tinyproxy), and dialed on demand.

Whatever the outer layers, the carrier's mutual TLS runs inside: a proxy that terminates
the outer TLS sees only the inner TLS's records, and one that answers with another key
is refused by the dialer with a logged reason.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.gateways import (
    GatewayProcess,
    echo_server,
    free_port,
    keygen,
    loopback_chain,
    pair_configs,
    running,
    udp_echo_server,
    wait_until,
)

MiB = 1 << 20


def _tunnels(tcp_port: int, udp_port: int | None = None) -> str:
    """An `echo` TCP tunnel to tcp_port (and a `dns` UDP tunnel to udp_port) via exit."""
    text = f"""
[[tunnel]]
name = "echo"
listen = "tcp://127.0.0.1:0"
via = ["exit"]
target = "127.0.0.1:{tcp_port}"
"""
    if udp_port is not None:
        text += f"""
[[tunnel]]
name = "dns"
listen = "udp://127.0.0.1:0"
via = ["exit"]
target = "127.0.0.1:{udp_port}"
"""
    return text


def _round_trip(port: int, size: int = 4 * MiB) -> None:
    """`size` random bytes through an echo, both ways at once, compared by sha256."""
    data = os.urandom(size)
    got = bytearray()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        def read() -> None:
            while len(got) < size and (chunk := s.recv(65536)):
                got.extend(chunk)

        reader = threading.Thread(target=read)
        reader.start()
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        reader.join(30)
    assert hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest()


def _udp_round_trip(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.settimeout(5)
        for attempt in range(5):  # UDP may drop: bounded tries
            payload = os.urandom(1200) + bytes([attempt])
            u.sendto(payload, ("127.0.0.1", port))
            try:
                assert u.recv(65535) == payload
                return
            except TimeoutError:
                continue
    raise AssertionError("no UDP answer through the tunnel")


@pytest.mark.parametrize("scheme", ["ws", "wss"])
def test_sessions_over_a_websocket_carrier(tmp_path: Path, scheme: str) -> None:
    echo, udp = echo_server(), udp_echo_server()
    exit_gw, entry = pair_configs(tmp_path, transport=scheme,
                                  tunnels_on_entry=_tunnels(echo.getsockname()[1], udp.getsockname()[1]))
    with echo, udp, running(exit_gw, entry):
        entry.wait_log(f"carrier to exit at {scheme}://127.0.0.1:")
        _round_trip(entry.tunnel_port("echo"))
        _udp_round_trip(entry.tunnel_port("dns"))


# ---------------------------------------------------------------- nginx in front

NGINX = """
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log info;
events {{ worker_connections 64; }}
http {{
    access_log {dir}/nginx-access.log;
    client_body_temp_path {dir};
    proxy_temp_path {dir};
    server {{
        # Only a client that names the server (SNI: localhost) is let in, as at a CDN.
        listen 127.0.0.1:{port} ssl default_server;
        ssl_reject_handshake on;
    }}
    server {{
        listen 127.0.0.1:{port} ssl;
        server_name localhost;
        ssl_certificate {dir}/edge-cert.pem;
        ssl_certificate_key {dir}/edge-key.pem;
        location /tunnel {{
            proxy_pass http://127.0.0.1:{backend};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_read_timeout 3600s;
            proxy_buffering off;
        }}
    }}
}}
"""


@pytest.fixture
def nginx_bin() -> str:
    path = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if path is None:
        pytest.skip("nginx is not installed (apt-get install nginx)")
    return path


def _start_nginx(nginx_bin: str, folder: Path, port: int, backend: int) -> subprocess.Popen[bytes]:
    """nginx terminating TLS (a throwaway certificate of its own) for /tunnel of the
    server named localhost (a client sending no SNI is refused), passing the WebSocket
    upgrade to `backend`."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-days", "1", "-subj", "/CN=relay.example.net",
                    "-keyout", str(folder / "edge-key.pem"), "-out", str(folder / "edge-cert.pem")],
                   check=True, capture_output=True, timeout=30)
    conf = folder / "nginx.conf"
    conf.write_text(NGINX.format(dir=folder, port=port, backend=backend))
    proc = subprocess.Popen([nginx_bin, "-p", str(folder), "-c", str(conf), "-g", "daemon off;"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def listening() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_until(listening, 10, "nginx to listen")
    return proc


class Tap:
    """A TCP relay that records every byte passing through it (what nginx sends on)."""

    def __init__(self, target: int) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.target = target
        self.seen = bytearray()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while data := a.recv(65536):
                self.seen.extend(data)
                b.sendall(data)
            b.shutdown(socket.SHUT_WR)
        except OSError:
            pass


def _behind_nginx(folder: Path, exit_name: str, ws_port: int, nginx_port: int, echo_port: int,
                  exit_key: str = "exit", udp_port: int | None = None
                  ) -> tuple[GatewayProcess, GatewayProcess]:
    for name in ("entry", "exit", "impostor"):
        if not (folder / f"{name}.key").exists():
            keygen(folder, name)
    timers = "keepalive_interval = 1.0\nkeepalive_timeout = 4.0\nreconnect_max = 1.0\ndrain_timeout = 3.0\n"
    exit_cfg = f"""
[gateway]
name = "{exit_name}"
key = "{exit_key}.key"
listen = ["ws://127.0.0.1:{ws_port}/tunnel"]
{timers}
[[peer]]
name = "entry"
cert = "entry.crt"
allow = ["tcp://127.0.0.1:*", "udp://127.0.0.1:*"]
"""
    entry_cfg = f"""
[gateway]
name = "entry"
key = "entry.key"
{timers}
[[peer]]
name = "exit"
cert = "exit.crt"
dial = "wss://localhost:{nginx_port}/tunnel"
{_tunnels(echo_port, udp_port)}
"""
    return GatewayProcess(folder, "exit", exit_cfg), GatewayProcess(folder, "entry", entry_cfg)


def test_behind_nginx_terminating_tls_nginx_sees_only_ciphertext(tmp_path: Path, nginx_bin: str) -> None:
    echo, udp = echo_server(), udp_echo_server()
    ws_port, nginx_port = free_port(), free_port()
    tap = Tap(ws_port)  # between nginx and the gateway: what a TLS-terminating proxy sees
    nginx = _start_nginx(nginx_bin, tmp_path, nginx_port, tap.port)
    exit_gw, entry = _behind_nginx(tmp_path, "exit", ws_port, nginx_port, echo.getsockname()[1],
                                   udp_port=udp.getsockname()[1])
    marker = b"tunnelgate-plaintext-marker-" * 4096  # 112 KiB of a pattern nginx must not see
    try:
        with echo, udp, running(exit_gw, entry):
            entry.wait_log("carrier to exit at wss://localhost:")  # it sent SNI
            _round_trip(entry.tunnel_port("echo"))
            _udp_round_trip(entry.tunnel_port("dns"))
            with socket.create_connection(("127.0.0.1", entry.tunnel_port("echo")), timeout=20) as s:
                s.sendall(marker)
                s.shutdown(socket.SHUT_WR)
                got = b""
                while len(got) < len(marker) and (chunk := s.recv(65536)):
                    got += chunk
                assert got == marker
        assert b"Upgrade: websocket" in tap.seen or b"upgrade: websocket" in tap.seen.lower()
        assert len(tap.seen) > len(marker)
        assert b"tunnelgate-plaintext-marker-" not in tap.seen  # the inner TLS hides it
    finally:
        nginx.terminate()
        nginx.wait(10)
        tap.server.close()


def test_a_proxy_substituting_keys_is_refused_with_a_reason(tmp_path: Path, nginx_bin: str) -> None:
    """nginx forwards to an impostor gateway (same name, another key): the entry's
    inner handshake fails and says whose key it got."""
    echo = echo_server()
    ws_port, nginx_port = free_port(), free_port()
    nginx = _start_nginx(nginx_bin, tmp_path, nginx_port, ws_port)
    impostor, entry = _behind_nginx(tmp_path, "exit", ws_port, nginx_port, echo.getsockname()[1],
                                    exit_key="impostor")
    try:
        with echo, running(impostor, entry):
            entry.wait_log("failed: peer certificate is not trusted")
            assert " up (peer exit)" not in entry.log()
            with socket.create_connection(("127.0.0.1", entry.tunnel_port("echo")), timeout=20) as s:
                s.sendall(b"x")
                with pytest.raises(ConnectionResetError):  # no carrier: the session is refused
                    s.recv(1)
            entry.wait_log("refused: NO_ROUTE: no carrier to exit is up")
    finally:
        nginx.terminate()
        nginx.wait(10)


@pytest.mark.parametrize("scheme", ["ws", "wss"])
def test_a_relay_chain_with_one_websocket_hop(tmp_path: Path, scheme: str) -> None:
    """entry =ws(s)=> hub =tls=> exit, end to end: the WebSocket hop changes nothing above it."""
    gateways = loopback_chain(tmp_path, """
[[tunnel]]
name = "echo"
listen = "tcp://127.0.0.1:0"
via = ["hub", "exit"]
target = "service:echo"
end_to_end = true
""", entry_scheme=scheme)
    _, exit_gw, entry = gateways
    with running(*gateways):
        entry.wait_log(f"carrier to hub at {scheme}://")
        exit_gw.wait_log("carrier to hub at tls://")
        _round_trip(entry.tunnel_port("echo"))


# ---------------------------------------------------------------- forward proxies

StartProxy = Callable[..., tuple[int, Path]]  # (CONNECT port[, auth line]) -> (port, log)

TINYPROXY = """
Port {port}
Listen 127.0.0.1
Timeout 60
Allow 127.0.0.1
ConnectPort {connect_port}
User nobody
Group nogroup
LogLevel Info
MaxClients 64
{auth}
"""


@pytest.fixture
def tinyproxy(tmp_path: Path) -> Iterator[StartProxy]:
    if shutil.which("tinyproxy") is None:
        pytest.skip("tinyproxy is not installed (apt-get install tinyproxy)")
    procs: list[subprocess.Popen[bytes]] = []

    def start(connect_port: int, auth: str = "") -> tuple[int, Path]:
        port = free_port()
        conf = tmp_path / f"tinyproxy-{port}.conf"
        conf.write_text(TINYPROXY.format(port=port, connect_port=connect_port, auth=auth))
        log = tmp_path / f"tinyproxy-{port}.log"
        with log.open("wb") as out:
            procs.append(subprocess.Popen(["tinyproxy", "-d", "-c", str(conf)], stdout=out, stderr=out))

        def listening() -> bool:
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", port)) == 0

        wait_until(listening, 10, "tinyproxy to listen")
        return port, log

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(10)


def _with_peer_keys(entry: GatewayProcess, keys: str, env: dict[str, str] | None = None) -> GatewayProcess:
    """The entry's config with more keys on its [[peer]] exit (written before its dial)."""
    text = entry.config_path.read_text().replace('dial = "', f'{keys}\ndial = "', 1)
    return GatewayProcess(entry.folder, entry.name, text, env=env)


@pytest.mark.parametrize("scheme", ["tls", "wss"])
def test_dialing_through_an_http_connect_proxy_with_basic_auth(tmp_path: Path, tinyproxy: StartProxy,
                                                               scheme: str) -> None:
    echo, udp, carrier = echo_server(), udp_echo_server(), free_port()
    exit_gw, entry = pair_configs(tmp_path, transport=scheme, exit_port=carrier,
                                  tunnels_on_entry=_tunnels(echo.getsockname()[1], udp.getsockname()[1]))
    proxy_port, proxy_log = tinyproxy(carrier, "BasicAuth alice s3cret")
    entry = _with_peer_keys(entry, f'proxy = "http://alice:s3cret@127.0.0.1:{proxy_port}"')
    with echo, udp, running(exit_gw, entry):
        entry.wait_log(f"carrier to exit at {scheme}://127.0.0.1:{carrier}")
        _round_trip(entry.tunnel_port("echo"))
        _udp_round_trip(entry.tunnel_port("dns"))
    assert f"CONNECT 127.0.0.1:{carrier}" in proxy_log.read_text(errors="replace")


def test_proxy_env_follows_https_proxy(tmp_path: Path, tinyproxy: StartProxy) -> None:
    echo, carrier = echo_server(), free_port()
    exit_gw, entry = pair_configs(tmp_path, exit_port=carrier,
                                  tunnels_on_entry=_tunnels(echo.getsockname()[1]))
    proxy_port, proxy_log = tinyproxy(carrier)
    entry = _with_peer_keys(entry, 'proxy = "env"', env={"https_proxy": f"http://127.0.0.1:{proxy_port}",
                                                         "no_proxy": "example.net"})
    with echo, running(exit_gw, entry):
        entry.wait_log("carrier to exit at tls://")
        _round_trip(entry.tunnel_port("echo"), size=MiB)
    assert f"CONNECT 127.0.0.1:{carrier}" in proxy_log.read_text(errors="replace")


def test_a_proxy_refusal_is_logged_with_its_status_line(tmp_path: Path, tinyproxy: StartProxy) -> None:
    echo, carrier = echo_server(), free_port()
    exit_gw, entry = pair_configs(tmp_path, exit_port=carrier,
                                  tunnels_on_entry=_tunnels(echo.getsockname()[1]))
    proxy_port, _ = tinyproxy(1)  # CONNECT only to port 1: ours is refused
    entry = _with_peer_keys(entry, f'proxy = "http://127.0.0.1:{proxy_port}"')
    with echo, running(exit_gw, entry):
        entry.wait_log(f"refused CONNECT 127.0.0.1:{carrier}: HTTP 403")


# ---------------------------------------------------------------- dial on demand

def test_dial_on_demand_connects_for_a_session_and_hangs_up_when_idle(tmp_path: Path) -> None:
    echo = echo_server()
    exit_gw, entry = pair_configs(tmp_path, tunnels_on_entry=_tunnels(echo.getsockname()[1]))
    entry = _with_peer_keys(entry, "on_demand = true\nidle_hangup = 1.0")
    with echo, running(exit_gw, entry):
        time.sleep(1.0)  # long enough for an always-on dialer to have connected
        assert "carrier to exit" not in entry.log()
        _round_trip(entry.tunnel_port("echo"), size=MiB)  # waits for the carrier, then works
        entry.wait_log("dial exit on demand: a session needs a carrier")
        entry.wait_log("hanging up (on demand)", timeout=10)
        entry.wait_log("hung up (on demand)")
        _round_trip(entry.tunnel_port("echo"), size=MiB)  # dials again
        entry.wait_log("dial exit on demand: a session needs a carrier", count=2)
