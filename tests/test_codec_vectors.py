"""Golden vectors: codecs/vectors/vectors.json pins the exact bytes of every frame type.

One scripted conversation between a dialer and an acceptor produces each frame through
the public session API; every frame must equal its vector byte for byte (encode), and
feeding the vector's bytes to the peer session must give the expected events (decode).
A second, independent check splits each vector by the layout SPEC.md gives and
compares the fields. If the format changes, these tests fail: change the vectors and
SPEC.md together, deliberately.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import gateway_codecs
from gateway_codecs import (
    Acknowledged,
    Capability,
    CarrierSession,
    CircuitAccepted,
    CircuitClosed,
    CircuitKind,
    CircuitRefused,
    CircuitRequested,
    CircuitReset,
    CreditGranted,
    DatagramReceived,
    DataReceived,
    EndOfStream,
    ErrorCode,
    Event,
    GoAwayReceived,
    HandshakeComplete,
    OpenRequest,
    Origin,
    PingReceived,
    PongReceived,
    ProxyHeader,
    Resumable,
    Resuming,
    Role,
    Settings,
)
from tests.codec_helpers import parse_frames

VECTORS_FILE = Path(gateway_codecs.__file__).parent / "vectors" / "vectors.json"

DIALER = Settings(session_id=bytes(range(16)), node_name="edge-a")
ACCEPTOR = Settings(max_frame_payload=1 << 20, initial_window=128 * 1024, max_circuits=100,
                    session_id=bytes(range(0x10, 0x20)), node_name="edge-b")
OPEN_IPV4 = OpenRequest(CircuitKind.TCP, "192.0.2.10", 443)
OPEN_IPV6 = OpenRequest(CircuitKind.UDP, "2001:db8::53", 53)
OPEN_NAME = OpenRequest(CircuitKind.TCP, "db.internal", 5432, ("relay-b", "exit-c"), True)
HTTP_GET = b"GET / HTTP/1.1\r\n\r\n"
DNS_QUERY = bytes.fromhex("12340100000100000000000003777777076578616d706c6503636f6d0000010001")
PING = bytes.fromhex("0102030405060708")

Step = tuple[str, Callable[[], bytes], CarrierSession, list[Event]]


def conversation() -> Iterator[Step]:
    """(vector name, produce the frame, the session that decodes it, expected events)."""
    a = CarrierSession(Role.DIALER, DIALER)
    b = CarrierSession(Role.ACCEPTOR, ACCEPTOR)
    caps = Capability.DATAGRAM
    yield "hello_dialer", a.data_to_send, b, [
        HandshakeComplete(DIALER, 1, caps)]
    yield "hello_acceptor", b.data_to_send, a, [
        HandshakeComplete(ACCEPTOR, 1, caps)]

    def opened(request: OpenRequest) -> Callable[[], bytes]:
        def produce() -> bytes:
            a.open_circuit(request)
            return a.data_to_send()
        return produce

    yield "open_ipv4", opened(OPEN_IPV4), b, [CircuitRequested(1, OPEN_IPV4)]
    yield "open_ipv6_udp", opened(OPEN_IPV6), b, [CircuitRequested(3, OPEN_IPV6)]
    yield "open_name_route_e2e", opened(OPEN_NAME), b, [CircuitRequested(5, OPEN_NAME)]

    def then(action: Callable[[], object], session: CarrierSession) -> Callable[[], bytes]:
        def produce() -> bytes:
            action()
            return session.data_to_send()
        return produce

    yield "open_ok", then(lambda: b.accept_circuit(1), b), a, [CircuitAccepted(1)]
    yield "open_fail", then(lambda: b.refuse_circuit(
        5, ErrorCode.FORBIDDEN_ROUTE, "route via relay-b not allowed"), b), a, [
        CircuitRefused(5, ErrorCode.FORBIDDEN_ROUTE, "route via relay-b not allowed")]
    yield "data", then(lambda: a.send_data(1, HTTP_GET), a), b, [DataReceived(1, HTTP_GET)]

    def grow() -> None:
        b.consumed(1, len(HTTP_GET))
        b.set_receive_window(1, 1 << 20)

    yield "max_data", then(grow, b), a, [CreditGranted(1, 1 << 20)]
    yield "fin", then(lambda: a.send_eof(1), a), b, [EndOfStream(1)]
    yield "rst", then(lambda: b.reset_circuit(1, ErrorCode.CANCELLED, "client went away"), b), \
        a, [CircuitReset(1, ErrorCode.CANCELLED, "client went away")]
    yield "ping", then(lambda: a.ping(PING), a), b, [PingReceived(PING)]
    yield "pong", b.data_to_send, a, [PongReceived(PING)]
    yield "datagram", then(lambda: a.send_datagram(3, DNS_QUERY), a), b, [
        DatagramReceived(3, DNS_QUERY)]
    yield "unknown_type", lambda: bytes.fromhex("0000043f8000000000deadbeef"), a, []
    yield "goaway", then(lambda: b.goaway(ErrorCode.NO_ERROR, "maintenance"), b), a, [
        GoAwayReceived(5, ErrorCode.NO_ERROR, "maintenance")]


RESUMING_DIALER = Settings(capabilities=Capability.DATAGRAM | Capability.RESUME,
                           session_id=bytes(range(16)), node_name="edge-a")
RESUMING_ACCEPTOR = Settings(capabilities=Capability.DATAGRAM | Capability.RESUME,
                             session_id=bytes(range(0x10, 0x20)), node_name="hub")
SESSION = bytes(range(0x20, 0x30))
SECRET = bytes(range(0x30, 0x40))
VERIFIER = bytes.fromhex("f59e5fb8b3a17a5d0b1c5c9b5a0a0e4b")  # an opaque 16 bytes for the vector
OPEN_RESUMABLE = OpenRequest(CircuitKind.TCP, "10.2.0.5", 5432, ("dc",), False,
                             Resumable(SESSION, VERIFIER))
OPEN_RESUMING = OpenRequest(CircuitKind.TCP, "10.2.0.5", 5432, ("dc",), False,
                            Resuming(SESSION, SECRET, bytes(range(0x40, 0x50)), 1048576))


def resume_conversation() -> Iterator[Step]:
    """SPEC.md §14: a resumable OPEN, an ACK, and the OPEN that resumes the session on a
    later carrier (here the same session pair, for brevity)."""
    a = CarrierSession(Role.DIALER, RESUMING_DIALER)
    b = CarrierSession(Role.ACCEPTOR, RESUMING_ACCEPTOR)
    caps = Capability.DATAGRAM | Capability.RESUME
    yield "resume_hello_dialer", a.data_to_send, b, [HandshakeComplete(RESUMING_DIALER, 1, caps)]
    yield "resume_hello_acceptor", b.data_to_send, a, [HandshakeComplete(RESUMING_ACCEPTOR, 1, caps)]

    def opened(request: OpenRequest) -> Callable[[], bytes]:
        def produce() -> bytes:
            a.open_circuit(request)
            return a.data_to_send()
        return produce

    def acked() -> bytes:
        b.accept_circuit(1)
        b.data_to_send()  # the OPEN_OK, already pinned by "open_ok"
        b.send_ack(1, 1048577)
        return b.data_to_send()

    yield "open_resumable", opened(OPEN_RESUMABLE), b, [CircuitRequested(1, OPEN_RESUMABLE)]
    yield "ack", acked, a, [Acknowledged(1, 1048577)]
    yield "open_resuming", opened(OPEN_RESUMING), b, [CircuitRequested(3, OPEN_RESUMING)]


TIER_INSTANCE = Settings(capabilities=Capability.DATAGRAM | Capability.RESUME,
                         session_id=bytes(range(16)), node_name="hub",
                         instance_id=bytes.fromhex("a1b2c3d4e5f60718"))


def tier_conversation() -> Iterator[Step]:
    """SPEC.md §15: one instance of a relay tier announces its instance id."""
    a = CarrierSession(Role.DIALER, TIER_INSTANCE)
    b = CarrierSession(Role.ACCEPTOR, RESUMING_ACCEPTOR)
    yield "instance_hello", a.data_to_send, b, [
        HandshakeComplete(TIER_INSTANCE, 1, Capability.DATAGRAM | Capability.RESUME)]


ORIGIN_CAPS = Capability.DATAGRAM | Capability.RESUME | Capability.ORIGIN
ORIGIN_DIALER = Settings(capabilities=ORIGIN_CAPS, session_id=bytes(range(16)), node_name="edge")
ORIGIN_ACCEPTOR = Settings(capabilities=ORIGIN_CAPS, session_id=bytes(range(16, 32)), node_name="dc")
OPEN_ORIGIN = OpenRequest(CircuitKind.TCP, "10.2.0.5", 5432, ("dc",), False, Resumable(SESSION, VERIFIER),
                          Origin(("198.18.0.10", 51234), ("127.0.0.1", 5432), ProxyHeader.V1))
OPEN_SERVICE = OpenRequest(CircuitKind.TCP, "service:echo", 0, (), False, None,
                           Origin(("2001:db8::7", 40000), ("2001:db8::1", 7), ProxyHeader.V2))


def origin_conversation() -> Iterator[Step]:
    """SPEC.md §16 and §17: the origin extension after the resumption one, and a built-in
    service as the target."""
    a = CarrierSession(Role.DIALER, ORIGIN_DIALER)
    b = CarrierSession(Role.ACCEPTOR, ORIGIN_ACCEPTOR)
    yield "origin_hello_dialer", a.data_to_send, b, [HandshakeComplete(ORIGIN_DIALER, 1, ORIGIN_CAPS)]
    yield "origin_hello_acceptor", b.data_to_send, a, [HandshakeComplete(ORIGIN_ACCEPTOR, 1, ORIGIN_CAPS)]

    def opened(request: OpenRequest) -> Callable[[], bytes]:
        def produce() -> bytes:
            a.open_circuit(request)
            return a.data_to_send()
        return produce

    yield "open_origin", opened(OPEN_ORIGIN), b, [CircuitRequested(1, OPEN_ORIGIN)]
    yield "open_service", opened(OPEN_SERVICE), b, [CircuitRequested(3, OPEN_SERVICE)]


FIN_ACK_CAPS = Capability.DATAGRAM | Capability.RESUME | Capability.FIN_ACK
FIN_ACK_DIALER = Settings(capabilities=FIN_ACK_CAPS, session_id=bytes(range(16)), node_name="edge")
FIN_ACK_ACCEPTOR = Settings(capabilities=FIN_ACK_CAPS, session_id=bytes(range(16, 32)), node_name="dc")


def fin_ack_conversation() -> Iterator[Step]:
    """SPEC.md §8 and §14: the end of a resumable session with FIN_ACK. The entry's FIN
    carries its ACK; the exit's FIN carries its ACK and says COMPLETE (no RST NO_ERROR)."""
    a = CarrierSession(Role.DIALER, FIN_ACK_DIALER)
    b = CarrierSession(Role.ACCEPTOR, FIN_ACK_ACCEPTOR)
    yield "fin_ack_hello_dialer", a.data_to_send, b, [HandshakeComplete(FIN_ACK_DIALER, 1, FIN_ACK_CAPS)]
    yield "fin_ack_hello_acceptor", b.data_to_send, a, [HandshakeComplete(FIN_ACK_ACCEPTOR, 1, FIN_ACK_CAPS)]

    def opened() -> bytes:
        a.open_circuit(OPEN_RESUMABLE)
        b.receive_data(a.data_to_send())  # (the OPEN is pinned by "open_resumable")
        b.accept_circuit(1)
        a.receive_data(b.data_to_send())
        a.send_eof(1, delivered=6)  # the exit's 6 bytes, delivered
        return a.data_to_send()

    def completed() -> bytes:
        b.send_eof(1, complete=True, delivered=19)  # the entry's 18 bytes and its FIN
        return b.data_to_send()

    yield "fin_with_ack", opened, b, [EndOfStream(1, delivered=6)]
    yield "fin_complete", completed, a, [EndOfStream(1, complete=True, delivered=19), CircuitClosed(1)]


