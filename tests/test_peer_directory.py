"""Which carrier a new circuit takes (issue 15): the least loaded among a peer's live
carriers, counting only the newest carrier to each instance (an older one to the same
process may be a half-open leftover of a reconnect); never `avoid` if there is another."""

from __future__ import annotations

from dataclasses import dataclass, field

from gateway.carriers.peers import PeerDirectory
from gateway.config import PeerConfig


@dataclass
class _Session:
    live_circuits: int = 0


@dataclass(eq=False)
class _Carrier:
    peer_instance: str
    circuits: int = 0
    direction: str = "dialed"
    peer_name: str = "hub"
    usable: bool = True
    takes_circuits: bool = True
    session: _Session = field(default_factory=_Session)

    def __post_init__(self) -> None:
        self.session.live_circuits = self.circuits


def _directory(*carriers: _Carrier) -> PeerDirectory:
    peers = PeerDirectory([PeerConfig(name="hub", fingerprint="SHA256:" + "A" * 43)])
    for c in carriers:
        peers.add(c)  # type: ignore[arg-type]
    return peers


def test_the_least_loaded_instance_takes_new_circuits() -> None:
    a, b, c = _Carrier("a", 5), _Carrier("b", 2), _Carrier("c", 7)
    peers = _directory(a, b, c)
    assert peers.current("hub") is b
    assert peers.current("hub", avoid=b) is a
    assert peers.dialed_instances("hub") == {"a", "b", "c"}


def test_only_the_newest_carrier_to_an_instance_counts() -> None:
    stale = _Carrier("a", 0)  # idle, but perhaps dead: the peer process reconnected since
    fresh = _Carrier("a", 3)
    other = _Carrier("b", 4)
    peers = _directory(stale, other, fresh)
    assert peers.current("hub") is fresh


def test_without_instance_ids_the_newest_carrier_is_used_as_before() -> None:
    old, new = _Carrier("", 0), _Carrier("", 9)
    assert _directory(old, new).current("hub") is new


def test_carriers_the_peer_dialed_do_not_count_as_our_slots() -> None:
    peers = _directory(_Carrier("a", direction="accepted"), _Carrier("b"))
    assert peers.dialed_instances("hub") == {"b"}


def test_a_client_only_instance_is_never_picked_for_new_circuits() -> None:
    """`tunnelgate bench` dials as this gateway's identity with MAX_CIRCUITS 0: sessions
    towards that name must not land on it."""
    bench = _Carrier("bench", 0, takes_circuits=False)
    real = _Carrier("real", 40)
    assert _directory(real, bench).current("hub") is real
    assert _directory(bench).current("hub") is None
