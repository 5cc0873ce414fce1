"""Rule report: MMBench table, training curves, runtime of each stage."""
import argparse

from llavaflow.report import stage_runtimes, training_curves_svg, write_mmbench_table

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--curves", required=True)
    p.add_argument("--runtimes", required=True)
    p.add_argument("--metrics", nargs="+", required=True, help="STAGE=metrics.jsonl")
    p.add_argument("--benchmarks", nargs="+", required=True)
    p.add_argument("--summaries", nargs="+", required=True)
    args = p.parse_args()
    write_mmbench_table(args.summaries, args.out)
    training_curves_svg(dict(m.split("=", 1) for m in args.metrics), args.curves)
    stage_runtimes(args.benchmarks, args.runtimes)
