"""Fuzzing: whatever bytes arrive, a session raises RemoteProtocolError or nothing at all.

Random byte strings and mutated valid transcripts (bit flips, truncation, splices,
deletions, duplications), fed in random splits to a fresh session, must never raise
anything but `RemoteProtocolError`, and the session must never buffer more than one
frame header plus the payload limit it advertised (4,096 bytes before the handshake).
Also: importing the library pulls in no event loop, socket or TLS module.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
from collections.abc import Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway_codecs import (
    Capability,
    CarrierEnded,
    CarrierSession,
    CircuitKind,
    CircuitRequested,
    ErrorCode,
    OpenRequest,
    Origin,
    ProxyHeader,
    RemoteProtocolError,
    Resumable,
    Resuming,
    Role,
    Settings,
)
from gateway_codecs.frames import HEADER_SIZE, frame
from gateway_codecs.hello import MAX_HELLO_PAYLOAD

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

OPENS = (
    OpenRequest(CircuitKind.TCP, "192.0.2.1", 22),
    OpenRequest(CircuitKind.UDP, "2001:db8::1", 53),
    OpenRequest(CircuitKind.TCP, "db.internal", 5432, ("relay-b", "exit-c"), True),
    OpenRequest(CircuitKind.TCP, "10.2.0.5", 5432, ("dc",), False, Resumable(b"S" * 16, b"V" * 16)),
    OpenRequest(CircuitKind.TCP, "10.2.0.5", 5432, ("dc",), True,
                Resuming(b"S" * 16, b"K" * 16, b"W" * 16, 123456)),
    OpenRequest(CircuitKind.TCP, "service:echo", 0, ("dc",), False, Resumable(b"S" * 16, b"V" * 16),
                Origin(("198.18.0.10", 51234), ("2001:db8::1", 7), ProxyHeader.V1)),
)
# every extension is in the fuzzed bytes
CAPS = Capability.DATAGRAM | Capability.RESUME | Capability.ORIGIN | Capability.FIN_ACK
# A small window: overruns are easy.
LOCAL = Settings(initial_window=4096, session_id=b"L" * 16, capabilities=CAPS)


def transcripts() -> tuple[bytes, bytes, bytes]:
    """A dialer's and an acceptor's output from one busy conversation, HELLOs split off.

    Returns (dialer output after its HELLO, acceptor HELLO, acceptor output after it).
    """
    a = CarrierSession(Role.DIALER, Settings(initial_window=4096, session_id=b"A" * 16, capabilities=CAPS))
    b = CarrierSession(Role.ACCEPTOR, LOCAL)
    hello_a, hello_b = a.data_to_send(), b.data_to_send()
    b.receive_data(hello_a)
    a.receive_data(hello_b)
    ab, ba = bytearray(), bytearray()

    def flush() -> None:
        out_a, out_b = a.data_to_send(), b.data_to_send()
        ab.extend(out_a)
        ba.extend(out_b)
        b.receive_data(out_a)
        a.receive_data(out_b)

    ids = [a.open_circuit(r) for r in OPENS]
    a.send_data(ids[0], bytes(range(256)) * 8)
    a.send_datagram(ids[1], b"query")
    a.ping(b"abcdefgh")
    ab.extend(frame(0x40, 0xFF, 9, b"an extension v1 ignores"))
    b.receive_data(frame(0x40, 0xFF, 9, b"an extension v1 ignores"))
    flush()
    b.accept_circuit(ids[0])
    b.accept_circuit(ids[1])
    b.refuse_circuit(ids[2], ErrorCode.FORBIDDEN_ROUTE, "no route via relay-b")
    b.send_data(ids[0], b"SSH-2.0-OpenSSH_9.6\r\n" * 50)
    b.send_datagram(ids[1], b"answer")
    b.consumed(ids[0], 2048)
    b.accept_circuit(ids[3])
    b.send_ack(ids[3], 1)
    b.send_ack(ids[0], 2048)
    back = b.open_circuit(OPENS[0])
    b.ping(b"12345678")
    flush()
    a.accept_circuit(back)
    a.send_data(back, b"reverse tunnel")
    a.consumed(ids[0], 1050)
    a.send_eof(ids[0])
    b.send_eof(ids[0])
    a.send_eof(ids[3], delivered=7)  # FIN_ACK: FIN carrying an ACK
    b.send_eof(ids[3], complete=True, delivered=8)  # and saying COMPLETE
    a.reset_circuit(ids[1], ErrorCode.CANCELLED, "flow idle")
    flush()
    a.goaway(ErrorCode.NO_ERROR, "bye")
    b.goaway(ErrorCode.NO_ERROR, "bye too")
    flush()
    return bytes(ab), hello_b, bytes(ba)


AB, HELLO_B, BA = transcripts()


def dialer_hello() -> bytes:
    return CarrierSession(Role.DIALER, Settings(initial_window=4096,
                                                session_id=b"A" * 16, capabilities=CAPS)).data_to_send()


def scratch_acceptor() -> tuple[CarrierSession, bytes]:
    """An acceptor reading the dialer's stream from its first byte: the HELLO is fuzzed too.

    (It never opened circuit 2, so the unmutated stream ends in CIRCUIT_ID_ERROR there.)
    """
    return CarrierSession(Role.ACCEPTOR, LOCAL), dialer_hello() + AB


def fresh_acceptor() -> tuple[CarrierSession, bytes]:
    """An acceptor that read the dialer's HELLO and opened its own circuit 2, as b did."""
    b = CarrierSession(Role.ACCEPTOR, LOCAL)
    b.receive_data(dialer_hello())
    b.open_circuit(OPENS[0])
    b.data_to_send()
    return b, AB


