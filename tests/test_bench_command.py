"""`tunnelgate bench` (issue 13): a real exit gateway serving its built-in services, the
bench run as a real process from the entry's config; what it prints, writes and refuses."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gateway.bench import PLOT_MISSING, bench_config
from gateway.cli import main
from gateway.config import load_config
from tests.gateways import pair_configs, running

BENCH_TIMEOUT = 90


def _bench(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", "bench", "entry.toml", *args],
                          cwd=folder, capture_output=True, text=True, timeout=BENCH_TIMEOUT)


def test_bench_reports_every_measure_with_json_and_plot(tmp_path: Path) -> None:
    exit_gw, _entry = pair_configs(tmp_path, allow='["service:*"]')  # entry.toml written, not started
    with running(exit_gw):
        done = _bench(tmp_path, "--via", "exit", "--duration", "1", "--udp-rate", "500",
                      "--json", "out.json", "--plot", "out.png")
        assert done.returncode == 0, done.stderr
        assert "Traceback" not in done.stderr
        for line in ("upload to service:discard", "download from service:chargen", "latency median",
                     "latency p99", "new sessions", "UDP loss at 500/s (512 B)"):
            assert line in done.stdout
        for unit in ("MB/s", "Mbit/s", " ms", "sessions/s", " %"):
            assert unit in done.stdout

        report = json.loads((tmp_path / "out.json").read_text())
        assert report["via"] == ["exit"] and report["duration"] == 1.0
        assert report["config"] == "entry.toml" and report["tunnelgate_version"]
        for way in ("upload", "download"):
            assert report[way]["bytes"] > 0 and report[way]["mb_per_s"] > 0
            assert report[way]["mbit_per_s"] == pytest.approx(report[way]["mb_per_s"] * 8)
            assert sum(report[way]["samples"]["bytes"]) == report[way]["bytes"]
        latency = report["latency"]
        assert 0 < latency["median_ms"] <= latency["p99_ms"] <= latency["max_ms"]
        assert len(latency["samples_ms"]) == latency["round_trips"] > 0
        assert report["sessions"]["per_s"] > 0 and report["sessions"]["count"] > 0
        udp = report["udp"]
        assert udp["sent"] > 0 and 0 <= udp["received"] <= udp["sent"]
        assert 0 <= udp["loss"] <= 1

        png = (tmp_path / "out.png").read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000

        for target in ("tcp service:echo", "tcp service:discard", "tcp service:chargen", "udp service:echo"):
            exit_gw.wait_log(f"exit session open: {target} for entry", timeout=5)


def test_bench_against_an_exit_without_services_says_why(tmp_path: Path) -> None:
    exit_gw, _entry = pair_configs(tmp_path, allow='["tcp://127.0.0.1:*"]')
    with running(exit_gw):
        done = _bench(tmp_path, "--via", "exit", "--duration", "1")
    assert done.returncode == 1
    assert done.stdout == ""
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert "FORBIDDEN_TARGET" in done.stderr and "service:*" in done.stderr
    exit_gw.wait_log("refused tcp service:echo for entry: FORBIDDEN_TARGET", timeout=5)


def test_bench_via_a_peer_not_dialed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pair_configs(tmp_path)
    config = str(tmp_path / "entry.toml")
    assert main(["bench", config, "--via", "nope"]) == 2
    err = capsys.readouterr().err
    assert err == (f"{config}: bench --via: nope is not dialed by this config (no [[peer]] dial;"
                   " dialed peers: exit)\n")
    assert main(["bench", config, "--via", "exit,entry"]) == 2
    assert "entry is this gateway itself" in capsys.readouterr().err


def test_plot_without_matplotlib_is_refused_before_anything_runs(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    assert main(["bench", str(tmp_path / "missing.toml"), "--via", "exit", "--plot", "x.png"]) == 2
    assert capsys.readouterr().err == f"tunnelgate: {PLOT_MISSING}\n"
    assert PLOT_MISSING == "--plot needs matplotlib: pip install 'tunnelgate[bench]'"


def test_bench_config_is_a_client_with_only_the_bench_tunnels(tmp_path: Path) -> None:
    pair_configs(tmp_path, allow='["service:*"]', tunnels_on_entry="""
[[tunnel]]
name = "web"
listen = "tcp://127.0.0.1:0"
via = ["exit"]
target = "127.0.0.1:80"
""")
    config = load_config(tmp_path / "entry.toml")
    assert config.peer[0].policy.rules  # computed before the copy: the copy must not keep it
    bench = bench_config(config, ["exit"], end_to_end=True)
    gw = bench.gateway
    assert (gw.listen, gw.admin, gw.max_circuits, gw.name) == ([], None, 0, "entry")
    assert [(p.allow, p.route, p.policy.rules) for p in bench.peer] == [([], [], ())]
    assert bench.peer[0].dial == config.peer[0].dial
    assert [(t.listen.kind, str(t.target), t.via, t.end_to_end) for t in bench.tunnel] == [
        ("tcp", "service:echo", ["exit"], True), ("tcp", "service:discard", ["exit"], True),
        ("tcp", "service:chargen", ["exit"], True), ("udp", "service:echo", ["exit"], True)]
    assert all(t.listen.host == "127.0.0.1" and t.listen.port == 0 for t in bench.tunnel)
