"""Built-in services through a tunnel (issue 13): the exit serves service:echo, discard,
chargen, daytime and time (RFC 862-868) over TCP and UDP without a port of its own,
under its allow rules like any target. Clients: plain sockets and socat."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from gateway.services.standard import RFC868_EPOCH
from tests.gateways import pair_configs, running

SERVICES = ("echo", "discard", "chargen", "daytime", "time")


def _tunnels() -> str:
    text = ""
    for kind in ("tcp", "udp"):
        for name in SERVICES:
            text += f"""
[[tunnel]]
name = "{kind}-{name}"
listen = "{kind}://127.0.0.1:0"
via = ["exit"]
target = "service:{name}"
"""
    return text + """
[[tunnel]]
name = "forbidden"
listen = "tcp://127.0.0.1:0"
via = ["exit"]
target = "service:chargen"
"""


def _read_all(s: socket.socket, limit: int = 64 << 20) -> bytes:
    got = bytearray()
    while len(got) < limit and (chunk := s.recv(65536)):
        got += chunk
    return bytes(got)


def test_every_service_over_tcp_and_udp(tmp_path: Path) -> None:
    exit_gw, entry = pair_configs(tmp_path, allow='["service:echo", "service:discard", "service:daytime",'
                                                  ' "service:time", "udp://*:*"]',
                                  tunnels_on_entry=_tunnels())
    # The exit's rules name every service but chargen; "udp://*:*" names hosts only.
    with running(exit_gw, entry):
        def connect(name: str) -> socket.socket:
            return socket.create_connection(("127.0.0.1", entry.tunnel_port(name)), timeout=20)

        payload = os.urandom(4 << 20)
        with connect("tcp-echo") as s:  # 4 MiB both ways, then half-close: all of it, then FIN
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            assert hashlib.sha256(_read_all(s)).digest() == hashlib.sha256(payload).digest()
        with connect("tcp-discard") as s:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            assert _read_all(s) == b""  # a clean FIN, nothing else
        with connect("tcp-daytime") as s:
            line = _read_all(s)
            assert line.endswith(b"-UTC\r\n") and str(time.gmtime().tm_year).encode() in line
        with connect("tcp-time") as s:
            raw = _read_all(s)
            assert len(raw) == 4
            assert abs(int.from_bytes(raw, "big") - (time.time() + RFC868_EPOCH) % 2**32) < 5
        with connect("forbidden") as s:  # service:chargen is not in the exit's rules
            with pytest.raises(ConnectionResetError):
                _read_all(s)
        exit_gw.wait_log("refused tcp service:chargen for entry: FORBIDDEN_TARGET")

        assert _ask(entry.tunnel_port("udp-echo"), b"ping 1") == b"ping 1"
        assert _ask(entry.tunnel_port("udp-daytime"), b"?").endswith(b"-UTC\r\n")
        assert len(_ask(entry.tunnel_port("udp-time"), b"?")) == 4


def _ask(port: int, datagram: bytes) -> bytes:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.settimeout(5)
        for _ in range(5):  # UDP may drop: a bounded number of tries
            u.sendto(datagram, ("127.0.0.1", port))
            try:
                return u.recv(65536)
            except TimeoutError:
                continue
    raise AssertionError(f"no answer from udp port {port}")


@pytest.mark.skipif(shutil.which("socat") is None, reason="socat is not installed")
def test_socat_talks_to_echo_and_reads_chargen(tmp_path: Path) -> None:
    exit_gw, entry = pair_configs(tmp_path, allow='["service:*"]', tunnels_on_entry=_tunnels())
    with running(exit_gw, entry):
        echoed = subprocess.run(["socat", "-t", "5", "-", f"TCP:127.0.0.1:{entry.tunnel_port('tcp-echo')}"],
                                input=b"hello through the tunnel\n", capture_output=True, timeout=30)
        assert echoed.stdout == b"hello through the tunnel\n"
        chargen = subprocess.run(
            f"socat -u TCP:127.0.0.1:{entry.tunnel_port('tcp-chargen')} - | head -c 148",
            shell=True, capture_output=True, timeout=30)
        first, second = chargen.stdout.split(b"\r\n")[:2]
        assert first == bytes(range(33, 33 + 72)) and second == bytes(range(34, 34 + 72))
        assert set(_ask(entry.tunnel_port("udp-chargen"), b"?")) <= set(range(32, 127)) | {13, 10}
