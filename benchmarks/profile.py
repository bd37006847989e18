"""Profile the gateways of one tunnelgate setup while one scenario runs, with py-spy.

    .venv/bin/python benchmarks/profile.py [--contender tg-tls] [--scenario sessions]
                                           [--seconds 10] [--native] [--top 25]

Starts the targets and one tunnelgate contender (as bench.py does), attaches
`py-spy record` to every gateway process, repeats the scenario until the recording
ends, then prints, per gateway, the functions with the most samples on their own
(self) and in total (inclusive). The collapsed stacks stay in the output directory
for flame graphs (`flamegraph.pl` or speedscope). Needs py-spy (`pip install py-spy`)
and root or ptrace permission.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lib import scenarios
from lib.contenders import CONTENDER_NAMES, Tunnelgate, all_contenders
from lib.procs import raise_nofile
from lib.targets import Targets

SCENARIOS = {
    "sessions": lambda t, c: scenarios.sessions_sequential(c, 200),
    "sessions-concurrent": lambda t, c: scenarios.sessions_concurrent(c, 50, 10),
    "latency": lambda t, c: scenarios.latency(c, 2000),
    "bulk": lambda t, c: scenarios.bulk(t, c, 1, 2),
    "udp": lambda t, c: scenarios.udp(t, c, 2),
}


def summarize(stacks: Path, top: int) -> str:
    """Top functions by self and inclusive samples from py-spy's collapsed format."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in stacks.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack:
            continue
        count = int(count_text)
        frames = stack.split(";")
        samples += count
        own[frames[-1]] += count
        for frame in set(frames):
            total[frame] += count
    if not samples:
        return "  (no samples: was the process idle?)"
    rows = [f"  {samples} samples"]
    for title, counter in (("self", own), ("inclusive", total)):
        rows.append(f"  -- {title}")
        rows += [f"  {100 * n / samples:5.1f}%  {frame}" for frame, n in counter.most_common(top)]
    return "\n".join(rows)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contender", default="tg-tls",
                   choices=[n for n in CONTENDER_NAMES if n.startswith("tg-")])
    p.add_argument("--scenario", default="sessions", choices=sorted(SCENARIOS))
    p.add_argument("--seconds", type=int, default=10, help="recording length")
    p.add_argument("--native", action="store_true", help="include C frames (py-spy --native)")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args()
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(pyspy).exists():
        sys.exit("py-spy is missing: .venv/bin/pip install py-spy")
    raise_nofile(65536)
    workdir = Path(tempfile.mkdtemp(prefix="tunnelgate-profile-"))
    targets = Targets(workdir)
    contender = next(c for c in all_contenders(workdir) if c.name == args.contender)
    assert isinstance(contender, Tunnelgate)
    args.out.mkdir(parents=True, exist_ok=True)
    recorders: dict[str, tuple[subprocess.Popen[bytes], Path]] = {}
    try:
        targets.start()
        contender.start(targets.forwards)
        for role, proc in contender.gateways().items():
            out = args.out / f"profile-{args.contender}-{args.scenario}-{role}.txt"
            argv = [pyspy, "record", "--pid", str(proc.pid), "--duration", str(args.seconds),
                    "--rate", "500", "--format", "raw", "--output", str(out)]
            if args.native:
                argv.append("--native")
            recorders[role] = (subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                                stderr=subprocess.DEVNULL), out)
        stop = time.monotonic() + args.seconds + 1
        runs = 0
        while time.monotonic() < stop and runs < 10_000:
            SCENARIOS[args.scenario](targets, contender)
            runs += 1
        for proc, _ in recorders.values():
            proc.wait(timeout=args.seconds + 30)
    finally:
        contender.stop()
        targets.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"{args.scenario} on {args.contender}: {runs} runs while recording")
    for role, (_, out) in recorders.items():
        print(f"\n== {role} ({out})")
        print(summarize(out, args.top) if out.exists() else "  (py-spy wrote nothing)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
