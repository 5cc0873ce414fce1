"""Rule export_gguf: llavaflow convert to_gguf."""
import sys

from llavaflow.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "to_gguf", *sys.argv[1:]]))
