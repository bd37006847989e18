"""The contenders: ways of getting from a local port to a target port on loopback.

Each contender, once started, maps every Forward to a local port, and names the relay
processes whose CPU time the bulk scenario charges to it. Contenders that multiplex
sessions over one carrier (ssh, tunnelgate) are the ones the fairness scenario tests.
"""

from __future__ import annotations

import getpass
import shutil
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

from .procs import (
    HOST,
    Proc,
    ProcGroup,
    StartError,
    echo_roundtrip,
    free_port,
    is_listening,
    wait_port,
    wait_until,
)
from .targets import Forward

READY_TIMEOUT = 10.0
REPO = Path(__file__).resolve().parents[2]


class Contender:
    name = "?"
    supports_udp = False
    multiplexed = False  # sessions share one carrier (fairness is meaningful)
    is_tunnelgate = False

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir / self.name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.group = ProcGroup(self.dir)
        self.ports: dict[str, int] = {}

    # -- lifecycle ------------------------------------------------------------------------

    def start(self, forwards: list[Forward]) -> None:
        """Start the relays; raise StartError with a readable reason if they do not come up."""
        self.ports = {}
        try:
            self._start(forwards)
            self._wait_ready(forwards)
        except BaseException:
            self.stop()
            raise

    def _start(self, forwards: list[Forward]) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        self.group.stop()

    def relay_pids(self) -> list[int]:
        return [p.pid for p in self.group.procs]

    def gateways(self) -> dict[str, Proc]:
        """Role -> gateway process, for the memory scenario (tunnelgate only)."""
        return {}

    # -- readiness ------------------------------------------------------------------------

    def _wait_ready(self, forwards: list[Forward]) -> None:
        procs = self.group.procs
        for fwd in forwards:
            port = self.ports[fwd.name]
            if not wait_until(lambda p=port: is_listening(p), READY_TIMEOUT, procs):
                raise StartError(f"port {port} ({fwd.name}) did not open within "
                                 f"{READY_TIMEOUT:.0f} s{self._why(procs)}")
            if fwd.udp and self.supports_udp and not wait_until(
                lambda p=port: is_listening(p, udp=True), READY_TIMEOUT, procs
            ):
                raise StartError(f"UDP port {port} ({fwd.name}) was not bound within "
                                 f"{READY_TIMEOUT:.0f} s{self._why(procs)}")
        echo = self.ports["echo"]
        if not wait_until(lambda: echo_roundtrip(echo), READY_TIMEOUT, procs):
            raise StartError(f"no echo through port {echo} within {READY_TIMEOUT:.0f} s"
                             f"{self._why(procs)}")

    @staticmethod
    def _why(procs: list[Proc]) -> str:
        dead = [p for p in procs if not p.alive()] or procs[-1:]
        return "".join(f"\n  {p.describe_failure()}" for p in dead)

    def _start_and_wait(self, name: str, argv: list[str], port: int | None) -> Proc:
        """Spawn one relay process and, if ``port`` is given, poll-connect until it listens."""
        proc = self.group.spawn(name, argv, cwd=self.dir)
        if port is not None and not wait_port(port, READY_TIMEOUT, [proc]):
            raise StartError(f"{name} did not listen on {port} within {READY_TIMEOUT:.0f} s"
                             f"\n  {proc.describe_failure()}")
        return proc


class Direct(Contender):
    """No relay at all: the ceiling."""

    name = "direct"
    supports_udp = True

    def _start(self, forwards: list[Forward]) -> None:
        self.ports = {f.name: f.target for f in forwards}

    def _wait_ready(self, forwards: list[Forward]) -> None:
        # The targets are ours and already up; iperf3 binds UDP only during a UDP test.
        if not echo_roundtrip(self.ports["echo"]):
            raise StartError("the echo server does not answer")


