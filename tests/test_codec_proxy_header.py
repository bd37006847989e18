"""PROXY protocol headers (gateway_codecs.proxy_header) against HAProxy's proxy-protocol.txt.

Golden bytes are the spec's own examples and limits (§2.1's lines and their maximum
lengths, §2.2's signature and protocol bytes); every prefix of a header is "incomplete",
never an error; each malformation the spec names is refused; and fuzzing: encode then
parse gives the addresses back, and arbitrary bytes raise nothing but ProxyHeaderError.
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway_codecs.proxy_header import (
    V1_MAX_LENGTH,
    V2_SIGNATURE,
    Address,
    ParsedProxyHeader,
    ProxyHeaderError,
    encode_v1,
    encode_v2,
    parse_header,
    parse_v1,
    parse_v2,
)

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

SIGNATURE = bytes.fromhex("0D0A0D0A000D0A515549540A")  # §2.2, as the spec spells it
FFFF6 = ":".join(["ffff"] * 8)
HTTP = b"GET / HTTP/1.1\r\nHost: 192.168.0.11\r\n\r\n"


def test_signature() -> None:
    assert V2_SIGNATURE == SIGNATURE


# --- v1 ------------------------------------------------------------------------------


def test_spec_example_line() -> None:
    line = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"
    assert encode_v1(("192.168.0.1", 56324), ("192.168.0.11", 443)) == line
    assert parse_v1(line + HTTP) == ParsedProxyHeader(
        ("192.168.0.1", 56324), ("192.168.0.11", 443), len(line))


@pytest.mark.parametrize(("line", "length"), [
    (b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n", 56),
    (f"PROXY TCP6 {FFFF6} {FFFF6} 65535 65535\r\n".encode(), 104),
    (b"PROXY UNKNOWN\r\n", 15),
    (f"PROXY UNKNOWN {FFFF6} {FFFF6} 65535 65535\r\n".encode(), 107),
], ids=["tcp4", "tcp6", "unknown", "unknown-worst-case"])
def test_spec_maximum_lengths(line: bytes, length: int) -> None:
    assert len(line) == length
    parsed = parse_v1(line + HTTP)
    assert parsed is not None
    assert parsed.consumed == length


def test_tcp4_and_tcp6_encodings_at_the_limits() -> None:
    assert encode_v1(("255.255.255.255", 65535), ("255.255.255.255", 65535)) == (
        b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n")
    assert encode_v1((FFFF6, 65535), (FFFF6, 65535)) == f"PROXY TCP6 {FFFF6} {FFFF6} 65535 65535\r\n".encode()
    assert encode_v1(("2001:db8::1", 51000), ("2001:db8::2", 22)) == (
        b"PROXY TCP6 2001:db8::1 2001:db8::2 51000 22\r\n")


@pytest.mark.parametrize(("source", "destination"), [
    (None, ("192.0.2.1", 80)),
    (("192.0.2.1", 80), None),
    (None, None),
    (("192.0.2.1", 1), ("2001:db8::1", 2)),  # no common family
])
def test_unknown(source: Address | None, destination: Address | None) -> None:
    assert encode_v1(source, destination) == b"PROXY UNKNOWN\r\n"
    assert encode_v2(source, destination) == SIGNATURE + bytes.fromhex("21000000")


def test_ipv4_mapped_addresses_are_ipv4() -> None:
    """A dual-stack listener sees an IPv4 client as ::ffff:a.b.c.d."""
    expected = b"PROXY TCP4 192.0.2.1 192.0.2.2 1 2\r\n"
    assert encode_v1(("::ffff:192.0.2.1", 1), ("::ffff:192.0.2.2", 2)) == expected
    assert encode_v1(("::ffff:192.0.2.1", 1), ("192.0.2.2", 2)) == expected
    assert encode_v2(("::ffff:c000:201", 1), ("192.0.2.2", 2))[12:14] == bytes.fromhex("2111")
    # With a true IPv6 address, a mapped one stays IPv6, written as inet_ntop does.
    assert encode_v1(("::ffff:192.0.2.1", 1), ("2001:db8::2", 2)) == (
        b"PROXY TCP6 ::ffff:192.0.2.1 2001:db8::2 1 2\r\n")


def test_scope_id_is_dropped() -> None:
    assert encode_v1(("fe80::1%eth0", 1), ("fe80::2%eth0", 2)) == b"PROXY TCP6 fe80::1 fe80::2 1 2\r\n"


@pytest.mark.parametrize(("source", "destination"), [
    (("example.com", 1), ("192.0.2.1", 2)),  # names are not addresses
    (("192.0.2.1", 65536), ("192.0.2.2", 2)),
    (("192.0.2.1", 1), ("192.0.2.2", -1)),
])
def test_encoders_refuse_bad_input(source: Address, destination: Address) -> None:
    with pytest.raises(ValueError):
        encode_v1(source, destination)
    with pytest.raises(ValueError):
        encode_v2(source, destination)


def test_unknown_ignores_the_rest_of_its_line() -> None:
    line = b"PROXY UNKNOWN whatever \xff here\r\n"
    assert parse_v1(line + HTTP) == ParsedProxyHeader(None, None, len(line))


@pytest.mark.parametrize(("data", "message"), [
    (b"GET / HTTP/1.1\r\n", "not a PROXY v1 header"),
    (b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "not a PROXY v1 header"),
    (b"PROXY\r\n", "not a PROXY v1 header"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "lone LF"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX", "CR not followed by LF"),
    (b"PROXY UNKNOWN\r\r\n", "CR not followed by LF"),
    (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "protocol b'TCP5'"),
    (b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "protocol b''"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "3 fields after the protocol, expected 4"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "5 fields after the protocol"),
    (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "5 fields after the protocol"),
    (b"PROXY TCP4 2001:db8::1 5.6.7.8 1 2\r\n", "not an IPv4 address"),
    (b"PROXY TCP6 1.2.3.4 2001:db8::1 1 2\r\n", "not an IPv6 address"),
    (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "not an IPv4 address"),
    (b"PROXY TCP6 fe80::1%eth0 fe80::2 1 2\r\n", "not an IPv6 address"),
    (b"PROXY TCP4 1.2.3.\xc4\xb1 5.6.7.8 1 2\r\n", "not an IPv4 address"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 080 2\r\n", "without leading zeros"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 +80 2\r\n", "is not a decimal"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n", "65536 is out of range"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \r\n", "port b''"),
    (b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n", "no CRLF in its first 107 bytes"),
])
def test_v1_malformed(data: bytes, message: str) -> None:
    with pytest.raises(ProxyHeaderError, match=message.replace("+", r"\+")):
        parse_v1(data)


def test_v1_zero_port_is_valid() -> None:
    parsed = parse_v1(b"PROXY TCP4 1.2.3.4 5.6.7.8 0 0\r\n")
    assert parsed is not None
    assert (parsed.source, parsed.destination) == (("1.2.3.4", 0), ("5.6.7.8", 0))


def test_v1_line_without_crlf_is_refused_only_at_107_bytes() -> None:
    line = b"PROXY UNKNOWN " + b"x" * (V1_MAX_LENGTH - 2 - 14)
    assert parse_v1(line) is None
    assert parse_v1(line + b"\r") is None  # the LF may still come, as the 107th byte
    assert parse_v1(line + b"\r\n") == ParsedProxyHeader(None, None, V1_MAX_LENGTH)
    with pytest.raises(ProxyHeaderError, match="no CRLF in its first 107 bytes"):
        parse_v1(line + b"x\r\n")


# --- v2 ------------------------------------------------------------------------------


V2_TCP4 = SIGNATURE + bytes.fromhex("21 11 000c c0a80001 c0a8000b dc04 01bb")
V2_UDP6 = SIGNATURE + bytes.fromhex(
    "21 22 0024 20010db8000000000000000000000001 20010db8000000000000000000000002 c738 0035")


def test_v2_tcp4() -> None:
    assert encode_v2(("192.168.0.1", 56324), ("192.168.0.11", 443)) == V2_TCP4
    assert parse_v2(V2_TCP4 + HTTP) == ParsedProxyHeader(("192.168.0.1", 56324), ("192.168.0.11", 443), 28)


def test_v2_udp6() -> None:
    assert encode_v2(("2001:db8::1", 51000), ("2001:db8::2", 53), datagram=True) == V2_UDP6
    assert parse_v2(V2_UDP6) == ParsedProxyHeader(("2001:db8::1", 51000), ("2001:db8::2", 53), 52)


def test_v2_tcp6_and_udp4_protocol_bytes() -> None:
    assert encode_v2(("2001:db8::1", 1), ("2001:db8::2", 2))[12:16] == bytes.fromhex("21210024")
    assert encode_v2(("192.0.2.1", 1), ("192.0.2.2", 2), datagram=True)[12:16] == bytes.fromhex("2112000c")


def test_v2_tlvs_are_skipped() -> None:
    noop = bytes.fromhex("04 0002 0000")
    alpn = bytes.fromhex("01 0002") + b"h2"
    block = bytes.fromhex("c0000201 c0000202 0001 0002") + noop + alpn
    header = SIGNATURE + bytes.fromhex("2111") + len(block).to_bytes(2, "big") + block
    assert parse_v2(header + HTTP) == ParsedProxyHeader(("192.0.2.1", 1), ("192.0.2.2", 2), len(header))


@pytest.mark.parametrize("body", [
    "20 00 0000",  # LOCAL, as a health check sends it
    "20 11 000c c0000201 c0000202 0001 0002",  # LOCAL: addresses ignored
    "20 11 0000",  # LOCAL ignores the family, even without its addresses
    "21 00 0000",  # PROXY, AF_UNSPEC
    "21 00 0003 616263",  # AF_UNSPEC with bytes to skip
    "21 31 00d8" + "00" * 216,  # AF_UNIX stream
    "21 10 0000",  # AF_INET, transport unspecified
])
def test_v2_without_addresses(body: str) -> None:
    header = SIGNATURE + bytes.fromhex(body)
    assert parse_v2(header + HTTP) == ParsedProxyHeader(None, None, len(header))


@pytest.mark.parametrize(("body", "message"), [
    ("11 11 000c", "version 1, expected 2"),
    ("31 11 000c", "version 3, expected 2"),
    ("22 11 000c", "unassigned command 0x2"),
    ("2f 11 000c", "unassigned command 0xf"),
    ("21 41 000c", "family/transport byte 0x41"),
    ("21 13 000c", "family/transport byte 0x13"),
    ("21 11 0004 c0000201", "address block of 4 bytes, INET STREAM needs 12"),
    ("21 22 000c", "INET6 DGRAM needs 36"),
])
def test_v2_malformed(body: str, message: str) -> None:
    with pytest.raises(ProxyHeaderError, match=message):
        parse_v2(SIGNATURE + bytes.fromhex(body) + b"\x00" * 64)


def test_v2_wrong_signature() -> None:
    with pytest.raises(ProxyHeaderError, match="not a PROXY v2 header"):
        parse_v2(b"\r\n\r\n\x00\r\nquit\n" + bytes.fromhex("2111000c"))
    with pytest.raises(ProxyHeaderError, match="not a PROXY v2 header"):
        parse_v2(b"PROXY TCP4 ")


# --- both ----------------------------------------------------------------------------


HEADERS = [
    b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
    b"PROXY UNKNOWN\r\n",
    f"PROXY TCP6 {FFFF6} {FFFF6} 65535 65535\r\n".encode(),
    V2_TCP4,
    V2_UDP6,
    SIGNATURE + bytes.fromhex("20000000"),
]


@pytest.mark.parametrize("header", HEADERS)
def test_every_prefix_is_incomplete(header: bytes) -> None:
    for end in range(len(header)):
        assert parse_header(header[:end]) is None, header[:end]
    parsed = parse_header(header + HTTP)
    assert parsed is not None
    assert parsed.consumed == len(header)


def test_parse_header_dispatch() -> None:
    assert parse_header(b"") is None
    with pytest.raises(ProxyHeaderError, match="first byte 0x16"):
        parse_header(bytes.fromhex("160301"))


def test_parsed_header_unpacks_as_a_tuple() -> None:
    parsed = parse_v1(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n")
    assert parsed is not None
    source, destination, consumed = parsed
    assert (source, destination, consumed) == (("1.2.3.4", 1), ("5.6.7.8", 2), 32)


IPV4 = st.ip_addresses(v=4)
IPV6 = st.ip_addresses(v=6)
PORT = st.integers(0, 65535)
ENDPOINTS = st.one_of(
    st.tuples(IPV4, PORT, IPV4, PORT),
    st.tuples(IPV6, PORT, IPV6, PORT),
)


IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def _same_address(parsed: Address | None, ip: IP, port: int) -> bool:
    """Compare as addresses: IPv4 equals its IPv4-mapped form (written as TCP4)."""
    assert parsed is not None
    parsed_ip = ipaddress.ip_address(parsed[0])
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return parsed[1] == port and parsed_ip in (ip, mapped)


@FUZZ
@given(endpoints=ENDPOINTS, datagram=st.booleans(), tail=st.binary(max_size=32))
def test_round_trip(endpoints: tuple[IP, int, IP, int], datagram: bool, tail: bytes) -> None:
    src, src_port, dst, dst_port = endpoints
    source, destination = (str(src), src_port), (str(dst), dst_port)
    for header in (encode_v1(source, destination), encode_v2(source, destination, datagram=datagram)):
        parsed = parse_header(header + tail)
        assert parsed is not None
        assert parsed.consumed == len(header)
        assert _same_address(parsed.source, src, src_port)
        assert _same_address(parsed.destination, dst, dst_port)
    v1 = encode_v1(source, destination)
    assert len(v1) <= V1_MAX_LENGTH
    assert b"\r" not in v1[:-2]


def _only_proxy_header_errors(data: bytes) -> None:
    for parse in (parse_header, parse_v1, parse_v2):
        try:
            parsed = parse(data)
        except ProxyHeaderError:
            continue
        if parsed is not None:
            assert 0 < parsed.consumed <= len(data)


@FUZZ
@given(data=st.binary(max_size=200))
def test_random_bytes_only_raise_proxy_header_errors(data: bytes) -> None:
    _only_proxy_header_errors(data)


@FUZZ
@given(prefix=st.sampled_from([b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", b"PROXY UNKNOWN",
                               SIGNATURE, SIGNATURE + b"\x21", SIGNATURE + b"\x21\x11"]),
       data=st.binary(max_size=120),
       text=st.text(alphabet="0123456789abcdef.:% \r\nTCP46", max_size=90))
def test_random_bytes_after_a_valid_start(prefix: bytes, data: bytes, text: str) -> None:
    _only_proxy_header_errors(prefix + data)
    _only_proxy_header_errors(prefix + text.encode())
