"""The peer directory: who our peers are, and which carriers to them are up now."""

from __future__ import annotations

import trio

from gateway.carriers.carrier import Carrier
from gateway.config import PeerConfig


class PeerDirectory:
    """Configured peers by name and fingerprint, plus their live carriers."""

    def __init__(self, peers: list[PeerConfig]) -> None:
        self.by_name = {p.name: p for p in peers}
        self._carriers: dict[str, list[Carrier]] = {p.name: [] for p in peers}
        self._changed = trio.Event()

    def add(self, carrier: Carrier) -> None:
        assert carrier.peer_name is not None
        self._carriers[carrier.peer_name].append(carrier)
        self._changed.set()
        self._changed = trio.Event()

    def remove(self, carrier: Carrier) -> None:
        if carrier.peer_name in self._carriers:
            live = self._carriers[carrier.peer_name]
            if carrier in live:
                live.remove(carrier)

    def carriers(self) -> list[Carrier]:
        return [c for live in self._carriers.values() for c in live]

    def current(self, peer: str) -> Carrier | None:
        """A usable carrier to `peer` now, the newest first (it survived the latest
        reconnect), or None."""
        live = [c for c in self._carriers.get(peer, ()) if c.usable]
        if not live:
            return None
        return live[-1]

    async def wait_for(self, peer: str) -> Carrier:
        """A usable carrier to `peer`, waiting for one to come up (caller sets the deadline)."""
        while True:
            carrier = self.current(peer)
            if carrier is not None:
                return carrier
            await self._changed.wait()
