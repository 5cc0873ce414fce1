"""Rule report: the MMBench summary table."""
import argparse

from llavaflow.report import write_mmbench_table

if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("summaries", nargs="+")
    args = p.parse_args()
    write_mmbench_table(args.summaries, args.out)