class Socat(Contender):
    """socat, forking a child per connection (and per UDP peer)."""

    name = "socat"
    supports_udp = True

    def _start(self, forwards: list[Forward]) -> None:
        for fwd in forwards:
            port = free_port(udp_too=fwd.udp)
            self.ports[fwd.name] = port
            self._start_and_wait(f"socat-{fwd.name}", [
                "socat", f"TCP-LISTEN:{port},bind={HOST},reuseaddr,fork,backlog=4096,nodelay",
                f"TCP:{HOST}:{fwd.target},nodelay",
            ], port)
            if fwd.udp:
                self.group.spawn(f"socat-{fwd.name}-udp", [
                    "socat", f"UDP-LISTEN:{port},bind={HOST},reuseaddr,fork",
                    f"UDP:{HOST}:{fwd.target}",
                ], cwd=self.dir)


class Stunnel(Contender):
    """An stunnel client and server pair speaking TLS 1.3; one TLS connection per session."""

    name = "stunnel"

    def _start(self, forwards: list[Forward]) -> None:
        cert, key = self.dir / "stunnel.crt", self.dir / "stunnel.key"
        _openssl_cert(cert, key)
        server, client = [_stunnel_globals()], [_stunnel_globals(), "client = yes"]
        for fwd in forwards:
            middle, port = free_port(), free_port()
            self.ports[fwd.name] = port
            server += [f"[{fwd.name}]", f"accept = {HOST}:{middle}",
                       f"connect = {HOST}:{fwd.target}", f"cert = {cert}", f"key = {key}",
                       "sslVersionMin = TLSv1.3"]
            client += [f"[{fwd.name}]", f"accept = {HOST}:{port}",
                       f"connect = {HOST}:{middle}", "sslVersionMin = TLSv1.3"]
        for role, lines in (("server", server), ("client", client)):
            conf = self.dir / f"{role}.conf"
            conf.write_text("\n".join(lines) + "\n")
            self.group.spawn(f"stunnel-{role}", [_stunnel_bin(), str(conf)], cwd=self.dir)


def _stunnel_bin() -> str:
    return shutil.which("stunnel4") or shutil.which("stunnel") or "stunnel"


def _stunnel_globals() -> str:
    return "\n".join([
        "foreground = yes", "pid =", "syslog = no", "debug = warning",
        "socket = l:TCP_NODELAY=1", "socket = r:TCP_NODELAY=1",
    ])


def _openssl_cert(cert: Path, key: Path) -> None:
    _run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
          "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
          "-keyout", str(key), "-out", str(cert)])


class Ssh(Contender):
    """OpenSSH ``ssh -L`` to a throwaway sshd: the baseline every ratio is taken against."""

    name = "ssh"
    multiplexed = True
    CIPHER = "aes128-gcm@openssh.com"

    def _start(self, forwards: list[Forward]) -> None:
        host_key, user_key = self.dir / "host_ed25519", self.dir / "user_ed25519"
        for path in (host_key, user_key):
            if not path.exists():
                _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)])
        authorized = self.dir / "authorized_keys"
        authorized.write_text(Path(f"{user_key}.pub").read_text())
        sshd_port = free_port()
        self._write_sshd_config(sshd_port, host_key, authorized)
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation dir
        sshd = shutil.which("sshd") or "/usr/sbin/sshd"
        self._start_and_wait("sshd", [sshd, "-D", "-e", "-f", str(self.dir / "sshd_config")],
                             sshd_port)
        argv = ["ssh", "-F", "/dev/null", "-N", "-T", "-i", str(user_key), "-p", str(sshd_port),
                "-c", self.CIPHER, "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
                "-o", "ExitOnForwardFailure=yes", "-o", "Compression=no",
                "-o", "LogLevel=ERROR"]
        for fwd in forwards:
            port = free_port()
            self.ports[fwd.name] = port
            argv += ["-L", f"{HOST}:{port}:{HOST}:{fwd.target}"]
        self.group.spawn("ssh", [*argv, f"{getpass.getuser()}@{HOST}"], cwd=self.dir)

    def _write_sshd_config(self, port: int, host_key: Path, authorized: Path) -> None:
        (self.dir / "sshd_config").write_text("\n".join([
            f"Port {port}", f"ListenAddress {HOST}", f"HostKey {host_key}", "PidFile none",
            "PermitRootLogin prohibit-password", f"AuthorizedKeysFile {authorized}",
            "PasswordAuthentication no", "KbdInteractiveAuthentication no", "UsePAM no",
            "StrictModes no", "AllowTcpForwarding yes", f"Ciphers {self.CIPHER}",
            "LogLevel ERROR", "MaxStartups 100", "MaxSessions 100",
        ]) + "\n")


