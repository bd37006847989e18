"""HAProxy's PROXY protocol header, v1 (text) and v2 (binary), sans-IO.

A target behind a tunnel sees the exit's address; an exit that writes this header
before any other byte lets it see the client's instead (SPEC.md §16). The normative
text is HAProxy's doc/proxy-protocol.txt. The parsers are the receiving side: for tests,
and for anyone accepting such headers.
"""

from __future__ import annotations

import enum
import ipaddress
from typing import NamedTuple

Address = tuple[str, int]  # (IP address, port)
_IP = ipaddress.IPv4Address | ipaddress.IPv6Address

V1_PREFIX = b"PROXY "
V1_UNKNOWN = b"PROXY UNKNOWN\r\n"
V1_MAX_LENGTH = 107  # CRLF included: "PROXY UNKNOWN" and two full IPv6 addresses and ports
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER_SIZE = 16  # signature, version/command, family/transport, length
V2_MAX_LENGTH = V2_HEADER_SIZE + 0xFFFF  # what a receiver may have to buffer


class ProxyHeaderError(Exception):
    """The bytes are not a valid PROXY header: the receiver must close the connection."""


class ParsedProxyHeader(NamedTuple):
    """A header's addresses (None both when it carries none: UNKNOWN, LOCAL, AF_UNSPEC or
    AF_UNIX; the connection's own endpoints apply) and its size in bytes; what follows
    it is the connection's data."""

    source: Address | None
    destination: Address | None
    consumed: int


class _Command(enum.IntEnum):
    LOCAL = 0x0  # the proxy's own connection (a health check): no addresses
    PROXY = 0x1


class _Family(enum.IntEnum):
    UNSPEC = 0x0
    INET = 0x1
    INET6 = 0x2
    UNIX = 0x3


class _Transport(enum.IntEnum):
    UNSPEC = 0x0
    STREAM = 0x1
    DGRAM = 0x2


_V2_VERSION = 0x2
_V2_ADDRESS_SIZE = {_Family.INET: 4, _Family.INET6: 16}


# --- encoding ------------------------------------------------------------------


def _endpoint(address: Address) -> tuple[_IP, int]:
    host, port = address
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port out of range: {port}")
    ip = ipaddress.ip_address(host)  # a host name is a caller bug: headers carry addresses
    if isinstance(ip, ipaddress.IPv6Address):
        ip = ipaddress.IPv6Address(ip.packed)  # drops a %scope: the header has no room for it
    return ip, port


def _same_family(source: Address | None,
                 destination: Address | None) -> tuple[tuple[_IP, int], tuple[_IP, int]] | None:
    """Both endpoints in one family, or None (the header says UNKNOWN / AF_UNSPEC).

    IPv4-mapped IPv6 addresses (a dual-stack socket's view of an IPv4 peer) are IPv4 when
    both endpoints are IPv4 or mapped. An IPv4 address with a true IPv6 one has no
    common family.
    """
    if source is None or destination is None:
        return None
    (src, src_port), (dst, dst_port) = _endpoint(source), _endpoint(destination)
    src4, dst4 = _as_ipv4(src), _as_ipv4(dst)
    if src4 is not None and dst4 is not None:
        return (src4, src_port), (dst4, dst_port)
    if src.version == 6 and dst.version == 6:
        return (src, src_port), (dst, dst_port)
    return None


def _as_ipv4(ip: _IP) -> ipaddress.IPv4Address | None:
    return ip if isinstance(ip, ipaddress.IPv4Address) else ip.ipv4_mapped


