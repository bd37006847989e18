"""gateway_codecs: the tunnelgate wire protocol v1, sans-IO (bytes and events only).

Importing this package never imports trio, socket, ssl or asyncio. SPEC.md in this
folder is the byte-level specification; vectors/ holds its golden examples.
"""

from .errors import ErrorCode, LocalProtocolError, ProtocolError, RemoteProtocolError
from .events import (
    Acknowledged,
    CarrierEnded,
    CircuitAccepted,
    CircuitClosed,
    CircuitRefused,
    CircuitRequested,
    CircuitRequestRefused,
    CircuitReset,
    CreditGranted,
    DatagramReceived,
    DataReceived,
    EndOfStream,
    Event,
    GoAwayReceived,
    HandshakeComplete,
    PingReceived,
    PongReceived,
)
from .flow import ReceiveWindow, SendCredit
from .frames import (
    MAX_DATAGRAM,
    CircuitKind,
    FrameType,
    OpenRequest,
    Origin,
    ProxyHeader,
    Resumable,
    Resuming,
)
from .hello import PROTOCOL_VERSION, Capability, Settings
from .session import CarrierSession, CircuitSnapshot, CircuitState, Role

__all__ = [
    "MAX_DATAGRAM",
    "PROTOCOL_VERSION",
    "Acknowledged",
    "Capability",
    "CarrierEnded",
    "CarrierSession",
    "CircuitAccepted",
    "CircuitClosed",
    "CircuitKind",
    "CircuitRefused",
    "CircuitRequestRefused",
    "CircuitRequested",
    "CircuitReset",
    "CircuitSnapshot",
    "CircuitState",
    "CreditGranted",
    "DataReceived",
    "DatagramReceived",
    "EndOfStream",
    "ErrorCode",
    "Event",
    "FrameType",
    "GoAwayReceived",
    "HandshakeComplete",
    "LocalProtocolError",
    "OpenRequest",
    "Origin",
    "PingReceived",
    "PongReceived",
    "ProtocolError",
    "ProxyHeader",
    "ReceiveWindow",
    "RemoteProtocolError",
    "Resumable",
    "Resuming",
    "Role",
    "SendCredit",
    "Settings",
]
