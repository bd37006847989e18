"""A test-only fault injector: a relay that flips one payload byte in transit.

Enabled only by the environment variable TUNNELGATE_TEST_FLIP_BYTE=N on a relay
gateway: byte N of every relayed TCP circuit (counted from the entry side), and byte
N mod len of every relayed datagram from the entry side, is inverted. It exists to
prove that `end_to_end = true` turns tampering into an integrity error. It logs a
warning at start so it can never be on silently.
"""

from __future__ import annotations

import logging
import os

import trio

from gateway.udp import DatagramPort

log = logging.getLogger("tunnelgate.faults")
ENV = "TUNNELGATE_TEST_FLIP_BYTE"


def fault_injection_offset() -> int | None:
    raw = os.environ.get(ENV)
    if raw is None:
        return None
    offset = int(raw)
    log.warning("%s=%d: this relay will corrupt relayed payload (test fault injector)", ENV, offset)
    return offset


class ByteFlipper(trio.abc.HalfCloseableStream):
    """Passes a stream through, inverting the byte at `offset` of what it receives."""

    def __init__(self, inner: trio.abc.HalfCloseableStream, offset: int) -> None:
        self.inner = inner
        self.offset = offset
        self.position = 0

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self.inner.receive_some(max_bytes)
        start, self.position = self.position, self.position + len(data)
        if start <= self.offset < self.position:
            i = self.offset - start
            data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


class DatagramFlipper:
    """Inverts one byte of every datagram received through `inner`."""

    def __init__(self, inner: DatagramPort, offset: int) -> None:
        self.inner = inner
        self.offset = offset

    async def receive(self) -> bytes | None:
        data = await self.inner.receive()
        if data:
            i = self.offset % len(data)
            data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]
        return data

    async def send(self, data: bytes) -> None:
        await self.inner.send(data)
