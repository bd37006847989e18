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
from dataclasses import replace

import trio

from gateway.access import AccessDenied, AccessProtocol, AccessSession, Destination, access_protocol
from gateway.carriers.carrier import Carrier
from gateway.carriers.circuit import Circuit, DatagramCircuit
from gateway.carriers.peers import PeerDirectory
from gateway.carriers.writes import write_batch
from gateway.config import Config, Target, TunnelConfig
from gateway.errors import CircuitBroken, OpenRefused
from gateway.logs import format_address as _addr
from gateway.relay.e2e import SealedFlow, SecureStream
from gateway.relay.engine import RelayEngine
from gateway.relay.handshake import abort_unrelayed, handshake_or_abort
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
from gateway.security.policy import parse_ip
from gateway.security.tls import TlsContexts
from gateway_codecs import CircuitKind, ErrorCode, OpenRequest, Origin, ProxyHeader
from gateway_codecs.socks5 import Socks5Error, UdpDatagram, encode_udp_datagram, parse_udp_datagram

log = logging.getLogger("tunnelgate.tunnel")

FLOW_QUEUE = 32  # a sealed flow's datagrams held while its end-to-end handshake runs
ACCEPT_BACKOFF = 0.1  # out of file descriptors or memory: wait, then accept again
_ACCEPT_RESOURCE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
_WOULD_BLOCK = (BlockingIOError, InterruptedError)
UDP_LISTENER_BUFFER = 4 * 1024 * 1024  # SO_RCVBUF asked for on UDP listeners
REFUSED_HOLD = 1.0  # s a client whose flow was refused is not asked for again
REFUSED_CLIENTS = 4096  # refused clients remembered at most (UDP sources can be spoofed)
MAX_ASSOCIATION_FLOWS = 256  # destinations one SOCKS5 UDP association may have open at once


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


class _Association:
    """A SOCKS5 UDP association's client side: which datagrams are its client's (from the
    TCP client's address; the first one fixes the port), and its replies' header."""

    def __init__(self, sock: socket.socket, client_ip: str, port: int | None) -> None:
        self.sock = sock
        self.client_ip = client_ip
        self.port = port  # the port the client announced in its request, if it did
        self.source: tuple[str, int] | None = None

    def accept(self, packet: bytes, sender: tuple[str, int]) -> UdpDatagram | None:
        if self.source is None and sender[0] == self.client_ip and self.port in (None, sender[1]):
            self.source = sender
        if sender != self.source:
            return None
        try:
            datagram = parse_udp_datagram(packet)
        except Socks5Error:
            return None
        return None if datagram.fragment else datagram  # fragments: not supported (RFC 1928 §7)

    def reply(self, origin: tuple[str, int]) -> Callable[[bytes], object]:
        """Send a flow's datagrams to the client, each with the header naming their origin."""
        sock, client = self.sock, self.source
        assert client is not None  # a flow starts from one of the client's datagrams
        header_host, header_port = origin

        def reply(data: bytes) -> None:
            sock.sendto(encode_udp_datagram(header_host, header_port, data), client)

        return reply