class Tunnelgate(Contender):
    """tunnelgate gateways as real processes: entry -> [hub ->] exit."""

    supports_udp = True
    multiplexed = True
    is_tunnelgate = True

    def __init__(self, workdir: Path, name: str, carrier: str, chain: bool,
                 gateway_extra: tuple[str, ...] = (), scraped: bool = False, access: bool = False) -> None:
        self.name = name
        # Beside each TCP forward's fixed tunnel, a socks5:// and an http:// listener on
        # the same route (ports FORWARD-socks5, FORWARD-http): what naming the destination costs.
        self.access = access
        self.carrier = carrier
        self.chain = chain
        self.gateway_extra = gateway_extra  # more [gateway] keys for every gateway
        # Every gateway with an admin endpoint, and /metrics fetched from each every
        # second while the contender runs (a scrape interval far shorter than Prometheus').
        self.scraped = scraped
        self._admin_ports: list[int] = []
        self._scraping = threading.Event()
        super().__init__(workdir)
        self._gateways: dict[str, Proc] = {}

    def stop(self) -> None:
        self._scraping.set()
        super().stop()

    def _scrape(self) -> None:
        while not self._scraping.wait(1.0):
            for port in self._admin_ports:
                try:
                    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as answer:
                        answer.read()
                except OSError:
                    pass  # a gateway restarting between scenarios

    def gateways(self) -> dict[str, Proc]:
        return dict(self._gateways)

    def _start(self, forwards: list[Forward]) -> None:
        roles = ["entry", "hub", "exit"] if self.chain else ["entry", "exit"]
        for role in roles:
            if not (self.dir / f"{role}.key").exists():
                _run([gateway_python(), "-m", "gateway", "keygen", str(self.dir / role)])
        carrier_ports = {role: free_port() for role in roles[1:]}
        self._admin_ports = [free_port() for _ in roles] if self.scraped else []
        configs = self._configs(roles, carrier_ports, forwards)
        self._gateways = {}
        for role in reversed(roles):  # listeners first: exit, then hub, then entry
            path = self.dir / f"{role}.toml"
            path.write_text(configs[role])
            self._gateways[role] = self._start_and_wait(
                f"gw-{role}", [gateway_python(), "-m", "gateway", "run", *quiet_flag(), str(path)],
                carrier_ports.get(role),
            )
        if self.scraped:
            self._scraping = threading.Event()
            threading.Thread(target=self._scrape, daemon=True).start()

    def _configs(self, roles: list[str], carrier: dict[str, int],
                 forwards: list[Forward]) -> dict[str, str]:
        def url(role: str) -> str:
            return f"{self.carrier}://{HOST}:{carrier[role]}"

        allow = 'allow = ["tcp://127.0.0.1:*", "udp://127.0.0.1:*"]'
        out = {}
        for i, role in enumerate(roles):
            lines = ["[gateway]", f'name = "{role}"', f'key = "{self.dir / role}.key"', *self.gateway_extra]
            if self._admin_ports:
                lines.append(f'admin = "{HOST}:{self._admin_ports[i]}"')
            if role in carrier:
                lines.append(f'listen = ["{url(role)}"]')
            if i > 0:  # the previous hop dials us
                prev = roles[i - 1]
                lines += ["", "[[peer]]", f'name = "{prev}"', f'cert = "{self.dir / prev}.crt"']
                lines.append(allow if role == "exit" else f'route = {_toml_list(roles[i + 1:])}')
            if i < len(roles) - 1:  # we dial the next hop
                nxt = roles[i + 1]
                lines += ["", "[[peer]]", f'name = "{nxt}"', f'cert = "{self.dir / nxt}.crt"',
                          f'dial = "{url(nxt)}"']
            if role == "entry":
                lines += self._tunnels(roles[1:], forwards)
            out[role] = "\n".join(lines) + "\n"
        return out

    def _tunnels(self, via: list[str], forwards: list[Forward]) -> list[str]:
        lines = []
        for fwd in forwards:
            port = free_port(udp_too=fwd.udp)
            self.ports[fwd.name] = port
            kinds = ["tcp", "udp"] if fwd.udp else ["tcp"]
            for kind in kinds:
                name = fwd.name if kind == "tcp" else f"{fwd.name}-udp"
                lines += ["", "[[tunnel]]", f'name = "{name}"',
                          f'listen = "{kind}://{HOST}:{port}"', f"via = {_toml_list(via)}",
                          f'target = "{HOST}:{fwd.target}"']
            for scheme in ("socks5", "http") if self.access else ():
                self.ports[f"{fwd.name}-{scheme}"] = access_port = free_port()
                lines += ["", "[[tunnel]]", f'name = "{fwd.name}-{scheme}"',
                          f'listen = "{scheme}://{HOST}:{access_port}"', f"via = {_toml_list(via)}"]
        return lines


