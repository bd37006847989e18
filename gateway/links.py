"""Carrier links: accepting carriers on listeners and keeping dialed carriers up.

Identity is checked before a single frame is read: on a TLS listener the handshake
itself refuses a certificate that is not in the trust store (our peers' certificates,
or the fleet CA), and a dialer pins the peer's fingerprint right after the handshake.
"""

from __future__ import annotations

import logging
import random
import ssl
from collections.abc import Callable
from contextlib import suppress

import trio

from gateway.carrier import Carrier, RequestHandler, Timing
from gateway.config import CarrierAddress, Config, PeerConfig
from gateway.errors import CarrierLost, IdentityError
from gateway.identity import fingerprint_of_file
from gateway.peers import PeerDirectory
from gateway.tls import TlsContexts, describe_tls_failure, peer_fingerprint
from gateway_codecs import Role, Settings

log = logging.getLogger("tunnelgate.links")


def _where(address: CarrierAddress) -> str:
    host = f"[{address.host}]" if ":" in address.host else address.host
    return f"{address.scheme}://{host}:{address.port}"


def _remote(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return "?"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Links:
    """Everything about carriers except what flows on them."""

    def __init__(self, config: Config, contexts: TlsContexts, peers: PeerDirectory,
                 on_request: RequestHandler) -> None:
        gw = config.gateway
        self.config = config
        self.contexts = contexts
        self.peers = peers
        self.on_request = on_request
        self.timing = Timing(gw.handshake_timeout, gw.keepalive_interval, gw.keepalive_timeout)
        self.settings = Settings(initial_window=gw.initial_window, max_circuits=gw.max_circuits,
                                 node_name=gw.name)
        self.by_fingerprint: dict[str, PeerConfig] = {}
        for peer in config.peer:
            if peer.cert is not None:
                self.by_fingerprint[fingerprint_of_file(peer.cert)] = peer
            if peer.fingerprint is not None:
                self.by_fingerprint[peer.fingerprint] = peer

    async def _carry(self, carrier: Carrier, on_up: Callable[[], None] | None = None) -> None:
        """Run a carrier: register it once its HELLO exchange is done, until it ends."""

        def ready(carrier: Carrier) -> None:
            if carrier.peer_name not in self.peers.by_name:
                log.warning("carrier %s refused: HELLO names %r, not a configured peer",
                            carrier.description, carrier.peer_name)
                carrier.close(f"unknown peer name {carrier.peer_name!r} in HELLO")
                return
            self.peers.add(carrier)
            log.info("carrier %s up (peer %s)", carrier.description, carrier.peer_name)
            if on_up is not None:
                on_up()

        try:
            await carrier.run(ready)
        finally:
            self.peers.remove(carrier)
        log.warning("carrier %s down: %s", carrier.description, carrier.close_reason)

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
        log.info("carrier listener %s bound to %s", _where(address), bound)
        task_status.started(bound)

        async def accepted(stream: trio.SocketStream) -> None:
            await self._accepted(stream, address.scheme)

        # Accepted carriers run in `handler_nursery`, so closing the listener (a drain)
        # does not cancel them and the sessions on them.
        await trio.serve_listeners(accepted, listeners, handler_nursery=handler_nursery)

    async def _accepted(self, stream: trio.SocketStream, scheme: str) -> None:
        remote = _remote(stream)
        with suppress(OSError):
            stream.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, True)
        if scheme == "tcp":
            carrier = Carrier(stream, Role.ACCEPTOR, self.settings, self.timing, self.on_request,
                              None, f"from {remote} (plain)")
        else:
            tls = trio.SSLStream(stream, self.contexts.server(), server_side=True,
                                 https_compatible=False)
            try:
                with trio.fail_after(self.timing.handshake_timeout):
                    await tls.do_handshake()
                peer = self.by_fingerprint.get(peer_fingerprint(tls))
                if peer is None:
                    raise IdentityError(f"certificate {peer_fingerprint(tls)} is not a configured peer")
            except (trio.BrokenResourceError, trio.TooSlowError, IdentityError) as exc:
                why = ("TLS handshake timed out" if isinstance(exc, trio.TooSlowError)
                       else describe_tls_failure(exc))
                log.warning("carrier from %s refused: %s", remote, why)
                with trio.move_on_after(1) as scope:
                    scope.shield = True
                    await stream.aclose()
                return
            carrier = Carrier(tls, Role.ACCEPTOR, self.settings, self.timing, self.on_request,
                              peer.name, f"from {peer.name} at {remote}")
        try:
            await self._carry(carrier)
        except CarrierLost as exc:
            log.warning("carrier from %s failed: %s", remote, exc.reason)

    # ------------------------------------------------------------------ dialing

    async def keep_dialing(self, peer: PeerConfig) -> None:
        """Keep one carrier to `peer` up: reconnect with capped exponential backoff."""
        assert peer.dial is not None
        gw = self.config.gateway
        delay = gw.reconnect_min
        where = _where(peer.dial)
        while True:
            came_up = False

            def up() -> None:
                nonlocal came_up
                came_up = True

            try:
                carrier = await self._dial(peer)
                await self._carry(carrier, up)
            except (OSError, trio.BrokenResourceError, trio.TooSlowError, IdentityError,
                    CarrierLost) as exc:
                why = ("timed out" if isinstance(exc, trio.TooSlowError)
                       else describe_tls_failure(exc) if isinstance(exc.__cause__, ssl.SSLError)
                       else exc.reason if isinstance(exc, CarrierLost)
                       else describe_tls_failure(exc) if not isinstance(exc, OSError)
                       else (exc.strerror or str(exc)))
                log.warning("dial %s (%s) failed: %s; retrying in %.1f s", peer.name, where, why, delay)
            if came_up:
                delay = gw.reconnect_min
            # Full jitter keeps a fleet that lost its hub from reconnecting in lockstep.
            await trio.sleep(delay * (0.5 + random.random() / 2))
            delay = min(gw.reconnect_max, delay * 2)

    async def _dial(self, peer: PeerConfig) -> Carrier:
        assert peer.dial is not None
        where = _where(peer.dial)
        with trio.fail_after(self.timing.handshake_timeout):
            stream = await trio.open_tcp_stream(peer.dial.host, peer.dial.port)
            with suppress(OSError):
                stream.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, True)
            if peer.dial.scheme == "tcp":
                log.warning("carrier to %s (%s) is plain TCP: unencrypted and unauthenticated",
                            peer.name, where)
                return Carrier(stream, Role.DIALER, self.settings, self.timing, self.on_request,
                               peer.name, f"to {peer.name} at {where} (plain)")
            ctx = self.contexts.client_for(peer.cert)
            tls = trio.SSLStream(stream, ctx, server_side=False, https_compatible=False)
            try:
                await tls.do_handshake()
            except BaseException:
                with trio.move_on_after(1) as scope:
                    scope.shield = True
                    await stream.aclose()
                raise
        got = peer_fingerprint(tls)
        expected = {fp for fp, p in self.by_fingerprint.items() if p is peer}
        if expected and got not in expected:
            await tls.aclose()
            raise IdentityError(f"{where} presented {got}, not {peer.name}'s key")
        return Carrier(tls, Role.DIALER, self.settings, self.timing, self.on_request,
                       peer.name, f"to {peer.name} at {where}")
