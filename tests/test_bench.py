"""The CPU-cheap benchmark scripts run and measure what they claim (the GPU ones are smoke-run by hand)."""

import json
import sys

from conftest import ROOT, run


def test_padding_bench_shows_length_grouping_cutting_padding():
    proc = run([sys.executable, "padding.py", "--samples", "20000", "--world", "2"], cwd=ROOT / "bench")
    rows = {r["sampler"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert rows.keys() == {"shuffle", "length_grouped"}
    # Synthetic mix, micro-batch 8: a random batch pads ~26 % of its rows; xtuner's megabatch grouping ~1 %.
    assert 0.2 < rows["shuffle"]["padding_fraction"] < 0.3
    assert rows["length_grouped"]["padding_fraction"] < 0.03