def _toml_list(items: list[str]) -> str:
    return "[" + ", ".join(f'"{x}"' for x in items) + "]"


def gateway_python() -> str:
    venv = REPO / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


_QUIET: list[str] | None = None


def quiet_flag() -> list[str]:
    """``-q`` if this gateway's ``run`` has it: per-session info logs would skew CPU figures."""
    global _QUIET
    if _QUIET is None:
        try:
            helptext = subprocess.run(
                [gateway_python(), "-m", "gateway", "run", "--help"], capture_output=True,
                text=True, timeout=20, cwd=REPO,
            ).stdout
        except (OSError, subprocess.TimeoutExpired):
            helptext = ""
        _QUIET = ["-q"] if "--quiet" in helptext else []
    return _QUIET


def _run(argv: list[str]) -> None:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise StartError(f"{' '.join(argv)} failed: {exc}") from exc
    if done.returncode != 0:
        raise StartError(f"{' '.join(argv)} exited {done.returncode}: "
                         f"{(done.stderr or done.stdout).strip()[-800:]}")


def all_contenders(workdir: Path) -> list[Contender]:
    return [
        Direct(workdir), Socat(workdir), Stunnel(workdir), Ssh(workdir),
        Tunnelgate(workdir, "tg-tls", "tls", chain=False),
        Tunnelgate(workdir, "tg-tcp", "tcp", chain=False),
        Tunnelgate(workdir, "tg-chain", "tls", chain=True),
        # The same without session resumption (issue 11: what resumption costs).
        Tunnelgate(workdir, "tg-tls-noresume", "tls", chain=False, gateway_extra=("resume_timeout = 0",)),
        Tunnelgate(workdir, "tg-chain-noresume", "tls", chain=True, gateway_extra=("resume_timeout = 0",)),
        Tunnelgate(workdir, "tg-tls-admin", "tls", chain=False, scraped=True),
        # WebSocket carriers (issue 14): the same TLS inside a WebSocket, without and with outer TLS.
        Tunnelgate(workdir, "tg-ws", "ws", chain=False),
        Tunnelgate(workdir, "tg-wss", "wss", chain=False),
    ]


# A contender that is another with one setting changed, and that other: they run side
# by side in every round, and the report gives their ratio round by round (report.paired).
VARIANT_OF = {"tg-tls-noresume": "tg-tls", "tg-chain-noresume": "tg-chain"}

CONTENDER_NAMES = ["direct", "socat", "stunnel", "ssh", "tg-tls", "tg-tcp", "tg-chain", "tg-tls-noresume",
                   "tg-chain-noresume", "tg-tls-admin", "tg-ws", "tg-wss"]
