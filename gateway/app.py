"""The gateway process: wire config, identity, carriers, endpoints; drain on a signal.

Shutdown order (SIGTERM/SIGINT): stop accepting (listeners close), send GOAWAY on
every carrier, let open sessions finish for up to `drain_timeout`, then cancel the rest.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import ssl
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

import trio

from gateway.admin.http import AdminServer
from gateway.admin.view import GatewayView
from gateway.carriers.carrier import Carrier
from gateway.carriers.links import Links
from gateway.carriers.peers import PeerDirectory
from gateway.config import Config, PeerConfig, TunnelConfig, load_config
from gateway.errors import ConfigError
from gateway.notify import Notifier
from gateway.relay.engine import RelayEngine
from gateway.relay.resume import ResumeTable
from gateway.relay.sessions import SessionLog
from gateway.roles.endpoints import TunnelEndpoint
from gateway.roles.exits import CircuitServer
from gateway.security.identity import load_identity
from gateway.security.tls import TlsContexts

log = logging.getLogger("tunnelgate")

T = TypeVar("T")


def sole_exception(exc: BaseException) -> BaseException:
    """The one exception inside the groups nurseries wrap it in (or ``exc`` if it holds more)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


async def _bound(started: Awaitable[T], config: Config, key: str, address: object) -> T:
    """Await a listener's start; a port it cannot bind (in use, not ours) is the config's
    problem, so say which key asked for it instead of a traceback."""
    try:
        return await started
    except (OSError, BaseExceptionGroup) as exc:
        cause = sole_exception(exc)
        if not isinstance(cause, OSError) or isinstance(cause, ssl.SSLError):
            raise
        reason = cause.strerror or str(cause)
        message = f"cannot listen on {address}: {reason[:1].lower()}{reason[1:]}"
        raise ConfigError(str(config.path), key, message) from cause


def _write_ready_file(path: Path, ready: dict[str, object]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(ready))
    os.replace(tmp, path)  # readers never see a half-written file


async def run_gateway(config: Config, ready_file: Path | None = None) -> None:
    await Gateway(config).run(ready_file)


