"""Default-deny authorization: which targets a peer may open, which hops it may route to.

Pure and synchronous so the exit can decide before any socket is opened, and so the
rules can be tested exhaustively. A rule names a kind (tcp/udp), a host pattern (an
address, a CIDR, a DNS name, or ``*``) and a port range. A name target is allowed by a
rule naming it (or ``*``); CIDR rules judge the addresses a name resolves to, so a name
cannot be used to reach an address the rules do not allow.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, TypeAlias

Kind: TypeAlias = Literal["tcp", "udp"]
IPAddress: TypeAlias = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network

ANY = "*"
MAX_PORT = 65535
SERVICE_PREFIX = "service:"  # a built-in service of the exit as a target (SPEC.md §17)
SERVICE_NAMES = frozenset({"echo", "discard", "chargen", "daytime", "time"})  # RFC 862-868

# RFC 1123 host names: dot-separated labels of letters, digits and inner hyphens
# (underscores tolerated, as they occur in internal DNS); at most 253 characters.
_LABEL = r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)"
_NAME_RE = re.compile(rf"^{_LABEL}(\.{_LABEL})*\.?$")


def normalize_name(name: str) -> str:
    """Compare DNS names case-insensitively and without the root's trailing dot."""
    return name.rstrip(".").lower()


def is_host_name(text: str) -> bool:
    """True for a syntactically valid DNS name (not an address)."""
    return len(text.rstrip(".")) <= 253 and _NAME_RE.match(text) is not None


def _unmap(addr: IPAddress) -> IPAddress:
    """::ffff:10.0.0.1 is 10.0.0.1: judge it by the IPv4 rules."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


@functools.lru_cache(maxsize=4096)  # every session's target is parsed: the set is small
def parse_ip(text: str) -> IPAddress | None:
    """The address in ``text`` (brackets allowed around IPv6), or None if it is a name."""
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    try:
        return _unmap(ipaddress.ip_address(text))
    except ValueError:
        return None


def _is_ipv6(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).version == 6
    except ValueError:
        return False


def parse_ports(text: str) -> tuple[int, int]:
    """``5432``, ``5432-5433`` or ``*`` -> inclusive (low, high); ValueError says why not."""
    if text == ANY:
        return 1, MAX_PORT
    low_text, dash, high_text = text.partition("-")
    bounds = [low_text, high_text] if dash else [low_text]
    ports: list[int] = []
    for part in bounds:
        if not part.isascii() or not part.isdigit():
            raise ValueError(f"ports must be a port, a range like 5432-5433, or *; got {text[:40]!r}")
        if len(part.lstrip("0")) > 5:  # before int(): a million digits is no port either
            raise ValueError(f"port {part[:12]}... is out of range 1..{MAX_PORT}")
        port = int(part)
        if not 1 <= port <= MAX_PORT:
            raise ValueError(f"port {port} is out of range 1..{MAX_PORT}")
        ports.append(port)
    low, high = ports[0], ports[-1]
    if low > high:
        raise ValueError(f"port range {text!r} is backwards")
    return low, high


@dataclass(frozen=True)
class AllowRule:
    """One ``tcp://HOST:PORTS`` / ``udp://HOST:PORTS`` rule, exactly one host form set;
    or a ``service:NAME`` / ``service:*`` rule (built-in services, over TCP and UDP)."""

    kind: Kind
    low: int
    high: int
    any_host: bool = False
    network: IPNetwork | None = None
    name: str | None = None
    text: str = ""
    service: str | None = None  # a service rule: its name, or *

    @classmethod
    def parse(cls, text: str) -> AllowRule:
        """Parse a rule; ValueError carries a message fit for a config error."""
        expected = "expected tcp://HOST:PORTS, udp://HOST:PORTS or service:NAME"
        if text.startswith(SERVICE_PREFIX):
            service = text[len(SERVICE_PREFIX):]
            if service != ANY and service not in SERVICE_NAMES:
                raise ValueError(f"unknown service in {text[:60]!r}: expected service:* or one of"
                                 f" {', '.join(sorted(SERVICE_NAMES))}")
            return cls("tcp", 0, 0, text=text, service=service)
        scheme, sep, rest = text.partition("://")
        if not sep or scheme not in ("tcp", "udp"):
            raise ValueError(f"{expected}, got {text!r}")
        kind: Kind = "tcp" if scheme == "tcp" else "udp"
        if rest.startswith("["):
            close = rest.find("]")
            if close < 0:
                raise ValueError(f"unclosed '[' in {text!r}")
            host_text, after = rest[1:close], rest[close + 1 :]
            prefix, colon, ports_text = after.rpartition(":")
            if not colon or (prefix and not re.fullmatch(r"/\d{1,3}", prefix)):
                raise ValueError(f"{expected}, got {text!r}")
            host_text += prefix
            if not _is_ipv6(host_text.split("/")[0]):
                raise ValueError(f"brackets are for IPv6 addresses only, got {text!r}")
        else:
            host_text, colon, ports_text = rest.rpartition(":")
            if not colon or not host_text:
                raise ValueError(f"{expected}, got {text!r}")
            if ":" in host_text:
                raise ValueError(
                    f"write IPv6 hosts in brackets, like tcp://[fd00::1]:22; got {text!r}"
                )
        low, high = parse_ports(ports_text)
        if host_text == ANY:
            return cls(kind, low, high, any_host=True, text=text)
        if "/" in host_text or parse_ip(host_text) is not None:
            try:
                network = ipaddress.ip_network(host_text, strict=True)
            except ValueError as exc:
                raise ValueError(f"bad address or CIDR {host_text!r}: {exc}") from None
            return cls(kind, low, high, network=network, text=text)
        if not is_host_name(host_text):
            raise ValueError(
                f"bad host {host_text!r}: expected an address, a CIDR, a DNS name or *"
            )
        return cls(kind, low, high, name=normalize_name(host_text), text=text)

    def __str__(self) -> str:
        return self.text

    def applies(self, kind: Kind, port: int) -> bool:
        """Whether the rule covers this kind and port (the host is judged separately)."""
        return self.service is None and self.kind == kind and self.low <= port <= self.high

    def matches_service(self, service: str) -> bool:
        """Whether this is a service rule naming ``service`` (or every service)."""
        return self.service is not None and self.service in (ANY, service)

    def matches_address(self, addr: IPAddress) -> bool:
        """Whether the rule's host part covers this address."""
        return self.any_host or (self.network is not None and _unmap(addr) in self.network)

    def matches_name(self, name: str) -> bool:
        """Whether this rule names the host (``*`` names every host)."""
        return self.any_host or (self.name is not None and self.name == normalize_name(name))


