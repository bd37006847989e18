"""What the benchmark needs from the machine, and how to get what is missing.

Nothing is installed here: we only say what is missing and the command that installs it.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .contenders import REPO, gateway_python


@dataclass(frozen=True)
class Missing:
    what: str
    needed_by: str
    apt: str | None = None  # Debian package
    pip: str | None = None  # pip command


def _has_tool(*names: str) -> bool:
    return any(shutil.which(n) or Path(f"/usr/sbin/{n}").exists() for n in names)


TOOLS = {  # tool: (alternative names, Debian package)
    "iperf3": (("iperf3",), "iperf3"),
    "socat": (("socat",), "socat"),
    "stunnel": (("stunnel4", "stunnel"), "stunnel4"),
    "openssl": (("openssl",), "openssl"),
    "sshd": (("sshd",), "openssh-server"),
    "ssh": (("ssh",), "openssh-client"),
    "ssh-keygen": (("ssh-keygen",), "openssh-client"),
}
CONTENDER_TOOLS = {
    "socat": ["socat"],
    "stunnel": ["stunnel", "openssl"],
    "ssh": ["sshd", "ssh", "ssh-keygen"],
}
IPERF_SCENARIOS = {"bulk", "udp", "fairness"}


def _gateway_importable() -> bool:
    try:
        return subprocess.run([gateway_python(), "-c", "import gateway.cli"], cwd=REPO,
                              capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def check(contenders: list[str], scenarios: list[str], chart: bool) -> list[Missing]:
    missing: list[Missing] = []

    def tool(name: str, needed_by: str) -> None:
        names, package = TOOLS[name]
        if not _has_tool(*names):
            missing.append(Missing(name, needed_by, apt=package))

    if IPERF_SCENARIOS & set(scenarios):
        tool("iperf3", "scenarios " + ", ".join(sorted(IPERF_SCENARIOS & set(scenarios))))
    for name in contenders:
        for t in CONTENDER_TOOLS.get(name, []):
            tool(t, f"contender {name}")
    if any(n.startswith("tg-") for n in contenders) and not _gateway_importable():
        missing.append(Missing("the tunnelgate package (import gateway.cli)",
                               "tunnelgate contenders", pip=".venv/bin/pip install -e ."))
    if chart and importlib.util.find_spec("matplotlib") is None:
        missing.append(Missing("matplotlib", "the PNG chart",
                               pip=".venv/bin/pip install -e '.[bench]'"))
    return missing


def explain(missing: list[Missing]) -> str:
    lines = ["Missing prerequisites:"]
    lines += [f"  - {m.what} (needed by {m.needed_by})" for m in missing]
    apt = sorted({m.apt for m in missing if m.apt})
    pip = sorted({m.pip for m in missing if m.pip})
    lines.append("Install with:")
    if apt:
        lines.append(f"  apt-get install -y {' '.join(apt)}")
    lines += [f"  {p}" for p in pip]
    lines.append("or rerun with --skip-missing to leave out what needs them.")
    return "\n".join(lines)


def blocked(missing: list[Missing]) -> tuple[set[str], set[str], bool]:
    """(contenders, scenarios, chart?) that cannot run with these prerequisites missing."""
    contenders: set[str] = set()
    scenarios: set[str] = set()
    chart = False
    for m in missing:
        if m.needed_by.startswith("contender "):
            contenders.add(m.needed_by.removeprefix("contender "))
        elif m.needed_by == "tunnelgate contenders":
            contenders |= {"tg-tls", "tg-tcp", "tg-chain"}
        elif m.needed_by.startswith("scenarios "):
            scenarios |= IPERF_SCENARIOS
        elif m.what == "matplotlib":
            chart = True
    return contenders, scenarios, chart
