"""Carrier links: accepting carriers on listeners and keeping dialed carriers up.

Identity is checked before a single frame is read: on a TLS listener the handshake
itself refuses a certificate that is not in the trust store (our peers' certificates,
or the fleet CA), and a dialer pins the peer's fingerprint right after the handshake.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import random
import socket
import ssl
import time
from collections import Counter
from collections.abc import Callable

import trio

from gateway.carriers.carrier import Carrier, RequestHandler, Timing
from gateway.carriers.peers import PeerDirectory
from gateway.carriers.proxy import connect_through, proxy_for
from gateway.carriers.schemes import WebSocketEnd, open_transport
from gateway.carriers.transport import TransportBroken
from gateway.config import CarrierAddress, Config, PeerConfig
from gateway.errors import CarrierLost, IdentityError
from gateway.logs import Throttle, peer_address
from gateway.security.identity import fingerprint_of_file
from gateway.security.tls import TlsContexts, describe_tls_failure
from gateway_codecs import Capability, Role, Settings

log = logging.getLogger("tunnelgate.links")

# Connections accepted on one carrier listener whose peer has not yet been authenticated
# and said HELLO (each lasts at most handshake_timeout). Each costs a task, a socket and
# OpenSSL's handshake state (tens of KB): the caps bound what a flood can take, per
# listener and per source address (so one source cannot lock out the others).
MAX_HANDSHAKES = 512
MAX_HANDSHAKES_PER_SOURCE = 64
REFUSAL_LOG_INTERVAL = 1.0  # during a flood, one log line per second says how many were refused


class HandshakeGate:
    """Counts a listener's unauthenticated connections; refuses beyond the caps, logged
    (at most once a second per cap: a flood must not become a flood of log lines).

    A source is an IPv4 address or an IPv6 /64 (one host commonly holds a whole /64)."""

    def __init__(self, where: str, limit: int = MAX_HANDSHAKES,
                 per_source: int = MAX_HANDSHAKES_PER_SOURCE) -> None:
        self.where = where
        self.limit = limit
        self.per_source = per_source
        self.open = 0
        self.by_source: dict[str, int] = {}
        self._listener_log = Throttle(REFUSAL_LOG_INTERVAL)
        self._source_log = Throttle(REFUSAL_LOG_INTERVAL)

    @staticmethod
    def source_of(address: str) -> str:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        if isinstance(ip, ipaddress.IPv6Address):
            if ip.ipv4_mapped is not None:
                return str(ip.ipv4_mapped)
            return str(ipaddress.ip_network(f"{ip}/64", strict=False))
        return str(ip)

    def admit(self, source: str) -> bool:
        from_source = self.by_source.get(source, 0)
        if self.open >= self.limit:
            self._refused(self._listener_log, f"{self.open} open on this listener (limit {self.limit})")
            return False
        if from_source >= self.per_source:
            self._refused(self._source_log,
                          f"{from_source} open from {source} (limit {self.per_source} per source)")
            return False
        self.open += 1
        self.by_source[source] = from_source + 1
        return True

    def release(self, source: str) -> None:
        self.open -= 1
        left = self.by_source[source] - 1
        if left:
            self.by_source[source] = left
        else:
            del self.by_source[source]

    def _refused(self, throttle: Throttle, why: str) -> None:
        left_out = throttle.due()
        if left_out is not None:
            log.warning("carrier listener %s: refused %d connection(s): unauthenticated handshakes: %s",
                        self.where, left_out + 1, why)


def _where(address: CarrierAddress) -> str:
    return str(address)


def _has_tls_cause(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return True
        seen = seen.__cause__
    return False


def _connect_failure(exc: OSError) -> str:
    """trio reports a failed connect as 'all attempts failed'; say why the last one did."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        group = cause.__cause__
        if isinstance(group, BaseExceptionGroup) and group.exceptions:
            cause = group.exceptions[-1]
        else:
            cause = group
    return str(exc)


# A lost carrier's close_reason, reduced to a few words a metric label can carry.
_LOSS_REASONS = (("keepalive timeout", "keepalive_timeout"), ("after GOAWAY", "peer_goaway"),
                 ("peer closed", "peer_closed"), ("read failed", "io_error"),
                 ("write failed", "io_error"), ("protocol violation", "protocol_error"),
                 ("shut", "shutdown"), ("already has a carrier", "duplicate_instance"),
                 ("internal error", "internal_error"))


def loss_reason(close_reason: str) -> str:
    return next((label for text, label in _LOSS_REASONS if text in close_reason), "other")


