"""The relay engine as the tests drive it: running, and sessions handed to it the way the
gateway's roles do (a socket and a circuit, two circuits, TLS inside a circuit)."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio

from gateway.carriers.circuit import Circuit
from gateway.relay.engine import RelayEngine, SessionEnd, Transform
from gateway.relay.ports import CircuitPort, Port, SocketPort
from gateway.relay.sessions import SessionLog


@asynccontextmanager
async def running_engine() -> AsyncIterator[RelayEngine]:
    engine = RelayEngine()
    async with trio.open_nursery() as nursery:
        await nursery.start(engine.run)
        yield engine
        nursery.cancel_scope.cancel()


def relay_socket(engine: RelayEngine, sock: socket.socket, far_side: Circuit | Port,
                 sessions: SessionLog, what: str = "test", on_end: SessionEnd | None = None,
                 socket_is_client: bool = False) -> None:
    """Relay a local socket and a circuit (or a TLS port inside one), as an entry does
    (`socket_is_client`) or an exit."""
    port = far_side if isinstance(far_side, Port) else CircuitPort(far_side)
    circuit = port.circuit if isinstance(port, CircuitPort) else None
    record = sessions.open("entry" if socket_is_client else "exit", what, circuit)
    local = SocketPort(sock, engine.readiness)
    if socket_is_client:
        engine.relay(local, port, record, on_end)
    else:
        engine.relay(port, local, record, on_end)


def bridge(engine: RelayEngine, upstream: Circuit, onward: Circuit, sessions: SessionLog,
           what: str = "test", transform: Transform | None = None) -> None:
    """Relay two circuits, as a middle relay does."""
    engine.relay(CircuitPort(upstream), CircuitPort(onward), sessions.open("relay", what, upstream),
                 transform=transform)
