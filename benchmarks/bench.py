"""tunnelgate benchmark: tunnelgate against ssh -L, stunnel, socat and direct loopback.

    .venv/bin/python benchmarks/bench.py [--quick] [--only SCENARIO[,...]]
                                         [--contenders NAME[,...]] [--out DIR]

Everything runs on 127.0.0.1. Scenarios run interleaved: each round visits every
contender (in a rotated order) before the next round, and the report gives the median
over rounds, so machine drift hits every contender alike. Ratios are to ssh -L from the
same run. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from lib import prereqs, report, scenarios
from lib.contenders import CONTENDER_NAMES, VARIANT_OF, Contender, all_contenders
from lib.procs import StartError, raise_nofile
from lib.scenarios import ScenarioError, Settings
from lib.targets import Targets

HERE = Path(__file__).resolve().parent
SCENARIO_NAMES = ["bulk", "latency", "sessions", "udp", "fairness", "memory"]


def say(text: str) -> None:
    print(text, flush=True)


@dataclass
class Scenario:
    name: str
    applies: Callable[[Contender], bool]
    run: Callable[[Contender], dict]


def make_scenarios(targets: Targets, s: Settings) -> dict[str, Scenario]:
    """The interleaved scenarios (memory runs separately, on fresh gateways)."""

    def bulk(c: Contender) -> dict:
        return {**scenarios.bulk(targets, c, 1, s.bulk_seconds),
                **scenarios.bulk(targets, c, 8, s.bulk_seconds)}

    def sessions(c: Contender) -> dict:
        return {**scenarios.sessions_sequential(c, s.seq_sessions),
                **scenarios.sessions_concurrent(c, s.conc_workers, s.conc_per_worker)}

    def every(c: Contender) -> bool:
        return True

    return {
        "bulk": Scenario("bulk", every, bulk),
        "latency": Scenario("latency", every, lambda c: scenarios.latency(c, s.pingpong_n)),
        "sessions": Scenario("sessions", every, sessions),
        "udp": Scenario("udp", lambda c: c.supports_udp,
                        lambda c: scenarios.udp(targets, c, s.udp_seconds, s.udp_bitrate)),
        "fairness": Scenario("fairness", lambda c: c.multiplexed,
                             lambda c: scenarios.fairness(targets, c, s.fair_seconds)),
    }


def brief(values: dict) -> str:
    return ", ".join(f"{k}={v:,.1f}" for k, v in values.items() if v is not None) or "-"


def start_contender(c: Contender, targets: Targets, results: report.Results) -> bool:
    try:
        c.start(targets.forwards)
        return True
    except StartError as exc:
        results.skipped[c.name] = str(exc)
        say(f"  SKIP {c.name}: {exc}")
        return False


def run_memory(contenders: list[Contender], targets: Targets, s: Settings,
               results: report.Results) -> None:
    """Fresh gateways, so the idle RSS is not inflated by earlier scenarios' buffers."""
    for c in contenders:
        if not c.is_tunnelgate or c.name in results.skipped:
            continue
        say(f"[memory] {c.name}: holding {', '.join(map(str, s.memory_counts))} idle circuits")
        if not start_contender(c, targets, results):
            continue
        try:
            values = scenarios.memory(c, s.memory_counts, say)
            results.add(c.name, values)
            say(f"    {brief(values)}")
        except (ScenarioError, OSError) as exc:
            results.error(c.name, f"memory: {exc}")
            say(f"    ERROR {exc}")
        finally:
            c.stop()


def run_rounds(contenders: list[Contender], chosen: list[Scenario], s: Settings,
               results: report.Results) -> None:
    live = [c for c in contenders if c.name not in results.skipped]
    for rnd in range(s.rounds):
        order = side_by_side(live[rnd % len(live):] + live[:rnd % len(live)] if live else [], rnd)
        for scen in chosen:
            for c in order:
                if c.name in results.skipped or not scen.applies(c):
                    continue
                run_one(c, scen, rnd, s, results)


def side_by_side(order: list[Contender], rnd: int) -> list[Contender]:
    """Each variant (VARIANT_OF) moved beside what it varies: after it in even rounds,
    before it in odd ones. Their ratio then compares runs seconds apart, in both orders,
    so drift on a busy machine (single rounds scatter by 10-15%) mostly cancels."""
    names = {c.name for c in order}
    out = [c for c in order if VARIANT_OF.get(c.name) not in names]
    for c in order:
        if VARIANT_OF.get(c.name) in names:
            at = next(i for i, o in enumerate(out) if o.name == VARIANT_OF[c.name])
            out.insert(at + (rnd % 2 == 0), c)
    return out


