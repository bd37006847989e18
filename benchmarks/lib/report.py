"""Collecting samples, and reporting them: the table, results.json and the chart."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

BASELINE = "ssh"


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool
    digits: int = 0
    baseline: str = BASELINE  # UDP figures compare to socat: ssh -L carries no UDP


METRICS = [
    Metric("bulk1_mbps", "bulk TCP, 1 stream", "Mbit/s", True),
    Metric("bulk1_cpu_s_per_gb", "  CPU per GB, 1 stream", "s/GB", False, 2),
    Metric("bulk8_mbps", "bulk TCP, 8 streams", "Mbit/s", True),
    Metric("bulk8_cpu_s_per_gb", "  CPU per GB, 8 streams", "s/GB", False, 2),
    Metric("lat_median_us", "ping-pong 64 B, median", "us", False, 1),
    Metric("lat_p99_us", "ping-pong 64 B, p99", "us", False, 1),
    Metric("sess_seq_per_s", "sessions/s, sequential", "1/s", True),
    Metric("sess_conc50_per_s", "sessions/s, 50 concurrent", "1/s", True),
    Metric("udp_mbps", "UDP received (-l 1400), ratio to socat", "Mbit/s", True,
           baseline="socat"),
    Metric("udp_loss_pct", "  UDP loss (no ratio)", "%", False, 1, baseline=""),
    Metric("fair_mbps", "bulk beside a stalled circuit", "Mbit/s", True),
    Metric("fair_stalled_mib", "  buffered into stalled circuit", "MiB", False, 1),
]
MEMORY_ROLES = ("entry", "hub", "exit")


def memory_metrics(counts: tuple[int, ...]) -> list[Metric]:
    return [Metric(f"mem_{role}_{n}_b_per_circ", f"RSS/circuit, {role}, {n} idle", "B", False)
            for n in counts for role in MEMORY_ROLES]


@dataclass
class Results:
    contenders: list[str]
    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    # metric -> contender -> round -> value (rounds a contender ran in; for paired ratios)
    by_round: dict[str, dict[str, dict[int, float]]] = field(default_factory=dict)
    errors: dict[str, list[str]] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # contender -> why

    def add(self, contender: str, values: dict[str, float | None], rnd: int | None = None) -> None:
        for key, value in values.items():
            if value is not None:
                self.samples.setdefault(key, {}).setdefault(contender, []).append(value)
                if rnd is not None:
                    self.by_round.setdefault(key, {}).setdefault(contender, {})[rnd] = value

    def paired(self, key: str, contender: str, variant: str) -> list[float]:
        """contender ÷ variant, round by round (the rounds both ran in)."""
        mine = self.by_round.get(key, {}).get(contender, {})
        theirs = self.by_round.get(key, {}).get(variant, {})
        return [mine[r] / theirs[r] for r in sorted(mine) if theirs.get(r)]

    def error(self, contender: str, message: str) -> None:
        self.errors.setdefault(contender, []).append(message)

    def median(self, key: str, contender: str) -> float | None:
        values = self.samples.get(key, {}).get(contender)
        return statistics.median(values) if values else None

    def ratio(self, key: str, contender: str, baseline: str = BASELINE) -> float | None:
        if not baseline:
            return None
        value, base = self.median(key, contender), self.median(key, baseline)
        if value is None or not base:
            return None
        return value / base


def _cell(value: float | None, ratio: float | None, digits: int) -> str:
    if value is None:
        return "n/a"
    text = f"{value:,.{digits}f}"
    return f"{text} ({ratio:.2f}x)" if ratio is not None else text


def table(results: Results, metrics: list[Metric]) -> str:
    shown = [m for m in metrics if m.key in results.samples]
    names = results.contenders
    rows = [[f"{m.label} [{m.unit}]"] + [
        _cell(results.median(m.key, n), results.ratio(m.key, n, m.baseline), m.digits) for n in names
    ] for m in shown]
    return _grid(["metric (median; ratio to ssh -L unless noted)", *names], rows)


def _grid(header: list[str], rows: list[list[str]]) -> str:
    """Columns: the first left-aligned, the others right-aligned, a rule under the header."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def paired_table(results: Results, metrics: list[Metric], variant_of: dict[str, str]) -> str:
    """Each contender against its variant (it with one setting changed), as the median of
    the per-round ratios of runs made side by side, with their range."""
    pairs = [(ref, var) for var, ref in variant_of.items() if var in results.contenders
             and ref in results.contenders]
    rows = []
    for m in metrics:
        cells = []
        for ref, var in pairs:
            ratios = results.paired(m.key, ref, var)
            cells.append(f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"
                         if ratios else "")
        if any(cells):
            rows.append([f"{m.label.strip()} [{m.unit}]", *cells])
    if not rows:
        return ""
    return _grid(["paired, per round: median (range)", *(f"{ref} / {var}" for ref, var in pairs)], rows)


def to_json(results: Results, metrics: list[Metric], meta: dict,
            variant_of: dict[str, str] | None = None) -> dict:
    data: dict = {"meta": meta, "baseline": BASELINE, "contenders": {}, "metrics": {}, "paired": {}}
    for var, ref in (variant_of or {}).items():
        for m in metrics:
            ratios = results.paired(m.key, ref, var)
            if ratios:
                data["paired"].setdefault(f"{ref}/{var}", {})[m.key] = {
                    "median": statistics.median(ratios), "per_round": ratios}
    for name in results.contenders:
        data["contenders"][name] = {
            "status": "skipped" if name in results.skipped else "ran",
            "skipped_because": results.skipped.get(name),
            "errors": results.errors.get(name, []),
        }
    for m in metrics:
        if m.key not in results.samples:
            continue
        data["metrics"][m.key] = {
            "label": m.label.strip(), "unit": m.unit, "higher_is_better": m.higher_is_better,
            "ratio_to": m.baseline,
            "by_contender": {
                n: {"median": results.median(m.key, n), "ratio": results.ratio(m.key, n, m.baseline),
                    "samples": results.samples[m.key].get(n, [])}
                for n in results.contenders if n in results.samples[m.key]
            },
        }
    return data


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_chart(path: Path, results: Results, metrics: list[Metric], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [m for m in metrics if m.key in results.samples]
    if not shown:
        return
    cols = 3
    rows = (len(shown) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.2 * rows), squeeze=False)
    for ax, m in zip(axes.flat, shown, strict=False):
        names = [n for n in results.contenders if results.median(m.key, n) is not None]
        values = [results.median(m.key, n) for n in names]
        colors = ["tab:red" if n == BASELINE else
                  "tab:blue" if n.startswith("tg-") else "tab:gray" for n in names]
        ax.bar(names, values, color=colors)
        better = "higher" if m.higher_is_better else "lower"
        ax.set_title(f"{m.label.strip()} [{m.unit}] ({better} is better)", fontsize=9)
        ax.tick_params(axis="x", labelrotation=45, labelsize=8)
        ax.tick_params(axis="y", labelsize=8)
        if m.key.startswith("mem_"):
            ax.axhline(8192, color="tab:green", linestyle="--", linewidth=1)  # issue 5 target
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    fig.savefig(path, dpi=110)
    plt.close(fig)
