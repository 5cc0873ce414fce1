"""Rules pretrain / finetune: one training stage, launched by torchrun."""
import sys

from llavaflow.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
