"""Multi-host topologies for tests: network namespaces in a line, joined by veth links.

`Topology("edge", "hub", "dc")` makes one namespace per host (``tg-<pid>-<n>-<host>``)
and one veth link per neighbour pair. Link i joins host i and host i+1 with
198.18.i.1/24 (left) and 198.18.i.2/24 (right): addresses from 198.18.0.0/15 only,
inside our own namespaces only. There is no forwarding and no route beyond the
directly connected /24s unless a test asks for it, so the last host cannot be
reached from the first: that is what makes a tunnel necessary.

Everything a topology starts (namespaces, processes) is removed by `destroy()`, which
`topology()` calls in a ``finally``; namespaces left by an earlier run of ours that
crashed (its pid is gone) are removed before a new one is made.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

PREFIX = "tg-"
STALE_RE = re.compile(r"^tg-(\d+)-\d+-")
COMMAND_TIMEOUT = 15.0  # one `ip` command or short client; far above what any takes
_counter = itertools.count(1)


def unavailable_reason() -> str | None:
    """Why multi-host tests cannot run here, or None if they can."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    try:
        subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"`ip netns` does not work here: {exc}"
    return None


def require_netns() -> None:
    """Skip the calling test (with the reason) when namespaces are not available."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)


def run(cmd: Sequence[str], timeout: float = COMMAND_TIMEOUT, check: bool = True,
        input: bytes | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command with a deadline; on failure the error shows its output."""
    out = subprocess.run(list(cmd), capture_output=True, timeout=timeout, input=input)
    result = subprocess.CompletedProcess(out.args, out.returncode,
                                         out.stdout.decode(errors="replace"),
                                         out.stderr.decode(errors="replace"))
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {result.returncode}:\n"
                           f"{result.stdout}{result.stderr}")
    return result


def _namespaces() -> list[str]:
    out = run(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_namespace_processes(ns: str) -> None:
    """SIGKILL whatever still runs in `ns` (only our own namespaces are ever passed)."""
    out = run(["ip", "netns", "pids", ns], check=False).stdout
    for word in out.split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(word), signal.SIGKILL)


def _delete_namespace(ns: str) -> None:
    _kill_namespace_processes(ns)
    run(["ip", "netns", "delete", ns], check=False)


def clean_stale() -> list[str]:
    """Delete ``tg-<pid>-*`` namespaces whose creating test process no longer exists.

    A namespace of a run that is still alive (another pytest at the same time) is left
    alone, and so is anything not named by our scheme.
    """
    removed = []
    for ns in _namespaces():
        match = STALE_RE.match(ns)
        if match is None or int(match.group(1)) == os.getpid() or _pid_alive(int(match.group(1))):
            continue
        _delete_namespace(ns)
        removed.append(ns)
    return removed


@dataclass(frozen=True)
class Link:
    """A veth pair between host `left` (index i) and host `right` (index i+1)."""

    index: int
    left: str
    right: str
    left_dev: str
    right_dev: str
    left_addr: str
    right_addr: str