def run_one(c: Contender, scen: Scenario, rnd: int, s: Settings,
            results: report.Results) -> None:
    t0 = time.monotonic()
    try:
        values = scen.run(c)
        results.add(c.name, values, rnd)
        say(f"[round {rnd + 1}/{s.rounds}] {scen.name:<8} {c.name:<9} {brief(values)}"
            f"  ({time.monotonic() - t0:.1f} s)")
    except (ScenarioError, OSError, TimeoutError) as exc:
        results.error(c.name, f"round {rnd + 1} {scen.name}: {exc}")
        say(f"[round {rnd + 1}/{s.rounds}] {scen.name:<8} {c.name:<9} ERROR {exc}")
        dead = [p for p in c.group.procs if not p.alive()]
        if dead:
            results.skipped[c.name] = "died during the run: " + dead[0].describe_failure()
            say(f"  SKIP {c.name} from now on: a relay process died")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="short runs (1 s iperf3, 2 rounds, fewer sessions)")
    p.add_argument("--only", help=f"comma-separated scenarios: {','.join(SCENARIO_NAMES)}")
    p.add_argument("--contenders", help=f"comma-separated: {','.join(CONTENDER_NAMES)}")
    p.add_argument("--rounds", type=int, help="rounds of interleaved runs (median reported)")
    p.add_argument("--udp-bitrate", default="0",
                   help="iperf3 -b for the UDP scenario, e.g. 2G (default 0: unlimited)")
    p.add_argument("--out", type=Path, default=HERE / "results",
                   help="where results.json and results.png go (default benchmarks/results/)")
    p.add_argument("--skip-missing", action="store_true",
                   help="leave out contenders/scenarios whose prerequisites are missing")
    p.add_argument("--keep", action="store_true",
                   help="keep the temporary directory (configs, keys, logs)")
    return p.parse_args(argv)


def pick(value: str | None, known: list[str], what: str) -> list[str]:
    if not value:
        return list(known)
    chosen = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in chosen if v not in known]
    if unknown:
        sys.exit(f"unknown {what}: {', '.join(unknown)} (known: {', '.join(known)})")
    return chosen


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    settings = Settings.quick() if args.quick else Settings()
    if args.rounds:
        settings.rounds = max(1, args.rounds)
    settings.udp_bitrate = args.udp_bitrate
    wanted = pick(args.only, SCENARIO_NAMES, "scenario")
    names = pick(args.contenders, CONTENDER_NAMES, "contender")
    chart = True

    missing = prereqs.check(names, wanted, chart)
    if missing:
        say(prereqs.explain(missing))
        if not args.skip_missing:
            return 2
        no_contenders, no_scenarios, no_chart = prereqs.blocked(missing)
        names = [n for n in names if n not in no_contenders]
        wanted = [w for w in wanted if w not in no_scenarios]
        chart = not no_chart

    nofile = raise_nofile(65536)
    if "memory" in wanted and nofile < max(settings.memory_counts) + 1000:
        say(f"note: RLIMIT_NOFILE is {nofile}; the memory scenario may fail to open all circuits")
    workdir = Path(tempfile.mkdtemp(prefix="tunnelgate-bench-"))
    say(f"workdir (configs, keys, logs): {workdir}")
    results = report.Results(names)
    targets = Targets(workdir)
    contenders = [c for c in all_contenders(workdir) if c.name in names]
    started_at = datetime.datetime.now(datetime.UTC)
    try:
        targets.start()
        run_all(contenders, targets, settings, wanted, results)
    except StartError as exc:
        say(f"cannot set up the targets: {exc}")
        return 1
    finally:
        for c in contenders:
            c.stop()
        targets.stop()
    write_report(args, settings, results, started_at, chart)
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


def run_all(contenders: list[Contender], targets: Targets, settings: Settings,
            wanted: list[str], results: report.Results) -> None:
    if "memory" in wanted:
        run_memory(contenders, targets, settings, results)
    table = make_scenarios(targets, settings)
    chosen = [table[w] for w in wanted if w in table]
    if not chosen:
        return
    say("starting contenders")
    for c in contenders:
        if c.name not in results.skipped:
            start_contender(c, targets, results)
    run_rounds(contenders, chosen, settings, results)


def write_report(args: argparse.Namespace, settings: Settings, results: report.Results,
                 started_at: datetime.datetime, chart: bool) -> None:
    metrics = report.METRICS + report.memory_metrics(settings.memory_counts)
    say("")
    say(report.table(results, metrics))
    paired = report.paired_table(results, metrics, VARIANT_OF)
    if paired:
        say("")
        say(paired)
    for name, why in results.skipped.items():
        say(f"\nskipped {name}: {why}")
    for name, errors in results.errors.items():
        for e in errors:
            say(f"error {name}: {e}")
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "started": started_at.isoformat(timespec="seconds"),
        "host": platform.node(), "kernel": platform.release(), "python": platform.python_version(),
        "cpus": _cpu_count(), "settings": asdict(settings), "versions": tool_versions(),
    }
    path = args.out / "results.json"
    report.write_json(path, report.to_json(results, metrics, meta, VARIANT_OF))
    say(f"\nwrote {path}")
    if chart:
        png = args.out / "results.png"
        report.write_chart(png, results, metrics,
                           f"tunnelgate bench {meta['started']} (median of {settings.rounds})")
        say(f"wrote {png}")


def _cpu_count() -> int | None:
    import os

    return os.cpu_count()


def tool_versions() -> dict[str, str]:
    probes = {"iperf3": ["iperf3", "--version"], "socat": ["socat", "-V"],
              "stunnel": ["stunnel", "-version"], "ssh": ["ssh", "-V"],
              "openssl": ["openssl", "version"]}
    out = {}
    for name, argv in probes.items():
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            continue
        text = (done.stdout + done.stderr).strip().splitlines()
        line = next((t for t in text if "version" in t.lower() or name in t.lower()), "")
        out[name] = line.strip()[:120]
    return out


if __name__ == "__main__":
    sys.exit(main())