class CarrierStats:
    """Carriers that came up and went down, per peer (the admin endpoint's metrics)."""

    def __init__(self) -> None:
        self.connects: Counter[tuple[str, str]] = Counter()  # (peer, "dialed"|"accepted")
        self.losses: Counter[tuple[str, str]] = Counter()  # (peer, loss_reason)


class Links:
    """Everything about carriers except what flows on them."""

    def __init__(self, config: Config, contexts: TlsContexts, peers: PeerDirectory,
                 on_request: RequestHandler) -> None:
        gw = config.gateway
        self.config = config
        self.contexts = contexts
        self.peers = peers
        self.on_request = on_request
        # Set by the gateway once its root nursery exists: sessions outlive their carrier.
        self.session_nursery: trio.Nursery | None = None
        self.timing = Timing(gw.handshake_timeout, gw.keepalive_interval, gw.keepalive_timeout)
        capabilities = Capability.DATAGRAM | Capability.ORIGIN
        if gw.resume_timeout > 0:
            capabilities |= Capability.RESUME | Capability.FIN_ACK
        # This process among the instances of `gw.name` (a relay tier runs several).
        self.instance_id = os.urandom(8)
        self.settings = Settings(initial_window=gw.initial_window, max_circuits=gw.max_circuits,
                                 node_name=gw.name, capabilities=capabilities,
                                 instance_id=self.instance_id)
        self.stats = CarrierStats()
        self.by_fingerprint: dict[str, PeerConfig] = {}
        self.use(config)

    def use(self, config: Config) -> None:
        """The peers to recognize (at start, and after a reload; [gateway] stays)."""
        self.config = config
        by_fingerprint = {}
        for peer in config.peer:
            if peer.cert is not None:
                by_fingerprint[fingerprint_of_file(peer.cert)] = peer
            if peer.fingerprint is not None:
                by_fingerprint[peer.fingerprint] = peer
        self.by_fingerprint = by_fingerprint

    async def _carry(self, carrier: Carrier, on_up: Callable[[], None] | None = None,
                     distinct: bool = False) -> None:
        """Run a carrier: register it once its HELLO exchange is done, until it ends.
        `distinct`: one of several carriers kept to a relay tier; if it reached an
        instance that already has one of them, close it (the dialer tries again)."""

        def ready(carrier: Carrier) -> None:
            if carrier.peer_name not in self.peers.by_name:
                log.warning("carrier %s refused: HELLO names %r, not a configured peer",
                            carrier.description, carrier.peer_name)
                carrier.close(f"unknown peer name {carrier.peer_name!r} in HELLO")
                return
            if distinct and carrier.peer_instance in self.peers.dialed_instances(carrier.peer_name):
                carrier.close(f"instance {carrier.peer_instance} of {carrier.peer_name}"
                              " already has a carrier from us")
                return
            self.peers.add(carrier)
            carrier.up_since = time.time()
            self.stats.connects[carrier.peer_name, carrier.direction] += 1
            log.info("carrier %s up (peer %s)%s", carrier.description, carrier.peer_name,
                     f", instance {carrier.peer_instance}" if carrier.peer_instance else "",
                     extra={"event": "carrier_up", "peer": carrier.peer_name,
                            "instance": carrier.peer_instance, "direction": carrier.direction,
                            "address": carrier.description})
            if on_up is not None:
                on_up()

        try:
            await carrier.run(ready)
        finally:
            self.peers.remove(carrier)
            if carrier.up_since:
                self.stats.losses[carrier.peer_name or "", loss_reason(carrier.close_reason)] += 1
        log.warning("carrier %s down: %s", carrier.description, carrier.close_reason,
                    extra={"event": "carrier_down", "peer": carrier.peer_name,
                           "instance": carrier.peer_instance, "direction": carrier.direction,
                           "address": carrier.description, "reason": carrier.close_reason})

    # ------------------------------------------------------------------ accepting

    async def serve(self, address: CarrierAddress, handler_nursery: trio.Nursery | None = None, *,
                    task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED
                    ) -> None:
        listeners = await trio.open_tcp_listeners(address.port, host=address.host or None)
        bound = [(str(ln.socket.getsockname()[0]), int(ln.socket.getsockname()[1])) for ln in listeners]
        if address.scheme == "tcp":
            log.warning("carrier listener %s is plain TCP: no encryption, no peer"
                        " authentication (the peer's name is taken from its HELLO)", _where(address))
        else:
            self.contexts.server()
            if address.scheme == "wss":
                self.contexts.outer_server()
        log.info("carrier listener %s bound to %s", _where(address), bound)
        task_status.started(bound)

        gate = HandshakeGate(_where(address))

        async def accepted(stream: trio.SocketStream) -> None:
            try:
                source = gate.source_of(str(stream.socket.getpeername()[0]))
            except (OSError, ValueError):
                await stream.aclose()  # gone already
                return
            if not gate.admit(source):
                stream.socket.close()
                await trio.lowlevel.checkpoint()
                return
            authenticated = False

            def up() -> None:
                nonlocal authenticated
                authenticated = True
                gate.release(source)

            try:
                await self._accepted(stream, address, up)
            except Exception:  # a bug with one connection must not end the listener
                log.exception("carrier from %s: internal error; closed", source)
                await stream.aclose()
            finally:
                if not authenticated:
                    gate.release(source)

        # Accepted carriers run in `handler_nursery`, so closing the listener (a drain)
        # does not cancel them and the sessions on them.
        await trio.serve_listeners(accepted, listeners, handler_nursery=handler_nursery)

    async def _accepted(self, stream: trio.SocketStream, address: CarrierAddress,
                        on_up: Callable[[], None]) -> None:
        remote = peer_address(stream.socket)
        scheme = address.scheme
        try:
            with trio.fail_after(self.timing.handshake_timeout):
                transport = await open_transport(scheme, stream, self._context(scheme, None),
                                                 server_side=True, websocket=self._websocket(address, True))
            try:
                fingerprint = transport.peer_fingerprint()
            except BaseException:
                transport.close()
                raise
        except (OSError, ssl.SSLError, trio.TooSlowError, IdentityError, TransportBroken) as exc:
            why = ("TLS handshake timed out" if isinstance(exc, trio.TooSlowError)
                   else describe_tls_failure(exc))
            log.warning("carrier from %s refused: %s", remote, why)
            return
        if fingerprint is None:  # plain: the peer's name will be what its HELLO says
            carrier = Carrier(transport, Role.ACCEPTOR, self.settings, self.timing, self.on_request,
                              None, f"from {remote} (plain)", self.session_nursery)
        else:
            peer = self.by_fingerprint.get(fingerprint)
            if peer is None:
                log.warning("carrier from %s refused: certificate %s is not a configured peer",
                            remote, fingerprint)
                transport.close()
                return
            carrier = Carrier(transport, Role.ACCEPTOR, self.settings, self.timing, self.on_request,
                              peer.name, f"from {peer.name} at {remote}", self.session_nursery)
        try:
            await self._carry(carrier, on_up)
        except CarrierLost as exc:
            log.warning("carrier from %s failed: %s", remote, exc.reason)

    def _websocket(self, address: CarrierAddress, server_side: bool) -> WebSocketEnd | None:
        """The WebSocket details of a ws:// or wss:// address (None for the others)."""
        if not address.is_websocket:
            return None
        outer = None
        if address.scheme == "wss":
            outer = self.contexts.outer_server() if server_side else self.contexts.outer_client()
        # A CDN or a reverse proxy with several names picks the certificate (and the
        # backend) by SNI: a dialer names the URL's host, unless it is an address.
        server_name = None if server_side or _is_address(address.host) else address.host
        return WebSocketEnd(address.path, address.host_header, outer, server_name)

    def _context(self, scheme: str, peer: PeerConfig | None) -> ssl.SSLContext | None:
        """The TLS context a carrier of `scheme` needs (None for plain ones): the server
        context when accepting, the one that verifies `peer` when dialing it."""
        if scheme == "tcp":
            return None
        return self.contexts.server() if peer is None else self.contexts.client_for(peer.cert)

    # ------------------------------------------------------------------ dialing

    async def keep_dialing(self, peer: PeerConfig, slot: int = 0) -> None:
        """Keep carrier number `slot` of `peer.connections` up: reconnect with capped
        exponential backoff. Attempts go round `peer.dial`'s addresses (and the addresses
        each name resolves to), each slot starting at its own; with several slots, a
        carrier that reaches an instance another slot already has is closed and dialed
        again (through a load balancer, until the slots hold distinct instances)."""
        assert peer.dial
        gw = self.config.gateway
        delay = gw.reconnect_min
        distinct = peer.connections > 1
        attempt = slot
        while True:
            if peer.on_demand:
                await self.peers.wanted(peer.name)
                log.info("dial %s on demand: a session needs a carrier", peer.name)
            came_up = False

            def up() -> None:
                nonlocal came_up
                came_up = True

            address = peer.dial[attempt % len(peer.dial)]
            where = _where(address)
            try:
                carrier = await self._dial(peer, address, attempt // len(peer.dial))
                if peer.on_demand:
                    await self._carry_until_idle(carrier, up, distinct, peer.idle_hangup)
                else:
                    await self._carry(carrier, up, distinct)
            except (OSError, ssl.SSLError, trio.TooSlowError, IdentityError, CarrierLost,
                    TransportBroken) as exc:
                why = ("timed out" if isinstance(exc, trio.TooSlowError)
                       else describe_tls_failure(exc) if _has_tls_cause(exc)
                       else exc.reason if isinstance(exc, CarrierLost)
                       else describe_tls_failure(exc) if not isinstance(exc, OSError)
                       else _connect_failure(exc))
                log.warning("dial %s (%s) failed: %s; retrying in %.1f s", peer.name, where, why, delay)
            except Exception:  # a bug with one carrier must not end the gateway, nor this loop
                log.exception("dial %s (%s): internal error; retrying in %.1f s", peer.name, where, delay)
            attempt += 1
            if came_up:
                delay = gw.reconnect_min
                if peer.on_demand:
                    continue  # hung up (or lost): dial again when a session needs it
            # Full jitter keeps a fleet that lost its hub from reconnecting in lockstep.
            await trio.sleep(delay * (0.5 + random.random() / 2))
            delay = min(gw.reconnect_max, delay * 2)

    async def _carry_until_idle(self, carrier: Carrier, on_up: Callable[[], None], distinct: bool,
                                idle_hangup: float) -> None:
        """An on-demand carrier: hang up (GOAWAY) after `idle_hangup` s without circuits."""
        async with trio.open_nursery() as nursery:
            async def watch() -> None:
                idle_since = trio.current_time()
                while True:
                    await trio.sleep(min(1.0, idle_hangup / 4))
                    if carrier.circuits:
                        idle_since = trio.current_time()
                    elif trio.current_time() - idle_since >= idle_hangup:
                        log.info("carrier %s: no circuit for %g s: hanging up (on demand)",
                                 carrier.description, idle_hangup)
                        carrier.close(f"idle for {idle_hangup:g} s: hung up (on demand)")
                        return

            async def carry() -> None:
                try:
                    await self._carry(carrier, on_up, distinct)
                finally:
                    nursery.cancel_scope.cancel()

            nursery.start_soon(watch)
            nursery.start_soon(carry)

    async def _dial(self, peer: PeerConfig, address: CarrierAddress, turn: int) -> Carrier:
        """Connect to `address` (through the peer's proxy, if it has one); a name with
        several addresses is tried from its `turn`-th one round (so that retries and
        slots spread over a tier's members)."""
        where = _where(address)
        scheme = address.scheme
        context = self._context(scheme, peer)  # before connecting: nothing to clean up if it fails
        proxy = proxy_for(peer.proxy, address)
        with trio.fail_after(self.timing.handshake_timeout):
            if proxy is not None:
                stream = await connect_through(proxy, address.host, address.port)
            else:
                stream = await _connect_round(address.host, address.port, turn)
            transport = await open_transport(scheme, stream, context, server_side=False,
                                             websocket=self._websocket(address, False))
        try:
            got = transport.peer_fingerprint()
        except BaseException:
            transport.close()
            raise
        if got is None:
            log.warning("carrier to %s (%s) is plain TCP: unencrypted and unauthenticated",
                        peer.name, where)
            return Carrier(transport, Role.DIALER, self.settings, self.timing, self.on_request,
                           peer.name, f"to {peer.name} at {where} (plain)", self.session_nursery)
        expected = {fp for fp, p in self.by_fingerprint.items() if p is peer}
        if expected and got not in expected:
            transport.close()
            raise IdentityError(f"{where} presented {got}, not {peer.name}'s key")
        return Carrier(transport, Role.DIALER, self.settings, self.timing, self.on_request,
                       peer.name, f"to {peer.name} at {where}", self.session_nursery)


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


async def _connect_round(host: str, port: int, turn: int) -> trio.SocketStream:
    """A TCP connection to `host`, whose addresses are tried in turn from the `turn`-th
    (an IP address, or a name with one address: that one)."""
    try:
        ipaddress.ip_address(host)
        return await trio.open_tcp_stream(host, port)
    except ValueError:
        pass
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if len(addresses) <= 1:
        return await trio.open_tcp_stream(host, port)
    start = turn % len(addresses)
    last: OSError | None = None
    for ip in addresses[start:] + addresses[:start]:
        try:
            return await trio.open_tcp_stream(ip, port)
        except OSError as exc:
            last = exc
    assert last is not None
    raise last
