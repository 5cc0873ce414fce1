"""The `llavaflow` command. Each subcommand parses its arguments and makes one library call."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _load_recipe(value: str):
    import yaml

    from .train.recipe import Recipe

    if value.lstrip().startswith("{"):
        return Recipe.from_dict(json.loads(value))
    path = Path(value)
    # YAML 1.1 reads 1e-8 as a string, so JSON files go through the JSON parser.
    data = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
    return Recipe.from_dict(data)


def cmd_train(args) -> None:
    from .train.loop import train

    train(_load_recipe(args.recipe), args.work_dir, args.output)


def cmd_build_tiny(args) -> None:
    from .tiny import build_tiny_assets

    build_tiny_assets(Path(args.out), Path(args.mmbench_dir), args.datasets, seed=args.seed)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llavaflow", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="run one training stage (launch with torchrun for several ranks)")
    t.add_argument("--recipe", required=True, help="the stage recipe: a JSON/YAML file or an inline JSON object")
    t.add_argument("--work-dir", required=True, help="resume state (iter_N.pth checkpoints); reruns resume from it")
    t.add_argument("--output", required=True, help="where the final checkpoint is published when the run completes")
    t.set_defaults(func=cmd_train)

    b = sub.add_parser("build-tiny", help="build the tiny embedded preset's models and data")
    b.add_argument("--out", required=True)
    b.add_argument("--mmbench-dir", required=True)
    b.add_argument("--datasets", nargs="+", required=True)
    b.add_argument("--seed", type=int, default=0)
    b.set_defaults(func=cmd_build_tiny)
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parser().parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
