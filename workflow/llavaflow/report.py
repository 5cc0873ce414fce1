"""The run's summary: MMBench tables, training curves, per-category scores and stage runtimes.

One function, `render_report`, writes every table and figure; the Snakemake `report` rule calls it with
the files it declares, and `llavaflow report RESULTS_DIR` with the files it finds in a finished results
folder, so both show the same summary. Figures are drawn with matplotlib's object API (no pyplot state,
no display needed).
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

import pandas as pd

# metrics.jsonl key -> axis label with units. Memory is recorded on GPU only.
TRAINING_METRICS = (
    ("loss", "loss (token cross-entropy, nats)"),
    ("lr", "learning rate"),
    ("grad_norm", "grad norm (global L2)"),
    ("tokens_per_s", "throughput (tokens/s)"),
    ("model_tflops_per_s", "model TFLOP/s"),
    ("max_memory_gib", "peak GPU memory (GiB)"),
)
MODES = ("circular", "vanilla_0", "vanilla_all")
# Jobs in DAG order, for tables and figures (others follow, by name).
JOB_ORDER = ("build_tiny_assets", "download", "check_data", "pretrain", "finetune", "pth_to_hf", "phi_to_llama",
             "export_hf", "export_llava", "mmbench_eval", "report")
FIGURES = {"training": "training_curves.png", "mmbench": "mmbench_categories.png", "runtimes": "stage_runtimes.png"}
TABLES = {"mmbench": "mmbench_summary.tsv", "runtimes": "stage_runtimes.tsv"}


class ReportError(ValueError):
    pass


def read_summary(path: str | Path) -> dict:
    try:
        summary = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ReportError(f"{path}: not a readable evaluation summary ({e}); rerun that evaluation") from None
    missing = [k for k in ("dataset", "rows", "policy", "extraction") if not isinstance(summary, dict) or k not in summary]
    if missing:
        raise ReportError(f"{path}: not an evaluation summary of llavaflow mmbench (no {', '.join(missing)})")
    return summary


def mmbench_table(summaries: list[str | Path]) -> pd.DataFrame:
    rows = []
    for path in summaries:
        s = read_summary(path)
        row = {"dataset": s["dataset"], "rows": s["rows"], "policy": s["policy"], "template": s.get("template")}
        for mode in MODES:
            row[mode] = round(s[mode]["Overall"], 4) if mode in s else None
        row["unparsed"] = s["extraction"][s["policy"]]["unparsed"]
        row["note"] = s.get("note", "")
        rows.append(row)
    return pd.DataFrame(rows)


def read_metrics(path: str | Path) -> pd.DataFrame:
    lines = [(n, line) for n, line in enumerate(Path(path).read_text().splitlines(), 1) if line.strip()]
    if not lines:
        raise ReportError(f"{path}: no training records")
    records = []
    for n, line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ReportError(f"{path}:{n}: not a JSON training record ({e})") from None
    return pd.DataFrame(records)


def _job_name(path: Path) -> str:
    """A benchmark file's job: its path below the `benchmarks` folder, without the suffix."""
    parts = path.with_suffix("").parts
    below = len(parts) - 1 - parts[::-1].index("benchmarks") if "benchmarks" in parts else len(parts) - 1
    return "/".join(parts[below + 1:]) if "benchmarks" in parts else path.stem


def runtime_table(benchmarks: list[str | Path]) -> pd.DataFrame:
    """Wall time, CPU time and peak memory of every job, from Snakemake's benchmark TSVs."""
    rows = []
    for path in benchmarks:
        b = pd.read_csv(path, sep="\t")
        if "s" not in b.columns or "max_rss" not in b.columns or b.empty:
            raise ReportError(f"{path}: not a Snakemake benchmark file (no 's' and 'max_rss' columns)")
        rows.append({"job": _job_name(Path(path)), "seconds": round(float(b["s"].iloc[0]), 1),
                     "cpu_seconds": round(float(b["cpu_time"].iloc[0]), 1) if "cpu_time" in b else None,
                     "max_rss_mb": b["max_rss"].iloc[0]})
    return pd.DataFrame(rows).sort_values("job", key=lambda jobs: jobs.map(_job_rank), kind="stable",
                                          ignore_index=True)


