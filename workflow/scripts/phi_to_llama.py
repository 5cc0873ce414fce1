"""Rule phi_to_llama: llavaflow convert phi_to_llama."""
import sys

from llavaflow.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "phi_to_llama", *sys.argv[1:]]))
