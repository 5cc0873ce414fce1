"""Rule mmbench_eval: llavaflow mmbench on one benchmark TSV (torchrun shards the rows)."""
import sys

from llavaflow.cli import main

if __name__ == "__main__":
    sys.exit(main(["mmbench", *sys.argv[1:]]))
