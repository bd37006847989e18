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
from gateway.config import Config
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
    gw = config.gateway
    for warning in config.tier_warnings():
        log.warning("%s", warning)
    identity = load_identity(gw.key)
    peers = PeerDirectory(list(config.peer))
    sessions = SessionLog()
    contexts = TlsContexts(identity, [p.cert for p in config.peer if p.cert is not None], gw.ca)
    relay = RelayEngine()

    async def find_carrier(peer: str, deadline: float, avoid: Carrier | None) -> Carrier | None:
        with trio.move_on_at(deadline):
            return await peers.wait_for(peer, avoid)
        return None

    resume = ResumeTable(gw.resume_timeout, find_carrier, gw.handshake_timeout, gw.resume_buffer)
    server = CircuitServer(config, peers, sessions, contexts, relay, resume)
    links = Links(config, contexts, peers, server)
    endpoints = [TunnelEndpoint(t, config, peers, sessions, contexts, relay, resume)
                 for t in config.tunnel]
    view = GatewayView(config, identity.fingerprint, links, peers, sessions, relay, resume)
    notifier = Notifier()

    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as root:
            handlers = root  # carriers and sessions outlive the listeners when draining
            links.session_nursery = handlers
            await root.start(relay.run)
            await root.start(resume.run)
            accepting = trio.CancelScope()

            async def listen(*, task_status: trio.TaskStatus[dict[str, object]]) -> None:
                with accepting:
                    async with trio.open_nursery() as nursery:
                        carriers = [await _bound(nursery.start(links.serve, address, handlers),
                                                 config, f"gateway.listen[{i}]", address)
                                    for i, address in enumerate(gw.listen)]
                        tunnels = {e.tunnel.name: await _bound(nursery.start(e.serve, handlers), config,
                                                               f"tunnel[{i}].listen", e.tunnel.listen)
                                   for i, e in enumerate(endpoints)}
                        admin = None
                        if gw.admin is not None:
                            # In root, not with the listeners: it answers 503 while draining.
                            admin = await _bound(root.start(AdminServer(view).serve, gw.admin),
                                                 config, "gateway.admin", gw.admin)
                        for peer in config.peer:
                            for slot in range(peer.connections if peer.dial else 0):
                                root.start_soon(links.keep_dialing, peer, slot)
                        view.listening = True
                        task_status.started({"carriers": carriers, "tunnels": tunnels, "admin": admin,
                                             "fingerprint": identity.fingerprint, "pid": os.getpid(),
                                             "instance": links.instance_id.hex()})

            ready = await root.start(listen)
            log.info("gateway %s (%s) ready, instance %s", gw.name, identity.fingerprint,
                     links.instance_id.hex())
            notifier.send("READY=1", f"STATUS=listening; instance {links.instance_id.hex()}")
            root.start_soon(notifier.keep_watchdog)
            if ready_file is not None:
                _write_ready_file(ready_file, ready)

            async for signum in signals:
                log.info("%s received: draining (up to %g s, %d sessions open)",
                         signal.Signals(signum).name, gw.drain_timeout, sessions.active)
                break
            view.draining = True
            notifier.send("STOPPING=1", f"STATUS=draining {sessions.active} sessions")
            accepting.cancel()
            for endpoint in endpoints:
                endpoint.accepting = False
            if moved := relay.release_relayed():
                log.info("%d resumable relayed sessions handed back to their endpoints", moved)
            for carrier in peers.carriers():
                carrier.goaway("gateway shutting down")
            with trio.move_on_after(gw.drain_timeout):
                await sessions.wait_idle()
            if sessions.active:
                log.warning("drain deadline reached with %d sessions open; closing them", sessions.active)
            relay.end_all()  # their RSTs leave before the carriers close
            for carrier in peers.carriers():
                carrier.close("gateway shut down")
            root.cancel_scope.cancel()
    log.info("gateway %s stopped (%d sessions served)", gw.name, sessions.total)
