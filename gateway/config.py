"""The gateway's TOML config: parsed, validated and cross-checked into frozen models.

Every mistake becomes one ``ConfigError`` naming the file, the key (``tunnel[1].listen``)
and what was expected, because the operator fixing it has only that line to go on.
pydantic checks the shape (strict types, no unknown keys); the cross-checks that need
the whole file (unique names, declared peers, files that must agree) run afterwards.
"""

from __future__ import annotations

import difflib
import functools
import ipaddress
import os
import re
import tomllib
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
)

from gateway.errors import ConfigError, IdentityError
from gateway.security.identity import fingerprint_of_cert, load_cert, load_identity
from gateway.security.policy import (
    SERVICE_NAMES,
    SERVICE_PREFIX,
    AllowRule,
    Policy,
    RoutePolicy,
    is_host_name,
    parse_ip,
)
from gateway.security.users import UsersFileError, load_users

NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,63}$")
FINGERPRINT_RE = re.compile(r"^SHA256:[A-Za-z0-9+/]{43}$")
ANY_PEER = "*"
MAX_PATH = 4095  # Linux PATH_MAX, less the NUL


CarrierScheme = Literal["tls", "tcp", "ws", "wss"]
WEBSOCKET_PORTS = {"ws": 80, "wss": 443}  # a dialed ws:// / wss:// URL without a port


@dataclass(frozen=True)
class CarrierAddress:
    """Where a carrier listens or dials: ``tls://HOST:PORT``, (explicitly) ``tcp://``, or
    a WebSocket URL ``ws://HOST[:PORT]/PATH`` / ``wss://...`` (the same mutual TLS inside)."""

    scheme: CarrierScheme
    host: str  # without brackets
    port: int
    path: str = ""  # the WebSocket URL's path (ws, wss)

    def __str__(self) -> str:
        return f"{self.scheme}://{_join_host(self.host)}:{self.port}{self.path}"

    @property
    def is_websocket(self) -> bool:
        return self.scheme in WEBSOCKET_PORTS

    @property
    def host_header(self) -> str:
        """The HTTP Host of a WebSocket URL (the port only when it is not the default)."""
        default = WEBSOCKET_PORTS.get(self.scheme)
        return _join_host(self.host) + ("" if self.port == default else f":{self.port}")


ListenKind = Literal["tcp", "udp", "socks5", "http"]
ACCESS_KINDS = ("socks5", "http")  # listeners whose clients name the destination


@dataclass(frozen=True)
class ListenAddress:
    """A tunnel's local listener: ``tcp://`` or ``udp://`` (one fixed target), or
    ``socks5://`` or ``http://`` (CONNECT: each client names its destination)."""

    kind: ListenKind
    host: str
    port: int

    @property
    def is_access(self) -> bool:
        """A SOCKS5 or HTTP CONNECT listener: no fixed target."""
        return self.kind in ACCESS_KINDS

    @property
    def socket_kind(self) -> Literal["tcp", "udp"]:
        """What it binds: every kind but udp is a TCP listener."""
        return "udp" if self.kind == "udp" else "tcp"

    def __str__(self) -> str:
        return f"{self.kind}://{_join_host(self.host)}:{self.port}"


@dataclass(frozen=True)
class AdminAddress:
    """Where the admin endpoint listens: TCP ``HOST:PORT`` or ``unix:PATH``."""

    host: str = ""
    port: int = 0
    path: str = ""  # a unix socket (mode 0600) when set

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.path else f"{_join_host(self.host)}:{self.port}"


@dataclass(frozen=True)
class Target:
    """Where the exit gateway connects: a name or an address, and a port; or one of the
    exit's built-in services (host ``service:NAME``, port 0)."""

    host: str
    port: int

    def __str__(self) -> str:
        if self.host.startswith(SERVICE_PREFIX):
            return self.host
        return f"{_join_host(self.host)}:{self.port}"


def _join_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# --- value parsers: each takes what TOML gave and raises ValueError saying what it wanted ---


SHOW_LIMIT = 60  # characters of a value echoed in a message; the operator needs its start


