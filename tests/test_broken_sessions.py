"""A broken session never looks complete (issue 9, item 1): edge -> hub -> dc in network
namespaces, one plain and one end-to-end TCP session open mid-transfer, then the relay
between them dies (SIGKILL of hub, `ss -K` of the hub-dc carrier, or hub-dc blackholed
until the keepalive gives up) and does not come back. Both the client at edge and the
target at dc must see a reset, never a FIN, and dc's log line must carry the real byte
counts and the error, never "ok". With resumption (the default) that happens once
`resume_timeout` has passed without a route back, and the log says so; without it
(`resume_timeout = 0`), at once.
"""

from __future__ import annotations

import json
import re
import subprocess
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.chains import CARRIER_PORT, start_plain_and_e2e_chain
from tests.gateways import GatewayProcess, wait_until
from tests.netns import Topology, read_line, topology

pytestmark = [pytest.mark.netns]

ECHO_PORT = 9100
TCP_E2E, TCP_PLAIN = 8100, 8200
ECHOED = 1024 * 1024  # echoed in full before the break: every byte is known to have crossed

# Echoes every connection; records how each one ended: "eof N" (a FIN) or "reset N".
ECHO_SERVER = r"""
import socket, sys, threading
addr, port, log = sys.argv[1], int(sys.argv[2]), sys.argv[3]
srv = socket.create_server((addr, port))
print("ready", flush=True)

def serve(conn):
    count, outcome = 0, "eof"
    with conn:
        conn.settimeout(60)
        try:
            while True:
                data = conn.recv(1 << 20)
                if not data:
                    break
                count += len(data)
                conn.sendall(data)
        except ConnectionResetError:
            outcome = "reset"
        except OSError as exc:
            outcome = f"error {exc!r}"
    with open(log, "a") as f:
        f.write(f"{outcome} {count}\n")

while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

# Sends ECHOED bytes, reads them back, says so, then waits for how the session ends.
HOLDING_CLIENT = r"""
import json, socket, sys
port, size = int(sys.argv[1]), int(sys.argv[2])
conn = socket.create_connection(("127.0.0.1", port), timeout=30)
conn.sendall(b"x" * size)
got = 0
while got < size:
    chunk = conn.recv(1 << 20)
    if not chunk:
        break
    got += len(chunk)
print(json.dumps({"echoed": got}), flush=True)
try:
    outcome = "eof" if conn.recv(1) == b"" else "data"
except ConnectionResetError:
    outcome = "reset"
except OSError as exc:
    outcome = f"error {exc!r}"
print(json.dumps({"outcome": outcome}), flush=True)
"""


RESUME_TIMEOUT = 2.0


def _chain(stack: ExitStack, folder: Path, resume: bool = True
           ) -> tuple[Topology, dict[str, GatewayProcess], Path]:
    topo = stack.enter_context(topology("edge", "hub", "dc"))
    dc = topo.addr("dc", "hub")
    record = folder / "echo.log"
    topo.spawn_python("dc", ECHO_SERVER, dc, str(ECHO_PORT), str(record), log=folder / "echo.err")
    gateways = start_plain_and_e2e_chain(stack, topo, folder, f"{dc}:{ECHO_PORT}", (TCP_E2E, TCP_PLAIN),
                                         RESUME_TIMEOUT if resume else 0)
    return topo, gateways, record


def _hold_session(topo: Topology, port: int) -> subprocess.Popen[bytes]:
    client = topo.spawn_python("edge", HOLDING_CLIENT, str(port), str(ECHOED), ready_line=False)
    line = read_line(client, 30)
    assert json.loads(line) == {"echoed": ECHOED}, line
    return client


# (With resumption, an `ss -K` of a carrier is survived: the carrier comes back at once and
# the sessions resume; tests/test_resumption.py has that. Here the route stays down.)
@pytest.mark.parametrize(("how", "resume"), [("sigkill-hub", True), ("blackhole-hub-dc", True),
                                             ("sigkill-hub", False), ("ss-kill-carrier", False)])
def test_a_relay_dying_mid_session_resets_both_ends_plain_and_end_to_end(tmp_path: Path, how: str,
                                                                         resume: bool) -> None:
    with ExitStack() as stack:
        topo, gateways, record = _chain(stack, tmp_path, resume)
        clients = [_hold_session(topo, port) for port in (TCP_E2E, TCP_PLAIN)]
        if how == "sigkill-hub":
            gateways["hub"].kill()
        elif how == "ss-kill-carrier":
            # Reset the hub-dc carrier from dc's side: the edge-hub carrier stays up, so
            # the entry learns of the break only through the chain's RST.
            topo.exec("dc", "ss", "-K", "dst", topo.addr("hub", "dc"), "dport", "=", str(CARRIER_PORT))
        else:
            # Silently drop everything on hub-dc: the keepalive (1 s / 3 s) declares it dead.
            topo.cut("hub", "dc", how="nft")
        outcomes = [json.loads(read_line(c, 30))["outcome"] for c in clients]
        assert outcomes == ["reset", "reset"], outcomes
        wait_until(lambda: record.exists() and len(record.read_text().splitlines()) == 2, 20,
                   "the target to record both sessions' ends")
        assert record.read_text().splitlines() == [f"reset {ECHOED}"] * 2, record.read_text()
        dc = gateways["dc"]
        wait_until(lambda: dc.log().count("exit session closed") == 2, 20, "dc to log both sessions")
        closed = [ln for ln in dc.log().splitlines() if "exit session closed" in ln]
        for line in closed:
            assert re.search(rf": {ECHOED} B out, {ECHOED} B back, [0-9.]+ s, error: ", line), line
            assert ("not resumed within" in line) == resume, line
        assert any("end-to-end with edge" in ln for ln in closed), closed
