"""Which transport a carrier address's scheme names: the one place that maps them.

`tcp` a plain socket, `tls` TLS 1.3 on it, `ws`/`wss` a WebSocket (with outer TLS for
wss) carrying the same TLS 1.3 inside (transport.py, websocket.py).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

import trio

from gateway.carriers.transport import CarrierTransport, SocketTransport, TlsTransport
from gateway.carriers.websocket import SecureWebSocketTransport, WebSocketTransport


@dataclass(frozen=True)
class WebSocketEnd:
    """What a WebSocket transport needs beyond the socket: the URL's path and Host, and
    the outer TLS context (`wss://`)."""

    path: str
    host: str = ""
    outer: ssl.SSLContext | None = None
    server_name: str | None = None  # the outer TLS's SNI (a dialed name; none for an address)


async def open_transport(scheme: str, stream: trio.SocketStream, context: ssl.SSLContext | None,
                         server_side: bool, websocket: WebSocketEnd | None = None) -> CarrierTransport:
    """The transport `scheme` names, over a connected TCP stream (the caller sets the
    deadline). The one place that maps a scheme to a transport; `context` is the TLS
    context for schemes that use one (inside the WebSocket for ws and wss)."""
    sock = SocketTransport.from_trio(stream)
    if scheme == "tcp":
        return SocketTransport(sock)
    try:
        if scheme == "tls":
            assert context is not None
            return await TlsTransport.handshake(sock, context, server_side)
        if scheme in ("ws", "wss"):
            assert context is not None and websocket is not None
            raw = SocketTransport(sock)
            if scheme == "wss":
                assert websocket.outer is not None
                raw = await TlsTransport.handshake(sock, websocket.outer, server_side,
                                                   None if server_side else websocket.server_name)
            cls = SecureWebSocketTransport if scheme == "wss" else WebSocketTransport
            if server_side:
                return await cls.accept(raw, websocket.path, context)
            return await cls.dial(raw, websocket.host, websocket.path, context)
    except BaseException:
        sock.close()
        raise
    sock.close()
    raise ValueError(f"unknown carrier scheme {scheme!r}")
