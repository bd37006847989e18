"""Circuits honour the trio stream contract (trio.testing.check_half_closeable_stream)."""

from __future__ import annotations

import trio
import trio.testing

from gateway.carriers.circuit import Circuit
from tests.carriers import carrier_pair, open_pair


async def test_circuits_pass_trio_half_closeable_stream_conformance() -> None:
    async with carrier_pair() as (dialer, inbound):

        async def maker() -> tuple[Circuit, Circuit]:
            return await open_pair(dialer, inbound)

        await trio.testing.check_half_closeable_stream(maker, None)


async def test_small_window_still_moves_a_large_transfer_in_order() -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB through a 16 KiB window
    async with carrier_pair(window=16384) as (dialer, inbound):
        a, b = await open_pair(dialer, inbound)
        received = bytearray()

        async def reader() -> None:
            while chunk := await b.receive_some(7000):
                received.extend(chunk)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await a.send_all(payload)
            await a.send_eof()
        assert bytes(received) == payload
