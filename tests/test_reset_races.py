"""A client reset must never reach the far end as a clean end of its direction, even
when the reset is met first by a send (which consumes the socket's error, so the next
read looks like EOF) and both directions of the session are moved in the same wake-up.
Issue 9's review found both: the plain splice path passed a FIN on, the end-to-end path
a TLS close_notify; the relay engine that replaced them must hold the line. Each trial:
a real carrier pair, a loopback TCP client downloading
through the session, reset (SO_LINGER 0) mid-download. Before the fixes, 10-30% of
trials leaked a clean end; the suite runs enough trials to see that.
"""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest
import trio

from gateway.carriers.circuit import Circuit
from gateway.relay.e2e import SecureStream
from gateway.relay.engine import RelayEngine
from gateway.relay.localsock import LocalStream
from gateway.relay.ports import Port
from gateway.relay.sessions import SessionLog
from gateway.security.identity import write_identity
from gateway.security.tls import client_context, server_context
from tests.carriers import carrier_pair, open_pair
from tests.engine import relay_socket

TRIALS = 60


def _downloading_client() -> tuple[socket.socket, LocalStream]:
    """A connected client (tiny buffers: a download fills them at once) and our end."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(listener.getsockname())
    conn, _ = listener.accept()
    listener.close()
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    return client, LocalStream(conn)


async def _trial(engine: RelayEngine, near: Circuit | Port, far: trio.abc.HalfCloseableStream,
                 chunk: int, pause: float) -> str:
    """How the far end saw the client's direction end: "clean" or "broken"."""
    client, stream = _downloading_client()
    seen = "open"

    async def far_end(nursery: trio.Nursery) -> None:
        nonlocal seen

        async def download() -> None:
            try:
                while True:  # small and paced: the sends meet the reset in every state
                    await far.send_all(b"x" * chunk)
                    await trio.sleep(pause)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

        nursery.start_soon(download)
        try:
            while await far.receive_some():
                pass
            seen = "clean"
        except trio.BrokenResourceError:
            seen = "broken"

    async def reset_client() -> None:
        await trio.sleep(0.03)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.close()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(far_end, nursery)
        nursery.start_soon(reset_client)
        ended = trio.Event()
        relay_socket(engine, stream.sock, near, SessionLog(), on_end=lambda error: ended.set(),
                     socket_is_client=True)
        await ended.wait()
        with trio.fail_after(5):
            while seen == "open":
                await trio.sleep(0.001)
        nursery.cancel_scope.cancel()
    return seen


@pytest.mark.parametrize("end_to_end", [False, True], ids=["plain", "end-to-end"])
async def test_a_client_reset_never_reaches_the_far_end_as_a_clean_end(tmp_path: Path,
                                                                        end_to_end: bool) -> None:
    identity = write_identity(tmp_path / "gw")
    engine = RelayEngine()
    outcomes = []
    with trio.fail_after(120):
        async with trio.open_nursery() as root:
            await root.start(engine.run)
            async with carrier_pair() as (dialer, inbound):
                for _ in range(TRIALS):
                    near, far_circuit = await open_pair(dialer, inbound)
                    near_port: Circuit | Port = near
                    far: trio.abc.HalfCloseableStream = far_circuit
                    if end_to_end:
                        near_tls = SecureStream(near, client_context(identity), server_side=False)
                        far_tls = SecureStream(far_circuit, server_context(identity, [tmp_path / "gw.crt"]),
                                               server_side=True)
                        async with trio.open_nursery() as handshakes:
                            handshakes.start_soon(near_tls.do_handshake)
                            handshakes.start_soon(far_tls.do_handshake)
                        near_port, far = near_tls.into_port(), far_tls
                    chunk, pause = (16384, 0.0) if end_to_end else (100, 0.0005)
                    outcomes.append(await _trial(engine, near_port, far, chunk, pause))
                    await far_circuit.aclose()
            root.cancel_scope.cancel()
    assert outcomes.count("clean") == 0, outcomes
