"""One exception tree and one table of wire error codes for the protocol.

A `ProtocolError` carries the `ErrorCode` that goes on the wire (in GOAWAY, RST or
OPEN_FAIL). `RemoteProtocolError` means the peer sent something invalid: the carrier
must be closed with that code. `LocalProtocolError` means this side asked the session
for something the protocol does not allow (sending beyond credit, opening after
GOAWAY): nothing was sent, the carrier is still usable.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.IntEnum):
    """Wire error codes (u16). Names are what logs show; SPEC.md §8 lists the meanings."""

    # Carrier-level (GOAWAY) and circuit-level (RST) codes.
    NO_ERROR = 0x0000
    PROTOCOL_ERROR = 0x0001
    INTERNAL_ERROR = 0x0002
    FLOW_CONTROL_ERROR = 0x0003
    FRAME_SIZE_ERROR = 0x0004
    VERSION_MISMATCH = 0x0005
    CIRCUIT_ID_ERROR = 0x0006
    CIRCUIT_STATE_ERROR = 0x0007
    CIRCUIT_IDS_EXHAUSTED = 0x0008
    KEEPALIVE_TIMEOUT = 0x0009
    CANCELLED = 0x000A
    INTEGRITY_ERROR = 0x000B
    ROUTE_LOST = 0x000C  # a carrier on a resumable circuit's route was lost: park, resume (§14)
    # OPEN_FAIL reasons: why a circuit could not be opened.
    FORBIDDEN_TARGET = 0x0101
    FORBIDDEN_ROUTE = 0x0102
    CONNECTION_REFUSED = 0x0103
    HOST_UNREACHABLE = 0x0104
    NAME_NOT_RESOLVED = 0x0105
    CONNECT_TIMEOUT = 0x0106
    NO_ROUTE = 0x0107
    ROUTE_LOOP = 0x0108
    ROUTE_TOO_LONG = 0x0109
    UNSUPPORTED_KIND = 0x010A
    GOING_AWAY = 0x010B
    RESOURCE_LIMIT = 0x010C
    END_TO_END_FAILED = 0x010D
    RESUME_REFUSED = 0x010E  # unknown, expired, replayed or unauthorized resumption (§14)

    @classmethod
    def describe(cls, value: int) -> str:
        """A log-friendly name for any u16, known or not."""
        try:
            return cls(value).name
        except ValueError:
            return f"UNKNOWN_0x{value:04x}"


class ProtocolError(Exception):
    """Root of every error this library raises."""

    def __init__(self, message: str, code: ErrorCode = ErrorCode.PROTOCOL_ERROR) -> None:
        super().__init__(message)
        self.code = code

    def __str__(self) -> str:
        return f"{self.code.name}: {self.args[0]}"


class RemoteProtocolError(ProtocolError):
    """The peer violated the protocol; close the carrier with `code`."""


class LocalProtocolError(ProtocolError):
    """This side misused the session; nothing was sent."""