def _show(value: object) -> str:
    """A value as a message shows it: TOML words, and cut short, or a 5 MB string is one line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, str) and len(value) > SHOW_LIMIT:
        return f"{value[:SHOW_LIMIT] + '…'!r} ({len(value)} characters)"
    text = repr(value)
    if len(text) > SHOW_LIMIT:
        return f"{text[:SHOW_LIMIT]}… ({len(text)} characters)"
    return text


# A quoted value longer than _show leaves one, in a message we did not word (policy's, pydantic's).
_LONG_QUOTED = re.compile(
    rf"'((?:[^'\\\n]|\\.){{{SHOW_LIMIT + 2},}})'|\"((?:[^\"\\\n]|\\.){{{SHOW_LIMIT + 2},}})\""
)


def _clip(message: str) -> str:
    """Cut the long quoted values in ``message`` as ``_show`` cuts ours."""

    def cut(match: re.Match[str]) -> str:
        quote, body = match.group()[0], match.group(1) or match.group(2)
        return f"{quote}{body[:SHOW_LIMIT]}…{quote} ({len(body)} characters)"

    return _LONG_QUOTED.sub(cut, message)


def _split_host_port(text: str, zero_ok: bool) -> tuple[str, int] | None:
    """``host:port`` or ``[v6]:port`` -> parts, or None if the shape is wrong."""
    match = re.fullmatch(r"\[([^\]]+)\]:(\d{1,5})|([^:\[\]/]+):(\d{1,5})", text)
    if match is None:
        return None
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if match.group(1) is not None and parse_ip(host) is None:
        return None  # brackets hold IPv6 addresses only
    if match.group(3) is not None and parse_ip(host) is None and not is_host_name(host):
        return None
    if port > 65535 or (port == 0 and not zero_ok):
        raise ValueError(f"port {port} is out of range {0 if zero_ok else 1}..65535 in {_show(text)}")
    return host, port


def _url(value: object, schemes: tuple[str, ...], zero_ok: bool) -> tuple[str, str, int]:
    forms = [f"{s}://HOST:PORT" for s in schemes]
    expected = forms[0] if len(forms) == 1 else f"{', '.join(forms[:-1])} or {forms[-1]}"
    if not isinstance(value, str):
        raise ValueError(f"expected {expected}, got {_show(value)}")
    scheme, sep, rest = value.partition("://")
    parts = _split_host_port(rest, zero_ok) if sep and scheme in schemes else None
    if parts is None:
        raise ValueError(f"expected {expected}, got {_show(value)}")
    return scheme, parts[0], parts[1]


_WEBSOCKET_URL = re.compile(r"(wss?)://(\[[^\]]+\]|[^:/\[\]]+)(?::(\d{1,5}))?(/[A-Za-z0-9._~!$&'()*+,;=:@%/-]*)?")


def _carrier(value: object, info: ValidationInfo) -> CarrierAddress:
    zero_ok = info.field_name == "listen"
    if isinstance(value, str) and value.startswith(("ws://", "wss://")):
        return _websocket(value, zero_ok)
    if not isinstance(value, str) or not value.startswith(("tls://", "tcp://")):
        raise ValueError(f"expected tls://HOST:PORT, tcp://HOST:PORT, ws://HOST:PORT/PATH or"
                         f" wss://HOST:PORT/PATH, got {_show(value)}")
    scheme, host, port = _url(value, ("tls", "tcp"), zero_ok)
    return CarrierAddress("tls" if scheme == "tls" else "tcp", host, port)


def _websocket(value: str, listening: bool) -> CarrierAddress:
    """``ws://HOST[:PORT]/PATH``; a listener needs its port, a dialer defaults to 80/443."""
    match = _WEBSOCKET_URL.fullmatch(value)
    expected = f"expected {value.split(':', 1)[0]}://HOST:PORT/PATH, got {_show(value)}"
    if match is None:
        raise ValueError(expected)
    scheme, host, port_text, path = match.groups()
    if host.startswith("["):
        host = host[1:-1]
        if parse_ip(host) is None or ":" not in host:
            raise ValueError(expected)
    elif parse_ip(host) is None and not is_host_name(host):
        raise ValueError(expected)
    if port_text is None and listening:
        raise ValueError(f"a listener needs its port: {expected}")
    port = int(port_text) if port_text is not None else WEBSOCKET_PORTS[scheme]
    if port > 65535 or (port == 0 and not listening):
        raise ValueError(f"port {port} is out of range in {_show(value)}")
    return CarrierAddress("ws" if scheme == "ws" else "wss", host, port, path or "/")