class Policy:
    """A peer's allow rules; anything no rule matches is refused."""

    def __init__(self, rules: Iterable[AllowRule]) -> None:
        self.rules: tuple[AllowRule, ...] = tuple(rules)

    @classmethod
    def parse(cls, texts: Iterable[str]) -> Policy:
        return cls(AllowRule.parse(t) for t in texts)

    def permits(self, kind: Kind, host: str, port: int) -> bool:
        """Whether a target given as a literal address, or as a name before resolving, is allowed.

        A name is allowed here only by a rule naming it (or ``*``); a name that only
        CIDR rules could allow needs ``permitted_addresses`` after resolving.
        """
        if host.startswith(SERVICE_PREFIX):  # a built-in service (port 0): only service rules name it
            return port == 0 and any(r.matches_service(host[len(SERVICE_PREFIX):]) for r in self.rules)
        addr = parse_ip(host)
        rules = [r for r in self.rules if r.applies(kind, port)]
        if addr is not None:
            return any(r.matches_address(addr) for r in rules)
        return any(r.matches_name(host) for r in rules)

    def may_permit_name(self, kind: Kind, host: str, port: int) -> bool:
        """Whether resolving ``host`` could lead anywhere allowed: skip DNS when it cannot."""
        return self.permits(kind, host, port) or any(
            r.network is not None and r.applies(kind, port) for r in self.rules
        )

    def permitted_addresses(
        self, kind: Kind, host: str, port: int, resolved: Sequence[IPAddress]
    ) -> list[IPAddress]:
        """The subset of ``resolved`` (in order) that may be connected to for this target."""
        if self.permits(kind, host, port) and parse_ip(host) is None:
            return list(resolved)
        rules = [r for r in self.rules if r.applies(kind, port)]
        return [a for a in resolved if any(r.matches_address(a) for r in rules)]


class RoutePolicy:
    """Which next hops a peer may route through us to (``*``: any peer we know)."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names = frozenset(names)

    def permits(self, next_hop: str) -> bool:
        return ANY in self.names or next_hop in self.names
