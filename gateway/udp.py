"""Datagram relaying: one function moves whole datagrams both ways with an idle timeout.

Every UDP role is two `DatagramPort`s joined by `relay_datagrams`: a listener flow and
a circuit at the edge, a circuit and a connected socket at the exit, two circuits in a
middle relay. Nothing here ever blocks the carrier: circuits drop (and count) instead.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Protocol

import trio

from gateway.circuit import DatagramCircuit

MAX_UDP_PAYLOAD = 65535  # receive buffer: any datagram fits (65,507 over IPv4)
# Errors a UDP send can report for an earlier datagram (ICMP): the flow goes on.
_TRANSIENT = {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ENOBUFS,
              errno.EAGAIN, errno.EMSGSIZE}


class DatagramPort(Protocol):
    async def receive(self) -> bytes | None: ...  # None: the flow ended
    async def send(self, data: bytes) -> None: ...


class CircuitPort:
    def __init__(self, circuit: DatagramCircuit) -> None:
        self.circuit = circuit

    async def receive(self) -> bytes | None:
        return await self.circuit.receive()

    async def send(self, data: bytes) -> None:
        self.circuit.send(data)  # drops and counts when the carrier is backed up
        await trio.lowlevel.checkpoint()


class SocketPort:
    """A connected UDP socket (exit side: one per flow, so replies come back to it)."""

    def __init__(self, sock: trio.socket.SocketType) -> None:
        self.sock = sock
        self.errors = 0

    async def receive(self) -> bytes | None:
        while True:
            try:
                return await self.sock.recv(MAX_UDP_PAYLOAD)
            except OSError as exc:
                if exc.errno not in _TRANSIENT:
                    raise
                self.errors += 1

    async def send(self, data: bytes) -> None:
        try:
            await self.sock.send(data)
        except OSError as exc:
            if exc.errno not in _TRANSIENT:
                raise
            self.errors += 1


@dataclass
class DatagramCounts:
    a_to_b: int = 0
    b_to_a: int = 0
    bytes_a_to_b: int = 0
    bytes_b_to_a: int = 0
    idle: bool = False
    error: BaseException | None = None


async def relay_datagrams(a: DatagramPort, b: DatagramPort, idle_timeout: float) -> DatagramCounts:
    """Relay until either side ends or breaks the flow, or nothing moved for `idle_timeout` s.

    A broken side is reported in `error`, not raised: the caller logs it."""
    counts = DatagramCounts()
    last = trio.current_time()

    async def pump(src: DatagramPort, dst: DatagramPort, forward: bool,
                   scope: trio.CancelScope) -> None:
        nonlocal last
        while True:
            try:
                data = await src.receive()
                if data is None:
                    scope.cancel()
                    return
                last = trio.current_time()
                await dst.send(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                counts.error = counts.error or exc
                scope.cancel()
                return
            if forward:
                counts.a_to_b += 1
                counts.bytes_a_to_b += len(data)
            else:
                counts.b_to_a += 1
                counts.bytes_b_to_a += len(data)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(pump, a, b, True, nursery.cancel_scope)
        nursery.start_soon(pump, b, a, False, nursery.cancel_scope)
        while True:
            await trio.sleep_until(last + idle_timeout)
            if trio.current_time() >= last + idle_timeout:
                counts.idle = True
                nursery.cancel_scope.cancel()
                break
    return counts