def _listen(value: object) -> ListenAddress:
    kind, host, port = _url(value, ("tcp", "udp", "socks5", "http"), zero_ok=True)
    for known in ("tcp", "udp", "socks5", "http"):
        if kind == known:
            return ListenAddress(known, host, port)
    raise AssertionError(kind)


def parse_admin(value: object) -> AdminAddress:
    expected = "expected HOST:PORT (TCP, e.g. 127.0.0.1:9100) or unix:PATH, got"
    if not isinstance(value, str):
        raise ValueError(f"{expected} {_show(value)}")
    if value.startswith("unix:"):
        if not value[5:]:
            raise ValueError(f"{expected} {_show(value)}")
        return AdminAddress(path=value[5:])
    parts = _split_host_port(value, zero_ok=True)
    if parts is None:
        raise ValueError(f"{expected} {_show(value)}")
    return AdminAddress(*parts)


def _target(value: object) -> Target:
    expected = "expected HOST:PORT (a name, an IPv4 address or [IPv6]) or service:NAME, got"
    if not isinstance(value, str):
        raise ValueError(f"{expected} {_show(value)}")
    if value.startswith(SERVICE_PREFIX):
        name = value[len(SERVICE_PREFIX):]
        if name not in SERVICE_NAMES:
            raise ValueError(f"expected one of the built-in services"
                             f" {', '.join(SERVICE_PREFIX + n for n in sorted(SERVICE_NAMES))},"
                             f" got {_show(value)}")
        return Target(value, 0)
    parts = _split_host_port(value, zero_ok=False)
    if parts is None:
        raise ValueError(f"{expected} {_show(value)}")
    return Target(*parts)


def _name(value: object) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise ValueError(
            f"expected a name of 1-63 letters, digits, '.', '_' or '-', got {_show(value)}"
        )
    return value


def _path(value: object, info: ValidationInfo) -> Path:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a file path, got {_show(value)}")
    if len(value) > MAX_PATH:  # the messages about the file echo its path whole
        raise ValueError(f"expected a file path of at most {MAX_PATH} characters, got {_show(value)}")
    base = Path((info.context or {}).get("base_dir", "."))
    return Path(os.path.abspath(base / Path(value).expanduser()))


def _fingerprint(value: object) -> str:
    if not isinstance(value, str) or not FINGERPRINT_RE.match(value):
        raise ValueError(
            "expected SHA256: followed by 43 base64 characters"
            f" (see `tunnelgate fingerprint FILE`), got {_show(value)}"
        )
    return value


def _rule(value: object) -> AllowRule:
    if not isinstance(value, str):
        raise ValueError(f"expected tcp://HOST:PORTS, udp://HOST:PORTS or service:NAME, got {_show(value)}")
    return AllowRule.parse(value)


def _proxy(value: object) -> str:
    if value == "env":
        return "env"
    if isinstance(value, str) and parse_proxy_url(value) is not None:
        return value
    raise ValueError(f"expected http://[USER:PASSWORD@]HOST:PORT or \"env\", got {_show(value)}")


@dataclass(frozen=True)
class ProxyAddress:
    """An HTTP CONNECT proxy to dial through, and its Basic credentials if any."""

    host: str
    port: int
    credentials: str | None = None  # "user:password", percent-decoded

    def __str__(self) -> str:  # never shows the password
        return f"http://{_join_host(self.host)}:{self.port}"


