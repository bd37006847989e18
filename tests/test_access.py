"""SOCKS5 and HTTP CONNECT listeners (issue 13) through two real gateways, driven by curl.

entry (socks5:// or http:// listener) ==carrier==> exit -> a local HTTP server. The
destination each client names is judged by the exit's allow rules; refusals come back
as the protocol's own answers (SOCKS reply codes, HTTP 403/502), which curl explains.
"""

from __future__ import annotations

import hashlib
import http.server
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gateways import GatewayProcess, echo_server, pair_configs, running, udp_echo_server

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")

BODY = hashlib.sha256(b"tunnelgate").hexdigest().encode() * 4096  # 256 KiB


@pytest.fixture
def web() -> Iterator[int]:
    """An HTTP server on 127.0.0.1 answering every GET with BODY."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def _users_file(folder: Path) -> Path:
    """users.txt with alice:wonderland, made by the real CLI."""
    out = subprocess.run([sys.executable, "-m", "gateway", "passwd", "alice"], input="wonderland\n",
                         capture_output=True, text=True, check=True, timeout=60)
    path = folder / "users.txt"
    path.write_text(out.stdout)
    return path


def _gateways(folder: Path, kind: str, extra: str = "") -> tuple[GatewayProcess, GatewayProcess]:
    return pair_configs(folder, tunnels_on_entry=f"""
[[tunnel]]
name = "access"
listen = "{kind}://127.0.0.1:0"
via = ["exit"]
{extra}
""")


def _curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["curl", "-sS", "--max-time", "20", *args], capture_output=True, timeout=30)


@pytest.mark.parametrize("flag", ["--socks5-hostname", "--socks5"])
def test_curl_through_socks5_reaches_an_allowed_destination(tmp_path: Path, web: int, flag: str) -> None:
    exit_gw, entry = _gateways(tmp_path, "socks5")
    with running(exit_gw, entry):
        proxy = f"127.0.0.1:{entry.tunnel_port('access')}"
        host = "localhost" if flag == "--socks5-hostname" else "127.0.0.1"  # a name goes to the exit
        done = _curl(flag, proxy, f"http://{host}:{web}/file")
        assert done.returncode == 0, done.stderr
        assert done.stdout == BODY
        entry.wait_log(f"-> {host}:{web}")


def test_a_destination_the_exit_forbids_is_not_allowed_by_ruleset(tmp_path: Path, web: int) -> None:
    exit_gw, entry = _gateways(tmp_path, "socks5")
    with running(exit_gw, entry):
        done = _curl("--socks5", f"127.0.0.1:{entry.tunnel_port('access')}", f"http://127.0.0.2:{web}/")
        assert done.returncode != 0
        # SOCKS5 reply 2: curl 8 says "connection not allowed by ruleset", curl 7 "... (2)"
        assert b"not allowed" in done.stderr or b"connection to 127.0.0.2. (2)" in done.stderr, done.stderr
        exit_gw.wait_log("refused tcp://127.0.0.2")
        entry.wait_log("FORBIDDEN_TARGET")


def test_socks5_username_and_password(tmp_path: Path, web: int) -> None:
    users = _users_file(tmp_path)
    exit_gw, entry = _gateways(tmp_path, "socks5", f'users_file = "{users}"')
    with running(exit_gw, entry):
        proxy = f"127.0.0.1:{entry.tunnel_port('access')}"
        good = _curl("--socks5", proxy, "--proxy-user", "alice:wonderland", f"http://127.0.0.1:{web}/")
        assert good.returncode == 0, good.stderr
        assert good.stdout == BODY
        bad = _curl("--socks5", proxy, "--proxy-user", "alice:looking-glass", f"http://127.0.0.1:{web}/")
        assert bad.returncode != 0 and b"rejected" in bad.stderr, bad.stderr
        anonymous = _curl("--socks5", proxy, f"http://127.0.0.1:{web}/")
        assert anonymous.returncode != 0
        entry.wait_log("authentication failed for user 'alice'")


def test_curl_through_http_connect(tmp_path: Path, web: int) -> None:
    exit_gw, entry = _gateways(tmp_path, "http")
    with running(exit_gw, entry):
        proxy = f"http://127.0.0.1:{entry.tunnel_port('access')}"
        done = _curl("-x", proxy, "--proxytunnel", f"http://127.0.0.1:{web}/")
        assert done.returncode == 0, done.stderr
        assert done.stdout == BODY
        refused = _curl("-x", proxy, "--proxytunnel", f"http://127.0.0.2:{web}/")
        assert refused.returncode != 0 and b"403" in refused.stderr, refused.stderr
        # curl does not show a failed CONNECT's body: it holds the reason
        with socket.create_connection(("127.0.0.1", entry.tunnel_port("access")), timeout=20) as s:
            s.sendall(f"CONNECT 127.0.0.2:{web} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            answer = b""
            while chunk := s.recv(4096):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 403 "), answer
        assert b"FORBIDDEN_TARGET: exit: tcp://127.0.0.2" in answer, answer
        plain = _curl("-x", proxy, f"http://127.0.0.1:{web}/")  # a GET to the proxy: not served
        assert plain.stdout.startswith(b"only CONNECT"), plain.stdout


def test_http_connect_basic_auth(tmp_path: Path, web: int) -> None:
    users = _users_file(tmp_path)
    exit_gw, entry = _gateways(tmp_path, "http", f'users_file = "{users}"')
    with running(exit_gw, entry):
        proxy = f"http://127.0.0.1:{entry.tunnel_port('access')}"
        good = _curl("-x", proxy, "--proxytunnel", "--proxy-user", "alice:wonderland", f"http://127.0.0.1:{web}/")
        assert good.returncode == 0, good.stderr
        assert good.stdout == BODY
        bad = _curl("-v", "-x", proxy, "--proxytunnel", "--proxy-user", "alice:x", f"http://127.0.0.1:{web}/")
        assert bad.returncode != 0 and b"407" in bad.stderr


def _exchange(port: int, first: bytes, answer_size: int, payload: bytes) -> bytes:
    """Send the whole negotiation and the payload in one write (pipelined), half-close,
    and read everything back."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(first + payload)
        s.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := s.recv(65536):
            got += chunk
    assert len(got) >= answer_size
    return got[answer_size:]


