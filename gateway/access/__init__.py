"""Access endpoints: listeners whose clients name their destination (SOCKS5, HTTP CONNECT).

The protocol modules only negotiate (request, authentication, the answer); the tunnel
endpoint opens the circuit to the destination, waits for the exit to connect, and
relays exactly as for a fixed target.
"""

from __future__ import annotations

from gateway.access.base import AccessDenied, AccessProtocol, AccessSession, Destination
from gateway.config import Config, TunnelConfig

__all__ = ["AccessDenied", "AccessProtocol", "AccessSession", "Destination", "access_protocol"]


def access_protocol(tunnel: TunnelConfig, config: Config) -> AccessProtocol:
    """The protocol of `tunnel`'s listener with its users (read now: a reload re-reads them)."""
    from gateway.access.http_connect import HttpConnectAccess
    from gateway.access.socks5 import Socks5Access
    from gateway.security.users import load_users

    users = load_users(tunnel.users_file) if tunnel.users_file is not None else None
    if tunnel.listen.kind == "socks5":
        return Socks5Access(users)
    return HttpConnectAccess(users)