def parse_proxy_url(text: str) -> ProxyAddress | None:
    """``http://[user:password@]host:port`` (as https_proxy holds it), else None."""
    scheme, sep, rest = text.partition("://")
    if not sep or scheme.lower() != "http":
        return None
    rest = rest.rstrip("/")
    credentials = None
    if "@" in rest:
        userinfo, _, rest = rest.rpartition("@")
        credentials = urllib.parse.unquote(userinfo)
    parts = _split_host_port(rest, zero_ok=False)
    if parts is None:
        return None
    return ProxyAddress(parts[0], parts[1], credentials)


def _route_name(value: object) -> str:
    return ANY_PEER if value == ANY_PEER else _name(value)


Name = Annotated[str, BeforeValidator(_name)]
FilePath = Annotated[Path, BeforeValidator(_path)]
Carrier = Annotated[CarrierAddress, BeforeValidator(_carrier)]
Admin = Annotated[AdminAddress, BeforeValidator(parse_admin)]


def _one_or_more(value: object) -> object:
    return value if isinstance(value, list) else [value]


# `dial = "tls://a:7443"` or a list of them (the instances of a relay tier, SPEC.md §15)
Dials = Annotated[list[Carrier], BeforeValidator(_one_or_more), Field(max_length=16)]
Listen = Annotated[ListenAddress, BeforeValidator(_listen)]
TargetField = Annotated[Target, BeforeValidator(_target)]
Fingerprint = Annotated[str, BeforeValidator(_fingerprint)]
Rule = Annotated[AllowRule, BeforeValidator(_rule)]
RouteName = Annotated[str, BeforeValidator(_route_name)]
Seconds = Annotated[float, Field(gt=0)]


class _Model(BaseModel):
    model_config = ConfigDict(
        extra="forbid", strict=True, frozen=True, arbitrary_types_allowed=True
    )


class GatewayConfig(_Model):
    """The ``[gateway]`` table: who we are, where carriers come in, and the timers."""

    name: Name
    key: FilePath
    ca: FilePath | None = None
    listen: list[Carrier] = []
    # Short: with resumable sessions a dead carrier costs a pause, so find it in seconds.
    keepalive_interval: Seconds = 2.0
    keepalive_timeout: Seconds = 6.0
    handshake_timeout: Seconds = 10.0
    drain_timeout: Seconds = 10.0
    reconnect_min: Seconds = 0.5
    reconnect_max: Seconds = 30.0
    udp_idle_timeout: Seconds = 60.0
    max_route_length: Annotated[int, Field(ge=1, le=32)] = 8
    initial_window: Annotated[int, Field(ge=16384, le=16777216)] = 262144
    # Circuits a peer may have open towards us per carrier; 0: a client-only gateway,
    # never chosen by a peer to open one (SPEC.md §3).
    max_circuits: Annotated[int, Field(ge=0)] = 16384
    # How long a session whose route was lost waits to be resumed; 0: no resumption.
    resume_timeout: Annotated[float, Field(ge=0, le=86400)] = 60.0
    # Bytes all resumable sessions may hold for retransmission; beyond, the longest idle
    # ones stop being resumable.
    resume_buffer: Annotated[int, Field(ge=1 << 20)] = 256 << 20
    # The admin endpoint (/metrics, /status, /healthz): absent, none.
    admin: Admin | None = None
    log_format: Literal["text", "json"] = "text"

    @property
    def cert(self) -> Path:
        """Our certificate, ``NAME.crt`` beside ``NAME.key``."""
        return self.key.with_suffix(".crt")


