"""Frame layout: the 9-byte header, frame types, and payload encoders/decoders.

Everything here is a pure function of bytes. SPEC.md §2-§7 is the normative text; the
golden vectors in vectors/ pin the exact bytes.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
import struct
from dataclasses import dataclass

from .errors import ErrorCode, RemoteProtocolError

# length (u24) and type (u8) share the first u32; then flags (u8), circuit id (u32).
HEADER = struct.Struct("!IBI")
HEADER_SIZE = HEADER.size  # 9
MAX_LENGTH_FIELD = (1 << 24) - 1
MAX_CIRCUIT_ID = (1 << 31) - 1  # the top bit is reserved and must be zero

_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")
_CODE_AND_LEN = struct.Struct("!HH")

MAX_REASON_BYTES = 1024  # a reason is for a log line, not a document
# The largest DATAGRAM payload: a u16-sized UDP payload. It holds any IPv4 UDP payload
# (65,507 bytes) plus the 24 bytes an end-to-end sealed flow adds to each datagram.
MAX_DATAGRAM = 65535
MAX_HOST_NAME = 253  # DNS limit
MAX_HOP_NAME = 63  # gateway names are DNS labels
MAX_ROUTE_HOPS = 32  # hard wire cap; gateways enforce a smaller configured limit


class FrameType(enum.IntEnum):
    HELLO = 0x01
    OPEN = 0x02
    OPEN_OK = 0x03
    OPEN_FAIL = 0x04
    DATA = 0x05
    MAX_DATA = 0x06
    FIN = 0x07
    RST = 0x08
    PING = 0x09
    PONG = 0x0A
    GOAWAY = 0x0B
    DATAGRAM = 0x0C
    ACK = 0x0D  # RESUME capability: end-to-end delivery acknowledgement (SPEC.md §14)


class CircuitKind(enum.IntEnum):
    TCP = 1  # reliable byte stream: DATA, FIN, MAX_DATA
    UDP = 2  # datagram flow: DATAGRAM, FIN


class OpenFlags(enum.IntFlag):
    NONE = 0
    END_TO_END = 0x01  # the opener runs TLS 1.3 inside the circuit with the exit
    RESUMABLE = 0x02  # RESUME capability: a new session the endpoints may resume (§14)
    RESUMING = 0x04  # RESUME capability: this OPEN resumes an earlier session (§14)
    ORIGIN = 0x08  # ORIGIN capability: the client's addresses follow, maybe a PROXY header (§16)


_END_TO_END, _F_RESUMABLE, _F_RESUMING, _F_ORIGIN = (int(f) for f in (
    OpenFlags.END_TO_END, OpenFlags.RESUMABLE, OpenFlags.RESUMING, OpenFlags.ORIGIN))


class FinFlags(enum.IntFlag):
    """FIN's flags (FIN_ACK capability, SPEC.md §8 and §14)."""

    NONE = 0
    ACK = 0x01  # the payload is the sender's ACK (u64 delivered), as if an ACK came first
    COMPLETE = 0x02  # the session is complete: no RST NO_ERROR follows; every hop retires it


class AddressType(enum.IntEnum):
    IPV4 = 1
    NAME = 3
    IPV6 = 4


def header(frame_type: int, flags: int, circuit_id: int, length: int) -> bytes:
    return HEADER.pack((length << 8) | frame_type, flags, circuit_id)


def frame(frame_type: int, flags: int, circuit_id: int, payload: bytes = b"") -> bytes:
    return header(frame_type, flags, circuit_id, len(payload)) + payload


# --- reasons (OPEN_FAIL, RST, GOAWAY) ---------------------------------------------


def encode_reason(code: int, reason: str) -> bytes:
    raw = reason.encode("utf-8")[:MAX_REASON_BYTES]
    # Never cut a multi-byte character in half.
    raw = raw.decode("utf-8", "ignore").encode("utf-8")
    return _CODE_AND_LEN.pack(code, len(raw)) + raw


