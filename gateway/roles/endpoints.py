"""Tunnel endpoints: the local TCP and UDP listeners where sessions enter a tunnel.

TCP: one circuit per accepted connection, relayed by the engine with half-close. UDP: one circuit
per client address:port flow, ended after `udp_idle_timeout` of silence; datagrams
that find a full queue are dropped and counted, never allowed to stall the carrier.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
from collections.abc import Callable

import trio

from gateway.carriers.carrier import Carrier
from gateway.carriers.circuit import Circuit, DatagramCircuit
from gateway.carriers.peers import PeerDirectory
from gateway.carriers.writes import write_batch
from gateway.config import Config, TunnelConfig
from gateway.errors import CircuitBroken, OpenRefused
from gateway.logs import format_address as _addr
from gateway.relay.e2e import SealedFlow, SecureStream
from gateway.relay.engine import RelayEngine
from gateway.relay.handshake import handshake_or_abort
from gateway.relay.localsock import LocalStream
from gateway.relay.ports import CircuitPort, SocketPort
from gateway.relay.resume import ResumeState, ResumeTable, make_resumable, open_state, route_lost
from gateway.relay.sessions import SessionLog
from gateway.relay.udp import (
    MAX_UDP_PAYLOAD,
    SOCKET_BATCH,
    DatagramCounts,
    DatagramFlow,
    flow_record,
)
from gateway.security.tls import TlsContexts
from gateway_codecs import CircuitKind, ErrorCode, OpenRequest

log = logging.getLogger("tunnelgate.tunnel")

FLOW_QUEUE = 32  # a sealed flow's datagrams held while its end-to-end handshake runs
ACCEPT_BACKOFF = 0.1  # out of file descriptors or memory: wait, then accept again
_ACCEPT_RESOURCE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_WOULD_BLOCK = (BlockingIOError, InterruptedError)
UDP_LISTENER_BUFFER = 4 * 1024 * 1024  # SO_RCVBUF asked for on UDP listeners
REFUSED_HOLD = 1.0  # s a client whose flow was refused is not asked for again
REFUSED_CLIENTS = 4096  # refused clients remembered at most (UDP sources can be spoofed)


def _log_circuit_failure(what: str, error: BaseException | None, sessions: SessionLog) -> None:
    """A session ended by its circuit (refused, reset, carrier lost) is worth a warning."""
    if isinstance(error, CircuitBroken):
        refused = isinstance(error, OpenRefused)
        log.warning("%s: %s: %s", what, "refused" if refused else "failed", error)
        if refused:
            sessions.refused(ErrorCode.describe(error.code))


def _reply_to(sock: socket.socket, client: tuple[str, int]) -> Callable[[bytes], object]:
    def reply(data: bytes) -> None:
        sock.sendto(data, client)

    return reply


class _Flow:
    """One client address:port of a UDP tunnel: its circuit, and its relay once it runs."""

    __slots__ = ("circuit", "early", "relay", "resume", "resuming")

    def __init__(self, circuit: DatagramCircuit) -> None:
        self.circuit = circuit
        self.resume: ResumeState | None = None  # a resumable flow's identity and secrets
        self.resuming = False  # its route was lost; a new circuit is being opened
        self.relay: DatagramFlow | None = None  # set at once, or after the end-to-end handshake
        self.early: list[bytes] = []  # the client's datagrams that came before it (bounded)


class TunnelEndpoint:
    def __init__(self, tunnel: TunnelConfig, config: Config, peers: PeerDirectory,
                 sessions: SessionLog, contexts: TlsContexts, engine: RelayEngine,
                 resume: ResumeTable) -> None:
        self.engine = engine
        self.resume = resume
        self.contexts = contexts
        self.handshake_timeout = config.gateway.handshake_timeout
        self.peers = peers
        self.sessions = sessions
        self.wait_for_carrier = config.gateway.handshake_timeout
        self.accepting = True
        # Clients whose last flow was refused (OPEN_FAIL), until when their datagrams are
        # dropped: without it every datagram of a refused client would be one more OPEN
        # (and one more refusal logged at each hop). Bounded: the oldest entry goes first.
        self._refused: dict[tuple[str, int], float] = {}
        self.use(tunnel, config)

    def use(self, tunnel: TunnelConfig, config: Config) -> None:
        """What new sessions of this tunnel open (at start, and after a reload that kept
        its listen address): the route, the target, the end-to-end peer."""
        self.tunnel = tunnel
        self.exit_peer = config.peer_named(tunnel.via[-1]) if tunnel.end_to_end else None
        self.udp_idle = config.udp_idle_timeout(tunnel)
        kind = CircuitKind.UDP if tunnel.listen.kind == "udp" else CircuitKind.TCP
        self.request = OpenRequest(kind, tunnel.target.host, tunnel.target.port,
                                   tuple(tunnel.via[1:]), tunnel.end_to_end)
        self.route = " -> ".join([*tunnel.via, str(tunnel.target)])

    async def serve(self, handler_nursery: trio.Nursery, *,
                    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED) -> None:
        listen = self.tunnel.listen
        if listen.kind == "tcp":
            listeners = await trio.open_tcp_listeners(listen.port, host=listen.host)
            sockets = [socket.socket(fileno=ln.socket.detach()) for ln in listeners]
            bound = sockets[0].getsockname()[:2]
            log.info("tunnel %s listening on tcp://%s, to %s", self.tunnel.name, _addr(bound), self.route)
            task_status.started(bound)
            async with trio.open_nursery() as nursery:
                for sock in sockets:
                    nursery.start_soon(self._accept_loop, sock, handler_nursery)
        else:
            await self._serve_udp(handler_nursery, task_status)

    async def _carrier(self) -> Carrier | None:
        with trio.move_on_after(self.wait_for_carrier):
            return await self.peers.wait_for(self.tunnel.via[0])
        return None

    # ------------------------------------------------------------------ TCP

    async def _accept_loop(self, sock: socket.socket, handlers: trio.Nursery) -> None:
        """Accept clients; each session runs in `handlers`, which outlives this loop (drain)."""
        with sock:
            sock.setblocking(False)
            while True:
                try:
                    conn, client = sock.accept()
                except _WOULD_BLOCK:
                    await trio.lowlevel.wait_readable(sock)
                    continue
                except OSError as exc:
                    if exc.errno in _ACCEPT_RESOURCE_ERRORS:
                        log.error("tunnel %s: cannot accept: %s; retrying in %g s",
                                  self.tunnel.name, exc.strerror, ACCEPT_BACKOFF)
                        await trio.sleep(ACCEPT_BACKOFF)
                    continue  # the client gave up before we accepted it: nothing to do
                stream = LocalStream(conn)
                what = f"tunnel {self.tunnel.name} {_addr(client)} -> {self.route}"
                carrier = self.peers.current(self.tunnel.via[0])
                if carrier is not None and self.exit_peer is None:
                    # Nothing to wait for: the engine takes the session now, no task.
                    self._relay_plain(stream, carrier, what)
                else:  # wait for a carrier, or run the end-to-end handshake, first
                    handlers.start_soon(self._tcp_client, stream, what)

    def _open(self, stream: LocalStream, carrier: Carrier | None, what: str
              ) -> tuple[Circuit, ResumeState | None] | None:
        """Open the session's circuit (resumable where the carrier and the gateway allow),
        or log why not and close the client (None)."""
        try:
            if carrier is None:
                raise OpenRefused(0x0107, f"no carrier to {self.tunnel.via[0]} is up")
            state, request = None, self.request
            if self.resume.enabled and carrier.session.resumable:
                state, request = open_state(self.request, self.tunnel.via[0])
            circuit = carrier.open(request)
        except OpenRefused as exc:
            log.warning("%s: refused: %s", what, exc)
            self.sessions.refused(ErrorCode.describe(exc.code))
            stream.abort(str(exc))
            stream.close_now()
            return None
        assert isinstance(circuit, Circuit)
        return circuit, state

    def _port(self, port: CircuitPort, state: ResumeState | None) -> CircuitPort:
        return port if state is None else make_resumable(port, state, self.resume)

    def _relay_plain(self, stream: LocalStream, carrier: Carrier | None, what: str) -> None:
        """Open the circuit and hand the session to the engine (OPEN and the client's first
        bytes leave in one write)."""
        try:
            with write_batch():
                opened = self._open(stream, carrier, what)
                if opened is not None:
                    circuit, state = opened
                    self.engine.relay(SocketPort(stream.sock, self.engine.readiness),
                                      self._port(CircuitPort(circuit), state),
                                      self.sessions.open("entry", what, circuit, self.tunnel.name),
                                      on_end=lambda error: _log_circuit_failure(what, error, self.sessions))
        except Exception:  # a bug in one session must not stop the listener
            log.exception("%s: internal error", what)
            stream.abort("internal error")
            stream.close_now()

    async def _tcp_client(self, stream: LocalStream, what: str) -> None:
        try:
            carrier = await self._carrier()
        except BaseException:  # cancelled (shutdown) while waiting: the client gets RST
            stream.abort("gateway shut down")
            stream.close_now()
            raise
        if self.exit_peer is None:
            self._relay_plain(stream, carrier, what)
            return
        opened = self._open(stream, carrier, what)
        if opened is None:
            return
        circuit, state = opened
        record = self.sessions.open("entry", what, circuit, self.tunnel.name)
        secure = await handshake_or_abort(
            lambda: self._secure_stream(circuit), stream, circuit, record,
            lambda reason: log.warning("%s: failed: %s", what, reason))
        if secure is None:
            return
        self.engine.relay(SocketPort(stream.sock, self.engine.readiness),
                          self._port(secure.into_port(), state), record,
                          on_end=lambda error: _log_circuit_failure(what, error, self.sessions))

    async def _secure_stream(self, circuit: Circuit) -> SecureStream:
        """TLS 1.3 with the exit gateway inside the circuit; its key must be the peer's."""
        assert self.exit_peer is not None
        secure = SecureStream(circuit, self.contexts.client_for(self.exit_peer.cert), server_side=False)
        with trio.fail_after(self.handshake_timeout):
            await secure.do_handshake()
        self._check_exit(secure.peer_fingerprint)
        return secure

    def _check_exit(self, fingerprint: str) -> None:
        assert self.exit_peer is not None
        if fingerprint != self.exit_peer.fingerprint:
            raise trio.BrokenResourceError(
                f"end-to-end peer presented {fingerprint}, not {self.exit_peer.name}'s key")

    # ------------------------------------------------------------------ UDP

    async def _sealing(self, circuit: DatagramCircuit) -> SealedFlow:
        """The flow's end-to-end keys, agreed with the exit gateway (whose key must be the peer's)."""
        assert self.exit_peer is not None
        with trio.fail_after(self.handshake_timeout):
            sealing, fingerprint = await SealedFlow.establish(
                circuit, self.contexts.client_for(self.exit_peer.cert), server_side=False)
        self._check_exit(fingerprint)
        return sealing

    async def _serve_udp(self, nursery: trio.Nursery,
                         task_status: trio.TaskStatus[tuple[str, int]]) -> None:
        listen = self.tunnel.listen
        family = socket.AF_INET6 if ":" in listen.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            # Every flow of this tunnel shares this one socket: the default buffer (~208 KiB)
            # overflows on a burst of three or four 64 KiB datagrams. The kernel caps it at
            # net.core.rmem_max.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_LISTENER_BUFFER)
            sock.bind((listen.host, listen.port))
            bound = sock.getsockname()[:2]
            log.info("tunnel %s listening on udp://%s, to %s", self.tunnel.name, _addr(bound), self.route)
            task_status.started(bound)
            flows: dict[tuple[str, int], _Flow] = {}
            while True:
                await trio.lowlevel.wait_readable(sock)
                with write_batch():  # the burst's datagrams leave in one write per carrier
                    for _ in range(SOCKET_BATCH):
                        try:
                            data, client = sock.recvfrom(MAX_UDP_PAYLOAD)
                        except (BlockingIOError, InterruptedError):
                            break
                        except OSError:
                            continue  # an ICMP error for an earlier reply; the flow's timeout handles it
                        flow = flows.get(client)
                        if flow is not None and flow.resuming:
                            self._dropped()  # kept for the resumed flow; this one is lost
                            continue
                        if flow is None or flow.circuit.ended.is_set():
                            # No flow, or one that has just ended (its task has not yet run to
                            # remove it): this datagram starts a new flow, never joins the old.
                            flow = self._new_flow(sock, client, flows, nursery)
                            if flow is None:
                                self._dropped()
                                continue
                        if flow.relay is not None:
                            flow.relay.from_local(data)
                        elif len(flow.early) < FLOW_QUEUE:  # its end-to-end handshake runs
                            flow.early.append(data)
                        else:
                            self._dropped()

    def _dropped(self, n: int = 1) -> None:
        """Datagrams this tunnel lost (a full queue, no carrier, a refused client, a full
        socket, a flow ending): counted for the admin endpoint's metrics."""
        self.sessions.udp_dropped["entry", self.tunnel.name] += n

    def _new_flow(self, sock: socket.socket, client: tuple[str, int],
                  flows: dict[tuple[str, int], _Flow], nursery: trio.Nursery) -> _Flow | None:
        if not self.accepting:
            return None
        refused_until = self._refused.get(client)
        if refused_until is not None:
            if trio.current_time() < refused_until:
                return None
            del self._refused[client]
        carrier = self.peers.current(self.tunnel.via[0])
        if carrier is None:
            log.debug("tunnel %s: no carrier for a new flow from %s; dropped",
                      self.tunnel.name, _addr(client))
            return None
        state, request = None, self.request
        if self.resume.enabled and carrier.session.resumable:
            state, request = open_state(self.request, self.tunnel.via[0])
        try:
            circuit = carrier.open(request)
        except OpenRefused as exc:
            log.warning("tunnel %s: flow from %s not opened: %s", self.tunnel.name, _addr(client), exc)
            return None
        assert isinstance(circuit, DatagramCircuit)

        flow = _Flow(circuit)
        flow.resume = state
        if self.exit_peer is None:
            flow.relay = DatagramFlow(circuit, _reply_to(sock, client))
        flows[client] = flow
        nursery.start_soon(self._udp_flow, flow, sock, client, flows)
        return flow

    async def _resume_flow(self, flow: _Flow, what: str) -> DatagramCircuit | None:
        """A resumable flow whose route was lost: its next circuit (the exit keeps its
        socket, so the target sees the same source), or None to end it. The client's
        datagrams meanwhile are dropped, as UDP may drop them."""
        if flow.resume is None or flow.relay is None or not route_lost(flow.circuit.broken):
            return None
        log.info("%s: route lost (%s); resuming the flow", what, flow.circuit.broken)
        flow.resuming = True
        try:
            deadline = trio.current_time() + min(self.resume.timeout, self.udp_idle)
            opened = await self.resume.reopen(flow.resume, deadline, lambda: True)
        finally:
            flow.resuming = False
        if isinstance(opened, str):
            log.warning("%s: flow not resumed: %s", what, opened or "out of time")
            return None
        circuit = opened[0]
        assert isinstance(circuit, DatagramCircuit)
        log.info("%s: flow resumed", what)
        return circuit

    async def _udp_flow(self, flow: _Flow, sock: socket.socket, client: tuple[str, int],
                        flows: dict[tuple[str, int], _Flow]) -> None:
        what = f"tunnel {self.tunnel.name} udp {_addr(client)} -> {self.route}"
        circuit = flow.circuit
        counts = flow.relay.counts if flow.relay is not None else DatagramCounts()
        with self.sessions.track("entry", what, circuit, drains=False, tunnel=self.tunnel.name) as record:
            try:
                with flow_record(record, counts):
                    if flow.relay is None:  # end to end: the same relay, sealing each datagram
                        relay = DatagramFlow(circuit, _reply_to(sock, client), counts,
                                             sealing=await self._sealing(circuit))
                        with write_batch():
                            for data in flow.early:
                                relay.from_local(data)
                        flow.early = []
                        flow.relay = relay
                    while True:
                        await flow.relay.run(self.udp_idle)
                        resumed = await self._resume_flow(flow, what)
                        if resumed is None:
                            break
                        flow.relay.rebind(resumed)
                        flow.circuit = circuit = resumed
            finally:
                if flows.get(client) is flow:  # not a newer flow of the same client
                    del flows[client]
                self._dropped(circuit.dropped_in + circuit.dropped_out
                              + (flow.relay.dropped if flow.relay is not None else 0))
                with trio.move_on_after(1) as scope:
                    scope.shield = True
                    await circuit.aclose()
        cause = counts.error.__cause__ if counts.error is not None else None
        if isinstance(cause, OpenRefused):
            self.sessions.refused(ErrorCode.describe(cause.code))
            if len(self._refused) >= REFUSED_CLIENTS:
                del self._refused[next(iter(self._refused))]
            self._refused[client] = trio.current_time() + REFUSED_HOLD
        if isinstance(cause, CircuitBroken):
            log.warning("%s: %s", what, cause)
