"""Small real servers and clients for the integration tests, all on 127.0.0.1.

Every server runs in threads, binds port 0, and is a context manager that closes
every socket and joins every thread on exit; an exception raised in a handler
thread is re-raised from `__exit__` (and by `check()`), so a broken target fails
the test instead of vanishing. Every socket has a timeout: nothing here can hang
a test for longer than its deadline.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import suppress
from types import TracebackType

from tests.gateways import free_port, wait_until

IO_TIMEOUT = 60.0  # per socket operation: a stalled tunnel fails the test, never hangs it
CHUNK = 256 * 1024
MiB = 1024 * 1024


# ---------------------------------------------------------------- known data


def pattern(total: int, seed: int = 0, chunk: int = CHUNK) -> Iterator[bytes]:
    """`total` bytes of known data: each chunk starts with its seed and index.

    Chunks differ, so a dropped, repeated or reordered chunk changes the hash.
    """
    base = bytes((i * 131 + seed * 7) & 0xFF for i in range(chunk))
    index = 0
    sent = 0
    while sent < total:
        block = struct.pack(">QQ", seed, index) + base[16:]
        block = block[: min(chunk, total - sent)]
        yield block
        sent += len(block)
        index += 1


def pattern_sha256(total: int, seed: int = 0) -> str:
    h = hashlib.sha256()
    for block in pattern(total, seed):
        h.update(block)
    return h.hexdigest()


def recv_all_hash(sock: socket.socket, limit: int | None = None) -> tuple[int, str]:
    """Read until EOF (or `limit` bytes); returns (count, sha256)."""
    h = hashlib.sha256()
    n = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while limit is None or n < limit:
        got = sock.recv_into(view if limit is None else view[: min(CHUNK, limit - n)])
        if not got:
            break
        h.update(view[:got])
        n += got
    return n, h.hexdigest()


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    out = bytearray()
    while len(out) < size:
        data = sock.recv(min(CHUNK, size - len(out)))
        if not data:
            raise ConnectionError(f"EOF after {len(out)} of {size} bytes")
        out += data
    return bytes(out)


def recv_until_eof(sock: socket.socket) -> bytes:
    out = bytearray()
    while data := sock.recv(CHUNK):
        out += data
    return bytes(out)


def send_pattern(sock: socket.socket, total: int, seed: int) -> None:
    for block in pattern(total, seed):
        sock.sendall(block)


# ---------------------------------------------------------------- threads


class _Threads:
    """Threads whose exceptions are kept and re-raised by `check()`."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()

    def spawn(self, fn: Callable[..., object], *args: object) -> threading.Thread:
        def run() -> None:
            try:
                fn(*args)
            except BaseException as exc:
                with self._lock:
                    self.errors.append(exc)

        t = threading.Thread(target=run, daemon=True)
        with self._lock:
            self.threads.append(t)
        t.start()
        return t

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for t in list(self.threads):
            t.join(max(0.0, deadline - time.monotonic()))
        alive = [t for t in self.threads if t.is_alive()]
        if alive:
            raise TimeoutError(f"{len(alive)} threads still running after {timeout} s")

    def check(self) -> None:
        if self.errors:
            raise self.errors[0]


# ---------------------------------------------------------------- TCP servers


class TcpServer:
    """A listener on 127.0.0.1:0 that runs `handler(conn)` in a thread per connection.

    `conns` keeps every accepted socket; all are closed on exit. `accepted` counts them.
    """

    def __init__(self, handler: Callable[[socket.socket], None], backlog: int = 1024,
                 io_timeout: float = IO_TIMEOUT) -> None:
        self.handler = handler
        self.io_timeout = io_timeout
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=backlog)
        self.sock.settimeout(0.1)
        self.port = int(self.sock.getsockname()[1])
        self.conns: list[socket.socket] = []
        self.accepted = 0
        self._stop = threading.Event()
        self._threads = _Threads()
        self._acceptor = threading.Thread(target=self._accept_loop, daemon=True)

    def __enter__(self) -> TcpServer:
        self._acceptor.start()
        return self

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(self.io_timeout)
            self.conns.append(conn)
            self.accepted += 1
            self._threads.spawn(self._handle, conn)

    def _handle(self, conn: socket.socket) -> None:
        try:
            self.handler(conn)
        finally:
            conn.close()

    def check(self) -> None:
        self._threads.check()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._acceptor.join(5)
        self.sock.close()
        for conn in self.conns:
            with suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        try:
            self._threads.join(10)
        finally:
            for conn in self.conns:
                conn.close()
        if et is None:
            self.check()


def echo_handler(conn: socket.socket) -> None:
    """Echo until EOF, then half-close our side too."""
    while data := conn.recv(CHUNK):
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


class BulkHandler:
    """Hash everything received; send `reply` bytes of pattern(seed) back.

    `concurrent=True`: the reply is sent while receiving (both directions at once);
    otherwise only after the client's EOF (the half-close case). Results land in
    `received`: (byte count, sha256) per connection.
    """

    def __init__(self, reply: int, seed: int = 1, concurrent: bool = True) -> None:
        self.reply = reply
        self.seed = seed
        self.concurrent = concurrent
        self.received: list[tuple[int, str]] = []

    def __call__(self, conn: socket.socket) -> None:
        if self.concurrent:
            sender = _Threads()
            sender.spawn(self._send, conn)
            self.received.append(recv_all_hash(conn))
            sender.join(IO_TIMEOUT * 2)
            sender.check()
        else:
            self.received.append(recv_all_hash(conn))
            self._send(conn)

    def _send(self, conn: socket.socket) -> None:
        send_pattern(conn, self.reply, self.seed)
        conn.shutdown(socket.SHUT_WR)


def bulk_exchange(port: int, send: int, seed: int = 0, timeout: float = IO_TIMEOUT,
                  half_close_first: bool = False) -> tuple[int, str]:
    """Connect to `port`, send `send` bytes of pattern(seed) and EOF while reading the
    reply until EOF; returns (reply byte count, reply sha256)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as c:
        if half_close_first:
            send_pattern(c, send, seed)
            c.shutdown(socket.SHUT_WR)
            return recv_all_hash(c)
        sender = _Threads()
        sender.spawn(lambda: (send_pattern(c, send, seed), c.shutdown(socket.SHUT_WR)))
        try:
            result = recv_all_hash(c)
        finally:
            sender.join(timeout * 2)
        sender.check()
        return result


class StallHandler:
    """Accept and never read until `release` is set; then drain to EOF (counting)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.connected = threading.Event()
        self.drained: list[int] = []

    def __call__(self, conn: socket.socket) -> None:
        self.connected.set()
        self.release.wait(IO_TIMEOUT)
        n, _ = recv_all_hash(conn)
        self.drained.append(n)


# ---------------------------------------------------------------- HTTP


class HttpServer:
    """http.server in a thread, serving `body` at every GET path."""

    def __init__(self, body: bytes) -> None:
        payload = body

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.1,), daemon=True)

    def __enter__(self) -> HttpServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self._thread.join(10)
        self.server.server_close()


# ---------------------------------------------------------------- UDP


class UdpEcho:
    """A UDP socket on 127.0.0.1:0 that sends every datagram back to its sender."""

    def __init__(self, rcvbuf: int = 4 * MiB, keep: bool = False) -> None:
        self.keep = keep
        self.datagrams: list[bytes] = []  # every datagram received, when `keep`
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, rcvbuf)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = int(self.sock.getsockname()[1])
        self.received = 0
        self.peers: set[tuple[str, int]] = set()
        self._stop = threading.Event()
        self._threads = _Threads()

    def __enter__(self) -> UdpEcho:
        self._threads.spawn(self._loop)
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                data, addr = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            self.received += 1
            self.peers.add(addr)
            if self.keep:
                self.datagrams.append(data)
            self.sock.sendto(data, addr)

    def __exit__(self, et: type[BaseException] | None, *exc: object) -> None:
        self._stop.set()
        try:
            self._threads.join(5)
        finally:
            self.sock.close()
        if et is None:
            self._threads.check()


def free_tcp_udp_port() -> int:
    """A port free for both TCP and UDP on 127.0.0.1 a moment ago (iperf3 needs both)."""
    for _ in range(50):
        port = free_port()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            try:
                u.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no port free for both TCP and UDP")


# ---------------------------------------------------------------- iperf3


def tcp_listening(port: int) -> bool:
    """Is some socket in LISTEN state on `port` (IPv4 or IPv6)? Read from /proc, no probe."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    return True
    return False


class Iperf3Server:
    """`iperf3 -s -1` on 127.0.0.1 and a free port, stopped (and reaped) on exit."""

    def __init__(self) -> None:
        self.port = free_tcp_udp_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Iperf3Server:
        self.proc = subprocess.Popen(["iperf3", "-s", "-1", "-B", "127.0.0.1", "-p", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        # Ready when its port is in LISTEN state (a probe connection would use up -1).
        while not tcp_listening(self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"iperf3 -s exited {self.proc.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError("iperf3 -s did not start listening")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def iperf3_client(port: int, *args: str, timeout: float = 40.0) -> dict[str, object]:
    out = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-J", *args],
                         capture_output=True, text=True, timeout=timeout)
    result: dict[str, object] = json.loads(out.stdout)
    if out.returncode != 0 or "error" in result:
        raise AssertionError(f"iperf3 failed ({out.returncode}): {result.get('error')}\n{out.stderr}")
    return result


# ---------------------------------------------------------------- config snippets


def tunnel_toml(name: str, kind: str, target_port: int, via: str = "exit", listen_port: int = 0,
                extra: str = "") -> str:
    """One [[tunnel]] table: listen on 127.0.0.1 (port 0: any), to 127.0.0.1:target_port."""
    return (f'\n[[tunnel]]\nname = "{name}"\nlisten = "{kind}://127.0.0.1:{listen_port}"\n'
            f'via = ["{via}"]\ntarget = "127.0.0.1:{target_port}"\n{extra}')


def push_until_blocked(sock: socket.socket, block: bytes, limit: int) -> int:
    """Fill every buffer on the way until `sock`'s send (which has a timeout) makes no
    progress; the bytes sent in whole blocks (part of the last block may have gone too).
    Fails past `limit` bytes: something buffered without bound for a reader that reads
    nothing."""
    sent = 0
    deadline = time.monotonic() + IO_TIMEOUT
    while True:
        assert time.monotonic() < deadline, "the tunnel never pushed back"
        assert sent < limit, f"{limit} B buffered for a target that reads nothing"
        try:
            sock.sendall(block)
        except TimeoutError:
            return sent
        sent += len(block)


def stalled_circuit_beside_bulk(stuck_port: int, bulk_port: int, stall: StallHandler,
                                handler: BulkHandler) -> None:
    """Stall one circuit (its target never reads) until the client's send blocks; then
    another circuit on the same carrier(s) must still move 20 MiB each way, and the
    stalled one must deliver everything once its target reads again."""
    with socket.create_connection(("127.0.0.1", stuck_port), timeout=1.0) as c:
        assert stall.connected.wait(IO_TIMEOUT)
        block = b"s" * (64 * 1024)
        stuck_sent = push_until_blocked(c, block, 1024 * MiB)
        # The carrier is shared: another circuit must still move 20 MiB each way.
        started = time.monotonic()
        n, sha = bulk_exchange(bulk_port, 20 * MiB, seed=5, timeout=30)
        assert (n, sha) == (20 * MiB, pattern_sha256(20 * MiB, 6))
        assert time.monotonic() - started < 60
        wait_until(lambda: bool(handler.received), 30, "the bulk target to see EOF")
        assert handler.received == [(20 * MiB, pattern_sha256(20 * MiB, 5))]
        # The stalled circuit recovers: everything the client sent arrives.
        stall.release.set()
        c.settimeout(IO_TIMEOUT)
        c.shutdown(socket.SHUT_WR)
        wait_until(lambda: bool(stall.drained), IO_TIMEOUT, "the stalled target to drain")
        assert stuck_sent <= stall.drained[0] < stuck_sent + len(block)
