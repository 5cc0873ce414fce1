"""Rules download_data / download_mmbench: llavaflow download."""
import sys

from llavaflow.cli import main

if __name__ == "__main__":
    sys.exit(main(["download", *sys.argv[1:]]))