def load() -> dict[str, dict[str, str]]:
    entries = json.loads(VECTORS_FILE.read_text())["vectors"]
    return {e["name"]: e for e in entries}


def test_every_vector_is_encoded_and_decoded_exactly() -> None:
    vectors = load()
    names = []
    for name, produce, decoder, expected in [*conversation(), *resume_conversation(),
                                              *tier_conversation(), *origin_conversation(),
                                              *fin_ack_conversation()]:
        names.append(name)
        produced = produce()
        assert produced.hex() == vectors[name]["hex"], f"{name}: encoding drifted"
        assert decoder.receive_data(bytes.fromhex(vectors[name]["hex"])) == expected, name
    assert sorted(names) == sorted(vectors), "a vector is not exercised, or one is missing"


def test_vector_headers_match_their_annotations() -> None:
    for name, entry in load().items():
        (frame,) = parse_frames(bytes.fromhex(entry["hex"]))
        assert entry["type"] == frame.type, name
        assert entry["flags"] == frame.flags, name
        assert entry["circuit_id"] == frame.circuit_id, name
        assert "".join(entry["layout"].split()).replace("|", "") == entry["hex"], name


def test_hello_vector_layout_by_hand() -> None:
    """Read the dialer HELLO with nothing but SPEC.md §3 and struct."""
    payload = parse_frames(bytes.fromhex(load()["hello_dialer"]["hex"]))[0].payload
    assert payload[:4] == b"TNGW" and struct.unpack("!H", payload[4:6]) == (1,)
    settings = {}
    pos = 6
    while pos < len(payload):
        key, size = struct.unpack_from("!HH", payload, pos)
        settings[key] = payload[pos + 4 : pos + 4 + size]
        pos += 4 + size
    assert settings == {
        1: (1).to_bytes(8, "big"),
        2: (65536).to_bytes(4, "big"),
        3: (262144).to_bytes(4, "big"),
        4: (16384).to_bytes(4, "big"),
        5: bytes(range(16)),
        6: b"edge-a",
    }