class Gateway:
    """One running gateway: its parts, the tasks that serve them, and `reload`, which
    applies a changed config file to them without touching what did not change."""

    def __init__(self, config: Config) -> None:
        gw = config.gateway
        for warning in config.tier_warnings():
            log.warning("%s", warning)
        self.config = config
        self.identity = identity = load_identity(gw.key)
        self.peers = peers = PeerDirectory(list(config.peer))
        self.sessions = sessions = SessionLog()
        self.contexts = contexts = TlsContexts(identity, _certs(config), gw.ca)
        self.relay = relay = RelayEngine()

        async def find_carrier(peer: str, deadline: float, avoid: Carrier | None) -> Carrier | None:
            with trio.move_on_at(deadline):
                return await peers.wait_for(peer, avoid)
            return None

        # A completed session is kept at its entry until a lost carrier would have been
        # found (keepalive) twice over: its last RST may be lost with the carrier.
        self.resume = resume = ResumeTable(gw.resume_timeout, find_carrier, gw.handshake_timeout,
                                           gw.resume_buffer, 2 * gw.keepalive_timeout + 1)
        self.server = CircuitServer(config, peers, sessions, contexts, relay, resume)
        self.links = links = Links(config, contexts, peers, self.server)
        self.endpoints = {t.name: self._endpoint(t) for t in config.tunnel}
        self.view = GatewayView(config, identity.fingerprint, links, peers, sessions, relay, resume)
        self.notifier = Notifier()
        # Per tunnel: the scope of its listener task, and an event set when that task ended
        # (its sockets closed), so a reload can give the port to another tunnel.
        self.endpoint_scopes: dict[str, tuple[trio.CancelScope, trio.Event]] = {}
        self.dial_scopes: dict[str, trio.CancelScope] = {}
        self._root: trio.Nursery | None = None
        self._listeners: trio.Nursery | None = None

    def _endpoint(self, tunnel: TunnelConfig) -> TunnelEndpoint:
        return TunnelEndpoint(tunnel, self.config, self.peers, self.sessions, self.contexts,
                              self.relay, self.resume)

    async def run(self, ready_file: Path | None = None) -> None:
        config, gw, sessions = self.config, self.config.gateway, self.sessions
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async with trio.open_nursery() as root:
                self._root = root
                self.links.session_nursery = root  # carriers and sessions outlive the listeners
                await root.start(self.relay.run)
                await root.start(self.resume.run)
                accepting = trio.CancelScope()

                async def listen(*, task_status: trio.TaskStatus[dict[str, object]]) -> None:
                    with accepting:
                        async with trio.open_nursery() as nursery:
                            self._listeners = nursery
                            # Open until the drain, even with no listener left: a reload may add one.
                            nursery.start_soon(trio.sleep_forever)
                            carriers = [await _bound(nursery.start(self.links.serve, address, root),
                                                     config, f"gateway.listen[{i}]", address)
                                        for i, address in enumerate(gw.listen)]
                            tunnels = {}
                            for i, endpoint in enumerate(self.endpoints.values()):
                                tunnels[endpoint.tunnel.name] = await _bound(
                                    self._start_endpoint(endpoint), config, f"tunnel[{i}].listen",
                                    endpoint.tunnel.listen)
                            admin = None
                            if gw.admin is not None:
                                # In root, not with the listeners: it answers 503 while draining.
                                admin = await _bound(root.start(AdminServer(self.view, self.reload).serve,
                                                                gw.admin), config, "gateway.admin", gw.admin)
                            for peer in config.peer:
                                self._start_dialing(peer)
                            self.view.listening = True
                            task_status.started({"carriers": carriers, "tunnels": tunnels,
                                                 "admin": admin, "fingerprint": self.identity.fingerprint,
                                                 "pid": os.getpid(),
                                                 "instance": self.links.instance_id.hex()})

                ready = await root.start(listen)
                instance = self.links.instance_id.hex()
                log.info("gateway %s (%s) ready, instance %s", gw.name, self.identity.fingerprint, instance)
                self.notifier.send("READY=1", f"STATUS=listening; instance {instance}")
                root.start_soon(self.notifier.keep_watchdog)
                if ready_file is not None:
                    _write_ready_file(ready_file, ready)

                async for signum in signals:
                    if signum == signal.SIGHUP:
                        log.info("SIGHUP received: reloading %s", self.config.path)
                        await self.reload()
                        continue
                    log.info("%s received: draining (up to %g s, %d sessions open)",
                             signal.Signals(signum).name, gw.drain_timeout, sessions.active)
                    break
                self.view.draining = True
                self.notifier.send("STOPPING=1", f"STATUS=draining {sessions.active} sessions")
                accepting.cancel()
                for endpoint in self.endpoints.values():
                    endpoint.accepting = False
                if moved := self.relay.release_relayed():
                    log.info("%d resumable relayed sessions handed back to their endpoints", moved)
                for carrier in self.peers.carriers():
                    carrier.goaway("gateway shutting down")
                with trio.move_on_after(gw.drain_timeout):
                    await sessions.wait_idle()
                if sessions.active:
                    log.warning("drain deadline reached with %d sessions open; closing them", sessions.active)
                self.relay.end_all()  # their RSTs leave before the carriers close
                for carrier in self.peers.carriers():
                    carrier.close("gateway shut down")
                root.cancel_scope.cancel()
        log.info("gateway %s stopped (%d sessions served)", gw.name, sessions.total)

    # ------------------------------------------------------------------ tasks per tunnel and peer

    async def _start_endpoint(self, endpoint: TunnelEndpoint) -> object:
        """Serve `endpoint`'s listener under its own scope (a reload may stop it alone)."""
        assert self._listeners is not None and self._root is not None
        scope, ended = trio.CancelScope(), trio.Event()
        self.endpoint_scopes[endpoint.tunnel.name] = scope, ended
        root = self._root

        async def serve(*, task_status: trio.TaskStatus[object]) -> None:
            try:
                with scope:
                    await endpoint.serve(root, task_status=task_status)
            finally:
                ended.set()

        return await self._listeners.start(serve)

    def _start_dialing(self, peer: PeerConfig) -> None:
        """Keep `peer.connections` carriers to `peer` (if we dial it) under one scope."""
        if not peer.dial:
            return
        assert self._root is not None
        scope = trio.CancelScope()
        self.dial_scopes[peer.name] = scope

        async def dial() -> None:
            with scope:
                async with trio.open_nursery() as slots:
                    for slot in range(peer.connections):
                        slots.start_soon(self.links.keep_dialing, peer, slot)

        self._root.start_soon(dial)

    # ------------------------------------------------------------------ reload

    async def reload(self) -> tuple[bool, str]:
        """Read the config file again and apply what changed (SIGHUP, or POST /reload):
        tunnels added, removed or changed, peers added, removed or changed, allow and
        route rules for new sessions; everything unchanged is left alone. An invalid file
        changes nothing. Returns (applied, what happened, in one line)."""
        path = self.config.path
        try:
            new = load_config(path)
        except ConfigError as exc:
            log.error("reload refused, the running config stays: %s", exc)
            return False, str(exc)
        self.notifier.send("RELOADING=1", "STATUS=reloading")
        try:
            changes = await self._apply(new)
        except Exception as exc:  # a bug must not take the gateway (or the admin server) down
            log.exception("reload of %s failed part way; what was applied stays", path)
            return False, f"{path}: reload failed part way: {exc}"
        finally:
            self.notifier.send("READY=1", "STATUS=listening")
        summary = "; ".join(changes) or "nothing changed"
        log.info("reloaded %s: %s", path, summary)
        return True, summary

    async def _apply(self, new: Config) -> list[str]:
        old = self.config
        changes: list[str] = []
        for key in type(old.gateway).model_fields:
            if getattr(old.gateway, key) != getattr(new.gateway, key):
                log.warning("reload: gateway.%s changed; it takes effect at the next restart", key)
                changes.append(f"gateway.{key} needs a restart")
        new = new.model_copy(update={"gateway": old.gateway})  # [gateway] stays as it runs
        before = {p.name: p for p in old.peer}
        after = {p.name: p for p in new.peer}
        # Who we trust and how new sessions are judged: every part sees the new peers.
        self.config = self.view.config = new
        self.contexts.set_peer_certs(_certs(new))
        self.links.use(new)
        self.server.use(new)
        for gone in self.peers.use(list(new.peer)):
            gone.close("peer removed from the config")
        for name in before.keys() - after.keys():
            self._stop_dialing(name)
            changes.append(f"peer {name} removed")
        for name, peer in after.items():
            was = before.get(name)
            if was is None:
                self._start_dialing(peer)
                changes.append(f"peer {name} added")
                continue
            identity = (was.cert, was.fingerprint) != (peer.cert, peer.fingerprint)
            if identity or (was.dial, was.connections) != (peer.dial, peer.connections):
                self._stop_dialing(name)
                if identity:  # its carriers were authenticated against the old key
                    for carrier in self.peers.live(name):
                        carrier.close("peer's identity changed in the config")
                self._start_dialing(peer)
                changes.append(f"peer {name} reconnected")
            elif (was.allow, was.route) != (peer.allow, peer.route):
                changes.append(f"peer {name} rules changed")
        await self._apply_tunnels(old, new, changes)
        return changes

    async def _apply_tunnels(self, old: Config, new: Config, changes: list[str]) -> None:
        before = {t.name: t for t in old.tunnel}
        after = {t.name: t for t in new.tunnel}
        for name, tunnel in before.items():
            if name not in after or after[name].listen != tunnel.listen:
                await self._stop_endpoint(name)
                changes.append(f"tunnel {name} removed" if name not in after
                               else f"tunnel {name} moved to {after[name].listen}")
        for name, tunnel in after.items():
            endpoint = self.endpoints.get(name)
            if endpoint is not None:
                if tunnel != before[name]:
                    changes.append(f"tunnel {name} changed")
                endpoint.use(tunnel, new)  # the same listener; new sessions take the new route
                continue
            endpoint = self.endpoints[name] = self._endpoint(tunnel)
            try:
                await self._start_endpoint(endpoint)
            except OSError as exc:
                del self.endpoints[name]
                log.error("reload: tunnel %s: cannot listen on %s: %s", name, tunnel.listen,
                          exc.strerror or exc)
                changes.append(f"tunnel {name} not started ({exc.strerror or exc})")
                continue
            if name not in before:
                changes.append(f"tunnel {name} added")

    async def _stop_endpoint(self, name: str) -> None:
        """Close the tunnel's listener now (its port is free when this returns); its open
        sessions drain for drain_timeout."""
        endpoint = self.endpoints.pop(name)
        endpoint.accepting = False
        scope, ended = self.endpoint_scopes.pop(name)
        scope.cancel()
        await ended.wait()
        assert self._root is not None
        self._root.start_soon(self._drain_tunnel, name)

    async def _drain_tunnel(self, name: str) -> None:
        with trio.move_on_after(self.config.gateway.drain_timeout):
            # A bounded poll of one counter, once per removed tunnel: no event is kept per tunnel.
            while self.sessions.open_by["entry", name] > 0:  # noqa: ASYNC110
                await trio.sleep(0.1)
            return
        left = self.relay.end_tunnel(name)
        log.warning("tunnel %s removed: %d sessions still open after the drain; reset", name, left)

    def _stop_dialing(self, name: str) -> None:
        scope = self.dial_scopes.pop(name, None)
        if scope is not None:
            scope.cancel()


def _certs(config: Config) -> list[Path]:
    return [p.cert for p in config.peer if p.cert is not None]
