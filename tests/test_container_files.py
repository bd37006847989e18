"""deploy/docker/ (issue 12): the image's Dockerfile and the compose demo of the README's
three-host example, checked without a Docker engine. The compose file's keys are made
with the commands its header documents, each gateway's files are laid out as compose
mounts them in /etc/tunnelgate, `tunnelgate check` passes there, and the three gateways
(addresses swapped for loopback ones) carry a request edge -> hub -> dc -> web while the
image's own HEALTHCHECK command finds each of them healthy."""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.gateways import GatewayProcess, free_port, running, wait_until

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "deploy" / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
CONFIG_DIR = "/etc/tunnelgate"
CONFIG_FILE = f"{CONFIG_DIR}/gateway.toml"
GATEWAYS = ("edge", "hub", "dc")


# --- the Dockerfile ------------------------------------------------------------------------

def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order: comments dropped, continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue  # (comment lines inside a continuation are dropped too, as Docker does)
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        word, _, rest = pending.strip().partition(" ")
        out.append((word.upper(), rest.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continuation line"
    return out


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for word, rest in _instructions():
        if word == "FROM":
            stages.append([])
        assert stages, f"{word} before the first FROM"
        stages[-1].append((word, rest))
    return stages


def _only(stage: list[tuple[str, str]], word: str) -> str:
    found = [rest for w, rest in stage if w == word]
    assert len(found) == 1, f"expected one {word} in the final stage, found {found}"
    return found[0]


def _healthcheck_command() -> list[str]:
    check = _only(_stages()[-1], "HEALTHCHECK")
    assert " CMD " in f" {check} ", check
    command: list[str] = json.loads(check.split("CMD", 1)[1])  # exec form: no shell in the probe
    return command


def _healthcheck_address() -> str:
    """HOST:PORT of the admin endpoint the HEALTHCHECK asks for /healthz."""
    (url,) = [u for part in _healthcheck_command() for u in re.findall(r"http://[^'\"]+", part)]
    match = re.fullmatch(r"http://(127\.0\.0\.1:\d+)/healthz", url)
    assert match, url
    return match[1]


def _image_uid() -> int:
    user = _only(_stages()[-1], "USER")
    return int(user.split(":")[0])


def test_the_image_is_built_in_one_stage_and_run_from_another_as_a_non_root_user() -> None:
    build, final = _stages()
    assert build[0] == ("FROM", "python:3.11-slim AS build")
    assert final[0] == ("FROM", "python:3.11-slim")
    assert any(w == "RUN" and "pip wheel" in rest and rest.endswith(" .") for w, rest in build)
    # The runtime installs only what stage 1 built, and has no source or wheels left.
    (install,) = [rest for w, rest in final if w == "RUN"]
    assert "from=build" in install and "--no-index" in install and "tunnelgate" in install
    assert not [rest for w, rest in final if w in ("COPY", "ADD")]

    uid = _image_uid()
    assert uid != 0
    assert f"--uid {uid}" in install and f"--gid {uid}" in install
    # The config folder is created before USER: root's, so read-only to the gateway.
    words = [w for w, _ in final]
    assert words.index("WORKDIR") < words.index("USER") and _only(final, "WORKDIR") == CONFIG_DIR

    entrypoint, command = json.loads(_only(final, "ENTRYPOINT")), json.loads(_only(final, "CMD"))
    assert [*entrypoint, *command] == ["tunnelgate", "run", CONFIG_FILE]
    assert _only(final, "STOPSIGNAL") == "SIGTERM"
    assert _only(final, "EXPOSE") == "7443"
    assert _healthcheck_command()[0] == "python"


def test_every_file_the_dockerfile_copies_exists_and_is_in_the_build_context() -> None:
    sources = []
    for stage in _stages():
        for word, rest in stage:
            if word in ("COPY", "ADD"):
                args = [a for a in shlex.split(rest) if not a.startswith("--")]
                assert "--from" not in rest, "stage 2 takes stage 1's wheels through a bind mount"
                sources += args[:-1]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), f"the Dockerfile copies {source}, which is not in the repository"
    # pyproject.toml's readme is read at build time, so it must be copied too.
    assert "README.md" in sources and {"pyproject.toml", "codecs", "gateway"} <= set(sources)

    # The context is the repository root; the ignore file beside the Dockerfile lets in
    # only what is copied (never .venv, .git or the generated keys under deploy/docker/keys).
    patterns = [line.strip() for line in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert patterns[0] == "*"
    admitted = {p[1:] for p in patterns if p.startswith("!")}
    assert admitted == set(sources)


def test_the_kubernetes_tier_runs_the_same_image_as_the_same_user() -> None:
    deployment = yaml.safe_load((ROOT / "deploy" / "kubernetes" / "deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == _image_uid() == pod["securityContext"]["runAsGroup"]
    (container,) = pod["containers"]
    assert container["command"] == json.loads(_only(_stages()[-1], "ENTRYPOINT"))
    assert container["image"] == _compose()["x-gateway"]["image"]


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint is not installed")
def test_hadolint_finds_nothing() -> None:
    result = subprocess.run(["hadolint", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


# --- the compose file ------------------------------------------------------------------------

def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def _mounts(service: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """target path -> (configs or secrets, the top-level name)."""
    out = {}
    for kind in ("configs", "secrets"):
        for entry in service.get(kind, []):
            assert entry["target"] not in out, f"two mounts at {entry['target']}"
            out[entry["target"]] = (kind, entry["source"])
    return out


def _documented_commands() -> list[str]:
    """The shell commands in compose.yaml's header comment (indented under '#')."""
    header = COMPOSE.read_text().split("\nname:", 1)[0]
    return [line[1:].strip() for line in header.splitlines() if line.startswith("#   ")]


def _container_views(tmp_path: Path) -> dict[str, Path]:
    """Follow the header's key commands in a copy of deploy/docker, then lay each gateway's
    files out as compose mounts them: one folder per service standing for /etc/tunnelgate."""
    copy = tmp_path / "docker"
    shutil.copytree(DOCKER, copy, ignore=shutil.ignore_patterns("*.key", "*.crt"))
    keygen = [c for c in _documented_commands() if "tunnelgate keygen" in c]
    assert len(keygen) == 1, _documented_commands()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    subprocess.run(["bash", "-euc", keygen[0]], cwd=copy, env=env, check=True, capture_output=True,
                   timeout=60)

    compose = _compose()
    views = {}
    for name in GATEWAYS:
        view = tmp_path / name
        view.mkdir()
        for target, (kind, source) in _mounts(compose["services"][name]).items():
            assert os.path.dirname(target) == CONFIG_DIR, target
            file = copy / compose[kind][source]["file"]
            assert file.is_file(), f"{kind}.{source}: {file} was not made by the documented commands"
            shutil.copy(file, view / os.path.basename(target))  # (keeps the key's mode 0600)
        views[name] = view
    return views


def test_every_file_compose_mounts_is_in_the_repository_or_made_by_the_documented_keygen() -> None:
    compose = _compose()
    commands = _documented_commands()
    assert any("chown 10001:10001 keys/*.key" in c for c in commands) and _image_uid() == 10001
    assert "docker compose up -d --build" in commands
    generated = {f"./keys/{name}.{ext}" for name in GATEWAYS for ext in ("key", "crt")}
    for kind in ("configs", "secrets"):
        for name, definition in compose[kind].items():
            source = definition["file"]
            assert (DOCKER / source).is_file() or source in generated, f"{kind}.{name}: {source}"
            # Private keys are secrets, everything else is a config.
            assert (kind == "secrets") == source.endswith(".key"), f"{kind}.{name}: {source}"
    assert {d["file"] for k in ("configs", "secrets") for d in compose[k].values()} >= generated
    assert (DOCKER / "keys" / ".gitignore").read_text().splitlines()[-2:] == ["*", "!.gitignore"]


def test_the_compose_topology_is_the_three_host_example() -> None:
    compose = _compose()
    services = compose["services"]
    gateway = compose["x-gateway"]
    build = gateway["build"]
    assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
    assert set(services) == {*GATEWAYS, "web"}
    networks = {name: set(s["networks"]) for name, s in services.items()}
    assert set(compose["networks"]) == set().union(*networks.values())

    for name in GATEWAYS:
        service = services[name]
        for key, value in gateway.items():  # the shared settings, merged in by the YAML anchor
            assert service[key] == value, f"{name}.{key}"
        mounts = _mounts(service)
        assert mounts[CONFIG_FILE] == ("configs", f"{name}.toml")
        assert compose["configs"][f"{name}.toml"]["file"] == f"./config/{name}.toml"
        # Its own private key and nobody else's.
        assert [src for kind, src in mounts.values() if kind == "secrets"] == [f"{name}.key"]
        # depends_on waits for a healthy gateway: only gateways have the image's HEALTHCHECK.
        for other, condition in service.get("depends_on", {}).items():
            if condition["condition"] == "service_healthy":
                assert other in GATEWAYS

    # hub is the only way across: edge and dc share no network, and only dc reaches web.
    assert networks["hub"] & networks["edge"] and networks["hub"] & networks["dc"]
    assert not networks["edge"] & networks["dc"]
    assert networks["web"] & networks["dc"] and not networks["web"] & (networks["edge"] | networks["hub"])
    assert all(compose["networks"][n] and compose["networks"][n].get("internal") for n in networks["web"])
    assert services["edge"]["depends_on"]["hub"]["condition"] == "service_healthy"
    assert services["dc"]["depends_on"]["hub"]["condition"] == "service_healthy"


@pytest.mark.parametrize("name", GATEWAYS)
def test_each_gateway_config_passes_check_where_compose_mounts_it(tmp_path: Path, name: str) -> None:
    views = _container_views(tmp_path)
    result = subprocess.run([sys.executable, "-m", "gateway", "check", "gateway.toml"], cwd=views[name],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("gateway.toml: ok") and not result.stderr
    # Every file compose mounts for it is one its config uses: key and own cert, peer certs.
    text = (views[name] / "gateway.toml").read_text()
    used = {"gateway.toml", f"{name}.crt", *re.findall(r'^(?:key|cert) = "([^"]+)"', text, re.M)}
    assert {p.name for p in views[name].iterdir()} == used


def test_the_configs_match_the_compose_wiring() -> None:
    compose = _compose()
    services = compose["services"]
    networks = {name: set(s["networks"]) for name, s in services.items()}
    configs = {name: (DOCKER / "config" / f"{name}.toml").read_text() for name in GATEWAYS}

    # The HEALTHCHECK asks the admin endpoint every config sets.
    address = _healthcheck_address()
    for name, text in configs.items():
        assert re.search(rf'^admin = "{re.escape(address)}"', text, re.M), f"{name}.toml: admin"

    # hub listens where the spokes dial it, on a network each shares with it.
    (listen,) = re.findall(r'^listen = \["tls://0\.0\.0\.0:(\d+)"\]', configs["hub"], re.M)
    exposed = _only(_stages()[-1], "EXPOSE")
    assert listen == exposed
    for spoke in ("edge", "dc"):
        assert f'dial = "tls://hub:{listen}"' in configs[spoke]
        assert networks[spoke] & networks["hub"]

    # edge's tunnel is what compose publishes; its target is what dc allows and reaches.
    (tunnel_port,) = re.findall(r'^listen = "tcp://0\.0\.0\.0:(\d+)"', configs["edge"], re.M)
    assert services["edge"]["ports"] == [f"127.0.0.1:{tunnel_port}:{tunnel_port}"]
    (target,) = re.findall(r'^target = "([^"]+)"', configs["edge"], re.M)
    assert f'allow = ["tcp://{target}"]' in configs["dc"]
    assert target.split(":")[0] in services and target.endswith(":80")  # nginx's port

    # The drain (drain_timeout, 10 s unless set) ends before compose kills the container.
    assert "drain_timeout" not in "".join(configs.values())
    assert compose["x-gateway"]["stop_grace_period"] == "15s"


def _healthy(admin_port: int) -> bool:
    """The image's HEALTHCHECK command, run here against an admin endpoint on `admin_port`."""
    address = _healthcheck_address()
    command = [sys.executable if c == "python" else c.replace(address, f"127.0.0.1:{admin_port}")
               for c in _healthcheck_command()]
    assert sum(address in c for c in _healthcheck_command()) == 1
    return subprocess.run(command, capture_output=True, timeout=30).returncode == 0


class _Web(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"hello from web\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _swap(text: str, old: str, new: str) -> str:
    assert old in text, f"{old!r} is not in the config any more"
    return text.replace(old, new)


def test_the_compose_configs_carry_a_request_end_to_end_and_pass_the_healthcheck(tmp_path: Path) -> None:
    """The three configs as compose mounts them, with Docker's names and ports swapped for
    loopback ones (hub -> 127.0.0.1, web -> a local HTTP server): a request through edge's
    tunnel reaches web via hub and dc, end to end encrypted; the image's HEALTHCHECK command
    says each gateway is healthy once running, and fails where nothing answers."""
    views = _container_views(tmp_path)
    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Web)
    threading.Thread(target=web.serve_forever, daemon=True).start()
    carrier = free_port()
    admin = {name: free_port() for name in GATEWAYS}
    texts = {name: (views[name] / "gateway.toml").read_text() for name in GATEWAYS}
    probed = _healthcheck_address()
    for name in GATEWAYS:
        texts[name] = _swap(texts[name], f'admin = "{probed}"', f'admin = "127.0.0.1:{admin[name]}"')
    texts["hub"] = _swap(texts["hub"], "tls://0.0.0.0:7443", f"tls://127.0.0.1:{carrier}")
    for spoke in ("edge", "dc"):
        texts[spoke] = _swap(texts[spoke], "tls://hub:7443", f"tls://127.0.0.1:{carrier}")
    texts["edge"] = _swap(texts["edge"], "tcp://0.0.0.0:8080", "tcp://127.0.0.1:0")
    texts["edge"] = _swap(texts["edge"], '"web:80"', f'"127.0.0.1:{web.server_port}"')
    texts["dc"] = _swap(texts["dc"], "tcp://web:80", f"tcp://127.0.0.1:{web.server_port}")

    assert not _healthy(admin["hub"])  # nothing listens there yet: the probe fails
    gateways = [GatewayProcess(views[name], name, texts[name]) for name in ("hub", "dc", "edge")]
    try:
        with running(*gateways) as (_, dc, edge):
            for name in GATEWAYS:
                assert _healthy(admin[name]), f"{name} is not healthy"
            dc.wait_log("up (peer hub)")
            edge.wait_log("up (peer hub)")
            url = f"http://127.0.0.1:{edge.tunnel_port('web')}/"
            replies: list[bytes] = []

            def fetched() -> bool:
                try:
                    with urllib.request.urlopen(url, timeout=5) as reply:
                        replies.append(reply.read())
                        return True
                except OSError:
                    return False  # (until hub has both carriers: refused, then retried)

            wait_until(fetched, 20, "a reply through edge -> hub -> dc -> web", step=0.2)
            assert replies[-1] == b"hello from web\n"
            # dc, the exit, logs the session as end to end with edge: hub saw ciphertext only.
            dc.wait_log("for hub (end-to-end with edge)")
    finally:
        web.shutdown()
        web.server_close()


@functools.cache
def _compose_command() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True,
                                                 timeout=30).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


@pytest.mark.skipif(_compose_command() is None, reason="docker compose is not installed")
def test_docker_compose_accepts_the_file() -> None:
    """`docker compose config` parses and validates without an engine."""
    command = _compose_command()
    assert command is not None
    result = subprocess.run([*command, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
