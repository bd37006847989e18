"""JSON logs (issue 12): `log_format = "json"` (or `run --log-format json`) writes one JSON
object per line, with the event's fields; every line of a real session's logs parses."""

from __future__ import annotations

import json
import socket
from pathlib import Path

from tests.gateways import GatewayProcess, pair_configs, running, wait_until


def _events(gw: GatewayProcess) -> list[dict[str, object]]:
    return [json.loads(line) for line in gw.log().splitlines() if line.strip()]


def test_every_line_is_a_json_object_with_the_events_fields(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as target:
        tunnels = (f'[[tunnel]]\nname = "t"\nlisten = "tcp://127.0.0.1:0"\nvia = ["exit"]\n'
                   f'target = "127.0.0.1:{target.getsockname()[1]}"\n')
        exit_gw, entry = pair_configs(tmp_path, tunnels_on_entry=tunnels)
        exit_gw.config_path.write_text(exit_gw.config_path.read_text().replace(
            "[gateway]\n", '[gateway]\nlog_format = "json"\n', 1))
        entry.extra_args = ("--log-format", "json")
        with running(exit_gw, entry):
            wait_until(lambda: any(e.get("event") == "carrier_up" for e in _events(entry)), 20,
                       "a carrier_up event in entry's log")
            with socket.create_connection(("127.0.0.1", entry.tunnel_port("t")), timeout=10) as c:
                c.sendall(b"hello")
                c.shutdown(socket.SHUT_WR)
                server, _ = target.accept()
                with server:
                    server.settimeout(10)
                    assert server.recv(100) == b"hello"
                    assert server.recv(100) == b""
                    server.sendall(b"hi!")
                c.settimeout(10)
                assert c.recv(100) == b"hi!"
            entry.wait_log('"event": "session_closed"')
            exit_gw.wait_log('"event": "session_closed"')
    for gw in (entry, exit_gw):
        events = _events(gw)  # every line parses
        assert all({"ts", "level", "logger", "event", "message"} <= e.keys() for e in events)
        closed = [e for e in events if e["event"] == "session_closed"]
        assert len(closed) == 1
    (closed,) = [e for e in _events(entry) if e["event"] == "session_closed"]
    assert closed["bytes_out"] == 5 and closed["bytes_back"] == 3 and closed["outcome"] == "ok"
    assert closed["tunnel"] == "t" and closed["role"] == "entry" and isinstance(closed["duration"], float)
    up = [e for e in _events(entry) if e["event"] == "carrier_up"]
    assert up and up[0]["peer"] == "exit" and up[0]["direction"] == "dialed" and up[0]["instance"]
