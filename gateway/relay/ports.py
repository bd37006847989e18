"""Ports: the ends a relayed byte stream runs between, all synchronous.

The relay engine (engine.py) never touches a socket, a circuit or TLS itself; it asks its
two ports for room, bytes and EOFs and tells them when it is done. Three kinds exist:

- `SocketPort`: a local TCP socket (a client at an entry, a target at an exit), watched
  for readiness by the engine's `Readiness` backend;
- `CircuitPort`: a circuit, fed by its carrier's reader (data is pushed straight through
  the engine while the other port keeps up; credit, EOF and resets arrive as events);
- `TlsPort`: end-to-end TLS 1.3 inside a circuit (OpenSSL over `ssl.MemoryBIO`), after
  its handshake ran; close_notify carries the half-close, a FIN without it is a
  truncation, a record failing authentication resets the circuit with INTEGRITY_ERROR.

A port signals trouble by raising `CircuitBroken` (with the wire code to pass on) or
`SessionError` (a local socket broke); the engine then aborts every port.
"""

from __future__ import annotations

import errno
import os
import socket
import ssl
from typing import Protocol

from gateway.carriers.circuit import Circuit
from gateway.errors import CircuitBroken, SessionError
from gateway.relay.localsock import set_reset_on_close
from gateway.relay.readiness import ERROR, HANGUP, READABLE, WRITABLE, Readiness
from gateway.relay.sessions import SessionRecord
from gateway_codecs import ErrorCode

CHUNK = 256 * 1024  # bytes per read: a circuit hands over whole queued frames up to this
TLS_READ = 256 * 1024  # ciphertext taken from the circuit per read (bounded: see TlsPort.read)
_WOULD_BLOCK = (BlockingIOError, InterruptedError)


class Relay(Protocol):
    """What a port tells its session (engine.StreamRelay): a protocol, not an import, so
    the engine imports ports and never the reverse."""

    record: SessionRecord

    @property
    def ended(self) -> bool: ...
    def on_event(self) -> None: ...
    def moved_from(self, port: Port) -> None: ...
    def moved_to(self, port: Port) -> None: ...
    def fail(self, error: BaseException) -> None: ...


class Outgoing(Protocol):
    """The direction a port is the source of (engine.Direction): where pushes go."""

    @property
    def dst(self) -> Port: ...
    @property
    def closed(self) -> bool: ...  # everything, the EOF included, went on to dst
    def push(self, data: bytes | memoryview) -> int: ...


class EndedRelay:
    """What a port refers to once its session has ended (`Port.unbind`): an event that
    comes late (a readiness report collected before the end) finds nothing to do. Live,
    a session's relay, directions and ports refer to each other; cut, the ended session
    (sockets, circuits, buffers) is freed at once by reference counting, not left to
    the cyclic garbage collector, whose passes then cost far less."""

    __slots__ = ("record",)
    ended = True
    closed = True
    state = "ended"  # (engine.ENDED)

    def __init__(self, record: SessionRecord) -> None:
        self.record = record  # late log lines still name the session

    def on_event(self) -> None:
        pass

    def moved_from(self, port: Port) -> None:
        pass

    def moved_to(self, port: Port) -> None:
        pass

    def fail(self, error: BaseException) -> None:
        pass

    def internal_error(self, exc: Exception) -> None:
        pass

    def push(self, data: bytes | memoryview) -> int:
        return 0


