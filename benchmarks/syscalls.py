"""Count the system calls each relay process makes per session (strace -c), per contender.

    .venv/bin/python benchmarks/syscalls.py [--contenders ssh,tg-tls] [--sessions 2000]
                                            [--scenario sessions|latency]

Sequential sessions (or 64-byte ping-pongs) through each contender while `strace -c -f`
is attached to its relay processes; prints calls per session by syscall, so the data
path's syscall budget can be compared with ssh -L's. Needs strace and ptrace rights.
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lib import scenarios
from lib.contenders import all_contenders
from lib.procs import raise_nofile
from lib.targets import Targets

ROW = re.compile(r"^\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)$")


def parse(text: str) -> dict[str, int]:
    calls = {}
    for line in text.splitlines():
        m = ROW.match(line)
        if m and m.group(2) != "total":
            calls[m.group(2)] = int(m.group(1))
    return calls


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contenders", default="ssh,tg-tls,tg-tcp")
    p.add_argument("--sessions", type=int, default=2000)
    p.add_argument("--scenario", default="sessions", choices=["sessions", "latency"])
    args = p.parse_args()
    if not shutil.which("strace"):
        sys.exit("strace is missing: apt-get install -y strace")
    raise_nofile(65536)
    workdir = Path(tempfile.mkdtemp(prefix="tunnelgate-syscalls-"))
    targets = Targets(workdir)
    wanted = args.contenders.split(",")
    contenders = [c for c in all_contenders(workdir) if c.name in wanted]
    rows: dict[str, dict[str, dict[str, int]]] = {}
    try:
        targets.start()
        for c in contenders:
            c.start(targets.forwards)
            tracers = {}
            for pid in c.relay_pids():
                out = workdir / f"{c.name}-{pid}.strace"
                tracers[pid] = (subprocess.Popen(
                    ["strace", "-c", "-f", "-o", str(out), "-p", str(pid)],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), out)
            time.sleep(1.0)  # strace attaches asynchronously
            if args.scenario == "sessions":
                scenarios.sessions_sequential(c, args.sessions)
            else:
                scenarios.latency(c, args.sessions)
            for tracer, _ in tracers.values():
                tracer.send_signal(signal.SIGINT)
                tracer.wait(timeout=30)
            rows[c.name] = {str(pid): parse(out.read_text()) for pid, (_, out) in tracers.items()}
            c.stop()
    finally:
        for c in contenders:
            c.stop()
        targets.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    n = args.sessions
    for name, procs in rows.items():
        total: dict[str, int] = {}
        for calls in procs.values():
            for call, count in calls.items():
                total[call] = total.get(call, 0) + count
        print(f"\n== {name}: {sum(total.values()) / n:.1f} syscalls per {args.scenario[:-1]} "
              f"over {len(procs)} processes")
        for call, count in sorted(total.items(), key=lambda kv: -kv[1])[:14]:
            print(f"  {count / n:6.2f}  {call}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
