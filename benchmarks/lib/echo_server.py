"""Loopback target servers for the benchmark, run as their own process.

    python echo_server.py --echo PORT --stall PORT

``--echo``: sends back whatever it receives (ping-pong, sessions, idle circuits).
``--stall``: accepts and never reads, so a sender fills the buffers and blocks
(the fairness scenario's stalled circuit).

asyncio protocols, not streams: the server should cost as little as possible so the
relays under test dominate. Runs until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import signal


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]

    def eof_received(self) -> bool:
        return False  # close our side too


class Stall(asyncio.Protocol):
    """Accept and never read: the kernel buffers fill and the sender blocks."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.pause_reading()  # type: ignore[attr-defined]


async def serve(echo_port: int, stall_port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    servers = [
        await loop.create_server(Echo, "127.0.0.1", echo_port, backlog=4096, reuse_address=True),
        await loop.create_server(Stall, "127.0.0.1", stall_port, backlog=64, reuse_address=True),
    ]
    await stop.wait()
    for server in servers:
        server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--echo", type=int, required=True)
    parser.add_argument("--stall", type=int, required=True)
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    asyncio.run(serve(args.echo, args.stall))


if __name__ == "__main__":
    main()
