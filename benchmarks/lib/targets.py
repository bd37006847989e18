"""The servers every contender forwards to: iperf3, an echo server and a stalling server."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from .procs import HOST, ProcGroup, StartError, free_port, is_listening, wait_port, wait_until

ECHO_SERVER = Path(__file__).with_name("echo_server.py")


@dataclass(frozen=True)
class Forward:
    """One path a contender must provide: a local port relaying to ``target`` (TCP, +UDP)."""

    name: str
    target: int
    udp: bool = False


class Targets:
    """Starts and owns the target servers; hands out the forwards contenders must set up."""

    def __init__(self, logdir: Path) -> None:
        self.group = ProcGroup(logdir)
        self.iperf_port = free_port(udp_too=True)
        self.echo_port = free_port()
        self.stall_port = free_port()
        self._iperf = None

    @property
    def forwards(self) -> list[Forward]:
        return [
            Forward("iperf", self.iperf_port, udp=True),
            Forward("echo", self.echo_port),
            Forward("stall", self.stall_port),
        ]

    def start(self) -> None:
        echo = self.group.spawn(
            "targets-echo",
            [sys.executable, str(ECHO_SERVER), "--echo", str(self.echo_port),
             "--stall", str(self.stall_port)],
        )
        if not wait_port(self.echo_port, 10, [echo]):
            raise StartError(f"echo server did not start: {echo.describe_failure()}")
        self.start_iperf()

    def start_iperf(self) -> None:
        self._iperf = self.group.spawn(
            "targets-iperf3", ["iperf3", "-s", "-B", HOST, "-p", str(self.iperf_port)]
        )
        # Poll /proc rather than connect: a probe connection makes iperf3 log a bogus test.
        if not wait_until(lambda: is_listening(self.iperf_port), 10, [self._iperf]):
            raise StartError(f"iperf3 server did not start: {self._iperf.describe_failure()}")

    def restart_iperf(self) -> None:
        """iperf3 -s can wedge after a client dies mid-test; a fresh one costs little."""
        if self._iperf is not None:
            one = ProcGroup(self.group.logdir, [self._iperf])
            one.stop()
            self.group.procs.remove(self._iperf)
        self.start_iperf()

    def stop(self) -> None:
        self.group.stop()
