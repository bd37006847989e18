"""What every access protocol (SOCKS5, HTTP CONNECT) gives the tunnel endpoint, and the
socket reads they share.

An access session reads only its own request from the client's socket: what the client
sends after it (pipelined) stays in the kernel's buffer for the relay engine, which
reads the socket from there; no byte is held in a Python buffer the engine cannot see.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Protocol

import trio

from gateway.relay.localsock import LocalStream

_WOULD_BLOCK = (BlockingIOError, InterruptedError)


@dataclass(frozen=True)
class Destination:
    """Where a client asked to go: a host (name or address) and port, or a UDP association."""

    host: str
    port: int
    datagrams: bool = False  # SOCKS5 UDP ASSOCIATE
    user: str | None = None  # who authenticated, for the log

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        where = "udp association" if self.datagrams else f"{host}:{self.port}"
        return where if self.user is None else f"{where} (user {self.user})"


class AccessDenied(Exception):
    """The client's request was refused or malformed; it has had its answer (if its
    protocol has one), so the connection ends with FIN."""


class AccessSession(Protocol):
    """One client connection of an access listener."""

    async def negotiate(self) -> Destination:
        """Read the request (and authenticate); AccessDenied if refused."""

    async def opened(self, bound: tuple[str, int] = ("0.0.0.0", 0)) -> None:
        """Tell the client its destination is connected (or, for a UDP association, the
        address it sends its datagrams to): bytes flow from now on."""

    async def refused(self, code: int, reason: str) -> None:
        """Tell the client why its destination could not be reached (an OPEN_FAIL code)."""


class AccessProtocol(Protocol):
    """A listener's protocol and settings (users): makes one session per client."""

    def session(self, stream: LocalStream) -> AccessSession: ...


async def peek(sock: socket.socket, size: int) -> bytes:
    """Up to `size` bytes the client has sent, left in the socket; b"" at EOF."""
    while True:
        try:
            data = sock.recv(size, socket.MSG_PEEK)
        except _WOULD_BLOCK:
            await trio.lowlevel.wait_readable(sock)
            continue
        except OSError as exc:
            raise trio.BrokenResourceError(f"connection broken: {exc.strerror or exc}") from exc
        return data


def consume(sock: socket.socket, size: int) -> bytes:
    """Take `size` bytes already seen by `peek` out of the socket."""
    data = sock.recv(size)
    if len(data) != size:  # peeked bytes cannot vanish
        raise trio.BrokenResourceError(f"expected {size} buffered bytes, read {len(data)}")
    return data
