"""GET /status: the gateway, its carriers and its tunnels, as JSON (`tunnelgate status`
prints it as a table)."""

from __future__ import annotations

from typing import Any

from gateway.admin.view import VERSION, GatewayView


def status(view: GatewayView) -> dict[str, Any]:
    gw = view.config.gateway
    s = view.sessions
    carriers = [{
        "peer": c.peer_name,
        "instance": c.peer_instance,
        "address": c.description,
        "direction": c.direction,
        "up_since": round(c.up_since, 3),
        "rtt": c.rtt,
        "open_circuits": len(c.circuits),
    } for c in view.carriers()]
    live = view.live_bytes()
    tunnels = []
    for t in view.config.tunnel:
        key = "entry", t.name
        out, back = live.get(key, (0, 0))
        tunnels.append({
            "name": t.name,
            "listen": str(t.listen),
            "route": list(t.via),
            "target": str(t.target),
            "end_to_end": t.end_to_end,
            "open_sessions": s.open_by[key],
            "sessions_ok": s.ended["entry", t.name, "ok"],
            "sessions_reset": s.ended["entry", t.name, "reset"],
            "bytes_out": s.bytes_out[key] + out,
            "bytes_back": s.bytes_back[key] + back,
        })
    return {"name": gw.name, "fingerprint": view.fingerprint, "instance": view.instance,
            "version": VERSION, "uptime": round(view.uptime, 3),
            "draining": view.draining, "sessions_open": s.active, "sessions_total": s.total,
            "carriers": carriers, "tunnels": tunnels}
