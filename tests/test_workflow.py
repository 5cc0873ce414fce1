"""The workflow as Snakemake sees it: lint, the DAG of each target, profiles, environments."""

import re
import sys
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, run

SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def dry_run(tmp_path, target, config="config.yaml", *extra):
    proc = run(SNAKEMAKE + [target, "-n", "--cores", "1", "--snakefile", str(ROOT / "Snakefile"), "--directory",
                            str(tmp_path), "--configfile", str(ROOT / "config" / config), *extra])
    return proc.stdout + proc.stderr


def job_counts(out: str) -> dict:
    table = out.split("Job stats:")[1].split("total")[0]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


@pytest.mark.parametrize("config", ["config.yaml", "tiny.yaml"])
def test_lint_is_clean(tmp_path, config):
    proc = run(SNAKEMAKE + ["--lint", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(tmp_path),
                            "--configfile", str(ROOT / "config" / config)], check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dag_of_the_real_recipe(tmp_path):
    assert job_counts(dry_run(tmp_path, "results/iter_hf")) == {
        "download_data": 2, "check_data": 2, "pretrain": 1, "finetune": 1, "pth_to_hf": 1, "phi_to_llama": 1,
        "export_hf": 1}
    assert job_counts(dry_run(tmp_path, "all")) == {
        "download_data": 2, "download_mmbench": 5, "check_data": 2, "pretrain": 1, "finetune": 1, "pth_to_hf": 1,
        "mmbench_eval": 5, "phi_to_llama": 1, "export_hf": 1, "export_llava": 1, "report": 1, "all": 1}
    assert job_counts(dry_run(tmp_path, "results/iter_llava")) == {
        "download_data": 2, "check_data": 2, "pretrain": 1, "finetune": 1, "pth_to_hf": 1, "phi_to_llama": 1,
        "export_llava": 1}


def test_dag_of_the_tiny_preset(tmp_path):
    assert job_counts(dry_run(tmp_path, "all", "tiny.yaml")) == {
        "build_tiny_assets": 1, "pretrain": 1, "finetune": 1, "pth_to_hf": 1, "mmbench_eval": 4, "phi_to_llama": 1,
        "export_hf": 1, "export_llava": 1, "report": 1, "all": 1}


def test_local_profile(tmp_path):
    out = dry_run(tmp_path, "results/iter_hf", "config.yaml", "--profile", str(ROOT / "profiles" / "local"))
    assert "finetune" in out


def test_slurm_profile_resources(tmp_path):
    out = dry_run(tmp_path, "results/iter_hf", "config.yaml", "--profile", str(ROOT / "profiles" / "slurm"))
    finetune = out.split("rule finetune:")[1].split("\n\n")[0]
    resources = dict(kv.split("=", 1) for kv in finetune.split("resources: ")[1].split("\n")[0].split(", "))
    # what the plugin turns into: -p gpu -C h100 --nodes=1 --gpus=8 --cpus-per-task=64 --mem 480000 -t 2880
    assert resources["slurm_partition"] == "gpu" and resources["constraint"] == "h100"
    assert resources["gpu"] == "8" and resources["nodes"] == "1"
    assert resources["cpus_per_task"] == "64" and resources["runtime"] == "2880" and resources["mem_mb"] == "480000"
    profile = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())
    forbidden = ("--gres", "--gpus", "--nodes", "--ntasks", "--mem", "--cpus-per", "-t ", "--time", "-p ", "-A ")
    assert not any(f in str(v) for r in profile.get("set-resources", {}).values() for k, v in r.items()
                   if k == "slurm_extra" for f in forbidden)
    assert not (ROOT / "profiles" / "default").exists()  # would be layered silently onto every profile


def _requirements():
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {re.split(r"[<>=!~ ]", d)[0].lower().replace("_", "-"): d for d in deps}


def test_env_pins_satisfy_the_package_requirements():
    from packaging.requirements import Requirement

    env = yaml.safe_load((ROOT / "envs" / "llavaflow.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    pins = {p.split("==")[0].lower().replace("_", "-"): p.split("==")[1] for p in pip}
    reqs = _requirements()
    for name, version in pins.items():
        assert name in reqs, f"{name} is pinned in envs/ but not a dependency of the package"
        assert Requirement(reqs[name]).specifier.contains(version), f"{name}=={version} violates {reqs[name]}"
    missing = set(reqs) - set(pins) - {"torch", "snakemake", "snakemake-executor-plugin-slurm"}
    assert not missing, f"dependencies without a pin in envs/llavaflow.yaml: {missing}"


def test_multi_node_finetune_through_srun_and_torchrun(tmp_path):
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg["finetune"]["nodes"] = 2
    path = tmp_path / "multi.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = run(SNAKEMAKE + ["results/finetune/final.pth", "-n", "-p", "--cores", "1", "--snakefile", str(ROOT / "Snakefile"),
                            "--directory", str(tmp_path), "--configfile", str(path), "--profile", str(ROOT / "profiles" / "slurm")])
    out = proc.stdout + proc.stderr
    finetune = out.split("rule finetune:")[1]
    resources = dict(kv.split("=", 1) for kv in finetune.split("resources: ")[1].split("\n")[0].split(", "))
    # per-node GPUs as gres, one task per node, no --ntasks-per-gpu (snakemake.md §11.2)
    assert resources["nodes"] == "2" and resources["gres"] == "gpu:8" and resources["mpi"] == "srun"
    assert resources["tasks"] == "2" and resources["tasks_per_gpu"] == "0" and "gpu" not in resources
    shell = finetune.split("Shell command: ")[1].split("\n")[0]
    assert " srun --nodes 2 --ntasks-per-node 1 --cpus-per-task 64 --gres gpu:8 --kill-on-bad-exit=1 bash -c " in shell
    assert '--nnodes "$SLURM_NNODES" --node_rank "$SLURM_NODEID" --nproc_per_node 8 --rdzv_backend c10d' in shell
    assert '"$0" "$@"\' ' + str(ROOT / "workflow" / "scripts" / "train.py") in shell
    pretrain = out.split("rule pretrain:")[1].split("resources: ")[1].split("\n")[0]
    assert "gpu=8" in pretrain and "nodes=1" in pretrain  # the single-node stage keeps --gpus
