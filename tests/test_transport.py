"""Carrier transports behind one interface (issue 10, item 4): `open_transport` picks
the implementation from the scheme; TLS authenticates both ends, plain TCP nobody; both
move bytes with the same non-blocking calls the carrier uses."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from gateway.carriers.schemes import open_transport
from gateway.carriers.transport import CarrierTransport, SocketTransport, TlsTransport
from gateway.security.identity import fingerprint_of_file, write_identity
from gateway.security.tls import client_context, server_context


async def _pair(scheme: str, tmp_path: Path) -> tuple[CarrierTransport, CarrierTransport]:
    server_id, client_id = write_identity(tmp_path / "srv"), write_identity(tmp_path / "cli")
    srv_ctx = server_context(server_id, [tmp_path / "cli.crt"]) if scheme == "tls" else None
    cli_ctx = client_context(client_id, tmp_path / "srv.crt") if scheme == "tls" else None
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    accepted: list[CarrierTransport] = []
    async with trio.open_nursery() as nursery:
        async def accept() -> None:
            stream = await listeners[0].accept()
            accepted.append(await open_transport(scheme, stream, srv_ctx, server_side=True))

        nursery.start_soon(accept)
        dialed = await open_transport(scheme, await trio.open_tcp_stream("127.0.0.1", port), cli_ctx,
                                      server_side=False)
    await listeners[0].aclose()
    return dialed, accepted[0]


async def _send_all(t: CarrierTransport, data: bytes) -> None:
    view = memoryview(data)
    while view:
        sent = t.try_send(view)
        if sent is None:
            await t.wait_writable()
        else:
            view = view[sent:]


async def _receive(t: CarrierTransport, size: int) -> bytes:
    got = bytearray()
    buffer = memoryview(bytearray(65536))
    while len(got) < size:
        n = t.try_recv_into(buffer)
        if n is None:
            await t.wait_readable()
            continue
        assert n, "closed early"
        got += buffer[:n]
    return bytes(got)


@pytest.mark.parametrize("scheme", ["tcp", "tls"])
async def test_both_schemes_carry_bytes_through_the_one_interface(scheme: str, tmp_path: Path) -> None:
    with trio.fail_after(10):
        dialed, accepted = await _pair(scheme, tmp_path)
        expected = TlsTransport if scheme == "tls" else SocketTransport
        assert type(dialed) is expected and type(accepted) is expected
        if scheme == "tls":  # each end knows whom it talks to
            assert dialed.peer_fingerprint() == fingerprint_of_file(tmp_path / "srv.crt")
            assert accepted.peer_fingerprint() == fingerprint_of_file(tmp_path / "cli.crt")
        else:
            assert dialed.peer_fingerprint() is None and accepted.peer_fingerprint() is None
        data = bytes(range(256)) * 4096  # 1 MiB: many TLS records, full socket buffers
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_send_all, dialed, data)
            assert await _receive(accepted, len(data)) == data
        dialed.close()
        accepted.close()


async def test_an_unknown_scheme_is_refused() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    stream = await trio.open_tcp_stream("127.0.0.1", listeners[0].socket.getsockname()[1])
    with pytest.raises(ValueError, match="unknown carrier scheme 'quic'"):
        await open_transport("quic", stream, None, server_side=False)
    await listeners[0].aclose()
