"""SOCKS5 (RFC 1928), server side, with username/password authentication (RFC 1929).

socksio, the usual library, speaks only the client side and has no UDP; an access
endpoint needs the server side, so it is here. `Socks5Negotiation` turns one client
connection's bytes into the replies to send and, at the end, one `Socks5Request`; the
caller does the I/O, checks the credentials, reaches the target and answers with
`encode_reply`. `parse_udp_datagram` / `encode_udp_datagram` are UDP ASSOCIATE's
per-datagram header (§7). Every failure is a `Socks5Error` carrying the bytes the client
should still get before the connection is closed.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Collection
from dataclasses import dataclass

from .frames import AddressType  # the tunnel protocol took its address types from SOCKS5

VERSION = 0x05
AUTH_VERSION = 0x01  # RFC 1929's sub-negotiation has its own version byte
MAX_HOST_NAME = 253  # DNS limit; a longer name could not be resolved nor put in an OPEN frame

# The largest message of each phase; a valid client never leaves more than that unparsed.
MAX_GREETING = 2 + 255  # VER NMETHODS METHODS[255]
MAX_AUTH = 3 + 255 + 255  # VER ULEN UNAME[255] PLEN PASSWD[255]
MAX_REQUEST = 4 + 1 + 255 + 2  # VER CMD RSV ATYP, a 255-byte name with its length, PORT
MAX_MESSAGE = max(MAX_GREETING, MAX_AUTH, MAX_REQUEST)  # 513

AUTH_SUCCEEDED = bytes((AUTH_VERSION, 0x00))
AUTH_FAILED = bytes((AUTH_VERSION, 0x01))


class ReplyCode(enum.IntEnum):
    SUCCEEDED = 0
    GENERAL_FAILURE = 1
    NOT_ALLOWED = 2
    NETWORK_UNREACHABLE = 3
    HOST_UNREACHABLE = 4
    CONNECTION_REFUSED = 5
    TTL_EXPIRED = 6
    COMMAND_NOT_SUPPORTED = 7
    ADDRESS_TYPE_NOT_SUPPORTED = 8


class Command(enum.IntEnum):
    CONNECT = 1
    BIND = 2
    UDP_ASSOCIATE = 3


class AuthMethod(enum.IntEnum):
    NO_AUTH = 0x00
    GSSAPI = 0x01
    USERNAME_PASSWORD = 0x02
    NO_ACCEPTABLE = 0xFF  # the server's answer when it accepts none of those offered


class NegotiationState(enum.Enum):
    GREETING = "greeting"  # waiting for VER NMETHODS METHODS
    AUTH = "auth"  # waiting for RFC 1929's username and password
    AWAITING_VERDICT = "awaiting verdict"  # `credentials` are set: call `verdict`
    REQUEST = "request"  # waiting for VER CMD RSV ATYP DST.ADDR DST.PORT
    READY = "ready"  # `request` and `leftover` are set: reach the target, `encode_reply`
    FAILED = "failed"  # a Socks5Error was raised or the credentials were refused: close


@dataclass(frozen=True, slots=True)
class Socks5Request:
    """What the client asked for. `host` is a dotted IPv4 address, a compressed IPv6
    address or a host name (printable ASCII, as the client sent it: never resolved)."""

    command: Command
    host: str
    port: int


@dataclass(frozen=True, slots=True)
class UdpDatagram:
    """One UDP ASSOCIATE datagram: its destination (from the client) or source (to the
    client), and its payload. Fragmentation is not supported: callers drop
    `fragment != 0`, as RFC 1928 §7 allows."""

    host: str
    port: int
    data: bytes
    fragment: int = 0


class Socks5Error(Exception):
    """The client broke the protocol or was refused.

    Send `to_send` (possibly empty) and close the connection. `reply` is the SOCKS5 reply
    code in it when the failure came at the request, None otherwise (a greeting refused
    with 0xFF, a failed authentication, or a client not speaking SOCKS5 at all).
    """

    def __init__(self, message: str, reply: ReplyCode | None = None, to_send: bytes = b"") -> None:
        super().__init__(message)
        self.reply = reply
        self.to_send = to_send


class _BadAddress(Exception):
    """An address the request phase refuses with `reply`; a UDP datagram just drops."""

    def __init__(self, message: str, reply: ReplyCode) -> None:
        super().__init__(message)
        self.reply = reply


def _refused(message: str, reply: ReplyCode) -> Socks5Error:
    return Socks5Error(message, reply, encode_reply(reply))


def _not_socks5(first: int) -> Socks5Error:
    """The first byte is all we need to tell an operator what connected instead."""
    hint = ""
    if first == 0x04:
        hint = " (a SOCKS4 client?)"
    elif ord("A") <= first <= ord("Z"):  # GET, POST, CONNECT, HEAD, ...
        hint = " (an HTTP request?)"
    elif first == 0x16:
        hint = " (a TLS ClientHello?)"
    return Socks5Error(f"not SOCKS5: version byte 0x{first:02x}{hint}")


def _method_names(methods: bytes) -> str:
    names = []
    for method in methods:
        try:
            names.append(AuthMethod(method).name)
        except ValueError:
            names.append(f"0x{method:02x}")
    return ", ".join(names)


class Socks5Negotiation:
    """The server's side of one client connection, from the greeting to the request.

    `feed` the client's bytes as they arrive, in any split, and send what it returns.
    With `require_auth`, the machine stops in AWAITING_VERDICT with `credentials` set and
    parses nothing more until `verdict` says whether they are good. In READY, `request`
    is what the client asked for and `leftover` what it sent after it (pipelined data
    for the target: forward it, it must not be lost). The caller then answers with
    `encode_reply`. Commands outside `commands` are refused with COMMAND_NOT_SUPPORTED.

    At most MAX_MESSAGE bytes of an unfinished message are ever held: any longer
    message is complete or invalid.
    """

    def __init__(self, require_auth: bool, *,
                 commands: Collection[Command] = (Command.CONNECT, Command.UDP_ASSOCIATE)) -> None:
        self._require_auth = require_auth
        self._commands = frozenset(commands)
        self._state = NegotiationState.GREETING
        self._buffer = bytearray()
        self._credentials: tuple[str, str] | None = None
        self._request: Socks5Request | None = None
        self._leftover = b""

    @property
    def state(self) -> NegotiationState:
        return self._state

    @property
    def credentials(self) -> tuple[str, str] | None:
        """(username, password) once the client sent them; kept after the verdict, so
        the caller can apply per-user policy."""
        return self._credentials

    @property
    def request(self) -> Socks5Request | None:
        """Set in READY."""
        return self._request

    @property
    def leftover(self) -> bytes:
        """Bytes the client sent after its request (READY only): the start of its data."""
        return self._leftover

    def feed(self, data: bytes) -> bytes:
        """Consume client bytes; return bytes to send to the client (possibly empty).

        Raises Socks5Error (state FAILED): send its `to_send`, which includes any reply
        this same call produced before the failure, then close.
        """
        if self._state in (NegotiationState.READY, NegotiationState.FAILED):
            raise RuntimeError(f"SOCKS5 negotiation is {self._state.value}: nothing more to feed")
        self._buffer += data
        if self._state is NegotiationState.AWAITING_VERDICT:
            return b""  # kept for after the verdict: the client may pipeline its request
        return self._advance(b"")

    def verdict(self, ok: bool) -> bytes:
        """The caller's decision on `credentials`; returns the status to send.

        On refusal the status is 0x01 and the state FAILED: send it and close. On success
        a request the client already pipelined is parsed now, so the state may be READY,
        or a Socks5Error raised whose `to_send` begins with the success status.
        """
        if self._state is not NegotiationState.AWAITING_VERDICT:
            raise RuntimeError(f"SOCKS5 negotiation is {self._state.value}: no credentials to judge")
        if not ok:
            self._state = NegotiationState.FAILED
            self._buffer.clear()
            return AUTH_FAILED
        self._state = NegotiationState.REQUEST
        return self._advance(AUTH_SUCCEEDED)

    def _advance(self, already: bytes) -> bytes:
        out = bytearray(already)
        try:
            while True:
                if self._state is NegotiationState.GREETING:
                    answer = self._greeting()
                elif self._state is NegotiationState.AUTH:
                    answer = self._auth()
                elif self._state is NegotiationState.REQUEST:
                    answer = self._parse_request()
                else:
                    break
                if answer is None:  # the message is not complete yet
                    break
                out += answer
        except Socks5Error as exc:
            self._state = NegotiationState.FAILED
            self._buffer.clear()
            exc.to_send = bytes(out) + exc.to_send
            raise
        return bytes(out)

    def _greeting(self) -> bytes | None:
        buf = self._buffer
        if not buf:
            return None
        if buf[0] != VERSION:
            raise _not_socks5(buf[0])
        if len(buf) < 2:
            return None
        count = buf[1]
        refusal = bytes((VERSION, AuthMethod.NO_ACCEPTABLE))
        if count == 0:
            raise Socks5Error("greeting offers no authentication method (NMETHODS 0)", to_send=refusal)
        if len(buf) < 2 + count:
            return None
        methods = bytes(buf[2 : 2 + count])
        del buf[: 2 + count]
        wanted = AuthMethod.USERNAME_PASSWORD if self._require_auth else AuthMethod.NO_AUTH
        if wanted not in methods:
            raise Socks5Error(f"no acceptable authentication method: the client offers "
                              f"{_method_names(methods)}, the server requires {wanted.name}",
                              to_send=refusal)
        self._state = NegotiationState.AUTH if self._require_auth else NegotiationState.REQUEST
        return bytes((VERSION, wanted))

    def _auth(self) -> bytes | None:
        buf = self._buffer
        if not buf:
            return None
        if buf[0] != AUTH_VERSION:
            raise Socks5Error(f"username/password version byte 0x{buf[0]:02x}, expected 0x01 (RFC 1929)",
                              to_send=AUTH_FAILED)
        if len(buf) < 2:
            return None
        user_end = 2 + buf[1]
        if len(buf) < user_end + 1:
            return None
        end = user_end + 1 + buf[user_end]
        if len(buf) < end:
            return None
        # RFC 1929 asks for 1..255 bytes each; empty ones are let through (curl sends an
        # empty password) for the verdict to judge.
        raw_user, raw_password = bytes(buf[2:user_end]), bytes(buf[user_end + 1 : end])
        del buf[:end]
        try:
            username = raw_user.decode("utf-8")
        except UnicodeDecodeError:
            raise Socks5Error("username is not UTF-8", to_send=AUTH_FAILED) from None
        try:
            password = raw_password.decode("utf-8")
        except UnicodeDecodeError:  # the message never shows the password
            raise Socks5Error(f"password of user {username!r} is not UTF-8", to_send=AUTH_FAILED) from None
        self._credentials = (username, password)
        self._state = NegotiationState.AWAITING_VERDICT
        return b""

    def _parse_request(self) -> bytes | None:
        buf = self._buffer
        if not buf:
            return None
        if buf[0] != VERSION:
            raise _refused(f"request version byte 0x{buf[0]:02x}, expected 0x05", ReplyCode.GENERAL_FAILURE)
        try:
            end = _address_end(buf, 3)
        except _BadAddress as exc:
            raise _refused(f"request {exc}", exc.reply) from None
        # The whole request is read before it is judged: closing with unread bytes
        # would send a TCP reset that may overtake the reply.
        if end is None or len(buf) < end:
            return None
        command_byte, reserved = buf[1], buf[2]
        if reserved != 0:
            raise _refused(f"request reserved byte 0x{reserved:02x}, must be 0x00", ReplyCode.GENERAL_FAILURE)
        try:
            command = Command(command_byte)
        except ValueError:
            raise _refused(f"unknown command 0x{command_byte:02x}", ReplyCode.COMMAND_NOT_SUPPORTED) from None
        if command not in self._commands:
            raise _refused(f"command {command.name} is not supported here", ReplyCode.COMMAND_NOT_SUPPORTED)
        try:
            host, port = _decode_address(bytes(buf[3:end]))
        except _BadAddress as exc:
            raise _refused(f"request {exc}", exc.reply) from None
        self._request = Socks5Request(command, host, port)
        self._leftover = bytes(buf[end:])
        buf.clear()
        self._state = NegotiationState.READY
        return b""


# --- addresses: ATYP | DST.ADDR | DST.PORT --------------------------------------


def _address_end(data: bytes | bytearray, start: int) -> int | None:
    """Where the address beginning at `start` ends, or None until enough of it is there
    to tell; an unknown address type or an empty name is refused at once."""
    if len(data) <= start:
        return None
    atype = data[start]
    if atype == AddressType.IPV4:
        return start + 1 + 4 + 2
    if atype == AddressType.IPV6:
        return start + 1 + 16 + 2
    if atype == AddressType.NAME:
        if len(data) <= start + 1:
            return None
        size = data[start + 1]
        if size == 0:
            raise _BadAddress("host name is empty", ReplyCode.HOST_UNREACHABLE)
        return start + 2 + size + 2
    raise _BadAddress(f"address type 0x{atype:02x} (1 IPv4, 3 host name and 4 IPv6 are known)",
                      ReplyCode.ADDRESS_TYPE_NOT_SUPPORTED)


def _decode_address(field: bytes) -> tuple[str, int]:
    """A complete ATYP | ADDR | PORT, exactly (its length was checked by _address_end)."""
    atype, port = field[0], int.from_bytes(field[-2:], "big")
    if atype == AddressType.IPV4:
        return str(ipaddress.IPv4Address(field[1:5])), port
    if atype == AddressType.IPV6:
        return str(ipaddress.IPv6Address(field[1:17])), port
    return _host_name(field[2:-2]), port


def _host_name_problem(raw: bytes) -> str | None:
    """What is wrong with a host name, or None. Printable ASCII only: NUL, CR or LF in a
    name would corrupt log lines and resolver calls."""
    if not 1 <= len(raw) <= MAX_HOST_NAME:
        return f"host name of {len(raw)} bytes (1..{MAX_HOST_NAME} allowed)"
    for index, byte in enumerate(raw):
        if not 0x21 <= byte <= 0x7E:
            return (f"host name has byte 0x{byte:02x} at offset {index}: only printable ASCII "
                    "is allowed (IDNA-encode other names)")
    return None


def _host_name(raw: bytes) -> str:
    problem = _host_name_problem(raw)
    if problem is not None:
        raise _BadAddress(problem, ReplyCode.HOST_UNREACHABLE)
    return raw.decode("ascii")


def _encode_address(host: str, port: int) -> bytes:
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"port out of range: {port}")
    port_bytes = port.to_bytes(2, "big")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if not host.isascii():
            raise ValueError(f"not an IP address nor an ASCII host name (IDNA-encode it): {host!r}") from None
        raw = host.encode("ascii")
        problem = _host_name_problem(raw)
        if problem is not None:  # never send what a parser here would refuse
            raise ValueError(f"{problem}: {host!r}") from None
        return bytes((AddressType.NAME, len(raw))) + raw + port_bytes
    atype = AddressType.IPV4 if address.version == 4 else AddressType.IPV6
    return bytes((atype,)) + address.packed + port_bytes


def encode_reply(code: ReplyCode, host: str = "0.0.0.0", port: int = 0) -> bytes:
    """The server's reply to a request; BND.ADDR's type follows `host` (IPv4, IPv6 or a
    name). For CONNECT, the address the server connected from; for UDP ASSOCIATE, where
    the client must send its datagrams; for a failure, anything (zeros)."""
    return bytes((VERSION, code, 0x00)) + _encode_address(host, port)


# --- UDP ASSOCIATE datagrams (RFC 1928 §7) -----------------------------------------


def parse_udp_datagram(packet: bytes) -> UdpDatagram:
    """Split a client's datagram into its destination and payload.

    Raises Socks5Error (with no reply: a bad datagram is dropped, the association stays)
    if the header is short or malformed.
    """
    if len(packet) < 4:
        raise Socks5Error(f"UDP datagram of {len(packet)} bytes, shorter than its header")
    if packet[0] or packet[1]:
        raise Socks5Error(f"UDP datagram reserved bytes 0x{packet[:2].hex()}, must be 0x0000")
    try:
        end = _address_end(packet, 3)
        if end is None or end > len(packet):
            raise Socks5Error(f"UDP datagram of {len(packet)} bytes ends inside its address")
        host, port = _decode_address(packet[3:end])
    except _BadAddress as exc:
        raise Socks5Error(f"UDP datagram {exc}") from None
    return UdpDatagram(host, port, packet[end:], packet[2])


def encode_udp_datagram(host: str, port: int, data: bytes) -> bytes:
    """A datagram to the client: `host` and `port` are where the payload came from."""
    return b"\x00\x00\x00" + _encode_address(host, port) + data