class Port:
    """One end of a relayed stream (see the module docstring). `bind` hands it the relay
    and the direction it is the source of; from then on it reports events to them."""

    __slots__ = ()

    def bind(self, relay: Relay, outgoing: Outgoing) -> None:
        raise NotImplementedError

    def check(self) -> None:
        """Raise if this end has broken meanwhile (a circuit reset, a lost carrier)."""

    def room(self) -> int:
        """Bytes `write` may take now; 0: an event comes when that changes."""
        raise NotImplementedError

    def read(self, max_bytes: int) -> bytes | None:
        """Up to `max_bytes` now; b"": the end of the stream; None: nothing yet (an event
        comes when there is)."""
        raise NotImplementedError

    def pause_reading(self) -> None:
        """The other end has no room: stop looking for bytes (errors still count)."""

    def write(self, data: bytes | memoryview) -> int:
        """Take what fits now; the rest waits for an event."""
        raise NotImplementedError

    def write_eof(self) -> None:
        raise NotImplementedError

    @property
    def flushed(self) -> bool:
        """Everything written (and the EOF) has left this port."""
        return True

    def flush(self) -> None:
        """Send what waits for credit (a TLS record, a resumed session's retransmission)
        when the direction into this port is already closed: nothing else would."""

    def abort(self, code: int, reason: str) -> None:
        """End as broken: RST (a socket's close resets; a circuit sends RST with the code)."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def unbind(self, ended: EndedRelay) -> None:
        """The session ended (after `close`): drop the references back to it."""


class SocketPort(Port):
    """A local TCP socket. `readable`/`writable` remember what readiness last said, so
    a short read or a short write needs no syscall to learn that the socket is drained
    or full: level-triggered readiness reports it again if more came."""

    __slots__ = ("mask", "readable", "readiness", "relay", "sock", "watched", "writable")

    def __init__(self, sock: socket.socket, readiness: Readiness) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.readiness = readiness
        self.mask = 0
        self.watched = False
        self.readable = True  # a client that speaks first has usually sent already
        self.writable = True

    def bind(self, relay: Relay, outgoing: Outgoing) -> None:
        self.relay = relay
        self.mask = READABLE
        # In the watched set even with an empty mask: errors and hang-ups still count.
        self.readiness.add(self.sock, self, READABLE)
        self.watched = True

    def _set_mask(self, mask: int) -> None:
        if mask != self.mask:
            self.mask = mask
            if self.watched:
                self.readiness.modify(self.sock, mask)
            elif mask:  # no longer watched after a hang-up (see on_ready), wanted again
                self.readiness.add(self.sock, self, mask)
                self.watched = True

    # ---- readiness callbacks
    def on_ready(self, events: int) -> None:
        if events & ERROR:
            code = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            self.on_socket_error(code)
            return
        relay = self.relay
        if events & (READABLE | HANGUP) and self.mask & READABLE:
            self.readable = True
            relay.moved_from(self)
        if events & WRITABLE:
            self.writable = True
            relay.moved_to(self)
            if self.writable and not relay.ended:
                self._set_mask(self.mask & ~WRITABLE)  # drained what waited: stop asking
        if events & HANGUP and not relay.ended and not self.mask & (READABLE | WRITABLE):
            # Both directions shut (no error: that came first) and nothing is wanted: a
            # hang-up would be reported forever. Nothing left here can break.
            self.readiness.remove(self.sock)
            self.watched = False

    def on_socket_error(self, code: int) -> None:
        self.relay.fail(SessionError(f"connection broken: {os.strerror(code) if code else 'error'}"))

    # ---- Port
    def room(self) -> int:
        if self.writable:
            return CHUNK
        self._set_mask(self.mask | WRITABLE)
        return 0

    def read(self, max_bytes: int) -> bytes | None:
        if not self.readable:
            self._set_mask(self.mask | READABLE)
            return None
        try:
            data = self.sock.recv(max_bytes)
        except _WOULD_BLOCK:
            self.readable = False
            self._set_mask(self.mask | READABLE)
            return None
        except OSError as exc:
            raise SessionError(f"connection broken: {exc.strerror or exc}") from exc
        if not data:
            self.readable = False
            self._set_mask(self.mask & ~READABLE)  # never read again
        elif len(data) < max_bytes:
            self.readable = False  # most likely drained; if not, readiness says so at once
        return data

    def pause_reading(self) -> None:
        if self.mask & READABLE:
            self._set_mask(self.mask & ~READABLE)

    def write(self, data: bytes | memoryview) -> int:
        if not self.writable:
            return 0
        try:
            sent = self.sock.send(data)
        except _WOULD_BLOCK:
            sent = 0
        except OSError as exc:
            raise SessionError(f"connection broken: {exc.strerror or exc}") from exc
        if sent < len(data):
            self.writable = False
            self._set_mask(self.mask | WRITABLE)
        return sent

    def write_eof(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            if exc.errno != errno.ENOTCONN:
                raise SessionError(f"connection broken: {exc.strerror or exc}") from exc

    def abort(self, code: int, reason: str) -> None:
        set_reset_on_close(self.sock)

    def close(self) -> None:
        if self.watched:
            self.watched = False
            self.readiness.remove(self.sock)
        self.sock.close()

    def unbind(self, ended: EndedRelay) -> None:
        self.relay = ended


class CircuitPort(Port):
    """A circuit. Its carrier's reader pushes arriving bytes straight into the engine
    (`Direction.push`); what the other end cannot take yet waits in the circuit's queue,
    holding back its credit, so flow control stays end to end.

    Everything it does to its circuit goes through five primitives (`_credit`, `_send`,
    `_take`, `_ended`, `_send_eof`), which TLS inside the circuit uses too and which
    resumable sessions (resume.py) extend with their sequence numbers."""

    __slots__ = ("circuit", "source")

    def __init__(self, circuit: Circuit) -> None:
        self.circuit = circuit
        self.source: Circuit | None = None  # a middle relay: the circuit whose FIN we pass on

    def bind(self, relay: Relay, outgoing: Outgoing) -> None:
        circuit = self.circuit
        circuit.sink = outgoing.push
        circuit.watcher = relay.on_event
        other = outgoing.dst
        if isinstance(other, CircuitPort):  # a middle relay passes end-to-end ACKs on
            circuit.ack_listener = other.circuit.send_ack
            self.source = other.circuit  # and a FIN's ACK and COMPLETE, in the FIN we send
            other.circuit.passes_fin_ack = True
            if circuit.peer_delivered >= 0:  # one came before the relay was bridged
                other.circuit.send_ack(circuit.peer_delivered)

    @property
    def resumable_route(self) -> bool:
        """The circuit carries a session its endpoints may resume (SPEC.md §14)."""
        return self.circuit.request.resume is not None

    @property
    def flushed(self) -> bool:
        # On a relay hop, a resumable session's end is the endpoints' RST NO_ERROR, which
        # comes after the FINs (ACKs still pass until then): see StreamRelay._complete;
        # or a FIN that said COMPLETE (SPEC.md §14).
        circuit = self.circuit
        return not self.resumable_route or circuit.fin_complete or circuit.complete_sent

    def _transport_flushed(self) -> bool:
        """What this port wrote has left it (TLS: no record waits for credit)."""
        return True

    # ---- the primitives
    def _credit(self) -> int:
        return self.circuit.send_credit

    def _send(self, data: bytes | memoryview) -> int:
        return self.circuit.try_send(data)

    def _take(self, max_bytes: int) -> bytes | None:
        return self.circuit.take_nowait(max_bytes)

    def _ended(self) -> bool:
        return self.circuit.at_eof

    def _send_eof(self) -> None:
        source = self.source
        if source is None:
            self.circuit.end_now()
        else:
            circuit = self.circuit
            circuit.end_now(source.fin_complete, source.fin_delivered)
            if source.fin_complete and not circuit.complete_sent:
                # No FIN_ACK on this leg: COMPLETE cannot cross it, and an RST NO_ERROR
                # after the FIN says the same to the endpoint beyond (SPEC.md §14). That
                # is also this relay's end of the session (StreamRelay._complete).
                circuit.retire()
                assert circuit.broken is not None
                raise circuit.broken

    # ---- Port
    def check(self) -> None:
        broken = self.circuit.broken
        if broken is not None:
            raise broken

    def room(self) -> int:
        return self._credit()

    def read(self, max_bytes: int) -> bytes | None:
        data = self._take(max_bytes)
        if data is None and self._ended():
            return b""
        return data

    def write(self, data: bytes | memoryview) -> int:
        return self._send(data)

    def write_eof(self) -> None:
        self.check()
        self._send_eof()

    def abort(self, code: int, reason: str) -> None:
        self.circuit.reset(code, reason)
        self.circuit.abort(reason)

    def close(self) -> None:
        circuit = self.circuit
        circuit.sink = None
        circuit.watcher = None
        circuit.ack_listener = None
        circuit.close_now()


class TlsPort(CircuitPort):
    """End-to-end TLS 1.3 inside a circuit, driven without a task. The handshake ran
    before (async, with a deadline: see handshake.py); this takes over its SSLObject and
    memory BIOs, with whatever they already hold."""

    __slots__ = ("_cipher", "_eof_sent", "_eof_wanted", "_held", "_held_end", "_in", "_out", "_ssl")

    def __init__(self, circuit: Circuit, tls: ssl.SSLObject, incoming: ssl.MemoryBIO,
                 outgoing: ssl.MemoryBIO) -> None:
        super().__init__(circuit)
        self._ssl = tls
        self._in = incoming
        self._out = outgoing
        self._cipher: bytes | None = None  # records the circuit's credit did not take yet
        self._eof_wanted = False  # close_notify was written; FIN follows the last record
        self._eof_sent = False
        self._held: bytearray | None = None  # plaintext decrypted ahead by write_eof: read first
        self._held_end = False  # ...and the far end's close_notify came with it

    def bind(self, relay: Relay, outgoing: Outgoing) -> None:
        # No push: ciphertext must be decrypted first. Data waits in the circuit, and
        # its arrival is an event like credit or EOF.
        self.circuit.sink = None
        self.circuit.watcher = relay.on_event

    def _fail(self, reason: str, exc: BaseException | None = None) -> CircuitBroken:
        """Reset the circuit with INTEGRITY_ERROR, so both ends log the same reason."""
        self.circuit.reset(ErrorCode.INTEGRITY_ERROR, reason)
        error = CircuitBroken(ErrorCode.INTEGRITY_ERROR, reason)
        error.__cause__ = exc
        return error

    def _flush(self) -> None:
        """Records into the circuit as far as its credit allows; then the FIN, if asked."""
        while True:
            cipher = self._cipher
            if cipher is None:
                cipher = self._out.read()
                if not cipher:
                    break
            sent = self._send(cipher)
            if sent < len(cipher):
                self._cipher = cipher[sent:]
                return
            self._cipher = None
        if self._eof_wanted and not self._eof_sent:
            self._eof_sent = True
            self._send_eof()

    def flush(self) -> None:
        self._flush()

    def room(self) -> int:
        self._flush()
        # A record is a few bytes longer than its plaintext: what exceeds the credit
        # waits in _cipher (at most one chunk's overhead) until the next credit.
        return 0 if self._cipher is not None else self._credit()

    def read(self, max_bytes: int) -> bytes | None:
        held = self._held
        if held is not None:
            if held:
                data = bytes(held[:max_bytes])
                del held[:max_bytes]
                return data
            self._held = None
            if self._held_end:
                return b""
        tls = self._ssl
        while True:
            try:
                data = tls.read(max_bytes)
            except ssl.SSLWantReadError:
                self._flush()  # a KeyUpdate's answer
                # Only now take more ciphertext: the circuit's credit then still bounds
                # what waits undecrypted (one read's worth at most).
                cipher = self._take(TLS_READ)
                if cipher is None:
                    if self._ended():
                        raise self._fail("the circuit ended without TLS close_notify: truncated") from None
                    return None
                self._in.write(cipher)
                continue
            except ssl.SSLZeroReturnError:
                return b""
            except ssl.SSLError as exc:
                raise self._fail(
                    f"end-to-end TLS record failed authentication: {exc.reason or exc}", exc) from exc
            return data

    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data)
        try:
            while view:
                view = view[self._ssl.write(view):]
        except ssl.SSLError as exc:
            raise self._fail(f"end-to-end TLS write failed: {exc.reason or exc}", exc) from exc
        self._flush()
        return len(data)

    def write_eof(self) -> None:
        self.check()
        if self._in.pending:
            # unwrap() tries a second SSL_shutdown, which reads on: application records
            # still waiting in the BIO would then fail the connection
            # (APPLICATION_DATA_AFTER_CLOSE_NOTIFY). Decrypt them first; read() serves them.
            self._decrypt_ahead()
        try:
            self._ssl.unwrap()  # close_notify: in TLS 1.3 it ends our direction only
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLError as exc:
            raise self._fail(f"end-to-end TLS close failed: {exc.reason or exc}", exc) from exc
        self._eof_wanted = True
        self._flush()

    def _decrypt_ahead(self) -> None:
        held = self._held if self._held is not None else bytearray()
        try:
            while chunk := self._ssl.read(TLS_READ):  # (b"": nothing more, even unwrapped)
                held += chunk
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            self._held_end = True
        except ssl.SSLError as exc:
            raise self._fail(f"end-to-end TLS record failed authentication: {exc.reason or exc}",
                             exc) from exc
        self._held = held

    @property
    def flushed(self) -> bool:
        return self._transport_flushed()

    def _transport_flushed(self) -> bool:
        return self._cipher is None and self._eof_sent == self._eof_wanted
