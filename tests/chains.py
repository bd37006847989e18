"""Gateway chains on a `Topology`: one gateway per host, one TLS carrier per link.

`chain_gateways` writes one config per host (gateway name = host name): a carrier on
every link, dialed by the left or the right host as asked; each peer entry routes on to
the neighbour on the other side (so sessions may cross the whole line either way)
unless a test overrides it; `allow` rules are given by the test. Also here: the target
servers and clients the chain tests run inside namespaces (real processes: a hashing
TCP server, dnsmasq, dig).
"""

from __future__ import annotations

import atexit
import json
import shutil
import subprocess
import tempfile
from contextlib import ExitStack
from pathlib import Path

from tests.gateways import GatewayProcess, keygen, running
from tests.netns import Topology, read_line

CARRIER_PORT = 7000
HASH_PORT = 9000
DNS_PORT = 5353
DNS_NAME = "example.test"
DNS_ANSWER = "198.18.99.99"
KEEPALIVE_INTERVAL = 1.0
KEEPALIVE_TIMEOUT = 3.0
TIMERS = (f"keepalive_interval = {KEEPALIVE_INTERVAL}\nkeepalive_timeout = {KEEPALIVE_TIMEOUT}\n"
          "reconnect_min = 0.2\nreconnect_max = 1.0\ndrain_timeout = 3.0\nhandshake_timeout = 5.0\n")

_keys_dir: Path | None = None


def copy_keys(folder: Path, names: list[str]) -> None:
    """NAME.key/NAME.crt in `folder`, made once per test process with the real CLI."""
    global _keys_dir
    if _keys_dir is None:
        _keys_dir = Path(tempfile.mkdtemp(prefix="tg-keys-"))
        atexit.register(shutil.rmtree, _keys_dir, True)
    for name in names:
        if not (_keys_dir / f"{name}.key").exists():
            keygen(_keys_dir, name)
        for suffix in (".key", ".crt"):
            shutil.copy2(_keys_dir / f"{name}{suffix}", folder / f"{name}{suffix}")


def chain_gateways(topo: Topology, folder: Path, *,
                   dialer: dict[int, str] | None = None,
                   allow: dict[tuple[str, str], list[str]] | None = None,
                   route: dict[tuple[str, str], list[str]] | None = None,
                   alias: dict[tuple[str, str], str] | None = None,
                   tunnels: dict[str, str] | None = None,
                   extra: dict[str, str] | None = None,
                   env: dict[str, dict[str, str]] | None = None,
                   known: dict[str, list[str]] | None = None) -> dict[str, GatewayProcess]:
    """One GatewayProcess per host of `topo`, in its namespace (not started).

    dialer[i]: "left" (default) or "right", which end of link i dials the carrier.
    allow[(gw, peer)] / route[(gw, peer)]: that peer entry's rules in gw's config
    (route defaults to the neighbour on the other side of gw). alias[(gw, neighbour)]:
    the name gw's config gives that neighbour (default: its gateway name).
    tunnels[gw] / extra[gw]: TOML appended to the file / to its [gateway] table.
    """
    dialer, allow, route, alias = dialer or {}, allow or {}, route or {}, alias or {}
    tunnels, extra, env, known = tunnels or {}, extra or {}, env or {}, known or {}
    hosts = topo.hosts
    copy_keys(folder, hosts)

    def name(gw: str, neighbour: str) -> str:
        return alias.get((gw, neighbour), neighbour)

    gateways = {}
    for i, gw in enumerate(hosts):
        neighbours = [h for h in (hosts[i - 1] if i > 0 else None,
                                  hosts[i + 1] if i + 1 < len(hosts) else None) if h]
        listen = []
        peers = []
        for nb in neighbours:
            link = topo.link_between(gw, nb)
            dialing_end = link.left if dialer.get(link.index, "left") == "left" else link.right
            lines = [f'name = "{name(gw, nb)}"', f'cert = "{nb}.crt"']
            if dialing_end == gw:
                lines.append(f'dial = "tls://{topo.addr(nb, gw)}:{CARRIER_PORT}"')
            else:
                listen.append(f"tls://{topo.addr(gw, nb)}:{CARRIER_PORT}")
            onward = [name(gw, other) for other in neighbours if other != nb]
            lines.append(f"allow = {json.dumps(allow.get((gw, nb), []))}")
            lines.append(f"route = {json.dumps(route.get((gw, nb), onward))}")
            peers.append("[[peer]]\n" + "\n".join(lines) + "\n")
        for far in known.get(gw, []):
            peers.append(f'[[peer]]\nname = "{far}"\ncert = "{far}.crt"\n')
        text = (f'[gateway]\nname = "{gw}"\nkey = "{gw}.key"\nlisten = {json.dumps(listen)}\n'
                f"{TIMERS}{extra.get(gw, '')}\n" + "\n".join(peers) + "\n" + tunnels.get(gw, ""))
        gateways[gw] = GatewayProcess(folder, gw, text, netns=topo.ns[gw], env=env.get(gw))
    return gateways


