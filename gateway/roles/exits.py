"""Serving circuits a peer opens towards us: as the exit, or as a relay to the next hop.

Each hop decides for itself (default deny): the exit checks the asking peer's `allow`
rules before connecting; a relay checks the peer's `route` rules, loops and the route
length before opening the next leg. A refusal goes back as OPEN_FAIL whose reason
starts with this gateway's name, so the entry's log says which hop refused and why.
"""

from __future__ import annotations

import errno
import logging
import socket
from typing import Literal

import trio

from gateway.carriers.carrier import AnyCircuit, Carrier
from gateway.carriers.circuit import Circuit, DatagramCircuit
from gateway.carriers.peers import PeerDirectory
from gateway.carriers.writes import write_batch
from gateway.config import Config, PeerConfig
from gateway.errors import CircuitBroken, TunnelgateError
from gateway.faults import byte_flipper, datagram_flipper, fault_injection_offset
from gateway.logs import format_address
from gateway.relay.e2e import SealedFlow, SecureStream
from gateway.relay.engine import RelayEngine
from gateway.relay.handshake import handshake_or_abort
from gateway.relay.localsock import LocalStream
from gateway.relay.outcomes import describe_error
from gateway.relay.ports import CircuitPort, SocketPort
from gateway.relay.resume import ResumeState, ResumeTable, exit_state, make_resumable, route_lost
from gateway.relay.sessions import SessionLog, SessionRecord
from gateway.relay.udp import (
    DatagramCounts,
    DatagramFlow,
    bridge_datagrams,
    flow_record,
)
from gateway.security.policy import SERVICE_NAMES, SERVICE_PREFIX, Policy, parse_ip
from gateway.security.tls import TlsContexts
from gateway.services.standard import serve_datagrams, serve_stream
from gateway_codecs import CircuitKind, ErrorCode, OpenRequest, ProxyHeader, Resumable, Resuming, proxy_header

log = logging.getLogger("tunnelgate.exit")

UDP_FLOW_BUFFER = 1024 * 1024  # SO_RCVBUF of each flow's connected socket (capped by rmem_max)


class Refusal(TunnelgateError):
    """Why this hop will not serve a circuit; becomes OPEN_FAIL."""

    def __init__(self, code: ErrorCode, reason: str, detail: str = "") -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason
        self.detail = detail  # for our log only, not sent to the peer


def _target(req: OpenRequest) -> str:
    if req.host.startswith(SERVICE_PREFIX):
        return f"{req.kind.name.lower()} {req.host}"
    host = f"[{req.host}]" if ":" in req.host else req.host
    return f"{req.kind.name.lower()}://{host}:{req.port}"


def _classify_connect_error(exc: BaseException) -> tuple[ErrorCode, str]:
    """Map whatever open_tcp_stream raised to an OPEN_FAIL code and a short reason."""
    seen: list[BaseException] = [exc]
    while seen:
        e = seen.pop()
        if isinstance(e, socket.gaierror):
            return ErrorCode.NAME_NOT_RESOLVED, f"name not resolved: {e.strerror or e}"
        if isinstance(e, ConnectionRefusedError):
            return ErrorCode.CONNECTION_REFUSED, "connection refused"
        if isinstance(e, OSError) and e.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
            return ErrorCode.HOST_UNREACHABLE, e.strerror or "unreachable"
        if isinstance(e, BaseExceptionGroup):
            seen.extend(e.exceptions)
        if e.__cause__ is not None:
            seen.append(e.__cause__)
    return ErrorCode.HOST_UNREACHABLE, str(exc) or type(exc).__name__