@pytest.mark.parametrize("kind", ["socks5", "http"])
def test_bytes_pipelined_behind_the_request_are_not_lost(tmp_path: Path, kind: str) -> None:
    echo = echo_server()
    port = echo.getsockname()[1]
    payload = bytes(range(256)) * 512  # 128 KiB right behind the request
    if kind == "socks5":
        first = b"\x05\x01\x00" + b"\x05\x01\x00\x01\x7f\x00\x00\x01" + port.to_bytes(2, "big")
        answer = 2 + 10  # method choice, then the reply with an IPv4 0.0.0.0:0
    else:
        first = f"CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
        answer = len(b"HTTP/1.1 200 Connection established\r\n\r\n")
    exit_gw, entry = _gateways(tmp_path, kind)
    with echo, running(exit_gw, entry):
        assert _exchange(entry.tunnel_port("access"), first, answer, payload) == payload


def _socks_udp(port: int, data: bytes) -> bytes:
    """RFC 1928 §7's UDP request header, written by hand (IPv4 destination)."""
    return b"\x00\x00\x00\x01\x7f\x00\x00\x01" + port.to_bytes(2, "big") + data


def test_socks5_udp_associate_carries_datagrams_per_destination(tmp_path: Path) -> None:
    first, second = udp_echo_server(), udp_echo_server()
    exit_gw, entry = _gateways(tmp_path, "socks5")
    with first, second, running(exit_gw, entry):
        control = socket.create_connection(("127.0.0.1", entry.tunnel_port("access")), timeout=20)
        control.sendall(b"\x05\x01\x00")
        assert control.recv(2) == b"\x05\x00"
        control.sendall(b"\x05\x03\x00\x01\x00\x00\x00\x00\x00\x00")  # UDP ASSOCIATE, 0.0.0.0:0
        reply = control.recv(10)
        assert reply[:4] == b"\x05\x00\x00\x01", reply
        relay = (socket.inet_ntoa(reply[4:8]), int.from_bytes(reply[8:10], "big"))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(5)
            for server in (first, second):
                port = server.getsockname()[1]
                answered = None
                for attempt in range(5):  # UDP may drop: bounded tries
                    client.sendto(_socks_udp(port, b"hello %d" % attempt), relay)
                    try:
                        answered = client.recv(65535)
                        break
                    except TimeoutError:
                        continue
                # The answer comes back with the header naming where it came from.
                assert answered is not None and answered.startswith(_socks_udp(port, b"hello ")), answered
            control.close()  # the association ends with its TCP connection
            entry.wait_log("udp association ended")
        entry.wait_log("udp -> 127.0.0.1:", count=2)


def test_a_reload_rereads_the_users_file(tmp_path: Path, web: int) -> None:
    users = _users_file(tmp_path)
    exit_gw, entry = _gateways(tmp_path, "socks5", f'users_file = "{users}"')
    with running(exit_gw, entry):
        proxy = f"127.0.0.1:{entry.tunnel_port('access')}"
        url = f"http://127.0.0.1:{web}/"
        assert _curl("--socks5", proxy, "--proxy-user", "alice:wonderland", url).returncode == 0
        changed = subprocess.run([sys.executable, "-m", "gateway", "passwd", "alice"],
                                 input="looking-glass\n", capture_output=True, text=True, check=True,
                                 timeout=60)
        users.write_text(changed.stdout)
        assert entry.proc is not None
        entry.proc.send_signal(signal.SIGHUP)  # the config is the same; its users file is not
        entry.wait_log("reloaded")
        old = _curl("--socks5", proxy, "--proxy-user", "alice:wonderland", url)
        assert old.returncode != 0
        new = _curl("--socks5", proxy, "--proxy-user", "alice:looking-glass", url)
        assert new.returncode == 0 and new.stdout == BODY
