"""Two carriers back to back over a socketpair, and circuits opened between them."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from gateway.carriers.carrier import AnyCircuit, Carrier, Timing
from gateway.carriers.circuit import Circuit
from gateway.carriers.transport import SocketTransport
from gateway_codecs import Capability, CircuitKind, OpenRequest, Role, Settings

Inbound = trio.MemoryReceiveChannel[AnyCircuit]


@asynccontextmanager
async def carrier_pair(window: int = 256 * 1024) -> AsyncIterator[tuple[Carrier, Inbound]]:
    """Two carriers back to back over an in-memory link; the acceptor's circuits are
    delivered, unanswered, on the channel."""
    async with carriers(window) as (dialer, _, inbound):
        yield dialer, inbound


@asynccontextmanager
async def carriers(window: int = 256 * 1024, resume: bool = False, fin_ack: bool = True
                   ) -> AsyncIterator[tuple[Carrier, Carrier, Inbound]]:
    """`carrier_pair`, with the acceptor's carrier too; `resume`: both announce RESUME,
    and FIN_ACK unless `fin_ack` is false (a peer from before it)."""
    left_sock, right_sock = socket.socketpair()
    for sock in (left_sock, right_sock):
        sock.setblocking(False)
    left, right = SocketTransport(left_sock), SocketTransport(right_sock)
    inbound_send, inbound_receive = trio.open_memory_channel[AnyCircuit](16)

    async def on_request(carrier: Carrier, circuit: AnyCircuit) -> None:
        await inbound_send.send(circuit)

    async def refuse_all(carrier: Carrier, circuit: AnyCircuit) -> None:
        circuit.refuse(0x0101, "test")

    capabilities = Capability.DATAGRAM
    if resume:
        capabilities |= Capability.RESUME | (Capability.FIN_ACK if fin_ack else Capability.NONE)
    settings = Settings(initial_window=window, capabilities=capabilities)
    dialer = Carrier(left, Role.DIALER, settings, Timing(), refuse_all, "acceptor", "test dialer")
    acceptor = Carrier(right, Role.ACCEPTOR, settings, Timing(), on_request, "dialer", "test acceptor")
    async with trio.open_nursery() as nursery:
        ready = trio.Event()
        count = 0

        def up(_: Carrier) -> None:
            nonlocal count
            count += 1
            if count == 2:
                ready.set()

        nursery.start_soon(dialer.run, up)
        nursery.start_soon(acceptor.run, up)
        await ready.wait()
        yield dialer, acceptor, inbound_receive
        nursery.cancel_scope.cancel()


async def open_pair(dialer: Carrier, inbound: Inbound) -> tuple[Circuit, Circuit]:
    a = dialer.open(OpenRequest(CircuitKind.TCP, "127.0.0.1", 9))
    b = await inbound.receive()
    b.accept()
    await a.wait_open()
    assert isinstance(a, Circuit) and isinstance(b, Circuit)
    return a, b
