"""`run` with a listen port it cannot bind: one line naming the file and the key, exit 2."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gateways import keygen

PEER = """
[[peer]]
name = "far"
fingerprint = "SHA256:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
dial = "tls://127.0.0.1:1"
"""


@pytest.fixture
def held_port() -> Iterator[int]:
    """A loopback port another socket holds for the whole test (TCP listening, and UDP)."""
    with socket.create_server(("127.0.0.1", 0)) as tcp:
        port = int(tcp.getsockname()[1])
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                pytest.skip(f"UDP port {port} is taken too")
            yield port


def run(folder: Path, config: str) -> subprocess.CompletedProcess[str]:
    keygen(folder, "edge")
    (folder / "edge.toml").write_text('[gateway]\nname = "edge"\nkey = "edge.key"\n' + config)
    return subprocess.run([sys.executable, "-m", "gateway", "run", "edge.toml"], cwd=folder,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("kind", ["tcp", "udp"])
def test_a_tunnel_port_in_use_is_one_line_naming_its_key(
    tmp_path: Path, held_port: int, kind: str
) -> None:
    tunnel = (f'[[tunnel]]\nname = "web"\nlisten = "{kind}://127.0.0.1:{held_port}"\n'
              'via = ["far"]\ntarget = "intranet:80"\n')
    done = run(tmp_path, PEER + tunnel)
    assert (done.returncode, done.stderr) == (
        2,
        f"edge.toml: tunnel[0].listen: cannot listen on {kind}://127.0.0.1:{held_port}:"
        " address already in use\n",
    )


def test_a_carrier_port_in_use_is_one_line_naming_its_key(tmp_path: Path, held_port: int) -> None:
    done = run(tmp_path, f'listen = ["tls://127.0.0.1:0", "tls://127.0.0.1:{held_port}"]\n')
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    # Only the log line of the listener that did bind comes before it.
    *logged, last = done.stderr.splitlines()
    assert last == (
        f"edge.toml: gateway.listen[1]: cannot listen on tls://127.0.0.1:{held_port}:"
        " address already in use"
    )
    assert len(logged) == 1 and "carrier listener tls://127.0.0.1:0 bound" in logged[0]