def fresh_dialer() -> tuple[CarrierSession, bytes]:
    """A dialer that read the acceptor's HELLO and opened its circuits, awaiting the rest."""
    d = CarrierSession(Role.DIALER, Settings(initial_window=4096, session_id=b"A" * 16, capabilities=CAPS))
    d.receive_data(HELLO_B)
    for r in OPENS:
        d.open_circuit(r)
    d.data_to_send()
    return d, BA


def feed(session: CarrierSession, data: bytes, cuts: list[int]) -> None:
    """Feed `data` split at `cuts`; only RemoteProtocolError may escape, buffers stay bounded."""
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    try:
        for start, end in itertools.pairwise(points):
            session.receive_data(data[start:end])
            limit = (session.local_settings.max_frame_payload if session.established
                     else MAX_HELLO_PAYLOAD)
            assert len(session._inbound) <= HEADER_SIZE + limit
            session.data_to_send()  # answers (PONG, OPEN_FAIL) must not pile up either
    except RemoteProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)
        out = session.data_to_send()
        assert out  # the GOAWAY that tells the peer why
        return
    session.receive_eof()


def mutate(data: bytes, ops: list[tuple[int, int, int, bytes]]) -> bytes:
    buf = bytearray(data)
    for kind, pos, arg, blob in ops:
        if not buf:
            break
        pos %= len(buf)
        if kind == 0:  # flip one bit
            buf[pos] ^= 1 << (arg % 8)
        elif kind == 1:  # truncate
            del buf[pos:]
        elif kind == 2:  # splice random bytes in
            buf[pos:pos] = blob
        elif kind == 3:  # delete a run
            del buf[pos : pos + arg % 64 + 1]
        elif kind == 4:  # duplicate a run (replayed frames, repeated ids)
            buf[pos:pos] = buf[pos : pos + arg % 200 + 1]
        else:  # overwrite with a random byte
            buf[pos] = arg & 0xFF
    return bytes(buf)


MUTATIONS = st.lists(
    st.tuples(st.integers(0, 5), st.integers(0, 1 << 20), st.integers(0, 255),
              st.binary(max_size=24)),
    min_size=1, max_size=6)
CUTS = st.lists(st.integers(0, 1 << 20), max_size=12)
TARGETS: dict[str, Callable[[], tuple[CarrierSession, bytes]]] = {
    "acceptor": fresh_acceptor, "dialer": fresh_dialer, "scratch": scratch_acceptor}


@FUZZ
@given(data=st.binary(max_size=2048), cuts=CUTS, role=st.sampled_from(Role))
def test_random_bytes_only_raise_protocol_errors(data: bytes, cuts: list[int], role: Role) -> None:
    feed(CarrierSession(role, LOCAL), data, cuts)


@FUZZ
@given(data=st.binary(max_size=2048), cuts=CUTS, target=st.sampled_from(sorted(TARGETS)))
def test_random_bytes_after_a_valid_hello_only_raise_protocol_errors(
        data: bytes, cuts: list[int], target: str) -> None:
    session, _ = TARGETS[target]()
    if target == "scratch":
        session.receive_data(dialer_hello())
    feed(session, data, cuts)


@FUZZ
@given(ops=MUTATIONS, cuts=CUTS, target=st.sampled_from(sorted(TARGETS)))
def test_mutated_transcripts_only_raise_protocol_errors(
        ops: list[tuple[int, int, int, bytes]], cuts: list[int], target: str) -> None:
    session, transcript = TARGETS[target]()
    feed(session, mutate(transcript, ops), cuts)


def test_the_unmutated_transcripts_are_valid() -> None:
    for make in (fresh_acceptor, fresh_dialer):
        session, transcript = make()
        assert session.receive_data(transcript)
        assert session.receive_eof() == [CarrierEnded(clean=False)]  # circuit 2 is still open
    session, transcript = fresh_acceptor()
    assert sum(isinstance(e, CircuitRequested) for e in session.receive_data(transcript)) == len(OPENS)


def test_a_huge_length_is_refused_before_it_is_buffered() -> None:
    session, transcript = fresh_acceptor()
    giant = (0xFFFFFF << 8 | 0x05).to_bytes(4, "big") + b"\x00" + (1).to_bytes(4, "big")
    try:
        session.receive_data(transcript + giant)
    except RemoteProtocolError as exc:
        assert exc.code == ErrorCode.FRAME_SIZE_ERROR
    else:  # pragma: no cover
        raise AssertionError("a 16 MiB frame was accepted")


def test_importing_the_codec_loads_no_io_modules() -> None:
    code = (
        "import sys, gateway_codecs\n"
        "banned = {'trio', 'ssl', '_ssl', 'asyncio', 'socket', '_socket', 'selectors'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in banned))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stdout
