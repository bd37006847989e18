"""A relayed session whose circuit moves to another carrier goes on untouched (issue 10,
item 3): the circuit keeps its identity, offsets and credit, the relay engine keeps
relaying the same session, and both ends see one byte stream.

Both ends of the circuit are detached from one carrier pair and attached to a second;
the test plays the part the RESUME exchange will play (telling the far end the id)."""

from __future__ import annotations

import hashlib
import socket

import trio

from gateway.relay.sessions import SessionLog
from tests.carriers import carrier_pair, carriers, open_pair
from tests.engine import relay_socket, running_engine

MIB = 1 << 20


async def test_a_relayed_session_moves_to_another_carrier_and_completes() -> None:
    up = bytes(range(256)) * 4096 * 2  # 2 MiB, many windows on either carrier
    down = bytes(reversed(range(256))) * 4096
    sessions = SessionLog()
    listener = socket.create_server(("127.0.0.1", 0))
    client_sock = socket.create_connection(listener.getsockname())
    local, _ = listener.accept()
    listener.close()
    client = trio.SocketStream(trio.socket.from_stdlib_socket(client_sock))
    with trio.fail_after(30):
        async with carrier_pair(64 * 1024) as (dialer1, inbound1), \
                carriers(64 * 1024) as (dialer2, acceptor2, _), running_engine() as engine:
            far, near = await open_pair(dialer1, inbound1)
            relay_socket(engine, local, near, sessions, socket_is_client=True)
            (session,) = engine.sessions

            got = b""
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.send_all, up[:MIB])
                while len(got) < MIB:  # then nothing is in flight on the first carrier
                    got += await far.receive_some(MIB - len(got))
            near.detach()
            far.detach()
            await client.send_all(up[MIB:MIB + 1000])  # waits in the socket: no credit now
            await trio.sleep(0.05)
            assert near.detached and near.send_credit == 0

            new_id = near.attach(dialer2)
            assert far.attach(acceptor2, new_id) == new_id

            async def upload() -> None:
                await client.send_all(up[MIB + 1000:])
                await client.send_eof()

            async def far_end() -> None:
                nonlocal got
                await far.send_all(down)
                await far.send_eof()
                while chunk := await far.receive_some(65536):
                    got += chunk

            back = b""
            async with trio.open_nursery() as nursery:
                nursery.start_soon(upload)
                nursery.start_soon(far_end)
                while chunk := await client.receive_some(65536):
                    back += chunk
            await sessions.wait_idle()
            assert engine.sessions == set() and session.state == "ended"
    await client.aclose()
    assert hashlib.sha256(got).digest() == hashlib.sha256(up).digest()
    assert back == down
    assert (session.record.sent, session.record.received, session.record.error) == (len(up), len(down), "")

