import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from consumer_venv import CACHE, HF_NEWEST, HF_OLDEST, hf4_name
from processes import kill_tree

ROOT = Path(__file__).resolve().parents[1]
TINY_DATASETS = ["MMBench_DEV_EN", "MMBench_TEST_EN", "MMBench_DEV_CN", "CCBench"]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The session runs as in this interpreter's activated environment (its bin folder first on PATH), as the README's
# `source .venv/bin/activate`: the workflow's jobs call the `llavaflow` and `python` of the environment running
# Snakemake, and DeepSpeed's CPU op is JIT-built by the first `ninja` on PATH. With the system's ninja (1.11) in
# some processes and the venv's (1.13) in others, each rebuilt the shared extension cache in turn (~1 min of both
# cores per training process on a 2-core machine).
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


# Slow builds a fixture needs, started in the background when the session collects a test using that
# fixture (consumer_venv.py): fixture name -> consumer_venv.PREBUILDS names.
BACKGROUND_PREBUILDS = {"llava_python": ["llava-official"], "hf4": [hf4_name(HF_OLDEST), hf4_name(HF_NEWEST)],
                        "llama_python": ["llama-cpp"]}
PREBUILD = pytest.StashKey[subprocess.Popen]()


def pytest_collection_finish(session):
    names = []  # in the order the session needs them
    for item in session.items:
        for fixture in getattr(item, "fixturenames", ()):
            names += [n for n in BACKGROUND_PREBUILDS.get(fixture, []) if n not in names]
    if names and not session.config.option.collectonly:
        CACHE.mkdir(parents=True, exist_ok=True)
        with open(CACHE / "prebuild.log", "w") as log:  # the last session's background build
            cmd = ["nice", "-n", "19", sys.executable, str(Path(__file__).parent / "consumer_venv.py"), *names]
            session.config.stash[PREBUILD] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                                              start_new_session=True)


def pytest_sessionfinish(session):
    """A prebuild still running when the session ends (its tests deselected by -x, or interrupted) is ours
    to end: its half-built folder is removed by the next build."""
    proc = session.config.stash.get(PREBUILD, None)
    if proc is not None and proc.poll() is None:
        kill_tree(proc)


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


@pytest.fixture
def subset(tiny, tmp_path):
    """The first 48 fine-tune samples, so a run takes seconds."""
    src = tiny["data"] / "finetune" / "conversations.jsonl"
    dst = tmp_path / "subset.jsonl"
    dst.write_text("".join(src.read_text().splitlines(keepends=True)[:48]))
    return [{"annotation": str(dst), "image_folder": str(tiny["data"] / "finetune")}]


@pytest.fixture(scope="session")
def tokenizer(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny["llm"], padding_side="right")


def run(cmd, cwd=ROOT, env=None, timeout=900, check=True):
    """Run a command, returning CompletedProcess; on failure the output is in the assertion message."""
    proc = subprocess.run(cmd, cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)
    if check:
        assert proc.returncode == 0, f"{cmd} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.fixture(scope="session")
def converted(tiny, tmp_path_factory):
    """A fine-tune-like checkpoint (all parts, perturbed away from the base weights) and every export of it."""
    import torch

    from llavaflow.convert.exports import to_hf, to_llava
    from llavaflow.convert.phi3_llama import phi_to_llama
    from llavaflow.convert.pth_to_hf import pth_to_hf
    from llavaflow.model.build import build_llava

    out = tmp_path_factory.mktemp("convert")
    torch.manual_seed(0)
    model = build_llava(str(tiny["llm"]), str(tiny["vit"]))
    state = {k: v + 0.02 * torch.randn_like(v) for k, v in model.state_dict().items()}
    torch.save({"state_dict": state}, out / "iter_9.pth")
    pth_to_hf(out / "iter_9.pth", out / "iter_xtuner", str(tiny["llm"]), str(tiny["vit"]), dtype="fp32")
    phi_to_llama(out / "iter_xtuner", out / "iter_xtuner_llama_llm")
    args = (out / "iter_xtuner_llama_llm", out / "iter_xtuner" / "visual_encoder",
            out / "iter_xtuner" / "projector" / "model.safetensors")
    to_hf(*args, out / "iter_hf", dtype="fp32")
    to_llava(*args, out / "iter_llava", mm_vision_tower=str(tiny["vit"]), dtype="fp32")
    model.load_state_dict(state)
    return {"out": out, "state": state, "model": model.eval()}


@pytest.fixture(scope="session")
def chromium():
    """Debian's chromium, installed with apt-get where missing (skipped only where apt cannot be used)."""
    exe = shutil.which("chromium")
    if exe:
        return exe
    if not shutil.which("apt-get") or os.geteuid() != 0:
        pytest.skip("chromium is not installed and apt-get is unavailable or not root: cannot install it")
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]):
        subprocess.run(cmd, check=True, capture_output=True, timeout=1200,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    return shutil.which("chromium")


@pytest.fixture(scope="session")
def dag(tmp_path_factory):
    """The whole tiny DAG run locally from nothing, once per session (test_pipeline, and test_slurm's reference)."""
    workdir = tmp_path_factory.mktemp("dag")
    run([sys.executable, "-m", "snakemake", "all", "--cores", "2", "--snakefile", str(ROOT / "Snakefile"), "--directory",
         str(workdir), "--configfile", str(ROOT / "config" / "tiny.yaml")], timeout=3600)
    return workdir