def _job_rank(job: str) -> tuple[int, str]:
    rule = job.split("/")[0]
    return (JOB_ORDER.index(rule) if rule in JOB_ORDER else len(JOB_ORDER), job)


def _smooth(values: pd.Series) -> pd.Series:
    return values.rolling(max(1, len(values) // 40), min_periods=1, center=True).mean()


def training_figure(metrics: dict[str, str | Path], out: str | Path):
    """One column per stage, one row per metric, against the training iteration; returns the figure."""
    from matplotlib.figure import Figure

    frames = {stage: read_metrics(path) for stage, path in metrics.items()}
    fig = Figure(figsize=(5.2 * len(frames), 2.4 * len(TRAINING_METRICS)), layout="constrained")
    axes = fig.subplots(len(TRAINING_METRICS), len(frames), squeeze=False)
    for col, (stage, df) in enumerate(frames.items()):
        for row, (key, label) in enumerate(TRAINING_METRICS):
            ax = axes[row][col]
            ax.set_xlabel("iteration")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
            series = df[["iter", key]].dropna() if key in df else pd.DataFrame()
            if series.empty:
                ax.text(0.5, 0.5, "not recorded\n(GPU runs only)" if key == "max_memory_gib" else "not recorded",
                        ha="center", va="center", transform=ax.transAxes, color="0.4")
                ax.set_xticks([])
                ax.set_yticks([])
                continue
            if key in ("loss", "grad_norm"):
                ax.plot(series["iter"], series[key], color="tab:blue", alpha=0.3, lw=0.8, label="per logged row")
                ax.plot(series["iter"], _smooth(series[key]), color="tab:blue", lw=1.6, label="moving mean")
                ax.legend(fontsize=7, loc="upper right")
                if key == "loss" and series[key].min() > 0 and series[key].max() / series[key].min() > 20:
                    ax.set_yscale("log")
            else:
                ax.plot(series["iter"], series[key], color="tab:orange" if key == "lr" else "tab:green", lw=1.4)
            if key == "lr":
                ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        # a row per log_interval (the interval's mean) and per checkpoint: the last row's iter is the count
        axes[0][col].set_title(f"{stage} ({int(df['iter'].max())} iterations)")
    fig.savefig(out, dpi=90)
    return fig


def _categories(block: dict) -> dict[str, float]:
    """The L3 categories of a score block (its keys besides split, Overall and the L2 abbreviations)."""
    from .eval.score import L2_ABBREVIATIONS

    skip = {"split", "Overall", *L2_ABBREVIATIONS.values()}
    return {k: v for k, v in block.items() if k not in skip}


def mmbench_figure(summaries: list[str | Path], out: str | Path) -> None:
    """Per-category circular and vanilla accuracy of each scorable dataset, with the Overall line."""
    from matplotlib.figure import Figure

    scored = [s for s in map(read_summary, summaries) if "circular" in s]
    fig = Figure(figsize=(11, 0.5 + 2.8 * max(1, len(scored))), layout="constrained")
    if not scored:
        ax = fig.subplots()
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no scorable dataset (TEST splits have no answers)", ha="center", va="center")
        fig.savefig(out, dpi=90)
        return
    axes = fig.subplots(len(scored), 1, squeeze=False)[:, 0]
    for ax, s in zip(axes, scored):
        cats = sorted(_categories(s["circular"]))
        width = 0.8 / len(MODES)
        for i, (mode, colour) in enumerate(zip(MODES, ("tab:blue", "tab:orange", "tab:gray"))):
            values = [_categories(s[mode]).get(c, math.nan) for c in cats]
            ax.bar([x + (i - 1) * width for x in range(len(cats))], values, width, color=colour,
                   label=f"{mode} (Overall {s[mode]['Overall']:.3f})")
        ax.axhline(s["circular"]["Overall"], color="tab:blue", ls="--", lw=1)
        ax.set_xticks(range(len(cats)), cats, rotation=20, ha="right", fontsize=8)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("accuracy (fraction)")
        ax.set_title(f"{s['dataset']}: {s.get('questions', '?')} questions, {s['rows']} rows, policy {s['policy']}")
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.grid(axis="y", alpha=0.3)
    fig.savefig(out, dpi=90)


def runtimes_figure(table: pd.DataFrame, out: str | Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 0.8 + 0.28 * max(1, len(table))), layout="constrained")
    left, right = fig.subplots(1, 2, sharey=True)
    y = range(len(table))
    cpu = table["cpu_seconds"].notna().any()
    left.barh([i - 0.2 * cpu for i in y], table["seconds"], height=0.8 - 0.4 * cpu, color="tab:blue", label="wall")
    if cpu:
        left.barh([i + 0.2 for i in y], table["cpu_seconds"], height=0.4, color="tab:orange", label="CPU (user+system)")
    left.set_yticks(y, table["job"], fontsize=8)
    left.invert_yaxis()
    left.set_xlabel("time (s)")
    left.set_title(f"runtime per job (total wall {table['seconds'].sum():.0f} s)")
    left.legend(fontsize=7, loc="lower right")
    right.barh(y, pd.to_numeric(table["max_rss_mb"], errors="coerce"), color="tab:green")
    right.set_xlabel("peak resident memory (MB)")
    right.set_title("peak memory per job")
    for ax in (left, right):
        ax.grid(axis="x", alpha=0.3)
    fig.savefig(out, dpi=90)


def render_report(*, metrics: dict[str, str | Path], summaries: list[str | Path], benchmarks: list[str | Path],
                  out_dir: str | Path) -> dict[str, Path]:
    """Write the tables (TSV) and figures (PNG) of a run into out_dir; returns their paths by name."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / f for name, f in {**{f"{k}_table": v for k, v in TABLES.items()},
                                               **{f"{k}_figure": v for k, v in FIGURES.items()}}.items()}
    mmbench_table(summaries).to_csv(paths["mmbench_table"], sep="\t", index=False)
    runtimes = runtime_table(benchmarks)
    runtimes.to_csv(paths["runtimes_table"], sep="\t", index=False)
    training_figure(metrics, paths["training_figure"])
    mmbench_figure(summaries, paths["mmbench_figure"])
    runtimes_figure(runtimes, paths["runtimes_figure"])
    return paths


def find_results(results: str | Path) -> dict:
    """The inputs of a report in a finished results folder (Snakemake's layout)."""
    results = Path(results)
    if not results.is_dir():
        raise ReportError(f"{results}: not a folder")
    found = {p.parents[1].name: p for p in results.glob("*/final.pth/metrics.jsonl")}
    metrics = {stage: found[stage] for stage in sorted(found, key=_job_rank)}
    summaries = sorted(results.glob("mmbench/*/summary.json"))
    benchmarks = sorted(results.glob("benchmarks/**/*.tsv"))
    missing = [what for what, found in (("*/final.pth/metrics.jsonl (a finished training stage)", metrics),
                                        ("mmbench/*/summary.json (an evaluation)", summaries),
                                        ("benchmarks/*.tsv (Snakemake benchmark files)", benchmarks)) if not found]
    if missing:
        raise ReportError(f"{results}: not a finished results folder, no {'; no '.join(missing)}")
    return {"metrics": metrics, "summaries": summaries, "benchmarks": benchmarks}


def summary_html(paths: dict[str, Path], title: str) -> str:
    """A self-contained HTML page of the tables and figures (images embedded)."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<style>body{font-family:sans-serif;margin:2em} table{border-collapse:collapse} "
             "td,th{border:1px solid #ccc;padding:2px 6px} img{max-width:100%}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>"]
    for name, heading in (("mmbench", "MMBench / CCBench"), ("runtimes", "Stage runtimes")):
        table = pd.read_csv(paths[f"{name}_table"], sep="\t")
        parts += [f"<h2>{heading}</h2>", table.to_html(index=False, na_rep="–", border=0)]
    for name, heading in (("training", "Training"), ("mmbench", "MMBench per category"), ("runtimes", "Runtimes")):
        data = base64.b64encode(paths[f"{name}_figure"].read_bytes()).decode()
        parts += [f"<h2>{heading}</h2>", f"<img alt='{name}' src='data:image/png;base64,{data}'>"]
    return "\n".join(parts + ["</body></html>"])


def report_results(results: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """`llavaflow report`: the summary of a finished results folder, plus summary.html."""
    paths = render_report(**find_results(results), out_dir=out_dir)
    paths["html"] = Path(out_dir) / "summary.html"
    paths["html"].write_text(summary_html(paths, f"llavaflow run: {Path(results).resolve()}"))
    return paths
