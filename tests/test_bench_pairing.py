"""benchmarks/bench.py's pairing: a variant (a contender with one setting changed) runs
beside what it varies, in alternating order, and the report gives their ratio round by
round, which is what issue 11's "resumption on / off" figures are read from."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench  # noqa: E402
from lib import report  # noqa: E402
from lib.contenders import VARIANT_OF  # noqa: E402


def _names(order: list[SimpleNamespace]) -> list[str]:
    return [c.name for c in order]


def test_a_variant_runs_beside_what_it_varies_first_and_second_in_turn() -> None:
    rotated = [SimpleNamespace(name=n) for n in
               ["tg-chain-noresume", "ssh", "tg-tls", "tg-chain", "tg-tls-noresume"]]
    even, odd = bench.side_by_side(rotated, 0), bench.side_by_side(rotated, 1)
    assert _names(even) == ["ssh", "tg-tls", "tg-tls-noresume", "tg-chain", "tg-chain-noresume"]
    assert _names(odd) == ["ssh", "tg-tls-noresume", "tg-tls", "tg-chain-noresume", "tg-chain"]
    alone = [SimpleNamespace(name=n) for n in ["tg-chain-noresume", "ssh"]]  # its reference not run
    assert _names(bench.side_by_side(alone, 0)) == ["tg-chain-noresume", "ssh"]
    assert set(VARIANT_OF.values()) == {"tg-tls", "tg-chain"}


def test_paired_ratios_use_only_rounds_both_ran_in() -> None:
    results = report.Results(["tg-chain", "tg-chain-noresume"])
    for rnd, (on, off) in enumerate([(90, 100), (50, 100), (99, 110)]):
        results.add("tg-chain", {"sess_conc50_per_s": on}, rnd)
        if rnd != 1:  # an error in round 1: no sample
            results.add("tg-chain-noresume", {"sess_conc50_per_s": off}, rnd)
    assert results.paired("sess_conc50_per_s", "tg-chain", "tg-chain-noresume") == [0.9, 0.9]
    text = report.paired_table(results, report.METRICS, {"tg-chain-noresume": "tg-chain"})
    assert "tg-chain / tg-chain-noresume" in text and "0.90 (0.90-0.90)" in text
    data = report.to_json(results, report.METRICS, {}, {"tg-chain-noresume": "tg-chain"})
    assert data["paired"]["tg-chain/tg-chain-noresume"]["sess_conc50_per_s"]["per_round"] == [0.9, 0.9]
