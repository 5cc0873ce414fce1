"""Virtual environments for the consumer tests, made once and cached outside the repository.

Each lives in ~/.cache/llavaflow/<name>-<hash of its requirements and Python version> (LLAVAFLOW_CACHE
overrides the root). It is built in a temporary sibling folder and renamed into place when complete, under
a file lock, so concurrent test processes neither race nor see a half-built environment. torch comes first
as `torch==2.13.0` where the consumer needs it, from TORCH_INDEX_URL when set, as install.sh (a CPU wheel here:
pip's configured index has one; PyPI's Linux wheel is the CUDA build, so elsewhere set it to PyTorch's CPU index).

Building them takes minutes on a fresh machine (llama.cpp alone 3.5 minutes of both cores). conftest.py
starts the builds in the background (`python consumer_venv.py NAME...`, niced) when the session holds a
test that uses their fixtures, so they use the CPU the other tests leave idle; a fixture then takes the
same lock and finds its venv built (or waits for it, or builds it itself when the background has not begun).
"""

from __future__ import annotations

import functools
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
TORCH_INDEX = os.environ.get("TORCH_INDEX_URL", "")
CONSUMERS = Path(__file__).parent / "consumers"

LLAMA_CPP = "llama-cpp-python==0.3.36"
# Only the libraries the bindings load (llama, ggml, mtmd); no tools, examples, tests or server; portable
# code (no -march=native), so a cached build never meets a CPU it was not built for.
LLAMA_CPP_CMAKE_ARGS = ("-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF "
                        "-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF")


def _pip(python: Path, *args: str, env: dict | None = None, timeout: float = 1800) -> None:
    """pip in a process group of its own: a timeout ends pip and what it started (cmake, compilers)."""
    cmd = ["nice", "-n", "10", str(python), "-m", "pip", "install", "--quiet", "--no-compile",
           "--disable-pip-version-check", *args]
    run_in_group(cmd, env=env, timeout=timeout)


def consumer_venv(name: str, requirements: list[str], no_deps: list[str] = (), *, with_torch: bool = True,
                  build_env: dict | None = None, timeout: float = 1800) -> Path:
    """The venv's python for `requirements` (+ `no_deps` installed with --no-deps), built if missing.
    `build_env`: extra environment for pip (part of the cache key)."""
    spec = {"python": list(sys.version_info[:2]), "torch": TORCH if with_torch else None,
            "requirements": requirements, "no_deps": list(no_deps)}
    if with_torch and TORCH_INDEX:
        spec["torch_index"] = TORCH_INDEX
    if build_env:
        spec["build_env"] = build_env
    digest = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
    final = CACHE / f"{name}-{digest}"
    python = final / "bin" / "python"
    if python.exists():
        return python
    CACHE.mkdir(parents=True, exist_ok=True)
    with FileLock(str(CACHE / f".{name}-{digest}.lock"), timeout=timeout + 600):
        if python.exists():  # another process built it while we waited
            return python
        for stale in CACHE.glob(f".{name}-{digest}-*"):  # ours, left by a build that was killed
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-{digest}-", dir=CACHE))
        env = {**os.environ, **(build_env or {})}
        try:
            start = time.monotonic()
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(tmp)], check=True, timeout=300)
            if with_torch:
                _pip(tmp / "bin" / "python", TORCH, *(["--index-url", TORCH_INDEX] if TORCH_INDEX else []), env=env,
                     timeout=timeout)
            _pip(tmp / "bin" / "python", *requirements, env=env, timeout=timeout)
            if no_deps:
                _pip(tmp / "bin" / "python", "--no-deps", *no_deps, env=env, timeout=timeout)
            (tmp / "llavaflow-venv.json").write_text(json.dumps({**spec, "build_seconds": round(time.monotonic() - start)}))
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return python


def llama_cpp_venv() -> Path:
    """llama-cpp-python (llama.cpp + mtmd built from source on the CPU): 206 s on 2 idle cores (2026-11-30)."""
    return consumer_venv("llama-cpp", [LLAMA_CPP], with_torch=False, timeout=3 * 3600,
                         build_env={"CMAKE_ARGS": LLAMA_CPP_CMAKE_ARGS,
                                    "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)})


# The set LLaVA's loader needs on Python 3.11 (its own pins where they matter); llava-torch itself --no-deps.
LLAVA_REQUIREMENTS = ["transformers==4.37.2", "tokenizers==0.15.1", "accelerate==0.21.0", "huggingface_hub<0.21",
                      "numpy<2", "pillow"]
LLAVA_NO_DEPS = ["llava-torch==1.2.2.post1"]
HF_OLDEST, HF_NEWEST = "4.49.0", "4.57.6"  # the 4.x range tests/test_consumers.py reads iter_hf with


def llava_official_venv() -> Path:
    return consumer_venv("llava-official", LLAVA_REQUIREMENTS, LLAVA_NO_DEPS)


def hf4_name(version: str) -> str:
    """The venv's (and its background prebuild's) name."""
    return f"hf-{version}"


def hf4_venv(version: str) -> Path:
    return consumer_venv(hf4_name(version), [f"transformers=={version}", "pillow"])


# by the name the background prebuild is given
PREBUILDS = {"llava-official": llava_official_venv, "llama-cpp": llama_cpp_venv,
             **{hf4_name(v): functools.partial(hf4_venv, v) for v in (HF_OLDEST, HF_NEWEST)}}


def run_consumer(python: Path, script: str, *args, timeout: int = 600) -> dict:
    """Run tests/consumers/<script> with that python; return the JSON object on its last stdout line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", CUDA_VISIBLE_DEVICES="")
    out, _ = run_in_group([str(python), str(CONSUMERS / script), *map(str, args)], env=env, timeout=timeout)
    return json.loads(out.strip().splitlines()[-1])


if __name__ == "__main__":  # the background prebuild: python consumer_venv.py NAME...
    for name in sys.argv[1:]:
        PREBUILDS[name]()