def decode_reason(payload: bytes, offset: int = 0) -> tuple[int, str]:
    if len(payload) < offset + 4:
        raise RemoteProtocolError("reason too short", ErrorCode.FRAME_SIZE_ERROR)
    code, size = _CODE_AND_LEN.unpack_from(payload, offset)
    end = offset + 4 + size
    if size > MAX_REASON_BYTES or end != len(payload):
        raise RemoteProtocolError("reason length does not match frame", ErrorCode.FRAME_SIZE_ERROR)
    try:
        text = bytes(payload[offset + 4 : end]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RemoteProtocolError("reason is not UTF-8") from exc
    return code, text


def encode_goaway(last_circuit_id: int, code: int, reason: str) -> bytes:
    return last_circuit_id.to_bytes(4, "big") + encode_reason(code, reason)


def decode_goaway(payload: bytes) -> tuple[int, int, str]:
    if len(payload) < 4:
        raise RemoteProtocolError("GOAWAY too short", ErrorCode.FRAME_SIZE_ERROR)
    last = int.from_bytes(payload[:4], "big")
    if last > MAX_CIRCUIT_ID:
        raise RemoteProtocolError("GOAWAY last circuit id out of range")
    code, reason = decode_reason(payload, 4)
    return last, code, reason


def encode_u64(value: int) -> bytes:
    return _U64.pack(value)


def decode_u64(payload: bytes) -> int:
    if len(payload) != 8:
        raise RemoteProtocolError("expected an 8-byte payload", ErrorCode.FRAME_SIZE_ERROR)
    value: int = _U64.unpack(payload)[0]
    return value


# --- OPEN -----------------------------------------------------------------------


RESUME_ID_SIZE = 16  # session id, secret and verifier: 128 bits each
_RESUMABLE = 0x01  # extension tags after OPEN's route (SPEC.md §14)
_RESUMING = 0x02
_ORIGIN = 0x03  # the session's origin (SPEC.md §16)


class ProxyHeader(enum.IntEnum):
    """Which PROXY protocol header the exit writes to the target before any byte (§16)."""

    NONE = 0
    V1 = 1
    V2 = 2


@dataclass(frozen=True, slots=True)
class Origin:
    """Where a session came from: the client's address and the address it connected to
    at the entry (as PROXY protocol's source and destination), and whether the exit
    announces them to the target with a PROXY header."""

    source: tuple[str, int]
    destination: tuple[str, int]
    proxy_header: ProxyHeader = ProxyHeader.NONE


@dataclass(frozen=True, slots=True)
class Resumable:
    """A new session its endpoints may resume: its id, and SHA-256(secret)[:16], which
    only the entry can answer (it reveals the secret when it resumes)."""

    session_id: bytes
    verifier: bytes


@dataclass(frozen=True, slots=True)
class Resuming:
    """Resume `session_id`: the secret behind the last verifier, the next verifier (a
    secret is good once), and how far the resumer has delivered the exit's stream."""

    session_id: bytes
    secret: bytes
    next_verifier: bytes
    delivered: int


class _Keep:
    """`OpenRequest.evolve`'s "leave this field as it is" (None is a value there)."""


_KEEP = _Keep()


@dataclass(frozen=True, slots=True)
class OpenRequest:
    """What an OPEN frame asks for: the target as the exit will see it, and the route."""

    kind: CircuitKind
    host: str
    port: int
    route: tuple[str, ...] = ()
    end_to_end: bool = False
    resume: Resumable | Resuming | None = None
    origin: Origin | None = None

    def evolve(self, *, route: tuple[str, ...] | None = None,
               resume: Resumable | Resuming | _Keep | None = _KEEP,
               origin: Origin | _Keep | None = _KEEP) -> OpenRequest:
        """A copy with these fields changed: `dataclasses.replace` for the per-session
        paths (several times faster; it costs a few microseconds per call)."""
        return OpenRequest(self.kind, self.host, self.port, self.route if route is None else route,
                           self.end_to_end, self.resume if isinstance(resume, _Keep) else resume,
                           self.origin if isinstance(origin, _Keep) else origin)

    @property
    def flags(self) -> int:
        """The OPEN frame's flags (`OpenFlags` bits; plain ints: Flag operators are slow)."""
        flags = _END_TO_END if self.end_to_end else 0
        if self.resume is not None:
            flags |= _F_RESUMABLE if type(self.resume) is Resumable else _F_RESUMING
        if self.origin is not None:
            flags |= _F_ORIGIN
        return flags


@functools.lru_cache(maxsize=1024)  # a tunnel opens the same target again and again
def _encode_host(host: str) -> bytes:
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raw = host.encode("idna") if not host.isascii() else host.encode("ascii")
        if not 1 <= len(raw) <= MAX_HOST_NAME:
            raise ValueError(f"host name must be 1..{MAX_HOST_NAME} bytes: {host!r}") from None
        return bytes((AddressType.NAME, len(raw))) + raw
    if addr.version == 4:
        return bytes((AddressType.IPV4,)) + addr.packed
    return bytes((AddressType.IPV6,)) + addr.packed


def encode_open(request: OpenRequest) -> bytes:
    if not 0 <= request.port <= 0xFFFF:
        raise ValueError(f"port out of range: {request.port}")
    if len(request.route) > MAX_ROUTE_HOPS:
        raise ValueError(f"route longer than {MAX_ROUTE_HOPS} hops")
    parts = [bytes((request.kind,)), _U16.pack(request.port), _encode_host(request.host)]
    parts.append(bytes((len(request.route),)))
    for hop in request.route:
        raw = hop.encode("utf-8")
        if not 1 <= len(raw) <= MAX_HOP_NAME:
            raise ValueError(f"hop name must be 1..{MAX_HOP_NAME} bytes: {hop!r}")
        parts.append(bytes((len(raw),)) + raw)
    resume = request.resume
    if isinstance(resume, Resumable):
        parts += [bytes((_RESUMABLE,)), _sized(resume.session_id), _sized(resume.verifier)]
    elif isinstance(resume, Resuming):
        parts += [bytes((_RESUMING,)), _sized(resume.session_id), _sized(resume.secret),
                  _sized(resume.next_verifier), _U64.pack(resume.delivered)]
    origin = request.origin
    if origin is not None:
        parts += [bytes((_ORIGIN, origin.proxy_header)), _encode_endpoint(*origin.source),
                  _encode_endpoint(*origin.destination)]
    return b"".join(parts)


def _encode_endpoint(host: str, port: int) -> bytes:
    """An origin address: IPv4 or IPv6 only (a client's address is never a name)."""
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port out of range: {port}")
    addr = ipaddress.ip_address(host)
    atype = AddressType.IPV4 if addr.version == 4 else AddressType.IPV6
    return bytes((atype,)) + addr.packed + _U16.pack(port)


def _sized(value: bytes) -> bytes:
    if len(value) != RESUME_ID_SIZE:
        raise ValueError(f"resumption ids are {RESUME_ID_SIZE} bytes")
    return value


class _Reader:
    """Bounds-checked cursor over a payload; every short read is a RemoteProtocolError."""

    __slots__ = ("data", "pos", "what")

    def __init__(self, data: bytes, what: str) -> None:
        self.data = data
        self.pos = 0
        self.what = what

    def take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise RemoteProtocolError(f"{self.what} truncated", ErrorCode.FRAME_SIZE_ERROR)
        chunk = self.data[self.pos : end]
        self.pos = end
        return bytes(chunk)

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return int.from_bytes(self.take(2), "big")


def decode_open(payload: bytes, flags: int, resume: bool = False, origin: bool = False) -> OpenRequest:
    """`resume`, `origin`: the RESUME and ORIGIN capabilities were negotiated; without
    them their flags and extensions are reserved bits and bytes, ignored as v1 says."""
    r = _Reader(payload, "OPEN")
    kind_raw = r.u8()
    try:
        kind = CircuitKind(kind_raw)
    except ValueError:
        raise RemoteProtocolError(f"OPEN with unknown circuit kind {kind_raw}") from None
    port = r.u16()
    atype = r.u8()
    if atype == AddressType.IPV4:
        host = str(ipaddress.IPv4Address(r.take(4)))
    elif atype == AddressType.IPV6:
        host = str(ipaddress.IPv6Address(r.take(16)))
    elif atype == AddressType.NAME:
        size = r.u8()
        raw = r.take(size)
        if not 1 <= size <= MAX_HOST_NAME or not all(32 < b < 127 for b in raw):
            raise RemoteProtocolError("OPEN host name must be 1..253 printable ASCII bytes")
        host = raw.decode("ascii")
    else:
        raise RemoteProtocolError(f"OPEN with unknown address type {atype}")
    hops = r.u8()
    if hops > MAX_ROUTE_HOPS:
        raise RemoteProtocolError(f"OPEN route has {hops} hops, more than {MAX_ROUTE_HOPS}")
    route = []
    for _ in range(hops):
        size = r.u8()
        raw = r.take(size)
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise RemoteProtocolError("OPEN hop name is not UTF-8") from None
        if not 1 <= size <= MAX_HOP_NAME:
            raise RemoteProtocolError("OPEN hop name must be 1..63 bytes")
        route.append(name)
    extension: Resumable | Resuming | None = None
    if resume and flags & (_F_RESUMABLE | _F_RESUMING):
        if flags & _F_RESUMABLE and flags & _F_RESUMING:
            raise RemoteProtocolError("OPEN both RESUMABLE and RESUMING")
        tag = r.u8()
        if flags & _F_RESUMABLE:
            if tag != _RESUMABLE:
                raise RemoteProtocolError("RESUMABLE OPEN without its extension")
            extension = Resumable(r.take(RESUME_ID_SIZE), r.take(RESUME_ID_SIZE))
        else:
            if tag != _RESUMING:
                raise RemoteProtocolError("RESUMING OPEN without its extension")
            extension = Resuming(r.take(RESUME_ID_SIZE), r.take(RESUME_ID_SIZE), r.take(RESUME_ID_SIZE),
                                 int.from_bytes(r.take(8), "big"))
    where_from = None
    if origin and flags & _F_ORIGIN:
        if r.u8() != _ORIGIN:
            raise RemoteProtocolError("ORIGIN OPEN without its extension")
        header_raw = r.u8()
        try:
            proxy_header = ProxyHeader(header_raw)
        except ValueError:
            raise RemoteProtocolError(f"OPEN origin with unknown PROXY header version {header_raw}") from None
        where_from = Origin(_decode_endpoint(r), _decode_endpoint(r), proxy_header)
    # Bytes after the route (and after the negotiated extensions) are reserved for
    # extensions and ignored.
    return OpenRequest(kind, host, port, tuple(route), bool(flags & _END_TO_END), extension,
                       where_from)


def _decode_endpoint(r: _Reader) -> tuple[str, int]:
    atype = r.u8()
    if atype == AddressType.IPV4:
        host = str(ipaddress.IPv4Address(r.take(4)))
    elif atype == AddressType.IPV6:
        host = str(ipaddress.IPv6Address(r.take(16)))
    else:
        raise RemoteProtocolError(f"OPEN origin with address type {atype}: IPv4 or IPv6 only")
    return host, r.u16()
