"""Rule check_data: llavaflow check-data."""
import sys

from llavaflow.cli import main

if __name__ == "__main__":
    sys.exit(main(["check-data", *sys.argv[1:]]))
