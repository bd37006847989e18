"""systemd's readiness protocol (sd_notify): one datagram per state change to
$NOTIFY_SOCKET, which is all it takes; no dependency. READY=1 once listening,
STOPPING=1 when the drain begins, WATCHDOG=1 every half $WATCHDOG_USEC when the unit
sets WatchdogSec. Without $NOTIFY_SOCKET (not under systemd) every call is a no-op."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

import trio

log = logging.getLogger("tunnelgate")


class Notifier:
    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        path = environ.get("NOTIFY_SOCKET", "")
        if path.startswith("@"):
            path = "\0" + path[1:]  # an abstract socket
        self.address = path
        usec = environ.get("WATCHDOG_USEC", "")
        pid = environ.get("WATCHDOG_PID", "")
        wanted = usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid()))
        self.watchdog_interval = int(usec) / 2e6 if wanted else 0.0

    def send(self, *states: str) -> None:
        if not self.address:
            return
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto("\n".join(states).encode(), self.address)
        except OSError as exc:  # systemd gone, or a wrong path: say it once per state
            log.warning("sd_notify %s to %r failed: %s", states[0], self.address, exc.strerror or exc)

    async def keep_watchdog(self) -> None:
        """WATCHDOG=1 at half the interval systemd asked for, for as long as the loop runs:
        a wedged event loop stops the pings and systemd restarts the gateway."""
        if not self.watchdog_interval:
            return
        while True:
            self.send("WATCHDOG=1")
            await trio.sleep(self.watchdog_interval)
