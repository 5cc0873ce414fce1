"""Virtual environments for the consumer tests, made once and cached outside the repository.

Each lives in ~/.cache/llavaflow/<name>-<hash of its requirements and Python version> (LLAVAFLOW_CACHE
overrides the root). It is built in a temporary sibling folder and renamed into place when complete, under
a file lock, so concurrent test processes neither race nor see a half-built environment. torch comes first
as `torch==2.13.0` (the CPU wheel; a bare requirement would pull CUDA).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from filelock import FileLock

from processes import run_in_group

CACHE = Path(os.environ.get("LLAVAFLOW_CACHE", Path.home() / ".cache" / "llavaflow"))
TORCH = "torch==2.13.0"
CONSUMERS = Path(__file__).parent / "consumers"


def _pip(python: Path, *args: str) -> None:
    cmd = [str(python), "-m", "pip", "install", "--quiet", "--no-compile", "--disable-pip-version-check", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def consumer_venv(name: str, requirements: list[str], no_deps: list[str] = ()) -> Path:
    """The venv's python for `requirements` (+ `no_deps` installed with --no-deps), built if missing."""
    spec = {"python": list(sys.version_info[:2]), "torch": TORCH, "requirements": requirements, "no_deps": list(no_deps)}
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    final = CACHE / f"{name}-{digest}"
    python = final / "bin" / "python"
    if python.exists():
        return python
    CACHE.mkdir(parents=True, exist_ok=True)
    with FileLock(str(CACHE / f".{name}-{digest}.lock")):
        if python.exists():  # another process built it while we waited
            return python
        for stale in CACHE.glob(f".{name}-{digest}-*"):  # ours, left by a build that was killed
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-{digest}-", dir=CACHE))
        try:
            start = time.monotonic()
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(tmp)], check=True, timeout=300)
            _pip(tmp / "bin" / "python", TORCH)
            _pip(tmp / "bin" / "python", *requirements)
            if no_deps:
                _pip(tmp / "bin" / "python", "--no-deps", *no_deps)
            (tmp / "llavaflow-venv.json").write_text(json.dumps({**spec, "build_seconds": round(time.monotonic() - start)}))
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return python


def run_consumer(python: Path, script: str, *args, timeout: int = 600) -> dict:
    """Run tests/consumers/<script> with that python; return the JSON object on its last stdout line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
    out, _ = run_in_group([str(python), str(CONSUMERS / script), *map(str, args)], env=env, timeout=timeout)
    return json.loads(out.strip().splitlines()[-1])
