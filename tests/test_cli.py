"""The ``tunnelgate`` command as a user runs it: a real ``python -m gateway`` process."""

from __future__ import annotations

import logging
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.logs import setup_logging
from gateway.security.identity import fingerprint_of_file
from tests.gateways import keygen

ROOT = Path(__file__).resolve().parent.parent


def tunnelgate(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )


def test_keygen_writes_key_0600_and_prints_its_fingerprint(tmp_path: Path) -> None:
    done = tunnelgate("keygen", "hub", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE((tmp_path / "hub.key").stat().st_mode) == 0o600
    fingerprint = done.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"SHA256:[A-Za-z0-9+/]{43}", fingerprint)
    assert fingerprint == fingerprint_of_file(tmp_path / "hub.crt")

    shown = tunnelgate("fingerprint", "hub.key", cwd=tmp_path)
    assert (shown.returncode, shown.stdout) == (0, fingerprint + "\n")


def test_keygen_accepts_a_path_prefix_and_refuses_to_overwrite(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    assert tunnelgate("keygen", "keys/edge", cwd=tmp_path).returncode == 0
    key = (tmp_path / "keys" / "edge.key").read_bytes()
    again = tunnelgate("keygen", "keys/edge", cwd=tmp_path)
    assert again.returncode == 1
    assert "already exists, refusing to overwrite it" in again.stderr
    assert (tmp_path / "keys" / "edge.key").read_bytes() == key


def test_fingerprint_of_a_missing_file_fails_cleanly(tmp_path: Path) -> None:
    done = tunnelgate("fingerprint", "nope.crt", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr == "tunnelgate: nope.crt: no such file\n"


def test_check_reports_ok_with_counts(tmp_path: Path) -> None:
    tunnelgate("keygen", "hub", cwd=tmp_path)
    tunnelgate("keygen", "edge", cwd=tmp_path)
    (tmp_path / "hub.toml").write_text(
        '[gateway]\nname = "hub"\nkey = "hub.key"\n'
        '[[peer]]\nname = "edge"\ncert = "edge.crt"\n'
        '[[tunnel]]\nname = "web"\nlisten = "tcp://127.0.0.1:8080"\nvia = ["edge"]\n'
        'target = "intranet:80"\n'
    )
    done = tunnelgate("check", "hub.toml", cwd=tmp_path)
    assert (done.returncode, done.stdout) == (0, "hub.toml: ok (1 peers, 1 tunnels)\n")


def test_check_and_run_report_config_errors_with_exit_2(tmp_path: Path) -> None:
    (tmp_path / "bad.toml").write_text('[gateway]\nname = "hub"\n')
    for verb in ("check", "run"):
        done = tunnelgate(verb, "bad.toml", cwd=tmp_path)
        assert done.returncode == 2
        assert done.stderr == "bad.toml: gateway.key: required key is missing\n"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("listen = " + "[" * 1000, "big.toml: value nested too deeply\n"),
        (
            f'name = "{"a" * 5_000_000}"',
            "big.toml: gateway.name: expected a name of 1-63 letters, digits, '.', '_' or '-',"
            f" got '{'a' * 60}…' (5000000 characters)\n",
        ),
    ],
    ids=["nested", "huge"],
)
def test_check_reports_hostile_values_in_one_short_line(
    tmp_path: Path, value: str, expected: str
) -> None:
    (tmp_path / "big.toml").write_text(f'[gateway]\nkey = "hub.key"\n{value}\n')
    done = tunnelgate("check", "big.toml", cwd=tmp_path)
    assert (done.returncode, done.stderr) == (2, expected)
    assert len(done.stderr) < 300


def test_check_and_run_refuse_a_private_key_others_can_read(tmp_path: Path) -> None:
    tunnelgate("keygen", "hub", cwd=tmp_path)
    (tmp_path / "hub.key").chmod(0o644)
    (tmp_path / "hub.toml").write_text('[gateway]\nname = "hub"\nkey = "hub.key"\n')
    key = tmp_path / "hub.key"
    for verb in ("check", "run"):
        done = tunnelgate(verb, "hub.toml", cwd=tmp_path)
        assert (done.returncode, done.stderr) == (
            2,
            f"hub.toml: gateway.key: {key} is readable by group and others (mode 0644);"
            f" run chmod 600 {key}\n",
        )


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    done = tunnelgate("frobnicate", cwd=tmp_path)
    assert done.returncode == 2
    assert "usage: tunnelgate" in done.stderr


def test_log_lines_have_utc_millisecond_timestamps(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        setup_logging(0)
        logging.getLogger("gateway.test").info("hello %s", "world")
        logging.getLogger("gateway.test").debug("hidden")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    err = capsys.readouterr().err
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO gateway\.test: hello world\n", err
    )


def test_check_warns_where_a_relay_tier_config_would_lose_sessions(tmp_path: Path) -> None:
    """SPEC.md §15's topology rule, at `check` time: valid configs, each warning names
    the key and says what would be lost."""
    keygen(tmp_path, "edge")
    keygen(tmp_path, "hub")
    (tmp_path / "edge.toml").write_text(
        '[gateway]\nname = "edge"\nkey = "edge.key"\nresume_timeout = 0\n\n'
        '[[peer]]\nname = "hub"\ncert = "hub.crt"\n'
        'dial = ["tls://198.18.0.1:7443", "tls://198.18.0.2:7443"]\nconnections = 3\n\n'
        '[[tunnel]]\nname = "web"\nlisten = "tcp://127.0.0.1:8080"\nvia = ["hub"]\ntarget = "127.0.0.1:80"\n')
    out = subprocess.run([sys.executable, "-m", "gateway", "check", str(tmp_path / "edge.toml")],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    warnings = out.stderr.splitlines()
    assert len(warnings) == 3, warnings
    assert "peer[0].connections: 3 carriers, but `dial` lists 2 IP addresses" in warnings[0]
    assert "peer[0].connections: gateway.resume_timeout = 0 (resumption off)" in warnings[1]
    assert "tunnel[0].via: its exit is hub, a relay tier (connections = 3)" in warnings[2]
    assert out.stdout.strip().endswith("ok (1 peers, 1 tunnels)")
