import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "workflow"))
TINY_DATASETS = ["MMBench_DEV_EN", "MMBench_TEST_EN", "MMBench_DEV_CN", "CCBench"]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """The tiny preset's assets, built once per test session: {root, llm, vit, data, mmbench}."""
    from llavaflow.tiny import build_tiny_assets

    root = tmp_path_factory.mktemp("tiny")
    build_tiny_assets(root / "assets", root / "mmbench", TINY_DATASETS, seed=0)
    return {
        "root": root,
        "llm": root / "assets" / "llm",
        "vit": root / "assets" / "vit",
        "data": root / "assets" / "data",
        "mmbench": root / "mmbench",
    }


@pytest.fixture(scope="session")
def tokenizer(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny["llm"], padding_side="right")


def run(cmd, cwd=ROOT, env=None, timeout=900, check=True):
    """Run a command, returning CompletedProcess; on failure the output is in the assertion message."""
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc
