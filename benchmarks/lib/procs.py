"""Processes and sockets on loopback: spawn, wait for a port, stop, and read /proc.

Every wait here has a deadline; nothing sleeps a fixed time hoping a server is up.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
POLL = 0.02  # seconds between two polls of a condition that has a deadline
CLK_TCK = os.sysconf("SC_CLK_TCK")


class StartError(RuntimeError):
    """A contender or server could not be started; the message says why."""


def free_port(udp_too: bool = False) -> int:
    """A port free on 127.0.0.1 for TCP (and UDP when ``udp_too``), chosen by the kernel."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if not udp_too:
            return port
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            try:
                u.bind((HOST, port))
            except OSError:
                continue
        return port
    raise StartError("no free port on 127.0.0.1 after 50 tries")


def raise_nofile(want: int = 65536) -> int:
    """Raise RLIMIT_NOFILE (inherited by every process we start); return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if os.geteuid() == 0 and hard < want:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
            return want
        except (ValueError, OSError):
            pass
    new = min(want, hard) if hard != resource.RLIM_INFINITY else want
    if new > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@dataclass
class Proc:
    """One process we started, with its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(text[-lines:]) or "(empty log)"

    def describe_failure(self) -> str:
        status = "still running" if self.alive() else f"exited with {self.popen.returncode}"
        return f"{self.name} ({status}); last lines of {self.log}:\n{self.log_tail()}"


@dataclass
class ProcGroup:
    """Processes started for one purpose, stopped together (each by its own pid)."""

    logdir: Path
    procs: list[Proc] = field(default_factory=list)

    def spawn(self, name: str, argv: Sequence[str], cwd: Path | None = None) -> Proc:
        log = self.logdir / f"{name}.log"
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                list(argv), cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )
        proc = Proc(name, popen, log)
        self.procs.append(proc)
        return proc

    def stop(self, grace: float = 3.0) -> None:
        for proc in reversed(self.procs):
            _signal(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in reversed(self.procs):
            try:
                proc.popen.wait(max(0.05, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal(proc, signal.SIGKILL)
                try:
                    proc.popen.wait(2.0)
                except subprocess.TimeoutExpired:
                    pass
        self.procs.clear()


def _signal(proc: Proc, sig: int) -> None:
    """Signal the process group we created for this process (its pid is the group id)."""
    if proc.popen.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            proc.popen.send_signal(sig)
        except ProcessLookupError:
            pass


def wait_until(condition, timeout: float, watch: Sequence[Proc] = ()) -> bool:
    """Poll ``condition()`` until true or ``timeout``; give up early if a watched proc dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        if any(not p.alive() for p in watch):
            return False
        time.sleep(POLL)
    return bool(condition())


def can_connect(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_port(port: int, timeout: float = 10.0, watch: Sequence[Proc] = ()) -> bool:
    """Poll a TCP connect to 127.0.0.1:port until it succeeds or the deadline passes."""
    return wait_until(lambda: can_connect(port), timeout, watch)


def is_listening(port: int, udp: bool = False) -> bool:
    """Whether something listens on (TCP) or is bound to (UDP) ``port``, without connecting."""
    table, state = ("/proc/net/udp", "07") if udp else ("/proc/net/tcp", "0A")
    want = f":{port:04X}"
    try:
        lines = Path(table).read_text().splitlines()[1:]
    except OSError:
        return False
    return any(
        (cols := line.split())[1].endswith(want) and cols[3] == state for line in lines
    )


def echo_roundtrip(port: int, timeout: float = 2.0) -> bool:
    """One byte through an echo path: proof that the whole relay chain works."""
    try:
        with socket.create_connection((HOST, port), timeout=timeout) as s:
            s.sendall(b"?")
            return s.recv(1) == b"?"
    except OSError:
        return False


# ---- /proc accounting -------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may contain spaces: split after the last ')'.
    return raw[raw.rindex(")") + 2 :].split()


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields:
                children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def process_tree(roots: Sequence[int]) -> list[int]:
    """The roots and all their live descendants (socat and sshd fork per connection)."""
    children = _children_map()
    seen: list[int] = []
    todo = list(roots)
    while todo and len(seen) < 100_000:
        pid = todo.pop()
        if pid not in seen:
            seen.append(pid)
            todo.extend(children.get(pid, []))
    return seen


def cpu_seconds(roots: Sequence[int]) -> float:
    """utime+stime (+ reaped children's) of the process trees under ``roots``."""
    ticks = 0
    for pid in process_tree(roots):
        fields = _stat_fields(pid)
        if fields:
            # After the name: state(0) ppid(1) ... utime(11) stime(12) cutime(13) cstime(14)
            ticks += sum(int(fields[i]) for i in (11, 12, 13, 14))
    return ticks / CLK_TCK


def rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
