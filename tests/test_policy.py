"""Allow rules are default-deny and cannot be side-stepped by names or address spellings."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.security.policy import AllowRule, Policy, RoutePolicy, parse_ports


def ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return ipaddress.ip_address(text)


@pytest.mark.parametrize(
    ("text", "kind", "low", "high"),
    [
        ("tcp://10.0.0.5:5432", "tcp", 5432, 5432),
        ("udp://10.0.0.0/8:53", "udp", 53, 53),
        ("tcp://db.internal:5432-5433", "tcp", 5432, 5433),
        ("tcp://*:*", "tcp", 1, 65535),
        ("tcp://[fd00::1]:22", "tcp", 22, 22),
        ("tcp://[fd00::]/8:22", "tcp", 22, 22),
        ("tcp://[fd00::/8]:22", "tcp", 22, 22),
    ],
)
def test_rules_parse(text: str, kind: str, low: int, high: int) -> None:
    rule = AllowRule.parse(text)
    assert (rule.kind, rule.low, rule.high) == (kind, low, high)
    assert str(rule) == text


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("http://x:80", "expected tcp://HOST:PORTS, udp://HOST:PORTS or service:NAME, got 'http://x:80'"),
        ("tcp://x", "expected tcp://HOST:PORTS, udp://HOST:PORTS or service:NAME, got 'tcp://x'"),
        ("tcp://x:0", "port 0 is out of range 1..65535"),
        ("tcp://x:70000", "port 70000 is out of range 1..65535"),
        ("tcp://x:9-3", "port range '9-3' is backwards"),
        ("tcp://x:ssh", "ports must be a port, a range like 5432-5433, or *; got 'ssh'"),
        ("tcp://fd00::1:22", "write IPv6 hosts in brackets"),
        ("tcp://[db]:22", "brackets are for IPv6 addresses only"),
        ("tcp://10.0.0.1/8:22", "has host bits set"),
        ("tcp://bad_host!:22", "bad host 'bad_host!'"),
    ],
)
def test_bad_rules_say_why(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("*", r"\*").replace("(", r"\(")):
        AllowRule.parse(text)


def test_nothing_is_permitted_without_rules() -> None:
    policy = Policy([])
    assert not policy.permits("tcp", "10.0.0.1", 22)
    assert not policy.permits("tcp", "example.com", 443)
    assert policy.permitted_addresses("tcp", "example.com", 443, [ip("10.0.0.1")]) == []


def test_cidr_rule_matches_kind_address_and_port() -> None:
    policy = Policy.parse(["tcp://10.0.0.0/8:5432-5433"])
    assert policy.permits("tcp", "10.1.2.3", 5432)
    assert policy.permits("tcp", "10.1.2.3", 5433)
    assert not policy.permits("tcp", "10.1.2.3", 5434)
    assert not policy.permits("udp", "10.1.2.3", 5432)
    assert not policy.permits("tcp", "11.0.0.1", 5432)
    # The same address spelled as IPv4-mapped IPv6 is the same host.
    assert policy.permits("tcp", "::ffff:10.0.0.1", 5432)
    assert policy.permits("tcp", "[::ffff:10.0.0.1]", 5432)


def test_name_rule_matches_the_name_case_insensitively_and_all_its_addresses() -> None:
    policy = Policy.parse(["tcp://DB.internal.:5432"])
    assert policy.permits("tcp", "db.INTERNAL", 5432)
    assert not policy.permits("tcp", "other.internal", 5432)
    addrs = [ip("192.0.2.1"), ip("2001:db8::1")]
    assert policy.permitted_addresses("tcp", "db.internal.", 5432, addrs) == addrs
    # A name rule does not make the address itself reachable by literal.
    assert not policy.permits("tcp", "192.0.2.1", 5432)


def test_a_name_only_reaches_the_addresses_cidr_rules_allow() -> None:
    policy = Policy.parse(["tcp://10.0.0.0/8:443", "tcp://[fd00::]/8:443"])
    assert not policy.permits("tcp", "intranet.example", 443)
    assert policy.may_permit_name("tcp", "intranet.example", 443)
    assert not policy.may_permit_name("tcp", "intranet.example", 80)
    resolved = [ip("203.0.113.9"), ip("10.9.9.9"), ip("fd12::1"), ip("2001:db8::1")]
    assert policy.permitted_addresses("tcp", "intranet.example", 443, resolved) == [
        ip("10.9.9.9"),
        ip("fd12::1"),
    ]


def test_star_host_permits_any_name_and_address_on_its_ports() -> None:
    policy = Policy.parse(["udp://*:53"])
    assert policy.permits("udp", "anything.example", 53)
    assert policy.permits("udp", "2001:db8::53", 53)
    assert not policy.permits("udp", "anything.example", 54)
    assert not policy.permits("tcp", "anything.example", 53)


@given(st.ip_addresses(v=4), st.integers(1, 65535))
def test_slash_zero_and_star_agree_for_ipv4(addr: ipaddress.IPv4Address, port: int) -> None:
    assert Policy.parse(["tcp://0.0.0.0/0:*"]).permits("tcp", str(addr), port)
    assert Policy.parse(["tcp://*:*"]).permits("tcp", str(addr), port)
    assert not Policy.parse(["udp://*:*"]).permits("tcp", str(addr), port)


def test_route_policy_is_default_deny() -> None:
    assert not RoutePolicy([]).permits("hub")
    assert RoutePolicy(["hub"]).permits("hub")
    assert not RoutePolicy(["hub"]).permits("edge")
    assert RoutePolicy(["*"]).permits("edge")


def test_a_huge_or_non_ascii_port_is_a_short_clear_error() -> None:
    for text in ("9" * 5_000_000, "0" * 10 + "123456", "\u0661\u0662"):  # Arabic-Indic digits
        with pytest.raises(ValueError) as caught:
            parse_ports(text)
        assert len(str(caught.value)) < 100 and "Exceeds" not in str(caught.value)
    assert parse_ports("000443") == (443, 443)


def test_service_rules_name_built_in_services_only() -> None:
    policy = Policy.parse(["service:echo", "tcp://*:*", "udp://0.0.0.0/0:*"])
    assert policy.permits("tcp", "service:echo", 0) and policy.permits("udp", "service:echo", 0)
    assert not policy.permits("tcp", "service:chargen", 0)  # not named
    assert not Policy.parse(["tcp://*:*"]).may_permit_name("tcp", "service:echo", 0)  # * is hosts only
    assert Policy.parse(["service:*"]).permits("udp", "service:time", 0)
    assert not Policy.parse(["service:*"]).permits("tcp", "echo", 7)  # a service rule names no host
    with pytest.raises(ValueError, match="unknown service in 'service:qotd'"):
        AllowRule.parse("service:qotd")
