"""HTTP CONNECT listener (RFC 9110 §9.3.6): CONNECT only, through h11.

The request head is read up to its blank line and no further, so a client that sends
its first bytes (a TLS ClientHello) right behind the request loses none of them. A
refusal is an HTTP answer with the reason in the body: 403 for what policy forbids, 504
when the exit's connect timed out, 502 for the rest; 407 asks for Basic credentials
when the listener has a users_file.
"""

from __future__ import annotations

import base64
import binascii
from typing import NoReturn

import h11

from gateway.access.base import AccessDenied, Destination, consume, peek
from gateway.relay.localsock import LocalStream
from gateway.security.policy import is_host_name, parse_ip
from gateway.security.users import UserDatabase
from gateway_codecs import ErrorCode

MAX_HEAD = 16384  # bytes of request line and headers; beyond: 431
REALM = b'Basic realm="tunnelgate", charset="UTF-8"'
_END_OF_HEAD = b"\r\n\r\n"

_STATUS: dict[int, int] = {
    ErrorCode.FORBIDDEN_TARGET: 403,
    ErrorCode.FORBIDDEN_ROUTE: 403,
    ErrorCode.CONNECT_TIMEOUT: 504,
}


class HttpConnectAccess:
    """The settings of one `http://` listener."""

    def __init__(self, users: UserDatabase | None) -> None:
        self.users = users

    def session(self, stream: LocalStream) -> HttpConnectSession:
        return HttpConnectSession(stream, self.users)


class HttpConnectSession:
    def __init__(self, stream: LocalStream, users: UserDatabase | None) -> None:
        self.stream = stream
        self.users = users
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)

    async def negotiate(self) -> Destination:
        head = await self._read_head()
        self.conn.receive_data(head)
        try:
            request = self.conn.next_event()
        except h11.RemoteProtocolError as exc:
            await self._deny(400, f"malformed request: {exc}")
        if not isinstance(request, h11.Request):
            await self._deny(400, "incomplete request")
        if request.method != b"CONNECT":
            method = request.method.decode("ascii", "replace")
            await self._deny(405, f"only CONNECT is served here, not {method}", [(b"Allow", b"CONNECT")])
        host, port = _authority(request.target)
        if host is None:
            target = request.target[:80].decode("ascii", "replace")
            await self._deny(400, f"CONNECT needs HOST:PORT, got {target!r}")
        user = None
        if self.users is not None:
            user = await self._authenticate(request)
        return Destination(host, port, user=user)

    async def _read_head(self) -> bytes:
        """The request line and headers, through the blank line and not a byte more."""
        sock = self.stream.sock
        head = b""
        while True:
            seen = await peek(sock, MAX_HEAD + len(_END_OF_HEAD) - len(head))
            if not seen:
                raise AccessDenied("the client closed before its request was complete")
            # The blank line may straddle what was already taken and what is peeked.
            window = head[-3:] + seen
            end = window.find(_END_OF_HEAD)
            if end >= 0:
                return head + consume(sock, end + len(_END_OF_HEAD) - len(head[-3:]))
            head += consume(sock, len(seen))
            if len(head) > MAX_HEAD:
                await self._deny(431, f"request head over {MAX_HEAD} bytes")

    async def _authenticate(self, request: h11.Request) -> str:
        assert self.users is not None
        credentials = dict(request.headers).get(b"proxy-authorization", b"")
        scheme, _, token = credentials.partition(b" ")
        name = password = ""
        if scheme.lower() == b"basic":
            try:
                decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
                name, _, password = decoded.partition(":")
            except (binascii.Error, UnicodeDecodeError):
                name = password = ""
        if not name or not await self.users.check(name, password):
            await self._deny(407, "proxy authentication required" if not credentials
                             else f"authentication failed for user {name[:64]!r}",
                             [(b"Proxy-Authenticate", REALM)])
        return name

    async def opened(self, bound: tuple[str, int] = ("0.0.0.0", 0)) -> None:
        await self.stream.send_all(self.conn.send(h11.Response(status_code=200, headers=[],
                                                               reason=b"Connection established")) or b"")

    async def refused(self, code: int, reason: str) -> None:
        await self._answer(_STATUS.get(code, 502), f"{ErrorCode.describe(code)}: {reason}")

    async def _deny(self, status: int, reason: str,
                    headers: list[tuple[bytes, bytes]] | None = None) -> NoReturn:
        await self._answer(status, reason, headers)
        raise AccessDenied(f"HTTP {status}: {reason}")

    async def _answer(self, status: int, reason: str,
                      headers: list[tuple[bytes, bytes]] | None = None) -> None:
        """An error answer with the reason as its body; the connection closes after it."""
        body = (reason + "\n").encode("utf-8", "replace")
        fields = [(b"Content-Type", b"text/plain; charset=utf-8"),
                  (b"Content-Length", str(len(body)).encode()), (b"Connection", b"close"), *(headers or [])]
        out = None
        if self.conn.our_state is h11.SEND_RESPONSE:
            try:
                out = self.conn.send(h11.Response(status_code=status, headers=fields))
            except h11.LocalProtocolError:
                out = None
        if out is None:
            out = _raw_head(status, fields)
        await self.stream.send_all(out + body)


def _raw_head(status: int, fields: list[tuple[bytes, bytes]]) -> bytes:
    """A response head for a request h11 could not parse (it has no state to answer from)."""
    lines = [f"HTTP/1.1 {status} ".encode(), *(name + b": " + value for name, value in fields)]
    return b"\r\n".join(lines) + b"\r\n\r\n"


def _authority(target: bytes) -> tuple[str, int] | tuple[None, int]:
    """``host:port`` or ``[v6]:port`` of a CONNECT request."""
    text = target.decode("ascii", "replace")
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        return None, 0
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        return (host, int(port_text)) if parse_ip(host) is not None and ":" in host else (None, 0)
    if parse_ip(host) is not None or is_host_name(host):
        return host, int(port_text)
    return None, 0