def test_origin_vector_by_hand() -> None:
    """SPEC.md §16's layout, read with nothing but the text: after the resumption
    extension, tag 3, the PROXY header version, then source and destination."""
    frame = parse_frames(bytes.fromhex(load()["open_origin"]["hex"]))[0]
    assert frame.flags == 0x02 | 0x08
    tail = frame.payload[-(1 + 1 + 7 + 7):]
    assert tail == (bytes([3, 1]) + bytes([1, 198, 18, 0, 10]) + (51234).to_bytes(2, "big")
                    + bytes([1, 127, 0, 0, 1]) + (5432).to_bytes(2, "big"))
    service = parse_frames(bytes.fromhex(load()["open_service"]["hex"]))[0].payload
    assert service[:3 + 2 + 12] == bytes([1, 0, 0, 3, 12]) + b"service:echo"


@pytest.mark.parametrize("name", ["open_ipv4", "open_ipv6_udp", "open_name_route_e2e"])
def test_open_vectors_by_hand(name: str) -> None:
    frame = parse_frames(bytes.fromhex(load()[name]["hex"]))[0]
    p = frame.payload
    if name == "open_ipv4":
        assert p == bytes([1]) + (443).to_bytes(2, "big") + bytes([1, 192, 0, 2, 10, 0])
    elif name == "open_ipv6_udp":
        addr = bytes.fromhex("20010db8000000000000000000000053")
        assert p == bytes([2]) + (53).to_bytes(2, "big") + bytes([4]) + addr + bytes([0])
    else:
        assert frame.flags == 0x01
        assert p == (bytes([1]) + (5432).to_bytes(2, "big") + bytes([3, 11]) + b"db.internal"
                     + bytes([2, 7]) + b"relay-b" + bytes([6]) + b"exit-c")