def start_chain(stack: ExitStack, topo: Topology, gateways: dict[str, GatewayProcess]) -> None:
    """Start every gateway (stopped when `stack` closes) and wait for every carrier to be
    up at both of its ends."""
    stack.enter_context(running(*gateways.values()))
    wait_chain_up(topo, gateways)


def wait_chain_up(topo: Topology, gateways: dict[str, GatewayProcess], count: int = 1,
                  timeout: float = 20.0) -> None:
    """Every link's carrier logged "up" at both ends at least `count` times."""
    for link in topo.links:
        for gw, peer in ((link.left, link.right), (link.right, link.left)):
            gateways[gw].wait_log(f"up (peer {peer_name_in(gateways[gw], peer)})", timeout, count)


def peer_name_in(gw: GatewayProcess, host: str) -> str:
    """The [[peer]] name under which gw's config knows the gateway of `host`."""
    text = gw.config_path.read_text()
    for block in text.split("[[peer]]")[1:]:
        if f'cert = "{host}.crt"' in block:
            return block.split('name = "', 1)[1].split('"', 1)[0]
    raise KeyError(f"{gw.name} has no peer entry for {host}")


def start_plain_and_e2e_chain(stack: ExitStack, topo: Topology, folder: Path, target: str,
                              ports: tuple[int, int], resume_timeout: float) -> dict[str, GatewayProcess]:
    """edge -> ... -> dc along `topo`'s hosts (the last link dialed by dc) with two TCP
    tunnels at edge to `target` in dc: end to end on 127.0.0.1:ports[0], plain on
    ports[1]; started and up."""
    hosts = topo.hosts
    first, last = hosts[0], hosts[-1]
    via = list(hosts[1:])
    tunnels = (tunnel("e2e", f"tcp://127.0.0.1:{ports[0]}", via, target, end_to_end=True)
               + tunnel("plain", f"tcp://127.0.0.1:{ports[1]}", via, target))
    timers = f"resume_timeout = {resume_timeout}\n"
    gateways = chain_gateways(topo, folder, dialer={len(hosts) - 2: "right"},
                              allow={(last, hosts[-2]): [f"tcp://{target}"]},
                              known={first: [last], last: [first]}, tunnels={first: tunnels},
                              extra=dict.fromkeys(hosts, timers))
    start_chain(stack, topo, gateways)
    return gateways


def tunnel(name: str, listen: str, via: list[str], target: str, *, end_to_end: bool = False) -> str:
    lines = [f'name = "{name}"', f'listen = "{listen}"', f"via = {json.dumps(via)}",
             f'target = "{target}"']
    if end_to_end:
        lines.append("end_to_end = true")
    return "[[tunnel]]\n" + "\n".join(lines) + "\n"


# --- targets and clients (run inside namespaces) ---------------------------------------------

HASH_SERVER = r"""
import hashlib, random, socket, sys, threading
addr, port, reply_size, log = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
reply = random.Random(7).randbytes(reply_size)
srv = socket.create_server((addr, port))
print("ready", flush=True)

def serve(conn):
    digest, count, outcome = hashlib.sha256(), 0, "eof"
    with conn:
        conn.settimeout(60)
        try:
            while True:
                data = conn.recv(1 << 20)
                if not data:
                    break
                digest.update(data)
                count += len(data)
            conn.sendall(f"{digest.hexdigest()} {count}\n".encode() + reply)
        except OSError as exc:
            outcome = repr(exc)
    with open(log, "a") as f:
        f.write(f"{digest.hexdigest()} {count} {outcome}\n")

while True:
    conn, _ = srv.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
"""