class Topology:
    """Hosts each in its own namespace, joined by one veth link per pair: in a line by
    default, or along the given `pairs` (a star, a tier: link i is `pairs[i]`)."""

    def __init__(self, *hosts: str, pairs: Sequence[tuple[str, str]] | None = None) -> None:
        if len(hosts) < 2 or len(set(hosts)) != len(hosts):
            raise ValueError(f"need at least two distinct host names, got {hosts}")
        if pairs is None:
            pairs = list(itertools.pairwise(hosts))
        if len(pairs) > 250:
            raise ValueError("one /24 per link: at most 250 links")
        unknown = {h for pair in pairs for h in pair} - set(hosts)
        if unknown:
            raise ValueError(f"links name unknown hosts {sorted(unknown)}")
        self.hosts = list(hosts)
        run_id = f"{PREFIX}{os.getpid()}-{next(_counter)}"
        self.ns = {h: f"{run_id}-{h}" for h in hosts}
        self.links = [
            Link(i, left, right, f"l{i}{right}"[:15], f"l{i}{left}"[:15],
                 f"198.18.{i}.1", f"198.18.{i}.2")
            for i, (left, right) in enumerate(pairs)
        ]
        self.processes: list[subprocess.Popen[bytes]] = []
        self._cut_rules: set[tuple[str, str]] = set()
        self.created = False

    # ------------------------------------------------------------------ life cycle

    def create(self) -> Topology:
        clean_stale()
        try:
            for host in self.hosts:
                run(["ip", "netns", "add", self.ns[host]])
                self.exec(host, "ip", "link", "set", "lo", "up")
                # No forwarding unless a test asks: the far end stays unreachable.
                self.exec(host, "sysctl", "-qw", "net.ipv4.ip_forward=0")
            self.created = True
            for link in self.links:
                left, right = self.ns[link.left], self.ns[link.right]
                run(["ip", "-n", left, "link", "add", link.left_dev, "type", "veth",
                     "peer", "name", link.right_dev, "netns", right])
                for host, dev, addr in ((link.left, link.left_dev, link.left_addr),
                                        (link.right, link.right_dev, link.right_addr)):
                    self.exec(host, "ip", "addr", "add", f"{addr}/24", "dev", dev)
                    self.exec(host, "ip", "link", "set", dev, "up")
        except BaseException:
            self.destroy()
            raise
        return self

    def destroy(self) -> None:
        """Stop every process we started, then delete the namespaces (veths go with them)."""
        for proc in self.processes:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
        deadline = time.monotonic() + 5
        for proc in self.processes:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        existing = set(_namespaces())
        for ns in self.ns.values():
            if ns in existing:
                _delete_namespace(ns)
        left = set(self.ns.values()) & set(_namespaces())
        if left:
            raise RuntimeError(f"namespaces could not be deleted: {sorted(left)}")

    # ------------------------------------------------------------------ addresses

    def link_between(self, a: str, b: str) -> Link:
        for link in self.links:
            if {link.left, link.right} == {a, b}:
                return link
        raise KeyError(f"no link between {a} and {b}")

    def addr(self, host: str, toward: str) -> str:
        """`host`'s address on its link to `toward`."""
        link = self.link_between(host, toward)
        return link.left_addr if link.left == host else link.right_addr

    def dev(self, host: str, toward: str) -> str:
        link = self.link_between(host, toward)
        return link.left_dev if link.left == host else link.right_dev

    # ------------------------------------------------------------------ running things

    def command(self, host: str, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns[host], *cmd]

    def exec(self, host: str, *cmd: str, timeout: float = COMMAND_TIMEOUT, check: bool = True,
             input: bytes | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command inside `host`'s namespace, with a deadline."""
        return run(self.command(host, *cmd), timeout=timeout, check=check, input=input)

    def python(self, host: str, code: str, *args: str, timeout: float = COMMAND_TIMEOUT,
               check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run `python -c code args...` inside `host`'s namespace."""
        return self.exec(host, sys.executable, "-c", code, *args, timeout=timeout, check=check)

    def spawn(self, host: str, *cmd: str, log: Path | None = None) -> subprocess.Popen[bytes]:
        """Start a long-running process in `host`'s namespace; `destroy()` stops it."""
        out = log.open("ab") if log is not None else subprocess.DEVNULL
        try:
            proc = subprocess.Popen(self.command(host, *cmd), stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=out)
        finally:
            if log is not None:
                out.close()  # type: ignore[union-attr]
        self.processes.append(proc)
        return proc

    def spawn_python(self, host: str, code: str, *args: str, log: Path | None = None,
                     ready_line: bool = True, timeout: float = 10.0) -> subprocess.Popen[bytes]:
        """Start `python -c code` in `host`'s namespace; wait for its first stdout line
        ("ready") when `ready_line`, so the caller knows it is listening."""
        proc = self.spawn(host, sys.executable, "-c", code, *args, log=log)
        if ready_line:
            line = read_line(proc, timeout)
            if not line:
                raise RuntimeError(f"server in {host} exited {proc.poll()} before it was ready")
        return proc

    def wait_listening(self, host: str, proto: str, port: int, timeout: float = 10.0) -> None:
        """Wait until something in `host` listens on `proto` ("tcp"/"udp") `port`."""
        flag = "-Hltn" if proto == "tcp" else "-Hlun"
        deadline = time.monotonic() + timeout
        while True:
            out = self.exec(host, "ss", flag, f"sport = :{port}").stdout
            if out.strip():
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {proto} port {port} in {host} after {timeout} s")
            time.sleep(0.05)

    def wait_receiving(self, host: str, port: int, count: int, at_least: int,
                       timeout: float = 30.0) -> None:
        """Wait until `count` TCP connections to `port` in `host` have each been seen
        having received `at_least` bytes (their data flows end to end). Seen over time:
        the first ones may have finished before the last one gets there."""
        deadline = time.monotonic() + timeout
        seen: set[tuple[str, str]] = set()
        while True:
            out = self.exec(host, "ss", "-Htin", "state", "connected", f"sport = :{port}").stdout
            connection = None
            for line in out.splitlines():
                if line and not line[0].isspace():
                    connection = tuple(line.split()[-2:])
                elif connection is not None:
                    m = re.search(r"bytes_received:(\d+)", line)
                    if m and int(m.group(1)) >= at_least:
                        seen.add(connection)  # type: ignore[arg-type]
            if len(seen) >= count:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{host}:{port}: {len(seen)} of {count} connections seen with"
                                   f" {at_least} B received after {timeout} s")
            time.sleep(0.05)

    # ------------------------------------------------------------------ forwarding, links

    def enable_forwarding(self, host: str) -> None:
        self.exec(host, "sysctl", "-qw", "net.ipv4.ip_forward=1")

    def add_route(self, host: str, destination: str, via: str) -> None:
        self.exec(host, "ip", "route", "add", destination, "via", via)

    def cut(self, a: str, b: str, how: str = "down") -> None:
        """Break the link between `a` and `b`: "down" sets both veth ends down;
        "nft" keeps the link up and silently drops everything on it (both ends)."""
        link = self.link_between(a, b)
        for host, dev in ((link.left, link.left_dev), (link.right, link.right_dev)):
            if how == "down":
                self.exec(host, "ip", "link", "set", dev, "down")
            elif how == "nft":
                rules = (f"table inet tgcut {{\n"
                         f"  chain in {{ type filter hook input priority 0; iifname \"{dev}\" drop; }}\n"
                         f"  chain out {{ type filter hook output priority 0; oifname \"{dev}\" drop; }}\n"
                         f"}}\n")
                self.exec(host, "nft", "-f", "-", input=rules.encode())
                self._cut_rules.add((host, dev))
            else:
                raise ValueError(f"how must be 'down' or 'nft', got {how!r}")

    def restore(self, a: str, b: str) -> None:
        link = self.link_between(a, b)
        for host, dev in ((link.left, link.left_dev), (link.right, link.right_dev)):
            if (host, dev) in self._cut_rules:
                self.exec(host, "nft", "delete", "table", "inet", "tgcut")
                self._cut_rules.discard((host, dev))
            self.exec(host, "ip", "link", "set", dev, "up")


def read_line(proc: subprocess.Popen[bytes], timeout: float) -> bytes:
    """One line of `proc`'s stdout within `timeout` (b"" if it closed it); raises on timeout."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no line from {proc.args} within {timeout} s")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 1)
            if not chunk:
                return line
            line += chunk
    return line


@contextlib.contextmanager
def topology(*hosts: str, pairs: Sequence[tuple[str, str]] | None = None) -> Iterator[Topology]:
    """A created topology, destroyed afterwards whatever happened; skips without root."""
    require_netns()
    topo = Topology(*hosts, pairs=pairs)
    topo.create()
    try:
        yield topo
    finally:
        topo.destroy()