class PeerConfig(_Model):
    """A ``[[peer]]``: another gateway, how to know it, and what it may do through us.

    After loading, ``fingerprint`` is always set (computed from ``cert`` if not given).
    """

    name: Name
    cert: FilePath | None = None
    fingerprint: Fingerprint | None = None
    dial: Dials = []
    # Carriers to keep to distinct instances of this peer (a relay tier): new circuits
    # go to the least loaded; a lost one's sessions resume over another.
    connections: Annotated[int, Field(ge=1, le=16)] = 1
    allow: list[Rule] = []
    route: list[RouteName] = []
    # Dial through an HTTP CONNECT proxy: "http://[USER:PASSWORD@]HOST:PORT", or "env"
    # (https_proxy / no_proxy, as curl reads them).
    proxy: Annotated[str, BeforeValidator(_proxy)] | None = None
    # Dial only when a session needs the carrier; hang up after idle_hangup seconds
    # without circuits (the book's tunnels over on-demand lines, §17.8).
    on_demand: bool = False
    idle_hangup: Seconds = 300.0

    @functools.cached_property
    def policy(self) -> Policy:
        """What this peer may open through us (default-deny)."""
        return Policy(self.allow)

    @functools.cached_property
    def route_policy(self) -> RoutePolicy:
        """Which next hops this peer may route through us to."""
        return RoutePolicy(self.route)


class TunnelConfig(_Model):
    """A ``[[tunnel]]``: a local listener whose sessions go ``via`` peers to ``target``
    (or, on a SOCKS5 or HTTP CONNECT listener, to where each client asks)."""

    name: Name
    listen: Listen
    via: Annotated[list[Name], Field(min_length=1)]
    target: TargetField | None = None
    end_to_end: bool = False
    udp_idle_timeout: Seconds | None = None
    # The exit writes a PROXY protocol header with the client's address to the target.
    proxy_protocol: Literal["v1", "v2"] | None = None
    # SOCKS5 / HTTP CONNECT clients: `name:hash` lines (`tunnelgate passwd`); absent: none.
    users_file: FilePath | None = None
    # A SOCKS5 / HTTP listener beyond loopback without users_file must say so.
    allow_anonymous: bool = False


class Config(_Model):
    """The whole file; ``path`` is where it came from (for messages and reloads)."""

    path: Path = Path("<config>")
    gateway: GatewayConfig
    peer: list[PeerConfig] = []
    tunnel: list[TunnelConfig] = []

    @property
    def peers(self) -> list[PeerConfig]:
        return self.peer

    @property
    def tunnels(self) -> list[TunnelConfig]:
        return self.tunnel

    def peer_named(self, name: str) -> PeerConfig | None:
        return next((p for p in self.peer if p.name == name), None)

    def udp_idle_timeout(self, tunnel: TunnelConfig) -> float:
        """The tunnel's own UDP idle timeout, or the gateway's default."""
        if tunnel.udp_idle_timeout is not None:
            return tunnel.udp_idle_timeout
        return self.gateway.udp_idle_timeout

    def tier_warnings(self) -> list[str]:
        """What this file lets happen that the relay-tier topology rule (SPEC.md §15)
        says loses sessions: one line each, "file: key: why" (`check` prints them, `run`
        logs them). Valid configs, so warnings, not errors."""
        warnings = []
        for i, peer in enumerate(self.peer):
            if peer.connections == 1:
                continue
            where = f"{self.path}: peer[{i}].connections"
            ips = {d.host for d in peer.dial if _is_ip(d.host)}
            if len(peer.dial) > 1 and len(ips) == len(peer.dial) and peer.connections > len(ips):
                warnings.append(f"{where}: {peer.connections} carriers, but `dial` lists {len(ips)}"
                                " IP addresses: at most that many distinct instances can be reached")
            if self.gateway.resume_timeout == 0:
                warnings.append(f"{where}: gateway.resume_timeout = 0 (resumption off): sessions on a"
                                " lost instance are reset; the extra carriers only spread the load")
            for j, tunnel in enumerate(self.tunnel):
                if tunnel.via == [peer.name]:
                    warnings.append(
                        f"{self.path}: tunnel[{j}].via: its exit is {peer.name}, a relay tier"
                        f" (connections = {peer.connections}): a session cannot outlive the"
                        " instance it ends at; route through the tier to a gateway behind it")
        return warnings


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


# --- turning pydantic's errors into ours -----------------------------------------------------

_SECTIONS: dict[object, type[_Model]] = {
    "gateway": GatewayConfig,
    "peer": PeerConfig,
    "tunnel": TunnelConfig,
}

_TYPE_WORDS = {
    "string_type": "a string",
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "list_type": "a list",
    "model_type": "a table",
    "dict_type": "a table",
    "dataclass_type": "a table",
}