HASH_CLIENT = r"""
import hashlib, json, random, socket, sys, time
addr = sys.argv[1]
port, size, seed, reply_size = (int(a) for a in sys.argv[2:6])
data = random.Random(seed).randbytes(size)
expected_reply = random.Random(7).randbytes(reply_size)
out = {"sent_sha": hashlib.sha256(data).hexdigest(), "sent": size, "error": None}
got = b""
start = time.monotonic()
try:
    with socket.create_connection((addr, port), timeout=30) as conn:
        conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            chunk = conn.recv(1 << 20)
            if not chunk:
                break
            chunks.append(chunk)
        got = b"".join(chunks)
except OSError as exc:
    out["error"] = repr(exc)
out["seconds"] = time.monotonic() - start
line, _, rest = got.partition(b"\n")
out["line"] = line.decode(errors="replace")
out["rest_len"] = len(rest)
out["rest_is_prefix"] = expected_reply.startswith(rest)
out["rest_complete"] = rest == expected_reply
print(json.dumps(out))
"""

# Concurrent uploads (one per port given), each paced (argv[4] s per 256 KiB) so the whole
# run lasts a few seconds; says "started" when every session has sent a quarter, then
# prints each session's result.
UPLOADS = r"""
import hashlib, json, random, socket, sys, threading, time
ports = [int(p) for p in sys.argv[1].split(",")]
size, reply_size = int(sys.argv[2]), int(sys.argv[3])
pause = float(sys.argv[4]) if len(sys.argv) > 4 else 0.01  # after each 256 KiB
expected_reply = random.Random(7).randbytes(reply_size)
quarter = threading.Barrier(len(ports) + 1)
results = [None] * len(ports)

def session(i, port):
    data = random.Random(1000 + i).randbytes(size)
    out = {"port": port, "sent_sha": hashlib.sha256(data).hexdigest(), "error": None}
    told = False
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=25) as conn:
            view = memoryview(data)
            for pos in range(0, size, 256 * 1024):
                conn.sendall(view[pos:pos + 256 * 1024])
                if not told and pos >= size // 4:
                    told = True
                    quarter.wait(60)
                time.sleep(pause)
            conn.shutdown(socket.SHUT_WR)
            chunks = []
            while chunk := conn.recv(1 << 20):
                chunks.append(chunk)
        got = b"".join(chunks)
        line, _, rest = got.partition(b"\n")
        out["line"] = line.decode(errors="replace")
        out["reply_ok"] = rest == expected_reply
    except Exception as exc:
        out["error"] = repr(exc)
        if not told:
            quarter.abort()
    results[i] = out

threads = [threading.Thread(target=session, args=(i, p)) for i, p in enumerate(ports)]
for t in threads:
    t.start()
try:
    quarter.wait(60)
    print("started", flush=True)
except threading.BrokenBarrierError:
    print("broken", flush=True)
for t in threads:
    t.join()
print(json.dumps(results), flush=True)
"""



def uploads_completed(clients: subprocess.Popen[bytes], upload: int, sessions: int,
                      *gateways: GatewayProcess) -> None:
    """UPLOADS' results: every session sent and got back everything (sha256 both ways),
    and each gateway logged every session closed `ok`."""
    try:
        results = json.loads(read_line(clients, 120))
    finally:
        clients.kill()
    failed = [r for r in results if r["error"] or r["line"] != f"{r['sent_sha']} {upload}"
              or not r["reply_ok"]]
    assert not failed, failed
    for gw in gateways:
        gw.wait_log("session closed", count=sessions)
        closed = [ln for ln in gw.log().splitlines() if "session closed" in ln]
        assert all(ln.endswith(", ok") for ln in closed), [ln for ln in closed if "ok" not in ln]

DIRECT_CONNECT = r"""
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close()
    print("connected")
except OSError as exc:
    print(f"failed: {exc!r}")
"""


