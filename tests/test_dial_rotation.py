"""Dialing a relay tier by one name that resolves to several addresses (issue 15): each
attempt starts at its own address in turn, and falls through to the next when one is
down, so a peer's `connections` spread over the tier's members."""

from __future__ import annotations

import socket

import trio

from gateway.carriers.links import _connect_round


class _TierResolver(trio.abc.HostnameResolver):
    """`tier.test` has two loopback addresses (127.0.0.0/8 is all loopback on Linux)."""

    async def getaddrinfo(self, host, port, family=0, type=0, proto=0, flags=0):  # type: ignore[no-untyped-def]
        assert host in (b"tier.test", "tier.test")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (addr, int(port)))
                for addr in ("127.0.0.1", "127.0.0.2")]

    async def getnameinfo(self, sockaddr, flags):  # type: ignore[no-untyped-def]
        raise NotImplementedError


async def test_each_turn_starts_at_another_address_and_falls_through() -> None:
    trio.socket.set_custom_hostname_resolver(_TierResolver())
    try:
        first = socket.create_server(("127.0.0.1", 0))
        port = first.getsockname()[1]
        second = socket.create_server(("127.0.0.2", port))
        with first, second:
            reached = []
            for turn in range(4):
                stream = await _connect_round("tier.test", port, turn)
                reached.append(stream.socket.getpeername()[0])
                await stream.aclose()
            assert reached == ["127.0.0.1", "127.0.0.2", "127.0.0.1", "127.0.0.2"]
        # One member down: every turn reaches the other.
        only = socket.create_server(("127.0.0.2", port))
        with only:
            for turn in range(2):
                stream = await _connect_round("tier.test", port, turn)
                assert stream.socket.getpeername()[0] == "127.0.0.2"
                await stream.aclose()
    finally:
        trio.socket.set_custom_hostname_resolver(None)
