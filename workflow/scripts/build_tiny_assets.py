"""Rule build_tiny_assets: the tiny preset's models, tokenizer, training data and benchmark TSVs."""
import sys

from llavaflow.cli import main

if __name__ == "__main__":
    sys.exit(main(["build-tiny", *sys.argv[1:]]))