def key_path(loc: Sequence[int | str]) -> str:
    """``("tunnel", 1, "listen")`` -> ``tunnel[1].listen``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            part = part if len(part) <= SHOW_LIMIT else part[:SHOW_LIMIT] + "…"  # an unknown key
            out += f".{part}" if out else part
    return out


def _message(error: Any) -> str:
    kind = error["type"]
    loc = error["loc"]
    given = _show(error.get("input"))
    ctx = error.get("ctx") or {}
    if kind == "value_error":
        return _clip(str(ctx.get("error", error["msg"])))
    if kind == "missing":
        return "required key is missing"
    if kind == "extra_forbidden":
        section = _SECTIONS.get(loc[0]) if len(loc) > 1 else Config
        known = sorted(k for k in (section or Config).model_fields if k != "path")
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return f"unknown key{hint}; expected one of: {', '.join(known)}"
    if kind in _TYPE_WORDS:
        if kind == "list_type" and loc[-1] in ("peer", "tunnel") and len(loc) == 1:
            return f"expected an array of tables ([[{loc[0]}]]), got {given}"
        return f"expected {_TYPE_WORDS[kind]}, got {given}"
    bounds = {
        "greater_than": "greater than {gt}",
        "greater_than_equal": "at least {ge}",
        "less_than": "less than {lt}",
        "less_than_equal": "at most {le}",
        "too_short": "at least {min_length} item(s)",
    }
    if kind in bounds:
        return f"expected {bounds[kind].format(**ctx)}, got {given}"
    return f"{_clip(error['msg'])}, got {given}"


# --- cross-checks over the whole file ---------------------------------------------------------


def _check(config: Config, file: str) -> Config:
    def fail(path: str, message: str) -> ConfigError:
        return ConfigError(file, path, message)

    gw = config.gateway
    if gw.keepalive_timeout <= gw.keepalive_interval:
        raise fail(
            "gateway.keepalive_timeout",
            f"expected more than keepalive_interval ({gw.keepalive_interval:g}),"
            f" got {gw.keepalive_timeout:g}",
        )
    if gw.reconnect_max < gw.reconnect_min:
        raise fail(
            "gateway.reconnect_max",
            f"expected at least reconnect_min ({gw.reconnect_min:g}), got {gw.reconnect_max:g}",
        )
    try:
        load_identity(gw.key)
    except IdentityError as exc:
        raise fail("gateway.key", str(exc)) from exc
    if gw.ca is not None:
        try:
            load_cert(gw.ca)
        except IdentityError as exc:
            raise fail("gateway.ca", str(exc)) from exc
    claims: list[_Claim] = []
    for i, carrier in enumerate(gw.listen):  # carriers are TCP, whatever their scheme
        _claim(claims, _Claim(f"gateway.listen[{i}]", str(carrier), "tcp", carrier.host, carrier.port), fail)

    peers: list[PeerConfig] = []
    first_seen: dict[str, int] = {}
    for i, peer in enumerate(config.peer):
        where = f"peer[{i}]"
        if peer.name == gw.name:
            raise fail(f"{where}.name", f"{peer.name!r} is this gateway's own name (gateway.name)")
        if peer.name in first_seen:
            raise fail(
                f"{where}.name",
                f"duplicate peer name {peer.name!r} (also peer[{first_seen[peer.name]}].name)",
            )
        first_seen[peer.name] = i
        peers.append(_check_peer(peer, where, gw, fail))

    declared = sorted(first_seen)
    for i, peer in enumerate(peers):
        for j, hop in enumerate(peer.route):
            if hop != ANY_PEER and hop not in first_seen:
                raise fail(f"peer[{i}].route[{j}]", _undeclared(hop, declared))

    tunnel_seen: dict[str, int] = {}
    for i, tunnel in enumerate(config.tunnel):
        where = f"tunnel[{i}]"
        if tunnel.name in tunnel_seen:
            raise fail(
                f"{where}.name",
                f"duplicate tunnel name {tunnel.name!r}"
                f" (also tunnel[{tunnel_seen[tunnel.name]}].name)",
            )
        tunnel_seen[tunnel.name] = i
        listen = tunnel.listen
        _claim(claims, _Claim(f"{where}.listen", str(listen), listen.socket_kind, listen.host, listen.port),
               fail)
        _check_tunnel_kind(tunnel, where, fail)
        if tunnel.via[0] not in first_seen:
            raise fail(f"{where}.via[0]", _undeclared(tunnel.via[0], declared))
        for j, hop in enumerate(tunnel.via):
            if hop == gw.name:
                raise fail(
                    f"{where}.via[{j}]", f"{hop!r} is this gateway itself: the route would loop"
                )
            if hop in tunnel.via[:j]:
                raise fail(f"{where}.via[{j}]", f"{hop!r} appears twice: the route would loop")
        if tunnel.end_to_end and tunnel.via[-1] not in first_seen:
            raise fail(
                f"{where}.via[{len(tunnel.via) - 1}]",
                f"end_to_end needs the exit gateway {tunnel.via[-1]!r} declared as a [[peer]]"
                " (with its cert or fingerprint) so its identity can be verified",
            )
        if len(tunnel.via) > gw.max_route_length:
            raise fail(
                f"{where}.via",
                f"route has {len(tunnel.via)} hops, more than"
                f" gateway.max_route_length ({gw.max_route_length})",
            )
    return config.model_copy(update={"peer": peers})


Fail = Callable[[str, str], ConfigError]


def _check_tunnel_kind(tunnel: TunnelConfig, where: str, fail: Fail) -> None:
    """What each listener kind needs: a target or none, and the access keys only where
    clients name their destination."""
    listen = tunnel.listen
    scheme = f"a {listen.kind}:// listener"
    if listen.is_access:
        if tunnel.target is not None:
            raise fail(f"{where}.target", f"{scheme} takes each destination from its client:"
                       " expected no target")
        if not tunnel.allow_anonymous and tunnel.users_file is None and not _is_loopback(listen.host):
            raise fail(f"{where}.users_file",
                       f"{scheme} on {listen.host}, beyond loopback, must authenticate its clients:"
                       " expected users_file (or allow_anonymous = true)")
        if tunnel.users_file is not None:
            try:
                load_users(tunnel.users_file)
            except UsersFileError as exc:
                raise fail(f"{where}.users_file", str(exc)) from exc
    else:
        if tunnel.target is None:
            raise fail(f"{where}.target", f"required for {scheme}: expected HOST:PORT or service:NAME")
        for key in ("users_file", "allow_anonymous"):
            if key in tunnel.model_fields_set:
                raise fail(f"{where}.{key}", f"only for socks5:// and http:// listeners, not {scheme}")
    if tunnel.proxy_protocol is not None:
        if listen.kind == "udp":
            raise fail(f"{where}.proxy_protocol",
                       "a PROXY header is for TCP sessions: not on a udp:// listener")
        if tunnel.target is not None and tunnel.target.host.startswith(SERVICE_PREFIX):
            raise fail(f"{where}.proxy_protocol",
                       f"{tunnel.target} is a built-in service: it takes no PROXY header")


def _is_loopback(host: str) -> bool:
    addr = parse_ip(host)
    return host.lower() == "localhost" if addr is None else addr.is_loopback


def _undeclared(name: str, declared: list[str]) -> str:
    known = ", ".join(declared) if declared else "none"
    return f"{name!r} is not a declared peer (declared: {known})"


@dataclass(frozen=True)
class _Claim:
    """A port a listener will bind, and the key that asked for it."""

    key: str
    address: str
    proto: Literal["tcp", "udp"]
    host: str
    port: int


def _claim(claims: list[_Claim], new: _Claim, fail: Fail) -> None:
    """Refuse a listener whose bind would fail with "address already in use", naming both keys."""
    first = next((c for c in claims if _clashes(c, new)), None)
    if first is not None:
        shown = "" if first.address == new.address else f" ({first.address})"
        raise fail(new.key, f"{new.address} is already used by {first.key}{shown}")
    claims.append(new)


def _clashes(a: _Claim, b: _Claim) -> bool:
    """Linux's rule: same protocol and port (0 is any free one), and one host covers the other."""
    return a.proto == b.proto and a.port == b.port != 0 and (_covers(a, b) or _covers(b, a))


