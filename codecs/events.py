"""Events a `CarrierSession` returns from `receive_data`: frozen, matchable."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ErrorCode
from .frames import OpenRequest
from .hello import Capability, Settings


@dataclass(frozen=True, slots=True)
class Event:
    pass


@dataclass(frozen=True, slots=True)
class HandshakeComplete(Event):
    """The peer's HELLO arrived; circuits may be opened now."""

    peer: Settings
    version: int
    capabilities: Capability


@dataclass(frozen=True, slots=True)
class CircuitRequested(Event):
    """The peer opened a circuit; answer with accept_circuit or refuse_circuit."""

    circuit_id: int
    request: OpenRequest


@dataclass(frozen=True, slots=True)
class CircuitRequestRefused(Event):
    """The peer opened a circuit and this session refused it itself (OPEN_FAIL already
    queued): beyond max_circuits, after our GOAWAY, or a kind not negotiated. Reported
    so the refusal can be logged; nothing to answer."""

    circuit_id: int
    request: OpenRequest
    code: ErrorCode
    reason: str


@dataclass(frozen=True, slots=True)
class CircuitAccepted(Event):
    circuit_id: int


@dataclass(frozen=True, slots=True)
class CircuitRefused(Event):
    circuit_id: int
    code: ErrorCode | int
    reason: str


@dataclass(frozen=True, slots=True)
class DataReceived(Event):
    """Stream bytes; call `consumed` once the application has taken them.

    A memoryview only if the input was lent (`receive_data(..., borrow=True)`).
    """

    circuit_id: int
    data: bytes | memoryview


@dataclass(frozen=True, slots=True)
class DatagramReceived(Event):
    circuit_id: int
    data: bytes


@dataclass(frozen=True, slots=True)
class CreditGranted(Event):
    """The peer raised its receive limit: `available` bytes may be sent now."""

    circuit_id: int
    available: int


@dataclass(frozen=True, slots=True)
class EndOfStream(Event):
    """The peer half-closed its direction (FIN). FIN_ACK capability: `delivered` is the
    ACK that rode in the FIN (-1: none), to be taken as an ACK just before it; `complete`:
    the sender's session is complete, and the circuit is retired once both FINs passed."""

    circuit_id: int
    complete: bool = False
    delivered: int = -1


@dataclass(frozen=True, slots=True)
class Acknowledged(Event):
    """ACK (RESUME capability): the far endpoint has delivered `delivered` units of our
    stream (bytes, plus one for the FIN), end to end through any relays."""

    circuit_id: int
    delivered: int


@dataclass(frozen=True, slots=True)
class CircuitReset(Event):
    circuit_id: int
    code: ErrorCode | int
    reason: str


@dataclass(frozen=True, slots=True)
class CircuitClosed(Event):
    """Both directions finished cleanly; the id is retired (never reused)."""

    circuit_id: int


@dataclass(frozen=True, slots=True)
class PingReceived(Event):
    payload: bytes


@dataclass(frozen=True, slots=True)
class PongReceived(Event):
    payload: bytes


@dataclass(frozen=True, slots=True)
class GoAwayReceived(Event):
    """The peer accepts no circuit above `last_circuit_id`; older ones continue."""

    last_circuit_id: int
    code: ErrorCode | int
    reason: str


@dataclass(frozen=True, slots=True)
class CarrierEnded(Event):
    """The byte stream ended; `clean` if a GOAWAY preceded it and no circuit was live."""

    clean: bool
