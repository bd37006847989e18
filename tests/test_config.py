"""Every kind of config mistake gets one exact message: file, key path, what was expected."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from gateway.config import CarrierAddress, ListenAddress, Target, load_config, parse_config
from gateway.errors import ConfigError
from gateway.security.identity import load_identity, write_identity


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    write_identity(tmp_path / "hub")
    write_identity(tmp_path / "edge")
    write_identity(tmp_path / "core")
    return tmp_path


GOOD = """
[gateway]
name = "hub"
key = "hub.key"
listen = ["tls://[::1]:7443", "tcp://127.0.0.1:7000"]

[[peer]]
name = "edge"
cert = "edge.crt"
allow = ["tcp://10.0.0.0/8:5432-5433", "udp://*:53"]
route = ["core"]

[[peer]]
name = "core"
fingerprint = "{core_fp}"
dial = "tls://core.example:7443"

[[tunnel]]
name = "db"
listen = "tcp://127.0.0.1:15432"
via = ["core", "far-away"]
target = "[fd00::1]:5432"
"""


def good(folder: Path) -> str:
    core_fp = load_identity(folder / "core.key").fingerprint
    return GOOD.format(core_fp=core_fp)


def error_of(folder: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(textwrap.dedent(text), "hub.toml", folder)
    return str(info.value)


def with_gateway(body: str) -> str:
    return '[gateway]\nname = "hub"\nkey = "hub.key"\n' + textwrap.dedent(body)


def test_a_good_config_loads_with_parsed_values(folder: Path) -> None:
    (folder / "hub.toml").write_text(good(folder))
    config = load_config(folder / "hub.toml")
    assert config.gateway.key == folder / "hub.key"
    assert config.gateway.cert == folder / "hub.crt"
    assert config.gateway.listen == [
        CarrierAddress("tls", "::1", 7443),
        CarrierAddress("tcp", "127.0.0.1", 7000),
    ]
    assert config.gateway.keepalive_timeout == 6.0 and config.gateway.resume_timeout == 60.0
    assert config.gateway.initial_window == 262144
    edge, core = config.peers
    assert edge.cert == folder / "edge.crt"
    assert edge.fingerprint is not None and edge.fingerprint.startswith("SHA256:")
    assert edge.policy.permits("tcp", "10.1.1.1", 5433)
    assert not edge.policy.permits("tcp", "10.1.1.1", 22)
    assert edge.route_policy.permits("core")
    assert core.dial == [CarrierAddress("tls", "core.example", 7443)] and core.connections == 1
    (tunnel,) = config.tunnels
    assert tunnel.listen == ListenAddress("tcp", "127.0.0.1", 15432)
    assert tunnel.target == Target("fd00::1", 5432)
    assert str(tunnel.target) == "[fd00::1]:5432"
    assert config.udp_idle_timeout(tunnel) == 60.0


def test_relative_paths_are_resolved_against_the_config_folder(
    folder: Path, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    (folder / "keys").mkdir()
    write_identity(folder / "keys" / "gw")
    (folder / "hub.toml").write_text(
        '[gateway]\nname = "gw"\nkey = "keys/gw.key"\nca = "hub.crt"\n'
    )
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    config = load_config(folder / "hub.toml")
    assert config.gateway.key == folder / "keys" / "gw.key"
    assert config.gateway.ca == folder / "hub.crt"


def test_missing_required_key(folder: Path) -> None:
    assert error_of(folder, '[gateway]\nname = "hub"\n') == (
        "hub.toml: gateway.key: required key is missing"
    )


def test_missing_key_file(folder: Path) -> None:
    message = error_of(folder, '[gateway]\nname = "hub"\nkey = "nope.key"\n')
    assert message == f"hub.toml: gateway.key: {folder / 'nope.key'}: no such file"


def test_wrong_type(folder: Path) -> None:
    assert error_of(folder, with_gateway("keepalive_interval = '5'\n")) == (
        "hub.toml: gateway.keepalive_interval: expected a number, got '5'"
    )
    assert error_of(folder, with_gateway("max_circuits = 1.5\n")) == (
        "hub.toml: gateway.max_circuits: expected an integer, got 1.5"
    )


def test_bad_tunnel_listen_url(folder: Path) -> None:
    text = with_gateway(
        """
        [[peer]]
        name = "edge"
        cert = "edge.crt"
        [[tunnel]]
        name = "a"
        listen = "tcp://127.0.0.1:1"
        via = ["edge"]
        target = "db:5432"
        [[tunnel]]
        name = "b"
        listen = "https://x:1"
        via = ["edge"]
        target = "db:5432"
        """
    )
    assert error_of(folder, text) == (
        "hub.toml: tunnel[1].listen: expected tcp://HOST:PORT, udp://HOST:PORT, socks5://HOST:PORT"
        " or http://HOST:PORT, got 'https://x:1'"
    )


def test_bad_port(folder: Path) -> None:
    assert error_of(folder, with_gateway('listen = ["tls://0.0.0.0:70000"]\n')) == (
        "hub.toml: gateway.listen[0]: port 70000 is out of range 0..65535 in '0.0.0.0:70000'"
    )


def test_bad_allow_rule(folder: Path) -> None:
    text = with_gateway(
        """
        [[peer]]
        name = "edge"
        cert = "edge.crt"
        allow = ["tcp://db:5432", "udp://*:53", "tcp://db:9-3"]
        """
    )
    assert error_of(folder, text) == "hub.toml: peer[0].allow[2]: port range '9-3' is backwards"


def test_unknown_key(folder: Path) -> None:
    assert error_of(folder, with_gateway("keepalive = 5\n")) == (
        "hub.toml: gateway.keepalive: unknown key (did you mean 'keepalive_timeout'?); expected"
        " one of: admin, ca, drain_timeout, handshake_timeout, initial_window, keepalive_interval,"
        " keepalive_timeout, key, listen, log_format, max_circuits, max_route_length, name, reconnect_max,"
        " reconnect_min, resume_buffer, resume_timeout, udp_idle_timeout"
    )
    assert error_of(folder, with_gateway("[tunnels]\n")) == (
        "hub.toml: tunnels: unknown key (did you mean 'tunnel'?); expected one of:"
        " gateway, peer, tunnel"
    )


def test_duplicate_names(folder: Path) -> None:
    text = with_gateway(
        """
        [[peer]]
        name = "edge"
        cert = "edge.crt"
        [[peer]]
        name = "edge"
        cert = "core.crt"
        """
    )
    assert error_of(folder, text) == (
        "hub.toml: peer[1].name: duplicate peer name 'edge' (also peer[0].name)"
    )


def test_peer_named_like_the_gateway(folder: Path) -> None:
    text = with_gateway('[[peer]]\nname = "hub"\ncert = "edge.crt"\n')
    assert error_of(folder, text) == (
        "hub.toml: peer[0].name: 'hub' is this gateway's own name (gateway.name)"
    )


def test_duplicate_listen_addresses(folder: Path) -> None:
    text = with_gateway(
        """
        [[peer]]
        name = "edge"
        cert = "edge.crt"
        [[tunnel]]
        name = "a"
        listen = "udp://127.0.0.1:53"
        via = ["edge"]
        target = "dns:53"
        [[tunnel]]
        name = "b"
        listen = "udp://127.0.0.1:53"
        via = ["edge"]
        target = "dns2:53"
        """
    )
    assert error_of(folder, text) == (
        "hub.toml: tunnel[1].listen: udp://127.0.0.1:53 is already used by tunnel[0].listen"
    )


def test_one_port_for_two_carrier_listeners_is_refused_whatever_their_schemes(folder: Path) -> None:
    text = with_gateway('listen = ["tls://127.0.0.1:17443", "tcp://127.0.0.1:17443"]\n')
    assert error_of(folder, text) == (
        "hub.toml: gateway.listen[1]: tcp://127.0.0.1:17443 is already used by gateway.listen[0]"
        " (tls://127.0.0.1:17443)"
    )


def tunnel_beside_carrier(carrier: str, tunnel: str) -> str:
    return with_gateway(
        f"""
        listen = ["{carrier}"]
        [[peer]]
        name = "edge"
        cert = "edge.crt"
        [[tunnel]]
        name = "a"
        listen = "{tunnel}"
        via = ["edge"]
        target = "db:5432"
        """
    )


@pytest.mark.parametrize(
    ("carrier", "tunnel"),
    [
        ("tls://127.0.0.1:17443", "tcp://127.0.0.1:17443"),
        ("tls://127.0.0.1:17443", "tcp://0.0.0.0:17443"),
        ("tls://0.0.0.0:17443", "tcp://127.0.0.1:17443"),
        ("tls://[::1]:17443", "tcp://[::]:17443"),
        ("tls://[::]:17443", "tcp://[0:0::1]:17443"),
    ],
)
def test_a_tunnel_on_a_carrier_port_is_refused(folder: Path, carrier: str, tunnel: str) -> None:
    assert error_of(folder, tunnel_beside_carrier(carrier, tunnel)) == (
        f"hub.toml: tunnel[0].listen: {tunnel} is already used by gateway.listen[0] ({carrier})"
    )


@pytest.mark.parametrize(
    ("carrier", "tunnel"),
    [
        ("tls://127.0.0.1:17443", "udp://127.0.0.1:17443"),  # UDP and TCP ports are separate
        ("tls://127.0.0.1:17443", "tcp://127.0.0.2:17443"),
        ("tls://0.0.0.0:17443", "tcp://[::]:17443"),  # trio's TCP listeners are IPv6-only
        ("tls://127.0.0.1:0", "tcp://127.0.0.1:0"),  # port 0 is a fresh port each time
    ],
)
def test_listeners_that_can_bind_together_are_accepted(
    folder: Path, carrier: str, tunnel: str
) -> None:
    parse_config(tunnel_beside_carrier(carrier, tunnel), "hub.toml", folder)


def test_udp_tunnels_clash_with_udp_ones_only_and_dual_stack(folder: Path) -> None:
    def tunnels(first: str, second: str) -> str:
        return with_gateway(
            f"""
            [[peer]]
            name = "edge"
            cert = "edge.crt"
            [[tunnel]]
            name = "a"
            listen = "{first}"
            via = ["edge"]
            target = "dns:53"
            [[tunnel]]
            name = "b"
            listen = "{second}"
            via = ["edge"]
            target = "dns:53"
            """
        )

    assert error_of(folder, tunnels("udp://127.0.0.1:53", "udp://[::]:53")) == (
        "hub.toml: tunnel[1].listen: udp://[::]:53 is already used by tunnel[0].listen"
        " (udp://127.0.0.1:53)"
    )
    parse_config(tunnels("udp://127.0.0.1:53", "tcp://127.0.0.1:53"), "hub.toml", folder)
    parse_config(tunnels("udp://0.0.0.0:0", "udp://0.0.0.0:0"), "hub.toml", folder)


def test_undeclared_via_peer(folder: Path) -> None:
    text = with_gateway(
        """
        [[peer]]
        name = "edge"
        cert = "edge.crt"
        [[tunnel]]
        name = "a"
        listen = "tcp://127.0.0.1:1"
        via = ["egde"]
        target = "db:5432"
        """
    )
    assert error_of(folder, text) == (
        "hub.toml: tunnel[0].via[0]: 'egde' is not a declared peer (declared: edge)"
    )


def test_route_through_ourselves_is_a_loop(folder: Path) -> None:
    text = with_gateway(
        """
        [[peer]]
        name = "edge"
        cert = "edge.crt"
        [[tunnel]]
        name = "a"
        listen = "tcp://127.0.0.1:1"
        via = ["edge", "hub"]
        target = "db:5432"
        """
    )
    assert error_of(folder, text) == (
        "hub.toml: tunnel[0].via[1]: 'hub' is this gateway itself: the route would loop"
    )


def test_route_longer_than_max_route_length(folder: Path) -> None:
    text = with_gateway(
        """
        max_route_length = 2
        [[peer]]
        name = "edge"
        cert = "edge.crt"
        [[tunnel]]
        name = "a"
        listen = "tcp://127.0.0.1:1"
        via = ["edge", "b", "c"]
        target = "db:5432"
        """
    )
    assert error_of(folder, text) == (
        "hub.toml: tunnel[0].via: route has 3 hops, more than gateway.max_route_length (2)"
    )


def test_peer_without_cert_and_without_dial(folder: Path) -> None:
    text = with_gateway(f'[[peer]]\nname = "edge"\nfingerprint = "SHA256:{"A" * 43}"\n')
    assert error_of(folder, text) == (
        "hub.toml: peer[0].cert: a peer that has no `dial` must have `cert` unless gateway.ca"
        " is set (the TLS listener needs the cert in its trust store)"
    )


def test_peer_without_any_identity(folder: Path) -> None:
    text = with_gateway('[[peer]]\nname = "edge"\ndial = "tls://edge:7443"\n')
    assert error_of(folder, text) == (
        "hub.toml: peer[0]: expected `cert` or `fingerprint` (or both) to identify the peer"
    )


def test_fingerprint_mismatch(folder: Path) -> None:
    core_fp = load_identity(folder / "core.key").fingerprint
    edge_fp = load_identity(folder / "edge.key").fingerprint
    text = with_gateway(f'[[peer]]\nname = "edge"\ncert = "edge.crt"\nfingerprint = "{core_fp}"\n')
    assert error_of(folder, text) == (
        f"hub.toml: peer[0].fingerprint: does not match peer[0].cert: the certificate's"
        f" fingerprint is {edge_fp}, got {core_fp}"
    )


def test_malformed_fingerprint(folder: Path) -> None:
    text = with_gateway('[[peer]]\nname = "edge"\ncert = "edge.crt"\nfingerprint = "abc"\n')
    assert error_of(folder, text) == (
        "hub.toml: peer[0].fingerprint: expected SHA256: followed by 43 base64 characters"
        " (see `tunnelgate fingerprint FILE`), got 'abc'"
    )


def test_keepalive_timeout_must_exceed_interval(folder: Path) -> None:
    text = with_gateway("keepalive_interval = 10\nkeepalive_timeout = 10\n")
    assert error_of(folder, text) == (
        "hub.toml: gateway.keepalive_timeout: expected more than keepalive_interval (10), got 10"
    )


def test_out_of_range_number(folder: Path) -> None:
    assert error_of(folder, with_gateway("initial_window = 1024\n")) == (
        "hub.toml: gateway.initial_window: expected at least 16384, got 1024"
    )


def test_bad_gateway_name(folder: Path) -> None:
    assert error_of(folder, '[gateway]\nname = "my hub"\nkey = "hub.key"\n') == (
        "hub.toml: gateway.name: expected a name of 1-63 letters, digits, '.', '_' or '-',"
        " got 'my hub'"
    )


def test_toml_syntax_error_names_line_and_column(folder: Path) -> None:
    assert error_of(folder, '[gateway]\nname = "hub\n') == (
        "hub.toml: TOML syntax error: Illegal character '\\n' (at line 2, column 12)"
    )


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.toml: no such file"):
        load_config(tmp_path / "nope.toml")


def test_a_deeply_nested_value_is_an_error_not_a_recursion_error(folder: Path) -> None:
    assert error_of(folder, with_gateway("listen = " + "[" * 1000 + "\n")) == (
        "hub.toml: value nested too deeply"
    )


def test_a_huge_value_is_cut_short_in_the_message(folder: Path) -> None:
    message = error_of(folder, f'[gateway]\nname = "{"a" * 5_000_000}"\nkey = "hub.key"\n')
    assert len(message) < 300
    assert message == (
        "hub.toml: gateway.name: expected a name of 1-63 letters, digits, '.', '_' or '-',"
        f" got '{'a' * 60}…' (5000000 characters)"
    )


@pytest.mark.parametrize(
    "text",
    [
        with_gateway('listen = ["tls://{big}:7443"]'),  # our parsers' messages
        with_gateway("{big} = 1"),  # an unknown key is in the key path
        '[gateway]\nname = "hub"\nkey = "{big}"',  # every message about a file echoes its path
        with_gateway('[[peer]]\nname = "edge"\ncert = "edge.crt"\nallow = ["tcp://{big}:22"]'),
    ],
    ids=["listen", "unknown-key", "path", "allow-rule"],
)
def test_every_echoed_value_is_cut_short(folder: Path, text: str) -> None:
    message = error_of(folder, text.replace("{big}", "b" * 5_000_000))
    assert len(message) < 400
    assert "b…" in message and "b" * 61 not in message


def test_a_private_key_others_can_read_is_refused(folder: Path) -> None:
    (folder / "hub.key").chmod(0o644)
    assert error_of(folder, with_gateway("")) == (
        f"hub.toml: gateway.key: {folder / 'hub.key'} is readable by group and others"
        f" (mode 0644); run chmod 600 {folder / 'hub.key'}"
    )


def test_a_relay_tier_peer_takes_a_dial_list_and_a_number_of_connections(folder: Path) -> None:
    """SPEC.md §15: `dial` is one address or several; `connections` carriers are kept."""
    fp = f"SHA256:{'A' * 43}"
    text = with_gateway(f'[[peer]]\nname = "relay"\nfingerprint = "{fp}"\n'
                        'dial = ["tls://relay-a:7443", "tls://relay-b:7443"]\nconnections = 3\n')
    (peer,) = parse_config(text, "hub.toml", folder).peer
    assert peer.dial == [CarrierAddress("tls", "relay-a", 7443), CarrierAddress("tls", "relay-b", 7443)]
    assert peer.connections == 3
    text = with_gateway(f'[[peer]]\nname = "relay"\nfingerprint = "{fp}"\nconnections = 2\n')
    assert error_of(folder, text) == (
        "hub.toml: peer[0].connections: expected `dial` with connections = 2: carriers are kept"
        " only to a peer this gateway dials")
    text = with_gateway(f'[[peer]]\nname = "relay"\nfingerprint = "{fp}"\ndial = "tls://r:1"\n'
                        'connections = 0\n')
    assert error_of(folder, text).startswith("hub.toml: peer[0].connections: ")


# ---------------------------------------------------------------- access listeners, services (issue 13)

def _tunnel(body: str) -> str:
    return with_gateway(
        """
        [[peer]]
        name = "edge"
        cert = "edge.crt"
        allow = ["service:echo", "service:*", "tcp://db:5432"]
        [[tunnel]]
        name = "t"
        via = ["edge"]
        """ + textwrap.dedent(body))


@pytest.mark.parametrize(("body", "message"), [
    ('listen = "socks5://127.0.0.1:1080"\ntarget = "db:5432"',
     "tunnel[0].target: a socks5:// listener takes each destination from its client: expected no target"),
    ('listen = "tcp://127.0.0.1:1"',
     "tunnel[0].target: required for a tcp:// listener: expected HOST:PORT or service:NAME"),
    ('listen = "socks5://0.0.0.0:1080"',
     "tunnel[0].users_file: a socks5:// listener on 0.0.0.0, beyond loopback, must authenticate its"
     " clients: expected users_file (or allow_anonymous = true)"),
    ('listen = "http://198.18.0.1:3128"',
     "tunnel[0].users_file: a http:// listener on 198.18.0.1, beyond loopback, must authenticate its"
     " clients: expected users_file (or allow_anonymous = true)"),
    ('listen = "tcp://127.0.0.1:1"\ntarget = "db:5432"\nallow_anonymous = true',
     "tunnel[0].allow_anonymous: only for socks5:// and http:// listeners, not a tcp:// listener"),
    ('listen = "udp://127.0.0.1:1"\ntarget = "db:53"\nproxy_protocol = "v2"',
     "tunnel[0].proxy_protocol: a PROXY header is for TCP sessions: not on a udp:// listener"),
    ('listen = "tcp://127.0.0.1:1"\ntarget = "service:echo"\nproxy_protocol = "v1"',
     "tunnel[0].proxy_protocol: service:echo is a built-in service: it takes no PROXY header"),
    ('listen = "tcp://127.0.0.1:1"\ntarget = "service:qotd"',
     "tunnel[0].target: expected one of the built-in services service:chargen, service:daytime,"
     " service:discard, service:echo, service:time, got 'service:qotd'"),
    ('listen = "socks5://127.0.0.1:1"\nusers_file = "missing.txt"',
     "tunnel[0].users_file: {folder}/missing.txt: cannot read: No such file or directory"),
])
def test_access_listener_and_service_mistakes(folder: Path, body: str, message: str) -> None:
    assert error_of(folder, _tunnel(body)) == f"hub.toml: {message.format(folder=folder)}"


def test_access_listeners_and_services_load(folder: Path) -> None:
    (folder / "users.txt").write_text("")
    config = parse_config(_tunnel('listen = "socks5://0.0.0.0:1080"\nusers_file = "users.txt"\n'
                                  'proxy_protocol = "v2"'), "hub.toml", folder)
    tunnel = config.tunnel[0]
    assert tunnel.listen == ListenAddress("socks5", "0.0.0.0", 1080) and tunnel.listen.is_access
    assert tunnel.target is None and tunnel.users_file == folder / "users.txt"
    assert tunnel.proxy_protocol == "v2"
    anonymous = parse_config(_tunnel('listen = "http://[::]:3128"\nallow_anonymous = true'),
                             "hub.toml", folder)
    assert anonymous.tunnel[0].listen.socket_kind == "tcp"
    service = parse_config(_tunnel('listen = "udp://127.0.0.1:7"\ntarget = "service:echo"'),
                           "hub.toml", folder)
    assert service.tunnel[0].target == Target("service:echo", 0)
    assert str(service.tunnel[0].target) == "service:echo"
    policy = service.peer[0].policy
    assert policy.permits("udp", "service:echo", 0) and policy.permits("tcp", "service:time", 0)
    assert not policy.permits("tcp", "db", 0) and not policy.permits("tcp", "service:echo", 5432)


def test_a_users_file_mistake_names_its_line(folder: Path) -> None:
    (folder / "users.txt").write_text("# users\nbob\n")
    message = error_of(folder, _tunnel('listen = "socks5://127.0.0.1:1"\nusers_file = "users.txt"'))
    assert message.startswith(f"hub.toml: tunnel[0].users_file: {folder}/users.txt:2: ")


# ---------------------------------------------------------------- carriers beyond TLS ports (issue 14)

def test_websocket_carrier_urls(folder: Path) -> None:
    config = parse_config(with_gateway(
        """
        listen = ["ws://127.0.0.1:8080/tunnel", "wss://[::]:8443/t/x"]
        [[peer]]
        name = "edge"
        cert = "edge.crt"
        dial = ["wss://relay.example.net/tunnel", "ws://198.18.0.1:8080"]
        proxy = "http://alice:p%40ss@127.0.0.1:3128"
        on_demand = true
        idle_hangup = 30
        """), "hub.toml", folder)
    assert config.gateway.listen == [CarrierAddress("ws", "127.0.0.1", 8080, "/tunnel"),
                                     CarrierAddress("wss", "::", 8443, "/t/x")]
    peer = config.peer[0]
    assert peer.dial == [CarrierAddress("wss", "relay.example.net", 443, "/tunnel"),
                         CarrierAddress("ws", "198.18.0.1", 8080, "/")]
    assert peer.dial[0].host_header == "relay.example.net" and peer.dial[1].host_header == "198.18.0.1:8080"
    assert peer.on_demand and peer.idle_hangup == 30


@pytest.mark.parametrize(("body", "message"), [
    ('listen = ["ws://127.0.0.1/tunnel"]',
     "gateway.listen[0]: a listener needs its port: expected ws://HOST:PORT/PATH, got 'ws://127.0.0.1/tunnel'"),
    ('listen = ["wss://127.0.0.1:8443/a b"]',
     "gateway.listen[0]: expected wss://HOST:PORT/PATH, got 'wss://127.0.0.1:8443/a b'"),
    ('listen = ["https://127.0.0.1:8443/"]',
     "gateway.listen[0]: expected tls://HOST:PORT, tcp://HOST:PORT, ws://HOST:PORT/PATH or"
     " wss://HOST:PORT/PATH, got 'https://127.0.0.1:8443/'"),
    ('[[peer]]\nname = "edge"\ncert = "edge.crt"\nproxy = "env"',
     "peer[0].proxy: only for a peer this gateway dials: expected `dial` too"),
    ('[[peer]]\nname = "edge"\ncert = "edge.crt"\ndial = "tls://a:1"\nproxy = "socks5://127.0.0.1:1080"',
     "peer[0].proxy: expected http://[USER:PASSWORD@]HOST:PORT or \"env\", got 'socks5://127.0.0.1:1080'"),
    ('[[peer]]\nname = "edge"\ncert = "edge.crt"\ndial = "tcp://a:1"\nproxy = "env"',
     "peer[0].proxy: a plain tcp:// carrier is not dialed through a proxy: use tls:// or wss://"),
    ('[[peer]]\nname = "edge"\ncert = "edge.crt"\non_demand = true',
     "peer[0].on_demand: only for a peer this gateway dials: expected `dial` too"),
])
def test_websocket_and_proxy_mistakes(folder: Path, body: str, message: str) -> None:
    assert error_of(folder, with_gateway(body)) == f"hub.toml: {message}"
