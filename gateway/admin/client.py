"""`tunnelgate status CONFIG.toml`: ask the running gateway's admin endpoint (its
address is in the config) for /status, and print it as a table or as JSON."""

from __future__ import annotations

import http.client
import json
import socket
import sys
import time
import tomllib
from typing import Any

from gateway.config import AdminAddress, load_config, parse_admin
from gateway.errors import ConfigError, TunnelgateError

TIMEOUT = 5.0


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=TIMEOUT)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(TIMEOUT)
        sock.connect(self.path)
        self.sock = sock


def fetch(address: AdminAddress, target: str, method: str = "GET") -> tuple[int, bytes]:
    conn = (_UnixConnection(address.path) if address.path
            else http.client.HTTPConnection(address.host, address.port, timeout=TIMEOUT))
    try:
        conn.request(method, target)
        response = conn.getresponse()
        return response.status, response.read()
    except OSError as exc:
        raise TunnelgateError(f"admin endpoint {address}: {exc.strerror or exc}") from exc
    finally:
        conn.close()


def _admin_of(config_path: str) -> AdminAddress:
    try:
        address = load_config(config_path).gateway.admin
    except ConfigError:
        # A file broken elsewhere may still say where the admin endpoint is: ask it, so
        # the gateway itself refuses the reload, and logs why.
        address = _admin_in_broken(config_path)
        if address is None:
            raise
    if address is None:
        raise ConfigError(config_path, "gateway.admin", "not set: this gateway has no admin endpoint to ask")
    return address


def _admin_in_broken(config_path: str) -> AdminAddress | None:
    try:
        with open(config_path, "rb") as f:
            raw = tomllib.load(f)
        return parse_admin(raw["gateway"]["admin"])
    except (OSError, tomllib.TOMLDecodeError, KeyError, TypeError, ValueError):
        return None


def reload(config_path: str) -> int:
    """`tunnelgate reload CONFIG.toml`: the running gateway re-reads its file (exit 0),
    or refuses it and keeps its config (the one-line error, exit 2)."""
    code, body = fetch(_admin_of(config_path), "/reload", "POST")
    if code == 400:
        print(body.decode().strip(), file=sys.stderr)
        return 2
    if code != 200:
        raise TunnelgateError(f"reload: the admin endpoint answered {code}")
    print(f"reloaded: {body.decode().strip()}")
    return 0


def print_status(config_path: str, as_json: bool) -> int:
    address = _admin_of(config_path)
    code, body = fetch(address, "/status")
    if code != 200:
        raise TunnelgateError(f"admin endpoint {address}: /status answered {code}")
    if as_json:
        sys.stdout.write(body.decode())
        return 0
    print(_table(json.loads(body)))
    return 0


def _table(s: dict[str, Any]) -> str:
    lines = [f"{s['name']} {s['fingerprint']} instance {s['instance']} (tunnelgate {s['version']}),"
             f" up {_duration(s['uptime'])}{', DRAINING' if s['draining'] else ''};"
             f" {s['sessions_open']} sessions open, {s['sessions_total']} in all", ""]
    carriers: list[tuple[str, ...]] = [("PEER", "INSTANCE", "DIRECTION", "UP FOR", "RTT", "CIRCUITS",
                                        "ADDRESS")]
    now = time.time()
    for c in s["carriers"]:
        rtt = f"{c['rtt'] * 1000:.1f} ms" if c["rtt"] is not None else "-"
        carriers.append((c["peer"] or "?", c["instance"][:8] or "-", c["direction"],
                         _duration(now - c["up_since"]), rtt, str(c["open_circuits"]), c["address"]))
    tunnels: list[tuple[str, ...]] = [("TUNNEL", "LISTEN", "ROUTE", "TARGET", "OPEN", "OK", "RESET",
                                       "BYTES OUT", "BYTES BACK")]
    for t in s["tunnels"]:
        tunnels.append((t["name"], t["listen"], " -> ".join(t["route"]), t["target"],
                        str(t["open_sessions"]), str(t["sessions_ok"]), str(t["sessions_reset"]),
                        str(t["bytes_out"]), str(t["bytes_back"])))
    return "\n".join([*lines, *_columns(carriers), "", *_columns(tunnels)])


def _columns(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
