"""A client reset must never reach the far end as a clean end of its direction, even
when the reset is met first by a send (which consumes the socket's error, so the next
read looks like EOF) and both pumps of a spliced session wake in the same batch.
Issue 9's review found both: the plain splice path passed a FIN on, the end-to-end path
a TLS close_notify. Each trial: a real carrier pair, a loopback TCP client downloading
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
from gateway.relay.localsock import LocalStream
from gateway.relay.socket_relay import SocketRelay
from gateway.relay.splice import SpliceResult
from gateway.security.identity import write_identity
from gateway.security.tls import client_context, server_context
from tests.carriers import carrier_pair, open_pair

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


async def _trial(relay: SocketRelay, near: Circuit, near_stream: trio.abc.HalfCloseableStream,
                 far: trio.abc.HalfCloseableStream, chunk: int, pause: float) -> str:
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
        await relay.splice_socket(stream, near_stream, near, SpliceResult())
        with trio.fail_after(5):
            while seen == "open":
                await trio.sleep(0.001)
        nursery.cancel_scope.cancel()
    return seen


@pytest.mark.parametrize("end_to_end", [False, True], ids=["plain", "end-to-end"])
async def test_a_client_reset_never_reaches_the_far_end_as_a_clean_end(tmp_path: Path,
                                                                        end_to_end: bool) -> None:
    identity = write_identity(tmp_path / "gw")
    relay = SocketRelay()
    outcomes = []
    with trio.fail_after(120):
        async with trio.open_nursery() as root:
            await root.start(relay.run)
            async with carrier_pair() as (dialer, inbound):
                for _ in range(TRIALS):
                    near, far_circuit = await open_pair(dialer, inbound)
                    near_stream: trio.abc.HalfCloseableStream = near
                    far: trio.abc.HalfCloseableStream = far_circuit
                    if end_to_end:
                        near_stream = SecureStream(near, client_context(identity), server_side=False)
                        far = SecureStream(far_circuit, server_context(identity, [tmp_path / "gw.crt"]),
                                           server_side=True)
                        async with trio.open_nursery() as handshakes:
                            handshakes.start_soon(near_stream.do_handshake)  # type: ignore[attr-defined]
                            handshakes.start_soon(far.do_handshake)  # type: ignore[attr-defined]
                    chunk, pause = (16384, 0.0) if end_to_end else (100, 0.0005)
                    outcomes.append(await _trial(relay, near, near_stream, far, chunk, pause))
                    await far_circuit.aclose()
            root.cancel_scope.cancel()
    assert outcomes.count("clean") == 0, outcomes