def _covers(wide: _Claim, other: _Claim) -> bool:
    """Same host, or a wildcard over it: 0.0.0.0 covers IPv4; :: covers IPv6, and IPv4 for UDP
    (trio's TCP listeners set IPV6_V6ONLY, the UDP ones are dual-stack). Names match as written."""
    mine, theirs = parse_ip(wide.host), parse_ip(other.host)
    if mine is None or theirs is None:
        return wide.host.lower() == other.host.lower()
    if mine == theirs:
        return True
    if not mine.is_unspecified:
        return False
    return mine.version == theirs.version or (wide.proto == "udp" and mine.version == 6)


def _check_peer(peer: PeerConfig, where: str, gw: GatewayConfig, fail: Fail) -> PeerConfig:
    for key in ("proxy", "on_demand", "idle_hangup"):
        if key in peer.model_fields_set and not peer.dial:
            raise fail(f"{where}.{key}", "only for a peer this gateway dials: expected `dial` too")
    if peer.proxy is not None and any(d.scheme == "tcp" for d in peer.dial):
        raise fail(f"{where}.proxy", "a plain tcp:// carrier is not dialed through a proxy:"
                   " use tls:// or wss://")
    if peer.cert is None and peer.fingerprint is None:
        raise fail(where, "expected `cert` or `fingerprint` (or both) to identify the peer")
    if peer.connections > 1 and not peer.dial:
        raise fail(f"{where}.connections",
                   f"expected `dial` with connections = {peer.connections}: carriers are kept"
                   " only to a peer this gateway dials")
    if not peer.dial and peer.cert is None and gw.ca is None:
        raise fail(
            f"{where}.cert",
            "a peer that has no `dial` must have `cert` unless gateway.ca is set"
            " (the TLS listener needs the cert in its trust store)",
        )
    if peer.cert is None:
        return peer
    try:
        actual = fingerprint_of_cert(load_cert(peer.cert))
    except IdentityError as exc:
        raise fail(f"{where}.cert", str(exc)) from exc
    if peer.fingerprint is not None and peer.fingerprint != actual:
        raise fail(
            f"{where}.fingerprint",
            f"does not match {where}.cert: the certificate's fingerprint is {actual},"
            f" got {peer.fingerprint}",
        )
    return peer.model_copy(update={"fingerprint": actual})


