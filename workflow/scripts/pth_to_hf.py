"""Rule pth_to_hf: llavaflow convert pth_to_hf."""
import sys

from llavaflow.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "pth_to_hf", *sys.argv[1:]]))
