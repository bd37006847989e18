"""SOCKS5 listener (RFC 1928, with RFC 1929 username/password): the `ssh -D` of tunnels.

The destination a client names (an address, or a name resolved at the exit, never
here) becomes the circuit's target; the exit's allow rules judge it as any fixed
target, and its OPEN_FAIL code becomes the matching SOCKS reply. The request is read
byte by byte out of what is peeked, so the socket gives up exactly the negotiation and
nothing the client pipelined behind it.
"""

from __future__ import annotations

from gateway.access.base import AccessDenied, Destination, consume, peek
from gateway.relay.localsock import LocalStream
from gateway.security.users import UserDatabase
from gateway_codecs import ErrorCode
from gateway_codecs.socks5 import (
    MAX_MESSAGE,
    Command,
    NegotiationState,
    ReplyCode,
    Socks5Error,
    Socks5Negotiation,
    encode_reply,
)

_STOPS = (NegotiationState.AWAITING_VERDICT, NegotiationState.READY)

# An OPEN_FAIL code as the SOCKS5 reply a client (curl, a browser) knows how to explain.
REPLY_FOR: dict[int, ReplyCode] = {
    ErrorCode.FORBIDDEN_TARGET: ReplyCode.NOT_ALLOWED,
    ErrorCode.FORBIDDEN_ROUTE: ReplyCode.NOT_ALLOWED,
    ErrorCode.CONNECTION_REFUSED: ReplyCode.CONNECTION_REFUSED,
    ErrorCode.HOST_UNREACHABLE: ReplyCode.HOST_UNREACHABLE,
    ErrorCode.NAME_NOT_RESOLVED: ReplyCode.HOST_UNREACHABLE,
    ErrorCode.NO_ROUTE: ReplyCode.NETWORK_UNREACHABLE,
    ErrorCode.CONNECT_TIMEOUT: ReplyCode.TTL_EXPIRED,
    ErrorCode.UNSUPPORTED_KIND: ReplyCode.COMMAND_NOT_SUPPORTED,
}


class Socks5Access:
    """The settings of one `socks5://` listener."""

    def __init__(self, users: UserDatabase | None) -> None:
        self.users = users

    def session(self, stream: LocalStream) -> Socks5Session:
        return Socks5Session(stream, self.users)


class Socks5Session:
    def __init__(self, stream: LocalStream, users: UserDatabase | None) -> None:
        self.stream = stream
        self.users = users
        self.negotiation = Socks5Negotiation(require_auth=users is not None)

    async def negotiate(self) -> Destination:
        user = None
        while True:
            await self._feed_until_stop()
            if self.negotiation.state is NegotiationState.READY:
                request = self.negotiation.request
                assert request is not None
                return Destination(request.host, request.port,
                                   datagrams=request.command is Command.UDP_ASSOCIATE, user=user)
            assert self.users is not None and self.negotiation.credentials is not None
            name, password = self.negotiation.credentials
            ok = await self.users.check(name, password)
            await self.stream.send_all(self.negotiation.verdict(ok))
            if not ok:
                raise AccessDenied(f"SOCKS5 authentication failed for user {name[:64]!r}")
            user = name

    async def _feed_until_stop(self) -> None:
        """Feed peeked bytes one at a time until the machine waits for a verdict or has
        the request; take just those bytes out of the socket; send the answers."""
        sock = self.stream.sock
        while self.negotiation.state not in _STOPS:
            seen = await peek(sock, MAX_MESSAGE)
            if not seen:
                raise AccessDenied("the client closed before its SOCKS5 request was complete")
            answer = bytearray()
            used = 0
            try:
                for used in range(1, len(seen) + 1):
                    answer += self.negotiation.feed(seen[used - 1:used])
                    if self.negotiation.state in _STOPS:
                        break
            except Socks5Error as exc:
                consume(sock, used)
                await self.stream.send_all(exc.to_send)
                raise AccessDenied(f"SOCKS5: {exc}") from None
            consume(sock, used)
            if answer:
                await self.stream.send_all(bytes(answer))

    async def opened(self, bound: tuple[str, int] = ("0.0.0.0", 0)) -> None:
        # For CONNECT, BND.ADDR would be the exit's socket, far away: 0.0.0.0:0, as most
        # proxies answer. For UDP ASSOCIATE it is where the client sends its datagrams.
        await self.stream.send_all(encode_reply(ReplyCode.SUCCEEDED, *bound))

    async def refused(self, code: int, reason: str) -> None:
        await self.stream.send_all(encode_reply(REPLY_FOR.get(code, ReplyCode.GENERAL_FAILURE)))