class CircuitServer:
    """The handler every carrier calls for each circuit the peer opens."""

    def __init__(self, config: Config, peers: PeerDirectory, sessions: SessionLog,
                 contexts: TlsContexts, engine: RelayEngine, resume: ResumeTable) -> None:
        self.engine = engine
        self.resume = resume
        self.contexts = contexts
        self.use(config)
        self.flip_offset = fault_injection_offset()
        self.name = config.gateway.name
        self.peers = peers
        self.sessions = sessions
        self.connect_timeout = config.gateway.handshake_timeout

    def use(self, config: Config) -> None:
        """The config new circuits are served by (a reload swaps it; open ones go on)."""
        self.config = config
        self.by_fingerprint = {p.fingerprint: p.name for p in config.peer if p.fingerprint}

    async def __call__(self, carrier: Carrier, circuit: AnyCircuit) -> None:
        req = circuit.request
        peer = self.peers.by_name.get(carrier.peer_name or "")
        what = f"{_target(req)} for {carrier.peer_name}"
        if req.origin is not None:
            what += f" (client {format_address(req.origin.source)})"
        if req.route:
            what += f" via {','.join(req.route)}"
        try:
            if peer is None:
                raise Refusal(ErrorCode.FORBIDDEN_TARGET, "unknown peer")
            if req.route:
                await self._relay(carrier, peer, circuit, what)
            elif isinstance(req.resume, Resuming):
                self._resume(peer, circuit, what)
            else:
                await self._exit(peer, circuit, what)
        except Refusal as refusal:
            reason = f"{self.name}: {refusal.reason}"
            log.warning("refused %s: %s: %s%s", what, refusal.code.name, refusal.reason,
                        f" ({refusal.detail})" if refusal.detail else "",
                        extra={"event": "refused", "peer": carrier.peer_name, "target": _target(req),
                               "code": refusal.code.name, "reason": refusal.reason})
            self.sessions.refused(refusal.code.name)
            circuit.refuse(refusal.code, reason)

    # ------------------------------------------------------------------ exit

    async def _exit(self, peer: PeerConfig, circuit: AnyCircuit, what: str) -> None:
        req = circuit.request
        kind: Literal["tcp", "udp"] = "udp" if req.kind is CircuitKind.UDP else "tcp"
        policy = peer.policy
        if not policy.may_permit_name(kind, req.host, req.port):
            raise Refusal(ErrorCode.FORBIDDEN_TARGET,
                          f"{_target(req)} is not in the allow list for peer {peer.name}")
        if req.host.startswith(SERVICE_PREFIX):
            await self._serve_builtin(circuit, req.host[len(SERVICE_PREFIX):], what)
        elif isinstance(circuit, DatagramCircuit):
            sock = await self._connect_udp(policy, req)
            with sock:
                await self._serve_udp(circuit, sock, what)
        else:
            stream = await self._connect_tcp(policy, req)
            _send_proxy_header(req, stream)
            await self._serve_tcp(circuit, stream, what)

    async def _serve_builtin(self, circuit: AnyCircuit, name: str, what: str) -> None:
        """A built-in service (SPEC.md §17): the circuit is relayed, exactly as to a
        target, to one end of a socket pair; the service runs on the other, in this task."""
        if name not in SERVICE_NAMES:
            raise Refusal(ErrorCode.NAME_NOT_RESOLVED, f"no built-in service {name!r}")
        if isinstance(circuit, DatagramCircuit):
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
            with trio.socket.from_stdlib_socket(theirs) as service_end:
                async with trio.open_nursery() as nursery:
                    idle = self.config.gateway.udp_idle_timeout
                    nursery.start_soon(serve_datagrams, name, service_end, idle)
                    with trio.socket.from_stdlib_socket(ours) as flow_end:
                        await self._serve_udp(circuit, flow_end, what)
                    nursery.cancel_scope.cancel()
            return
        ours, theirs = socket.socketpair()
        with trio.socket.from_stdlib_socket(theirs) as service_end:
            await self._serve_tcp(circuit, LocalStream(ours), what)
            await serve_stream(name, service_end)

    async def _permitted(self, policy: Policy, req: OpenRequest, kind: Literal["tcp", "udp"],
                         socktype: int) -> list[str]:
        """The addresses we may connect to; a name allowed by name is resolved by connect."""
        if parse_ip(req.host) is not None or policy.permits(kind, req.host, req.port):
            if not policy.permits(kind, req.host, req.port):
                raise Refusal(ErrorCode.FORBIDDEN_TARGET,
                              f"{_target(req)} is not in the allow list")
            if socktype == socket.SOCK_STREAM:
                return [req.host]
        try:
            infos = await trio.socket.getaddrinfo(req.host, req.port, type=socktype)
        except socket.gaierror as exc:
            raise Refusal(ErrorCode.NAME_NOT_RESOLVED,
                          f"cannot resolve {req.host}: {exc.strerror or exc}") from exc
        resolved = []
        for info in infos:
            addr = parse_ip(str(info[4][0]))
            if addr is not None and addr not in resolved:
                resolved.append(addr)
        allowed = policy.permitted_addresses(kind, req.host, req.port, resolved)
        if not allowed:
            raise Refusal(ErrorCode.FORBIDDEN_TARGET,
                          f"{_target(req)} resolves only to addresses outside the allow list")
        return [str(a) for a in allowed]

    async def _connect_tcp(self, policy: Policy, req: OpenRequest) -> LocalStream:
        candidates = await self._permitted(policy, req, "tcp", socket.SOCK_STREAM)
        last: BaseException | None = None
        with trio.move_on_after(self.connect_timeout):
            for host in candidates:
                try:
                    if parse_ip(host) is not None:
                        return await LocalStream.connect(host, req.port)
                    # A name allowed by name: trio resolves it and races the addresses.
                    stream = await trio.open_tcp_stream(host, req.port, happy_eyeballs_delay=0.25)
                    return LocalStream.from_trio(stream)
                except OSError as exc:
                    last = exc
        if last is None:
            raise Refusal(ErrorCode.CONNECT_TIMEOUT,
                          f"connect to {_target(req)} timed out after {self.connect_timeout:g} s")
        code, reason = _classify_connect_error(last)
        raise Refusal(code, f"connect to {_target(req)}: {reason}")

    async def _connect_udp(self, policy: Policy, req: OpenRequest) -> trio.socket.SocketType:
        candidates = await self._permitted(policy, req, "udp", socket.SOCK_DGRAM)
        addr = parse_ip(candidates[0])
        if addr is None:
            raise Refusal(ErrorCode.NAME_NOT_RESOLVED, f"cannot resolve {req.host}")
        family = socket.AF_INET6 if addr.version == 6 else socket.AF_INET
        sock = trio.socket.socket(family, socket.SOCK_DGRAM)
        try:
            # A burst of replies (a few 64 KiB datagrams) overflows the ~208 KiB default.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, UDP_FLOW_BUFFER)
            await sock.connect((str(addr), req.port))
        except OSError as exc:
            sock.close()
            code, reason = _classify_connect_error(exc)
            raise Refusal(code, f"udp {_target(req)}: {reason}") from exc
        return sock

    async def _serve_tcp(self, circuit: Circuit, stream: LocalStream, what: str) -> None:
        with write_batch():  # OPEN_OK and the target's first bytes: one write
            try:
                circuit.accept()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                stream.abort("the circuit went away during the connect")
                stream.close_now()  # the peer reset it, or its carrier was lost, meanwhile
                return
            record = self.sessions.open("exit", what, circuit)
            state = None
            if isinstance(circuit.request.resume, Resumable) and self.resume.enabled:
                state = exit_state(circuit.request)  # its first ACK: make_resumable
            if not circuit.request.end_to_end:
                self._relay_exit(CircuitPort(circuit), state, stream, record, what)
                return

        async def handshake() -> SecureStream:
            secure = SecureStream(circuit, self.contexts.server(), server_side=True)
            with trio.fail_after(self.connect_timeout):
                await secure.do_handshake()
            return secure

        secured = await handshake_or_abort(handshake, stream, circuit, record,
                                           lambda reason: log.warning("exit %s: %s", what, reason))
        if secured is not None:
            record.what += f" (end-to-end with {self._who(secured.peer_fingerprint)})"
            self._relay_exit(secured.into_port(), state, stream, record, what)

    def _relay_exit(self, near: CircuitPort, state: ResumeState | None, stream: LocalStream,
                    record: SessionRecord, what: str) -> None:
        if state is not None:
            near = make_resumable(near, state, self.resume)
        self.engine.relay(near, SocketPort(stream.sock, self.engine.readiness), record,
                          on_end=lambda error: _log_failure(what, error))

    def _resume(self, peer: PeerConfig, circuit: AnyCircuit, what: str) -> None:
        """A RESUMING OPEN for a session this gateway is the exit of (SPEC.md §14)."""
        req = circuit.request
        if not peer.policy.may_permit_name("udp" if req.kind is CircuitKind.UDP else "tcp",
                                           req.host, req.port):
            raise Refusal(ErrorCode.RESUME_REFUSED,
                          f"{_target(req)} is not in the allow list for peer {peer.name}")
        refused = self.resume.accept(circuit)
        if refused:
            raise Refusal(ErrorCode.RESUME_REFUSED, refused)
        log.info("exit %s: session resumed", what)

    def _who(self, fingerprint: str) -> str:
        return self.by_fingerprint.get(fingerprint, fingerprint)

    async def _serve_udp(self, circuit: DatagramCircuit, sock: trio.socket.SocketType,
                         what: str) -> None:
        circuit.accept()
        idle = self.config.gateway.udp_idle_timeout
        counts = DatagramCounts()
        flow: DatagramFlow | None = None
        slot = None
        if isinstance(circuit.request.resume, Resumable) and self.resume.enabled:
            slot = self.resume.track_flow(exit_state(circuit.request))
        with self.sessions.track("exit", what, circuit, drains=False) as record:
            try:
                # a->b is target -> circuit: the outward direction is b->a.
                with flow_record(record, counts, outward_is_a_to_b=False):
                    sealing = None
                    if circuit.request.end_to_end:
                        with trio.fail_after(self.connect_timeout):
                            sealing, fingerprint = await SealedFlow.establish(
                                circuit, self.contexts.server(), server_side=True)
                        record.what += f" (end-to-end with {self._who(fingerprint)})"
                    local = socket.socket(fileno=sock.detach())
                    local.setblocking(False)
                    with local:
                        flow = DatagramFlow(circuit, local.send, counts, ends_when_refused=True,
                                            sealing=sealing)
                        while True:
                            await flow.run(idle, local)
                            if slot is None or not route_lost(flow.circuit.broken):
                                break
                            # The route was lost: keep the socket (the target's view of the
                            # flow) until the entry resumes it, or give up.
                            deadline = trio.current_time() + min(self.resume.timeout, idle)
                            resumed = await slot.wait(deadline)
                            if resumed is None:
                                break
                            log.info("exit %s: flow resumed", what)
                            flow.rebind(resumed)
                            circuit = resumed
                if counts.error is not None:
                    log.warning("exit %s: %s", what, describe_error(counts.error))
            finally:
                if slot is not None:
                    self.resume.forget_flow(slot)
                self.sessions.udp_dropped["exit", ""] += (circuit.dropped_in + circuit.dropped_out
                                                          + (flow.dropped if flow is not None else 0))
                await circuit.aclose()

    # ------------------------------------------------------------------ relay

    def _check_route(self, carrier: Carrier, peer: PeerConfig, route: tuple[str, ...]) -> str:
        limit = self.config.gateway.max_route_length
        next_hop = route[0]
        if len(route) > limit:
            raise Refusal(ErrorCode.ROUTE_TOO_LONG,
                          f"route of {len(route)} more hops exceeds the limit of {limit}")
        if len(set(route)) != len(route) or self.name in route or next_hop == carrier.peer_name:
            raise Refusal(ErrorCode.ROUTE_LOOP, f"route {','.join(route)} loops")
        if next_hop not in self.peers.by_name or not peer.route_policy.permits(next_hop):
            # One answer for both: a peer must not learn which gateways we know by asking.
            raise Refusal(ErrorCode.FORBIDDEN_ROUTE,
                          f"peer {peer.name} may not route through {self.name} to {next_hop}",
                          detail="" if next_hop in self.peers.by_name else f"{next_hop} is not a peer here")
        return next_hop

    async def _relay(self, carrier: Carrier, peer: PeerConfig, circuit: AnyCircuit, what: str) -> None:
        req = circuit.request
        next_hop = self._check_route(carrier, peer, req.route)
        onward_req = req.evolve(route=req.route[1:])
        onward_carrier: Carrier | None = None
        with trio.move_on_after(self.connect_timeout):
            onward_carrier = await self.peers.wait_for(next_hop)
        if onward_carrier is None or onward_carrier.closed.is_set():
            raise Refusal(ErrorCode.NO_ROUTE, f"no carrier to {next_hop} is up")
        if onward_req.resume is not None and not onward_carrier.session.resumable:
            if isinstance(onward_req.resume, Resuming):
                raise Refusal(ErrorCode.RESUME_REFUSED, f"{next_hop} does not support resumption")
            onward_req = onward_req.evolve(resume=None)  # the session is just not resumable
        if onward_req.origin is not None and not onward_carrier.session.carries_origin:
            if onward_req.origin.proxy_header is not ProxyHeader.NONE:  # SPEC.md §16 rule 2
                raise Refusal(ErrorCode.UNSUPPORTED_KIND,
                              f"{next_hop} cannot carry the PROXY header (no ORIGIN capability)")
            onward_req = onward_req.evolve(origin=None)
        onward = onward_carrier.open(onward_req)
        try:
            with trio.fail_after(self.connect_timeout * 2):
                await onward.wait_open()
        except trio.TooSlowError:
            onward.reset(ErrorCode.CONNECT_TIMEOUT, "no answer in time")
            raise Refusal(ErrorCode.CONNECT_TIMEOUT, f"{next_hop} did not answer in time") from None
        except trio.BrokenResourceError as exc:
            cause = exc.__cause__
            if isinstance(cause, CircuitBroken):
                # Pass the downstream reason through unchanged: it names the refusing hop.
                if cause.code == ErrorCode.NO_ERROR:
                    # A resumption that completed the session at once (SPEC.md §14): the
                    # exit lacked only what it said; the entry takes this as the end.
                    log.info("relay %s: the session was complete when it resumed", what)
                else:
                    log.warning("relay %s: next hop refused: %s", what, cause)
                    self.sessions.refused(ErrorCode.describe(cause.code))
                circuit.refuse(cause.code, cause.reason)
                return
            raise Refusal(ErrorCode.NO_ROUTE, f"leg to {next_hop} failed: {exc}") from exc
        # OPEN_OK and what the next hop already sent (the target's first bytes, an ACK)
        # leave in one write.
        with write_batch():
            try:
                circuit.accept()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                # The previous hop went away while the next one answered: end the new leg too.
                onward.reset(ErrorCode.CANCELLED, "the previous hop closed the circuit")
                return
            if isinstance(circuit, Circuit) and isinstance(onward, Circuit):
                # No task from here on; the test-only fault injector is a transform inside.
                flip = byte_flipper(self.flip_offset) if self.flip_offset is not None else None
                self.engine.relay(CircuitPort(circuit), CircuitPort(onward),
                                  self.sessions.open("relay", f"{what} -> {next_hop}", circuit),
                                  transform=flip)
                return
        record = self.sessions.track("relay", f"{what} -> {next_hop}", circuit)
        with record:
            if isinstance(circuit, DatagramCircuit) and isinstance(onward, DatagramCircuit):
                try:
                    flip_datagram = (datagram_flipper(self.flip_offset) if self.flip_offset is not None
                                     else None)
                    counts = DatagramCounts()
                    with flow_record(record, counts):
                        await bridge_datagrams(circuit, onward, self.config.gateway.udp_idle_timeout,
                                               counts, flip_datagram)
                finally:
                    if req.resume is not None:  # a resumable flow: the endpoints resume it
                        for leg, other in ((circuit, onward), (onward, circuit)):
                            if route_lost(leg.broken) and other.broken is None:
                                other.reset(ErrorCode.ROUTE_LOST, str(leg.broken))
                    with trio.move_on_after(1) as cleanup:
                        cleanup.shield = True  # both legs, even when cancelled
                        await circuit.aclose()
                        await onward.aclose()


def _send_proxy_header(req: OpenRequest, stream: LocalStream) -> None:
    """The PROXY protocol header the entry asked for (SPEC.md §16), before any byte of the
    session: the target learns the client's address, not ours."""
    origin = req.origin
    if origin is None or origin.proxy_header is ProxyHeader.NONE:
        return
    encode = proxy_header.encode_v1 if origin.proxy_header is ProxyHeader.V1 else proxy_header.encode_v2
    header = encode(origin.source, origin.destination)
    try:
        sent = stream.sock.send(header)  # a new connection's empty buffer takes it whole
    except OSError as exc:
        sent, reason = 0, exc.strerror or str(exc)
    else:
        reason = "the socket took only part of it"
    if sent != len(header):
        stream.abort(reason)
        stream.close_now()
        raise Refusal(ErrorCode.CONNECTION_REFUSED, f"PROXY header to {_target(req)} not sent: {reason}")


def _log_failure(what: str, error: BaseException | None) -> None:
    """The engine's errors say what happened themselves ("connection broken: ...")."""
    if error is not None:
        log.warning("exit %s: %s", what, str(error) or type(error).__name__)