def _text(ip: _IP) -> str:
    """The address as inet_ntop writes it, on every Python version (3.13 changed how
    ipaddress prints IPv4-mapped addresses)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return f"::ffff:{ip.ipv4_mapped}"
    return str(ip)


def encode_v1(source: Address | None, destination: Address | None) -> bytes:
    """"PROXY TCP4|TCP6 src dst sport dport\\r\\n", or "PROXY UNKNOWN\\r\\n" when an
    address is missing or the two have no common family (the receiver then uses the
    connection's own endpoints)."""
    pair = _same_family(source, destination)
    if pair is None:
        return V1_UNKNOWN
    (src, src_port), (dst, dst_port) = pair
    protocol = "TCP4" if src.version == 4 else "TCP6"
    return f"PROXY {protocol} {_text(src)} {_text(dst)} {src_port} {dst_port}\r\n".encode("ascii")


def encode_v2(source: Address | None, destination: Address | None, *, datagram: bool = False) -> bytes:
    """The binary header: command PROXY, TCP (or UDP with `datagram`) over IPv4 or IPv6.
    Without usable addresses, family AF_UNSPEC and no address block, as the spec says
    for unknown or unsupported families."""
    pair = _same_family(source, destination)
    ver_cmd = bytes(((_V2_VERSION << 4) | _Command.PROXY,))
    if pair is None:
        return V2_SIGNATURE + ver_cmd + bytes(((_Family.UNSPEC << 4) | _Transport.UNSPEC,)) + b"\x00\x00"
    (src, src_port), (dst, dst_port) = pair
    family = _Family.INET if src.version == 4 else _Family.INET6
    transport = _Transport.DGRAM if datagram else _Transport.STREAM
    block = src.packed + dst.packed + src_port.to_bytes(2, "big") + dst_port.to_bytes(2, "big")
    return (V2_SIGNATURE + ver_cmd + bytes(((family << 4) | transport,))
            + len(block).to_bytes(2, "big") + block)


# --- parsing -------------------------------------------------------------------


def parse_header(data: bytes) -> ParsedProxyHeader | None:
    """Either version, told apart by the first byte (the spec allows a receiver to accept
    both; it must not guess whether a header is there at all)."""
    if not data:
        return None
    if data[0] == V1_PREFIX[0]:
        return parse_v1(data)
    if data[0] == V2_SIGNATURE[0]:
        return parse_v2(data)
    raise ProxyHeaderError(f"not a PROXY header: first byte 0x{data[0]:02x}")


def parse_v1(data: bytes) -> ParsedProxyHeader | None:
    """Parse a v1 line at the start of `data`; None if it may still be incomplete.

    Strict, as the spec asks: exactly one space between fields, CRLF (never a lone CR or
    LF) within 107 bytes, canonical addresses of the announced family, decimal ports
    without leading zeros. After UNKNOWN, anything up to the CRLF is ignored.
    """
    start = data[: len(V1_PREFIX)]
    if not V1_PREFIX.startswith(start):
        raise ProxyHeaderError(f"not a PROXY v1 header: it starts {bytes(start)!r}")
    line_feed = data.find(b"\n", 0, V1_MAX_LENGTH)
    if line_feed < 0:
        if len(data) >= V1_MAX_LENGTH:
            raise ProxyHeaderError(f"PROXY v1 line has no CRLF in its first {V1_MAX_LENGTH} bytes")
        carriage_return = data.find(b"\r")
        if 0 <= carriage_return < len(data) - 1:  # followed by something other than LF
            raise ProxyHeaderError("PROXY v1 line has a CR not followed by LF")
        return None
    if data[line_feed - 1] != ord("\r"):
        raise ProxyHeaderError("PROXY v1 line ends in a lone LF, not CRLF")
    line = data[: line_feed - 1]
    if b"\r" in line:  # refused whatever the line says, as it was before the LF arrived
        raise ProxyHeaderError("PROXY v1 line has a CR not followed by LF")
    consumed = line_feed + 1
    fields = line.split(b" ")  # fields[0] is PROXY: the prefix was checked
    if fields[1] == b"UNKNOWN":
        return ParsedProxyHeader(None, None, consumed)
    if fields[1] not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError(f"PROXY v1 protocol {bytes(fields[1])!r}: TCP4, TCP6 or UNKNOWN")
    if len(fields) != 6:
        raise ProxyHeaderError(f"PROXY v1 {fields[1].decode()} line has {len(fields) - 2} fields after the "
                               "protocol, expected 4 (source, destination, source port, destination port)")
    version = 4 if fields[1] == b"TCP4" else 6
    source = (_v1_address(fields[2], version), _v1_port(fields[4]))
    destination = (_v1_address(fields[3], version), _v1_port(fields[5]))
    return ParsedProxyHeader(source, destination, consumed)


def _v1_address(field: bytes, version: int) -> str:
    try:
        text = field.decode("ascii")
        # The scope-id check: ipaddress accepts "fe80::1%eth0", the spec does not.
        if "%" in text:
            raise ValueError(text)
        ip: _IP = ipaddress.IPv4Address(text) if version == 4 else ipaddress.IPv6Address(text)
    except ValueError:  # UnicodeDecodeError included
        raise ProxyHeaderError(f"PROXY v1 {bytes(field)!r} is not an IPv{version} address") from None
    return str(ip)


def _v1_port(field: bytes) -> int:
    if not (field.isdigit() and len(field) <= 5) or (len(field) > 1 and field[0] == ord("0")):
        raise ProxyHeaderError(f"PROXY v1 port {bytes(field)!r} is not a decimal 0..65535 "
                               "without leading zeros")
    port = int(field)
    if port > 0xFFFF:
        raise ProxyHeaderError(f"PROXY v1 port {port} is out of range")
    return port


def parse_v2(data: bytes) -> ParsedProxyHeader | None:
    """Parse a v2 header at the start of `data`; None if it is not complete yet.

    TLVs after the addresses are skipped unread (the length covers them). A LOCAL
    command, AF_UNSPEC or AF_UNIX give no addresses, as do families' unspecified
    transports; the connection's own endpoints apply.
    """
    start = data[: len(V2_SIGNATURE)]
    if not V2_SIGNATURE.startswith(start):
        raise ProxyHeaderError(f"not a PROXY v2 header: it starts {bytes(start)!r}")
    if len(data) <= len(V2_SIGNATURE):
        return None
    ver_cmd = data[12]
    if ver_cmd >> 4 != _V2_VERSION:
        raise ProxyHeaderError(f"PROXY v2 header with version {ver_cmd >> 4}, expected 2")
    try:
        command = _Command(ver_cmd & 0x0F)
    except ValueError:
        raise ProxyHeaderError(f"PROXY v2 header with unassigned command 0x{ver_cmd & 0x0F:x}") from None
    if len(data) < 14:
        return None
    try:
        family, transport = _Family(data[13] >> 4), _Transport(data[13] & 0x0F)
    except ValueError:
        raise ProxyHeaderError(
            f"PROXY v2 header with unknown family/transport byte 0x{data[13]:02x}") from None
    if len(data) < V2_HEADER_SIZE:
        return None
    length = int.from_bytes(data[14:16], "big")
    # Addresses are read only for TCP/UDP over IPv4/IPv6 on a PROXY command; LOCAL
    # ignores the family altogether.
    size = _V2_ADDRESS_SIZE.get(family) if transport is not _Transport.UNSPEC else None
    if command is _Command.LOCAL:
        size = None
    if size is not None and length < 2 * size + 4:
        raise ProxyHeaderError(f"PROXY v2 address block of {length} bytes, {family.name} "
                               f"{transport.name} needs {2 * size + 4}")
    end = V2_HEADER_SIZE + length
    if len(data) < end:
        return None
    if size is None:
        return ParsedProxyHeader(None, None, end)
    block = data[V2_HEADER_SIZE:end]
    ip_type = ipaddress.IPv4Address if family is _Family.INET else ipaddress.IPv6Address
    source_ip, destination_ip = ip_type(block[:size]), ip_type(block[size : 2 * size])
    ports = block[2 * size : 2 * size + 4]
    source = (str(source_ip), int.from_bytes(ports[:2], "big"))
    destination = (str(destination_ip), int.from_bytes(ports[2:], "big"))
    return ParsedProxyHeader(source, destination, end)