def start_hash_server(topo: Topology, host: str, addr: str, folder: Path,
                      reply_size: int = 0, port: int = HASH_PORT) -> Path:
    """A TCP server in `host` that answers "SHA256 COUNT\\n" + `reply_size` fixed bytes
    after the client's EOF; returns the file where it records what each connection got."""
    record = folder / f"hash-{host}-{port}.log"
    topo.spawn_python(host, HASH_SERVER, addr, str(port), str(reply_size), str(record),
                      log=folder / f"hash-{host}.err")
    return record


def hash_round_trip(topo: Topology, host: str, addr: str, port: int, size: int, seed: int = 1,
                    reply_size: int = 0, timeout: float = 90.0) -> dict[str, object]:
    """Run the hashing client in `host` against addr:port; its JSON result."""
    out = topo.python(host, HASH_CLIENT, addr, str(port), str(size), str(seed), str(reply_size),
                      timeout=timeout)
    result: dict[str, object] = json.loads(out.stdout)
    return result


UDP_HASH_SERVER = r"""
import hashlib, socket, sys
addr, port, log = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((addr, port))
print("ready", flush=True)
while True:
    data, peer = sock.recvfrom(65535)
    answer = f"{hashlib.sha256(data).hexdigest()} {len(data)}"
    with open(log, "a") as f:
        f.write(answer + "\n")
    sock.sendto(answer.encode(), peer)
"""

UDP_HASH_CLIENT = r"""
import hashlib, json, random, socket, sys, time
addr, port, wait = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
sizes = [int(n) for n in sys.argv[4].split(",")]
results = []
with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:  # one flow for all
    for i, size in enumerate(sizes):
        data = random.Random(100 + i).randbytes(size)
        sock.sendto(data, (addr, port))
        sock.settimeout(wait)
        try:
            reply = sock.recv(65535).decode()
        except (TimeoutError, OSError) as exc:
            reply = None
        results.append({"expected": f"{hashlib.sha256(data).hexdigest()} {size}", "reply": reply})
print(json.dumps(results))
"""


def start_udp_hash_server(topo: Topology, host: str, addr: str, port: int, folder: Path) -> Path:
    """A UDP server in `host` answering each datagram with "SHA256 LENGTH" of what it got;
    returns the file where it records every datagram's hash."""
    record = folder / f"udphash-{host}-{port}.log"
    topo.spawn_python(host, UDP_HASH_SERVER, addr, str(port), str(record),
                      log=folder / f"udphash-{host}.err")
    return record


def udp_hash_exchange(topo: Topology, host: str, addr: str, port: int, sizes: list[int],
                      wait: float = 3.0) -> list[dict[str, str | None]]:
    """From one client socket in `host`, send one datagram per size to addr:port and wait
    up to `wait` s for each answer; per datagram, the expected answer and the reply (or None)."""
    out = topo.python(host, UDP_HASH_CLIENT, addr, str(port), str(wait), ",".join(map(str, sizes)),
                      timeout=wait * len(sizes) + 15)
    results: list[dict[str, str | None]] = json.loads(out.stdout)
    return results


def direct_connect(topo: Topology, host: str, addr: str, port: int) -> str:
    return topo.python(host, DIRECT_CONNECT, addr, str(port)).stdout.strip()


def start_dnsmasq(topo: Topology, host: str, addr: str, folder: Path, port: int = DNS_PORT) -> None:
    topo.spawn(host, "dnsmasq", "--no-daemon", "--no-resolv", "--no-hosts", "--conf-file=/dev/null",
               f"--address=/{DNS_NAME}/{DNS_ANSWER}", f"--listen-address={addr}",
               f"--port={port}", "--bind-interfaces", "-u", "root",
               log=folder / f"dnsmasq-{host}.log")
    topo.wait_listening(host, "udp", port)


def dig(topo: Topology, host: str, server: str, port: int, name: str = DNS_NAME) -> str:
    """dig in `host` (one try, 3 s); the answer or dig's complaint."""
    out = topo.exec(host, "dig", f"@{server}", "-p", str(port), name, "+short", "+tries=1",
                    "+time=3", timeout=15, check=False)
    lines = (out.stdout.strip() or out.stderr.strip()).splitlines()
    return lines[-1] if lines else ""
