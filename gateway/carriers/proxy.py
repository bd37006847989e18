"""Dialing a carrier through an HTTP CONNECT forward proxy (`[[peer]] proxy`).

The proxy gets one CONNECT for the carrier's host and port and, once it answers 2xx,
only the carrier's bytes (TLS, or the WebSocket with TLS inside): it can see where the
carrier goes, never what it carries. `proxy = "env"` reads `https_proxy` (`http_proxy`
for `ws://`) and `no_proxy` the way curl does.
"""

from __future__ import annotations

import base64
import os

import h11
import trio

from gateway.config import CarrierAddress, ProxyAddress, parse_proxy_url

MAX_RESPONSE_HEAD = 16384


class ProxyRefused(OSError):
    """The proxy answered the CONNECT with something other than 2xx (its status line)."""


def proxy_for(setting: str | None, address: CarrierAddress) -> ProxyAddress | None:
    """The proxy to dial `address` through: the configured one, the environment's
    (unless `no_proxy` names the host), or none."""
    if setting is None:
        return None
    if setting != "env":
        return parse_proxy_url(setting)
    names = ("http_proxy", "HTTP_PROXY") if address.scheme == "ws" else ("https_proxy", "HTTPS_PROXY")
    value = next((os.environ[n] for n in names if os.environ.get(n)), "")
    if not value or _bypassed(address.host):
        return None
    return parse_proxy_url(value if "://" in value else f"http://{value}")


def _bypassed(host: str) -> bool:
    """`no_proxy`: comma-separated names (a leading dot or not: the domain and below),
    addresses, or `*`."""
    listed = os.environ.get("no_proxy") or os.environ.get("NO_PROXY") or ""
    host = host.lower().rstrip(".")
    for entry in (e.strip().lower().lstrip(".") for e in listed.split(",")):
        if entry == "*" or (entry and (host == entry or host.endswith("." + entry))):
            return True
    return False


async def connect_through(proxy: ProxyAddress, host: str, port: int) -> trio.SocketStream:
    """A stream to `host:port` through `proxy` (the caller sets the deadline). A refusal
    raises ProxyRefused with the proxy's status line."""
    stream = await trio.open_tcp_stream(proxy.host, proxy.port)
    try:
        await _connect(stream, proxy, host, port)
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return stream


async def _connect(stream: trio.SocketStream, proxy: ProxyAddress, host: str, port: int) -> None:
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    headers = [("Host", authority)]
    if proxy.credentials is not None:
        token = base64.b64encode(proxy.credentials.encode("utf-8")).decode("ascii")
        headers.append(("Proxy-Authorization", f"Basic {token}"))
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_RESPONSE_HEAD)
    await stream.send_all(conn.send(h11.Request(method="CONNECT", target=authority, headers=headers)))
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise ProxyRefused(f"proxy {proxy} answered the CONNECT with malformed HTTP: {exc}") from None
        if event is h11.NEED_DATA:
            data = await stream.receive_some(4096)
            if not data:
                raise ProxyRefused(f"proxy {proxy} closed the connection before answering the CONNECT")
            conn.receive_data(data)
            continue
        if isinstance(event, h11.InformationalResponse):
            continue
        if isinstance(event, h11.Response):
            reason = event.reason.decode("latin-1", "replace")
            if 200 <= event.status_code < 300:
                if conn.trailing_data[0]:
                    raise ProxyRefused(f"proxy {proxy} sent bytes before the carrier's own")
                return
            raise ProxyRefused(f"proxy {proxy} refused CONNECT {authority}:"
                               f" HTTP {event.status_code} {reason}")
        raise ProxyRefused(f"proxy {proxy}: unexpected answer {type(event).__name__}")