async def _until_closed(stream: LocalStream, scope: trio.CancelScope) -> None:
    """Cancel `scope` when the client closes (or resets) its TCP connection."""
    with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        while await stream.receive_some(4096):
            pass  # nothing is expected on it once the association runs
    scope.cancel()


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
        target = tunnel.target or Target("", 0)  # an access listener's clients name theirs
        self.request = OpenRequest(kind, target.host, target.port, tuple(tunnel.via[1:]), tunnel.end_to_end)
        self.route = " -> ".join(tunnel.via) + (f" -> {tunnel.target}" if tunnel.target else "")
        self.proxy_header = {None: ProxyHeader.NONE, "v1": ProxyHeader.V1, "v2": ProxyHeader.V2}[
            tunnel.proxy_protocol]
        self.access = access_protocol(tunnel, config) if tunnel.listen.is_access else None

    async def serve(self, handler_nursery: trio.Nursery, *,
                    task_status: trio.TaskStatus[tuple[str, int]] = trio.TASK_STATUS_IGNORED) -> None:
        listen = self.tunnel.listen
        if listen.socket_kind == "tcp":
            listeners = await trio.open_tcp_listeners(listen.port, host=listen.host)
            sockets = [socket.socket(fileno=ln.socket.detach()) for ln in listeners]
            bound = sockets[0].getsockname()[:2]
            log.info("tunnel %s listening on %s://%s, to %s", self.tunnel.name, listen.kind, _addr(bound),
                     self.route)
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
                if self.access is not None:  # the client names its destination first
                    handlers.start_soon(self._access_client, self.access, stream, what)
                    continue
                carrier = self.peers.current(self.tunnel.via[0])
                if carrier is not None and self.exit_peer is None:
                    # Nothing to wait for: the engine takes the session now, no task.
                    self._relay_plain(stream, carrier, what)
                else:  # wait for a carrier, or run the end-to-end handshake, first
                    handlers.start_soon(self._tcp_client, stream, what)

    def _open(self, stream: LocalStream, carrier: Carrier | None, what: str
              ) -> tuple[Circuit, ResumeState | None] | None:
        """Open the session's circuit, or log why not and reset the client (None)."""
        opened = self._open_circuit(stream, carrier, self.request)
        if isinstance(opened, OpenRefused):
            self._log_refusal(what, opened)
            stream.abort(str(opened))
            stream.close_now()
            return None
        return opened

    def _log_refusal(self, what: str, refusal: CircuitBroken) -> None:
        log.warning("%s: refused: %s", what, refusal)
        self.sessions.refused(ErrorCode.describe(refusal.code))

    def _open_circuit(self, stream: LocalStream, carrier: Carrier | None, request: OpenRequest
                      ) -> tuple[Circuit, ResumeState | None] | OpenRefused:
        """Open a session's circuit (resumable where the carrier and the gateway allow, with
        the client's origin where the tunnel asks for a PROXY header), or why not."""
        try:
            if carrier is None:
                raise OpenRefused(ErrorCode.NO_ROUTE, f"no carrier to {self.tunnel.via[0]} is up")
            if self.proxy_header is not ProxyHeader.NONE:
                if not carrier.session.carries_origin:
                    raise OpenRefused(ErrorCode.UNSUPPORTED_KIND, f"{self.tunnel.via[0]} cannot carry"
                                      " the PROXY header (no ORIGIN capability)")
                sock = stream.sock
                request = replace(request, origin=Origin(sock.getpeername()[:2], sock.getsockname()[:2],
                                                         self.proxy_header))
            state = None
            if self.resume.enabled and carrier.session.resumable:
                state, request = open_state(request, self.tunnel.via[0])
            circuit = carrier.open(request)
        except OpenRefused as exc:
            return exc
        except OSError as exc:  # the client is gone already (getpeername)
            return OpenRefused(ErrorCode.CANCELLED, f"the client went away: {exc.strerror or exc}")
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

    async def _access_client(self, access: AccessProtocol, stream: LocalStream, what: str) -> None:
        try:
            await self._access_session(access, stream, what)
        except Exception:  # a bug in one session must not stop the listener
            log.exception("%s: internal error", what)
            stream.abort("internal error")
            stream.close_now()
        except BaseException:  # cancelled (shut down) before the engine took the session
            stream.abort("gateway shut down")
            stream.close_now()
            raise

    async def _access_session(self, access: AccessProtocol, stream: LocalStream, what: str) -> None:
        """A SOCKS5 or HTTP CONNECT client: its request, the circuit to where it asks, the
        answer the protocol gives (success only once the exit has connected), then the
        same relay as a fixed tunnel's."""
        client = access.session(stream)
        try:
            with trio.fail_after(self.handshake_timeout):
                destination = await client.negotiate()
        except (AccessDenied, trio.TooSlowError, trio.BrokenResourceError) as exc:
            reason = "no complete request in time" if isinstance(exc, trio.TooSlowError) else str(exc)
            log.warning("%s: client refused: %s", what, reason)
            self.sessions.refused("ACCESS_DENIED")
            if not isinstance(exc, AccessDenied):
                stream.abort(reason)
            stream.close_now()
            return
        what = f"{what} -> {destination}"
        if destination.datagrams:
            try:
                await self._udp_association(client, stream, destination, what)
            finally:
                stream.close_now()
            return
        request = replace(self.request, host=destination.host, port=destination.port)
        opened = self._open_circuit(stream, await self._carrier(), request)
        if not isinstance(opened, OpenRefused):
            try:
                with trio.fail_after(self.handshake_timeout * 2):
                    await opened[0].wait_open()
            except trio.TooSlowError:
                opened[0].reset(ErrorCode.CONNECT_TIMEOUT, "no answer in time")
                opened = OpenRefused(ErrorCode.CONNECT_TIMEOUT, "no answer in time")
            except trio.BrokenResourceError as exc:
                cause = exc.__cause__
                opened = (OpenRefused(cause.code, cause.reason) if isinstance(cause, CircuitBroken)
                          else OpenRefused(ErrorCode.NO_ROUTE, str(exc)))
        if isinstance(opened, OpenRefused):
            self._log_refusal(what, opened)
            await client.refused(opened.code, opened.reason)
            stream.close_now()
            return
        circuit, state = opened
        record = self.sessions.open("entry", what, circuit, self.tunnel.name)
        port = CircuitPort(circuit)
        if self.exit_peer is not None:
            secure = await handshake_or_abort(
                lambda: self._secure_stream(circuit), stream, circuit, record,
                lambda reason: log.warning("%s: failed: %s", what, reason))
            if secure is None:
                return
            port = secure.into_port()
        try:
            await client.opened()
        except trio.BrokenResourceError as exc:
            reason = f"the client went away: {exc}"
            record.finish(0, 0, reason)
            abort_unrelayed(stream, circuit, reason)
            record.__exit__(None, None, None)
            return
        self.engine.relay(SocketPort(stream.sock, self.engine.readiness), self._port(port, state), record,
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
                        if flow is None or (not flow.resuming and flow.circuit.ended.is_set()):
                            # No flow, or one that has just ended (its task has not yet run to
                            # remove it): this datagram starts a new flow, never joins the old.
                            flow = self._new_flow(client, _reply_to(sock, client), self.request, flows,
                                                  nursery, f"tunnel {self.tunnel.name} udp {_addr(client)}"
                                                  f" -> {self.route}")
                        self._deliver(flow, data)

    def _deliver(self, flow: _Flow | None, data: bytes) -> None:
        """One datagram from a client to its flow (None: none could be opened)."""
        if flow is None or flow.resuming:  # a resuming flow keeps its place; this one is lost
            self._dropped()
        elif flow.relay is not None:
            flow.relay.from_local(data)
        elif len(flow.early) < FLOW_QUEUE:  # its end-to-end handshake runs
            flow.early.append(data)
        else:
            self._dropped()

    async def _udp_association(self, client: AccessSession, stream: LocalStream, asked: Destination,
                               what: str) -> None:
        """SOCKS5 UDP ASSOCIATE (RFC 1928 §7): a UDP socket for this client, beside its TCP
        listener; each destination the client's datagrams name is one flow (a UDP circuit
        to it, relayed as a UDP tunnel's). It lasts as long as the client's TCP connection."""
        control = stream.sock
        client_ip = control.getpeername()[0]
        expected_port = asked.port if parse_ip(asked.host) is not None and asked.port else None
        with socket.socket(control.family, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_LISTENER_BUFFER)
            sock.bind((control.getsockname()[0], 0))
            bound = sock.getsockname()[:2]
            await client.opened(bound)
            log.info("%s: udp association on %s", what, _addr(bound))
            flows: dict[tuple[str, int], _Flow] = {}
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_until_closed, stream, nursery.cancel_scope)
                association = _Association(sock, client_ip, expected_port)
                while True:
                    await trio.lowlevel.wait_readable(sock)
                    with write_batch():
                        for _ in range(SOCKET_BATCH):
                            try:
                                packet, sender = sock.recvfrom(MAX_UDP_PAYLOAD)
                            except (BlockingIOError, InterruptedError):
                                break
                            except OSError:
                                continue
                            datagram = association.accept(packet, sender[:2])
                            if datagram is None:
                                self._dropped()  # not our client's, malformed, or a fragment
                                continue
                            key = (datagram.host, datagram.port)
                            flow = flows.get(key)
                            if flow is None or (not flow.resuming and flow.circuit.ended.is_set()):
                                flow = None
                                if len(flows) < MAX_ASSOCIATION_FLOWS:
                                    flow = self._new_flow(
                                        key, association.reply(key),
                                        replace(self.request, kind=CircuitKind.UDP, host=key[0], port=key[1]),
                                        flows, nursery, f"{what} udp -> {_addr(key)}")
                            self._deliver(flow, datagram.data)
        log.info("%s: udp association ended (its TCP connection closed)", what)

    def _dropped(self, n: int = 1) -> None:
        """Datagrams this tunnel lost (a full queue, no carrier, a refused client, a full
        socket, a flow ending): counted for the admin endpoint's metrics."""
        self.sessions.udp_dropped["entry", self.tunnel.name] += n

    def _new_flow(self, key: tuple[str, int], reply: Callable[[bytes], object], request: OpenRequest,
                  flows: dict[tuple[str, int], _Flow], nursery: trio.Nursery, what: str) -> _Flow | None:
        """A flow's circuit and relay task: `key` is the client address:port of a UDP
        tunnel (or the destination of a SOCKS5 association), `reply` sends to the client."""
        if not self.accepting:
            return None
        refused_until = self._refused.get(key)
        if refused_until is not None:
            if trio.current_time() < refused_until:
                return None
            del self._refused[key]
        carrier = self.peers.current(self.tunnel.via[0])
        if carrier is None:
            log.debug("%s: no carrier for a new flow; dropped", what)
            return None
        state = None
        if self.resume.enabled and carrier.session.resumable:
            state, request = open_state(request, self.tunnel.via[0])
        try:
            circuit = carrier.open(request)
        except OpenRefused as exc:
            log.warning("%s: flow not opened: %s", what, exc)
            return None
        assert isinstance(circuit, DatagramCircuit)

        flow = _Flow(circuit)
        flow.resume = state
        if self.exit_peer is None:
            flow.relay = DatagramFlow(circuit, reply)
        flows[key] = flow
        nursery.start_soon(self._udp_flow, flow, key, reply, flows, what)
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

    async def _udp_flow(self, flow: _Flow, key: tuple[str, int], reply: Callable[[bytes], object],
                        flows: dict[tuple[str, int], _Flow], what: str) -> None:
        circuit = flow.circuit
        counts = flow.relay.counts if flow.relay is not None else DatagramCounts()
        with self.sessions.track("entry", what, circuit, drains=False, tunnel=self.tunnel.name) as record:
            try:
                with flow_record(record, counts):
                    if flow.relay is None:  # end to end: the same relay, sealing each datagram
                        relay = DatagramFlow(circuit, reply, counts,
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
                if flows.get(key) is flow:  # not a newer flow of the same client
                    del flows[key]
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
            self._refused[key] = trio.current_time() + REFUSED_HOLD
        if isinstance(cause, CircuitBroken):
            log.warning("%s: %s", what, cause)
