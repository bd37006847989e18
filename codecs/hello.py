"""HELLO: the first frame each side sends: magic, version, capabilities and limits.

The settings are a list of (id u16, length u16, value) entries so that later versions
can add settings that v1 receivers skip (SPEC.md §3).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

from .errors import ErrorCode, RemoteProtocolError
from .frames import MAX_DATAGRAM, MAX_HOP_NAME, MAX_LENGTH_FIELD

MAGIC = b"TNGW"
PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = frozenset({1})
MAX_HELLO_PAYLOAD = 4096  # bounds what we buffer before we know who the peer is
MIN_MAX_FRAME_PAYLOAD = 65536  # every DATAGRAM (<= 65,535 bytes) must fit in one frame
SESSION_ID_SIZE = 16
INSTANCE_ID_SIZE = 8

_ENTRY = struct.Struct("!HH")


class Capability(enum.IntFlag):
    NONE = 0
    DATAGRAM = 1 << 0  # UDP flows (kind UDP circuits, DATAGRAM frames)
    RESUME = 1 << 1  # resumable sessions: OPEN's resumption extension and ACK (SPEC.md §14)
    ORIGIN = 1 << 2  # OPEN's origin extension: the client's address, a PROXY header (SPEC.md §16)
    FIN_ACK = 1 << 3  # with RESUME: a FIN may carry its sender's ACK and complete the session (§14)


class SettingId(enum.IntEnum):
    CAPABILITIES = 0x1  # u64 bit set
    MAX_FRAME_PAYLOAD = 0x2  # u32: the largest frame payload this side accepts
    INITIAL_WINDOW = 0x3  # u32: every circuit's initial receive limit, both kinds
    MAX_CIRCUITS = 0x4  # u32: concurrent circuits the peer may open towards us
    SESSION_ID = 0x5  # 16 bytes: identifies the session for later resumption
    NODE_NAME = 0x6  # UTF-8, <= 63 bytes: the sender's gateway name, informational
    INSTANCE_ID = 0x7  # 8 bytes: which running instance of that name (a relay tier, §15)


@dataclass(frozen=True, slots=True)
class Settings:
    """What one side announces. Defaults are SPEC.md §3's, each with its reason there."""

    max_frame_payload: int = 65536
    initial_window: int = 256 * 1024
    max_circuits: int = 16384
    capabilities: Capability = Capability.DATAGRAM
    session_id: bytes = field(default=bytes(SESSION_ID_SIZE))
    node_name: str = ""
    instance_id: bytes = b""  # empty: not announced (one instance, or an older peer)
    version: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        if not MIN_MAX_FRAME_PAYLOAD <= self.max_frame_payload <= MAX_LENGTH_FIELD:
            raise ValueError(
                f"max_frame_payload must be {MIN_MAX_FRAME_PAYLOAD}..{MAX_LENGTH_FIELD}")
        if not 1 <= self.initial_window <= 0xFFFFFFFF:
            raise ValueError("initial_window must be 1..2**32-1")
        if not 0 <= self.max_circuits <= 0xFFFFFFFF:
            raise ValueError("max_circuits must fit in u32")
        if len(self.session_id) != SESSION_ID_SIZE:
            raise ValueError("session_id must be 16 bytes")
        if len(self.node_name.encode("utf-8")) > MAX_HOP_NAME:
            raise ValueError("node_name must be at most 63 bytes")
        if len(self.instance_id) not in (0, INSTANCE_ID_SIZE):
            raise ValueError("instance_id must be empty or 8 bytes")
        if not 0 <= self.version <= 0xFFFF:
            raise ValueError("version must fit in u16")


def encode_hello(s: Settings) -> bytes:
    entries = [
        (SettingId.CAPABILITIES, int(s.capabilities).to_bytes(8, "big")),
        (SettingId.MAX_FRAME_PAYLOAD, s.max_frame_payload.to_bytes(4, "big")),
        (SettingId.INITIAL_WINDOW, s.initial_window.to_bytes(4, "big")),
        (SettingId.MAX_CIRCUITS, s.max_circuits.to_bytes(4, "big")),
        (SettingId.SESSION_ID, s.session_id),
        (SettingId.NODE_NAME, s.node_name.encode("utf-8")),
    ]
    if s.instance_id:
        entries.append((SettingId.INSTANCE_ID, s.instance_id))
    body = b"".join(_ENTRY.pack(k, len(v)) + v for k, v in entries)
    return MAGIC + s.version.to_bytes(2, "big") + body


