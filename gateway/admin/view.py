"""What the admin endpoint sees of a running gateway: references, never copies; every
figure is read when it is asked for (a scrape), so serving it costs the data path nothing."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from gateway.carriers.carrier import Carrier
from gateway.carriers.links import Links
from gateway.carriers.peers import PeerDirectory
from gateway.config import Config
from gateway.relay.engine import RelayEngine
from gateway.relay.resume import ResumeTable
from gateway.relay.sessions import SessionLog

VERSION = "0.1.0"


@dataclass
class GatewayView:
    config: Config
    fingerprint: str
    links: Links
    peers: PeerDirectory
    sessions: SessionLog
    engine: RelayEngine
    resume: ResumeTable
    started: float = field(default_factory=time.time)
    listening: bool = False  # every listener bound
    draining: bool = False

    @property
    def instance(self) -> str:
        return self.links.instance_id.hex()

    @property
    def uptime(self) -> float:
        return time.time() - self.started

    def carriers(self) -> list[Carrier]:
        return [c for c in self.peers.carriers() if c.up_since]

    def live_bytes(self) -> dict[tuple[str, str], tuple[int, int]]:
        """Bytes each way of the TCP sessions still open, per (role, tunnel): a scrape
        adds them to the ended sessions' totals, so counters move during long sessions."""
        live: dict[tuple[str, str], tuple[int, int]] = {}
        for session in self.engine.sessions:
            record = session.record
            key = record.role, record.tunnel
            out, back = live.get(key, (0, 0))
            live[key] = out + session.forward.moved, back + session.backward.moved
        return live
