"""Rules export_llava / export_hf: llavaflow convert to_llava | to_hf."""
import sys

from llavaflow.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
