"""Rule report: MMBench tables and per-category bars, training curves, stage runtimes (llavaflow.report)."""
import argparse

from llavaflow.report import render_report

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--out-dir", required=True)
    p.add_argument("--metrics", nargs="+", required=True, help="STAGE=metrics.jsonl")
    p.add_argument("--benchmarks", nargs="+", required=True)
    p.add_argument("--summaries", nargs="+", required=True)
    args = p.parse_args()
    render_report(metrics=dict(m.split("=", 1) for m in args.metrics), summaries=args.summaries,
                  benchmarks=args.benchmarks, out_dir=args.out_dir)
