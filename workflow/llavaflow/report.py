"""The run's summary tables, from the evaluations' summary.json files."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd


def mmbench_table(summaries: list[str | Path]) -> pd.DataFrame:
    rows = []
    for path in summaries:
        s = json.loads(Path(path).read_text())
        row = {"dataset": s["dataset"], "rows": s["rows"], "policy": s["policy"], "template": s.get("template")}
        for mode in ("circular", "vanilla_0", "vanilla_all"):
            row[mode] = round(s[mode]["Overall"], 4) if mode in s else None
        row["unparsed"] = s["extraction"][s["policy"]]["unparsed"]
        row["note"] = s.get("note", "")
        rows.append(row)
    return pd.DataFrame(rows)


def write_mmbench_table(summaries: list[str | Path], out: str | Path) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    mmbench_table(summaries).to_csv(out, sep="\t", index=False)


def _polyline(xs, ys, x0, y0, w, h) -> tuple[str, float, float]:
    lo, hi = min(ys), max(ys)
    span = (hi - lo) or 1.0
    xmax = max(xs) or 1
    pts = " ".join(f"{x0 + w * x / xmax:.1f},{y0 + h - h * (y - lo) / span:.1f}" for x, y in zip(xs, ys))
    return pts, lo, hi


def training_curves_svg(metrics: dict[str, str | Path], out: str | Path) -> None:
    """Loss and lr per iteration of each stage, as one SVG picture (no plotting library needed)."""
    panels = []
    for stage, path in metrics.items():
        recs = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        its = [r["iter"] for r in recs]
        panels += [(f"{stage} loss", its, [r["loss"] for r in recs]), (f"{stage} lr", its, [r["lr"] for r in recs])]
    w, h, pad = 360, 200, 40
    width, height = 2 * (w + 2 * pad), (len(panels) // 2) * (h + 2 * pad)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
             f'<rect width="{width}" height="{height}" fill="white"/>']
    for i, (title, xs, ys) in enumerate(panels):
        x0, y0 = (i % 2) * (w + 2 * pad) + pad, (i // 2) * (h + 2 * pad) + pad
        pts, lo, hi = _polyline(xs, ys, x0, y0, w, h)
        parts += [f'<rect x="{x0}" y="{y0}" width="{w}" height="{h}" fill="none" stroke="#999"/>',
                  f'<polyline points="{pts}" fill="none" stroke="#1f77b4" stroke-width="1.2"/>',
                  f'<text x="{x0}" y="{y0 - 8}">{title}</text>',
                  f'<text x="{x0 + w + 4}" y="{y0 + 10}">{hi:.3g}</text>',
                  f'<text x="{x0 + w + 4}" y="{y0 + h}">{lo:.3g}</text>',
                  f'<text x="{x0 + w - 60}" y="{y0 + h + 16}">iter {max(xs)}</text>']
    parts.append("</svg>")
    Path(out).write_text("\n".join(parts))


def stage_runtimes(benchmarks: list[str | Path], out: str | Path) -> None:
    """Wall time and peak memory of every job, from Snakemake's benchmark TSVs."""
    rows = []
    for path in benchmarks:
        b = pd.read_csv(path, sep="\t")
        job = Path(path).relative_to(Path(path).parents[1] if Path(path).parent.name != "benchmarks" else Path(path).parent)
        rows.append({"job": str(job.with_suffix("")), "seconds": round(float(b["s"].iloc[0]), 1),
                     "max_rss_mb": b["max_rss"].iloc[0]})
    pd.DataFrame(rows).to_csv(out, sep="\t", index=False)