_FIXED_SIZES = {
    SettingId.CAPABILITIES: 8,
    SettingId.MAX_FRAME_PAYLOAD: 4,
    SettingId.INITIAL_WINDOW: 4,
    SettingId.MAX_CIRCUITS: 4,
    SettingId.SESSION_ID: SESSION_ID_SIZE,
    SettingId.INSTANCE_ID: INSTANCE_ID_SIZE,
}


def decode_hello(payload: bytes) -> Settings:
    """Parse a peer's HELLO. Unknown setting ids and capability bits are ignored."""
    if len(payload) < 6 or payload[:4] != MAGIC:
        raise RemoteProtocolError("not a tunnelgate carrier (bad HELLO magic)")
    version = int.from_bytes(payload[4:6], "big")
    if version < min(SUPPORTED_VERSIONS):
        raise RemoteProtocolError(
            f"peer speaks protocol version {version}; this side needs >= {min(SUPPORTED_VERSIONS)}",
            ErrorCode.VERSION_MISMATCH,
        )
    values: dict[int, bytes] = {}
    pos = 6
    while pos < len(payload):
        if pos + 4 > len(payload):
            raise RemoteProtocolError("HELLO setting truncated", ErrorCode.FRAME_SIZE_ERROR)
        key, size = _ENTRY.unpack_from(payload, pos)
        value = bytes(payload[pos + 4 : pos + 4 + size])
        if len(value) != size:
            raise RemoteProtocolError("HELLO setting truncated", ErrorCode.FRAME_SIZE_ERROR)
        if key in values:
            raise RemoteProtocolError(f"HELLO repeats setting 0x{key:x}")
        expected = _FIXED_SIZES.get(key)
        if expected is not None and size != expected:
            raise RemoteProtocolError(f"HELLO setting 0x{key:x} must be {expected} bytes")
        values[key] = value
        pos += 4 + size
    defaults = Settings()

    def number(key: SettingId, default: int) -> int:
        raw = values.get(key)
        return default if raw is None else int.from_bytes(raw, "big")

    max_payload = number(SettingId.MAX_FRAME_PAYLOAD, defaults.max_frame_payload)
    if not MIN_MAX_FRAME_PAYLOAD <= max_payload <= MAX_LENGTH_FIELD:
        raise RemoteProtocolError(
            f"HELLO max_frame_payload {max_payload} outside"
            f" {MIN_MAX_FRAME_PAYLOAD}..{MAX_LENGTH_FIELD}"
            f" (a {MAX_DATAGRAM}-byte datagram must fit)"
        )
    window = number(SettingId.INITIAL_WINDOW, defaults.initial_window)
    if window == 0:
        raise RemoteProtocolError("HELLO initial_window must be at least 1")
    try:
        name = values.get(SettingId.NODE_NAME, b"").decode("utf-8")
    except UnicodeDecodeError:
        raise RemoteProtocolError("HELLO node name is not UTF-8") from None
    if len(name.encode("utf-8")) > MAX_HOP_NAME:
        raise RemoteProtocolError("HELLO node name longer than 63 bytes")
    known = Capability.DATAGRAM | Capability.RESUME | Capability.ORIGIN | Capability.FIN_ACK
    return Settings(
        max_frame_payload=max_payload,
        initial_window=window,
        max_circuits=number(SettingId.MAX_CIRCUITS, defaults.max_circuits),
        capabilities=Capability(number(SettingId.CAPABILITIES, 0) & known),
        session_id=values.get(SettingId.SESSION_ID, defaults.session_id),
        node_name=name,
        instance_id=values.get(SettingId.INSTANCE_ID, b""),
        version=version,
    )