# --- entry points ------------------------------------------------------------------------------


def parse_config(
    text: str, path_for_messages: str | os.PathLike[str], base_dir: str | os.PathLike[str]
) -> Config:
    """Parse TOML text; relative paths in it are taken relative to ``base_dir``."""
    file = os.fspath(path_for_messages)
    try:
        return _check(_validate(_parse_toml(text, file), file, base_dir), file)
    except RecursionError:  # `listen = [[[[...` : tomllib, pydantic and repr all recurse
        raise ConfigError(file, "", "value nested too deeply") from None


def _parse_toml(text: str, file: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(file, "", f"TOML syntax error: {exc}") from exc
    except ValueError as exc:  # tomllib lets int()'s limit through (an integer of 5000 digits)
        raise ConfigError(file, "", f"TOML value error: {exc}") from exc


def _validate(data: dict[str, Any], file: str, base_dir: str | os.PathLike[str]) -> Config:
    if "path" in data:
        raise ConfigError(file, "path", _message({"type": "extra_forbidden", "loc": ("path",)}))
    try:
        return Config.model_validate(
            {**data, "path": Path(file)}, context={"base_dir": Path(base_dir)}
        )
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        raise ConfigError(file, key_path(first["loc"]), _message(first)) from None


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and check a config file; relative paths in it are relative to its folder."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(path), "", "no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(path), "", f"cannot read: {exc}") from exc
    return parse_config(text, path, path.parent)
