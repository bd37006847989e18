"""Refusals a user must be able to see: an unknown key, a target outside `allow`.

A refusal closes the client's connection, and both gateways' logs say who was refused
and why (an operator reads the log of the side that refused and of the side that was).
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

from tests.gateways import GatewayProcess, keygen, pair_configs, running, wait_until
from tests.netutil import IO_TIMEOUT, TcpServer, echo_handler, tunnel_toml


def _closed_without_reply(port: int, timeout: float = 20.0) -> None:
    """Connect to a tunnel and expect it to be closed on us, with no data."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as c:
        try:
            c.sendall(b"hello?")
            data = c.recv(100)
        except ConnectionResetError:
            data = b""
        assert data == b"", f"a refused session got data: {data!r}"


def test_a_gateway_with_an_unknown_key_is_refused(tmp_path: Path) -> None:
    with TcpServer(echo_handler) as target:
        exit_gw, entry = pair_configs(tmp_path)
        keygen(tmp_path, "intruder")  # a fresh key the exit has never heard of
        with running(exit_gw, entry):
            entry.wait_log("up (peer exit)")
            intruder = GatewayProcess(tmp_path, "intruder", f"""
[gateway]
name = "intruder"
key = "intruder.key"
handshake_timeout = 2.0
reconnect_max = 1.0

[[peer]]
name = "exit"
cert = "exit.crt"
dial = "tls://127.0.0.1:{exit_gw.carrier_port()}"
{tunnel_toml("sneak", "tcp", target.port)}
""")
            with running(intruder):
                # The exit refuses during the TLS handshake, before any frame is read,
                # and says who (the remote address) and why (the certificate).
                exit_gw.wait_log("refused: peer certificate is not trusted")
                line = next(ln for ln in exit_gw.log().splitlines()
                            if "refused: peer certificate is not trusted" in ln)
                who = r"WARNING tunnelgate\.links: carrier from 127\.0\.0\.1:\d+ refused: "
                assert re.search(who, line), line
                intruder.wait_log("dial exit (tls://127.0.0.1:")
                assert "up (peer exit)" not in intruder.log()
                # A session through the intruder goes nowhere.
                _closed_without_reply(intruder.tunnel_port("sneak"))
                intruder.wait_log("tunnel sneak 127.0.0.1:")
                assert re.search(r"tunnel sneak 127\.0\.0\.1:\d+ -> exit -> 127\.0\.0\.1:\d+: refused: .*"
                                 r"no carrier to exit is up", intruder.log()), intruder.log()[-3000:]
            assert target.accepted == 0
            # The real peer was not disturbed: its carrier is still the only one up.
            assert exit_gw.log().count("up (peer entry)") == 1


def test_a_target_outside_allow_is_refused_with_the_reason(tmp_path: Path) -> None:
    with TcpServer(echo_handler) as target:
        # The exit lets entry reach only port 1; the tunnel asks for the target's port.
        exit_gw, entry = pair_configs(tmp_path, allow='["tcp://127.0.0.1:1"]',
                                      tunnels_on_entry=tunnel_toml("t", "tcp", target.port))
        with running(exit_gw, entry):
            entry.wait_log("up (peer exit)")
            _closed_without_reply(entry.tunnel_port("t"))
            wanted = f"tcp://127.0.0.1:{target.port}"
            entry.wait_log(": refused: ")
            # The entry's log names the tunnel, the refusing gateway, the code and the reason.
            line = next(ln for ln in entry.log().splitlines() if ": refused: " in ln)
            assert "WARNING" in line and "tunnel t 127.0.0.1:" in line, line
            assert "FORBIDDEN_TARGET" in line, line
            assert f"exit: {wanted} is not in the allow list for peer entry" in line, line
            # The exit says it refused too, and what.
            exit_gw.wait_log(f"refused {wanted} for entry: FORBIDDEN_TARGET")
            assert target.accepted == 0
            # The carrier is fine: a refusal ends one circuit, not the link.
            assert entry.log().count("up (peer exit)") == 1
            assert "carrier" not in line
            wait_until(lambda: "session closed: tunnel t" in entry.log(), IO_TIMEOUT,
                       "the refused session's close line")


def test_opens_beyond_max_circuits_are_refused_and_logged(tmp_path: Path) -> None:
    with TcpServer(echo_handler) as target:
        exit_gw, entry = pair_configs(tmp_path, tunnels_on_entry=tunnel_toml("echo", "tcp", target.port),
                                      gateway_extra="max_circuits = 1\n")
        with running(exit_gw, entry):
            entry.wait_log("up (peer exit)")
            port = entry.tunnel_port("echo")
            with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as first:
                first.sendall(b"one")
                assert first.recv(3) == b"one"
                _closed_without_reply(port)  # the second circuit on the carrier: refused
            exit_gw.wait_log("refused circuit")
            line = next(ln for ln in exit_gw.log().splitlines() if "refused circuit" in ln)
            assert "RESOURCE_LIMIT" in line and f"127.0.0.1:{target.port}" in line, line
            entry.wait_log("RESOURCE_LIMIT")  # written just after the client was reset


def test_a_carrier_without_hello_is_told_why_in_a_goaway(tmp_path: Path) -> None:
    from gateway_codecs import CarrierSession, ErrorCode, GoAwayReceived, Role, Settings

    exit_gw, _ = pair_configs(tmp_path, transport="tcp", gateway_extra="handshake_timeout = 0.5\n")
    with running(exit_gw):
        with socket.create_connection(("127.0.0.1", exit_gw.carrier_port()), timeout=IO_TIMEOUT) as c:
            received = b""
            while chunk := c.recv(65536):  # the gateway's HELLO, then (after 0.5 s) its GOAWAY
                received += chunk
        events = CarrierSession(Role.DIALER, Settings()).receive_data(received)
        goaways = [e for e in events if isinstance(e, GoAwayReceived)]
        assert len(goaways) == 1, events
        assert goaways[0].code == ErrorCode.PROTOCOL_ERROR and "no HELLO" in goaways[0].reason


def test_a_hello_naming_another_gateway_than_the_certificate_is_logged(tmp_path: Path) -> None:
    exit_gw, entry = pair_configs(tmp_path)
    # entry's key and certificate, but its HELLO says "impostor".
    text = entry.config_path.read_text()
    entry.config_path.write_text(text.replace('name = "entry"', 'name = "impostor"', 1))
    with running(exit_gw, entry):
        exit_gw.wait_log("up (peer entry)")
        exit_gw.wait_log("HELLO names 'impostor', but the certificate is peer entry's")


def test_a_refused_udp_client_is_not_asked_for_again_at_once(tmp_path: Path) -> None:
    """Every datagram of a client whose flow was refused must not become one more OPEN
    (and one more refusal logged at each hop): the entry holds such a client back for a
    second, dropping its datagrams."""
    import time

    exit_gw, entry = pair_configs(tmp_path, allow='["udp://127.0.0.1:1"]',
                                  tunnels_on_entry=tunnel_toml("u", "udp", 9))
    with running(exit_gw, entry), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
        entry.wait_log("up (peer exit)")
        port = entry.tunnel_port("u")
        c.sendto(b"first", ("127.0.0.1", port))
        exit_gw.wait_log("refused udp://127.0.0.1:9")
        entry.wait_log("FORBIDDEN_TARGET")
        started = time.monotonic()
        while time.monotonic() - started < 0.5:  # well within the hold
            c.sendto(b"again", ("127.0.0.1", port))
            time.sleep(0.005)
        time.sleep(0.2)  # let anything that was opened be refused and logged
        assert exit_gw.log().count("refused udp://127.0.0.1:9") == 1
