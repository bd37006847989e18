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
        # Dial on demand: set when a session finds no carrier to the peer; how many
        # sessions wait for one now.
        self._wanted: dict[str, trio.Event] = {}
        self._waiting: dict[str, int] = {}

    def use(self, peers: list[PeerConfig]) -> list[Carrier]:
        """The configured peers after a reload: new circuits are judged by these entries
        (allow, route). Returns the carriers of peers no longer configured."""
        self.by_name = {p.name: p for p in peers}
        gone = [c for name, live in self._carriers.items() if name not in self.by_name for c in live]
        self._carriers = {name: self._carriers.get(name, []) for name in self.by_name}
        return gone

    def add(self, carrier: Carrier) -> None:
        assert carrier.peer_name is not None
        self._carriers.setdefault(carrier.peer_name, []).append(carrier)
        self._changed.set()
        self._changed = trio.Event()

    def remove(self, carrier: Carrier) -> None:
        if carrier.peer_name in self._carriers:
            live = self._carriers[carrier.peer_name]
            if carrier in live:
                live.remove(carrier)

    def carriers(self) -> list[Carrier]:
        return [c for live in self._carriers.values() for c in live]

    def live(self, peer: str) -> list[Carrier]:
        """The usable carriers to `peer` now, oldest first."""
        return [c for c in self._carriers.get(peer, ()) if c.usable]

    def dialed_instances(self, peer: str) -> set[str]:
        """The instance ids of `peer` we have dialed a usable carrier to (a relay tier's
        members; SPEC.md §15). Carriers the peer dialed to us do not count."""
        return {c.peer_instance for c in self.live(peer) if c.direction == "dialed" and c.peer_instance}

    def current(self, peer: str, avoid: Carrier | None = None) -> Carrier | None:
        """The usable carrier to `peer` with the fewest live circuits (the newest among
        equals: it survived the latest reconnect), or None. With several (a relay tier),
        new circuits spread over them; `avoid` is taken only if it is the only one."""
        # Per instance only its newest carrier: an older one to the same process may be
        # a half-open leftover of a reconnect, not yet found dead (a peer without instance
        # ids is one instance: its newest carrier, as before tiers).
        # A carrier whose far side takes no circuits (MAX_CIRCUITS 0: `tunnelgate bench`,
        # or any client-only gateway) is never chosen to open one.
        carriers = [c for c in self.live(peer) if c.takes_circuits]
        newest = {c.peer_instance: c for c in carriers}
        live = [c for c in carriers if newest[c.peer_instance] is c]  # still oldest first
        if not live:
            self._want(peer)
            return None
        if avoid is not None and len(live) > 1 and avoid in live:
            live.remove(avoid)
        best = live[-1]
        fewest = best.session.live_circuits
        for carrier in reversed(live):
            if carrier.session.live_circuits < fewest:
                best, fewest = carrier, carrier.session.live_circuits
        return best

    async def wait_for(self, peer: str, avoid: Carrier | None = None) -> Carrier:
        """A usable carrier to `peer`, waiting for one to come up (caller sets the deadline)."""
        self._waiting[peer] = self._waiting.get(peer, 0) + 1
        try:
            while True:
                carrier = self.current(peer, avoid)
                if carrier is not None:
                    return carrier
                await self._changed.wait()
        finally:
            self._waiting[peer] -= 1

    def _want(self, peer: str) -> None:
        event = self._wanted.get(peer)
        if event is None:
            event = self._wanted[peer] = trio.Event()
        event.set()

    async def wanted(self, peer: str) -> None:
        """Return once a session needs a carrier to `peer` (an on-demand dialer waits
        here): one is waiting now, or the next asks. Each call waits for a new need."""
        self._wanted[peer] = event = trio.Event()
        if self._waiting.get(peer):
            return
        await event.wait()
