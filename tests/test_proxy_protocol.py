"""PROXY protocol to targets (issue 13): the exit writes the client's address before any
byte, so a target behind the tunnel sees who really connected.

The target is haproxy with `accept-proxy` (it refuses a connection without a valid
header) answering each request with the source address it was given; curl's own
`%{local_port}` says which port that must be.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gateways import free_port, loopback_chain, pair_configs, running, wait_until

pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None or shutil.which("curl") is None,
                                reason="needs haproxy and curl (apt-get install haproxy curl)")

HAPROXY = """
defaults
    mode http
    timeout connect 5s
    timeout client 10s
    timeout server 10s
frontend fe
    bind 127.0.0.1:{port} accept-proxy
    http-request return status 200 content-type text/plain lf-string "{answer}"
"""
ANSWER = "client=%[src]:%[src_port] via=%[dst]:%[dst_port]"


@pytest.fixture
def proxied_target(tmp_path: Path) -> Iterator[int]:
    """haproxy on loopback that requires a PROXY header and echoes its addresses."""
    port = free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(HAPROXY.format(port=port, answer=ANSWER))
    proc = subprocess.Popen(["haproxy", "-db", "-f", str(config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)

    def listening() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == 0

    try:
        wait_until(listening, 10, "haproxy to listen")
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def _curl(*args: str) -> tuple[str, str]:
    """(body, curl's local port)."""
    done = subprocess.run(["curl", "-sS", "--max-time", "20", "-w", "\n%{local_port}", *args],
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    body, _, local_port = done.stdout.rpartition("\n")
    return body, local_port


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_the_target_sees_the_client_address_not_the_exit(tmp_path: Path, proxied_target: int,
                                                         version: str) -> None:
    exit_gw, entry = pair_configs(tmp_path, tunnels_on_entry=f"""
[[tunnel]]
name = "web"
listen = "tcp://127.0.0.1:0"
via = ["exit"]
target = "127.0.0.1:{proxied_target}"
proxy_protocol = "{version}"

[[tunnel]]
name = "plain"
listen = "tcp://127.0.0.1:0"
via = ["exit"]
target = "127.0.0.1:{proxied_target}"
""")
    with running(exit_gw, entry):
        port = entry.tunnel_port("web")
        body, local_port = _curl(f"http://127.0.0.1:{port}/")
        assert body == f"client=127.0.0.1:{local_port} via=127.0.0.1:{port}"
        exit_gw.wait_log(f"(client 127.0.0.1:{local_port})")
        # Without the header haproxy refuses the connection: the header above was needed.
        done = subprocess.run(["curl", "-sS", "--max-time", "10", f"http://127.0.0.1:{entry.tunnel_port('plain')}/"],
                              capture_output=True, timeout=30)
        assert done.returncode != 0


def test_a_socks5_session_carries_its_client_address_too(tmp_path: Path, proxied_target: int) -> None:
    exit_gw, entry = pair_configs(tmp_path, tunnels_on_entry="""
[[tunnel]]
name = "socks"
listen = "socks5://127.0.0.1:0"
via = ["exit"]
proxy_protocol = "v2"
""")
    with running(exit_gw, entry):
        port = entry.tunnel_port("socks")
        body, local_port = _curl("--socks5", f"127.0.0.1:{port}", f"http://127.0.0.1:{proxied_target}/")
        assert body == f"client=127.0.0.1:{local_port} via=127.0.0.1:{port}"


@pytest.mark.parametrize("end_to_end", [False, True])
def test_a_relay_passes_the_origin_on(tmp_path: Path, proxied_target: int, end_to_end: bool) -> None:
    gateways = loopback_chain(tmp_path, f"""
[[tunnel]]
name = "web"
listen = "tcp://127.0.0.1:0"
via = ["hub", "exit"]
target = "127.0.0.1:{proxied_target}"
proxy_protocol = "v1"
end_to_end = {"true" if end_to_end else "false"}

[[tunnel]]
name = "echo"
listen = "tcp://127.0.0.1:0"
via = ["hub", "exit"]
target = "service:echo"
end_to_end = {"true" if end_to_end else "false"}
""")
    _, exit_gw, entry = gateways
    with running(*gateways):
        exit_gw.wait_log("carrier to hub")
        port = entry.tunnel_port("web")
        body, local_port = _curl(f"http://127.0.0.1:{port}/")
        assert body == f"client=127.0.0.1:{local_port} via=127.0.0.1:{port}"
        with socket.create_connection(("127.0.0.1", entry.tunnel_port("echo")), timeout=20) as s:
            s.sendall(b"through the relay\n")
            s.shutdown(socket.SHUT_WR)
            assert s.recv(100) == b"through the relay\n"
