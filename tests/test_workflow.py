"""The workflow as Snakemake sees it: lint, the DAG of each target, profiles, environments."""

import csv
import io
import json
import re
import sys
from collections import Counter

import pytest
import yaml

from conftest import ROOT, run

SNAKEMAKE = [sys.executable, "-m", "snakemake"]


def dry_run(tmp_path, target, config="config.yaml", *extra):
    proc = run(SNAKEMAKE + [target, "-n", "--cores", "1", "--snakefile", str(ROOT / "Snakefile"), "--directory",
                            str(tmp_path), "--configfile", str(ROOT / "config" / config), *extra])
    return proc.stdout + proc.stderr


def dag_jobs(tmp_path, target, config="config.yaml") -> dict:
    """Jobs of the target's DAG by rule, from Snakemake's JSON rendering of the DAG (--d3dag)."""
    proc = run(SNAKEMAKE + [target, "--d3dag", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(tmp_path),
                            "--configfile", str(ROOT / "config" / config)])
    return dict(Counter(node["value"]["rule"] for node in json.loads(proc.stdout)["nodes"]))


def job_resources(out: str, rule: str) -> dict:
    """The resources line of a rule's job in a dry run (--printshellcmds output has no JSON form)."""
    block = out.split(f"rule {rule}:")[1]
    return dict(kv.split("=", 1) for kv in block.split("resources: ")[1].split("\n")[0].split(", "))


@pytest.mark.parametrize("config", ["config.yaml", "tiny.yaml"])
def test_lint_is_clean(tmp_path, config):
    proc = run(SNAKEMAKE + ["--lint", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(tmp_path),
                            "--configfile", str(ROOT / "config" / config)], check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dag_of_the_real_recipe(tmp_path):
    assert dag_jobs(tmp_path, "results/iter_hf") == {
        "download_data": 2, "check_data": 2, "pretrain": 1, "finetune": 1, "pth_to_hf": 1, "phi_to_llama": 1,
        "export_hf": 1}
    assert dag_jobs(tmp_path, "all") == {
        "download_data": 2, "download_mmbench": 5, "check_data": 2, "pretrain": 1, "finetune": 1, "pth_to_hf": 1,
        "mmbench_eval": 3, "mmbench_predict": 2, "phi_to_llama": 1, "export_hf": 1, "export_llava": 1, "export_gguf": 1, "report": 1,
        "all": 1}
    assert dag_jobs(tmp_path, "results/iter_llava") == {
        "download_data": 2, "check_data": 2, "pretrain": 1, "finetune": 1, "pth_to_hf": 1, "phi_to_llama": 1,
        "export_llava": 1}


def test_dag_of_the_tiny_preset(tmp_path):
    assert dag_jobs(tmp_path, "all", "tiny.yaml") == {
        "build_tiny_assets": 1, "pretrain": 1, "finetune": 1, "pth_to_hf": 1, "mmbench_eval": 3, "mmbench_predict": 1,
        "phi_to_llama": 1, "export_hf": 1, "export_llava": 1, "export_gguf": 1, "report": 1, "all": 1}


def test_every_file_a_job_writes_is_declared(tmp_path):
    """The files the evaluation and the data check write beside their main output are outputs too."""
    summary = run(SNAKEMAKE + ["all", "--summary", "--snakefile", str(ROOT / "Snakefile"), "--directory",
                               str(tmp_path), "--configfile", str(ROOT / "config" / "config.yaml")]).stdout
    rows = list(csv.DictReader(io.StringIO(summary), delimiter="\t"))
    outputs = {r["output_file"]: r["rule"] for r in rows}
    for dataset in ("MMBench_DEV_EN", "MMBench_DEV_CN", "CCBench"):
        for name in ("summary.json", "predictions.xlsx", "predictions.csv", f"{dataset}_acc.csv", "mmbench_result.json"):
            assert outputs[f"results/mmbench/{dataset}/{name}"] == "mmbench_eval"
    assert outputs["results/mmbench/MMBench_TEST_EN/predictions.csv"] == "mmbench_predict"
    assert "results/mmbench/MMBench_TEST_EN/MMBench_TEST_EN_acc.csv" not in outputs  # no answers, no scores
    assert outputs["results/data/finetune.bad_images.tsv"] == "check_data"


def test_the_report_depends_on_every_job(tmp_path):
    """Its inputs (every job's benchmark) follow from the rules, so no job can be left out of its tables."""
    proc = run(SNAKEMAKE + ["all", "--d3dag", "--snakefile", str(ROOT / "Snakefile"), "--directory", str(tmp_path),
                            "--configfile", str(ROOT / "config" / "config.yaml")])
    dag = json.loads(proc.stdout)
    rule = {n["id"]: n["value"]["rule"] for n in dag["nodes"]}
    report = next(i for i, r in rule.items() if r == "report")
    direct = {e["u"] for e in dag["edges"] if e["v"] == report}
    assert direct == {i for i, r in rule.items() if r not in ("report", "all")}


def test_local_gpu_jobs_run_one_at_a_time_on_all_gpus(tmp_path):
    """Snakemake assigns no devices and torchrun puts rank i on cuda:i: GPU jobs side by side would share cuda:0.
    Locally each claims the run's whole gpu limit: the profile's, or (a bare run) the GPUs it sees. On SLURM
    each asks for its own count."""
    for jobs in ([], ["--jobs", "4"]):  # --jobs beside the profile's cores: still local
        out = dry_run(tmp_path, "all", "config.yaml", "--profile", str(ROOT / "profiles" / "local"), *jobs)
        assert {r: job_resources(out, r)["gpu"] for r in ("finetune", "mmbench_eval", "mmbench_predict")} == \
            {"finetune": "8", "mmbench_eval": "8", "mmbench_predict": "8"}
    proc = run(SNAKEMAKE + ["all", "-n", "--cores", "2", "--snakefile", str(ROOT / "Snakefile"), "--directory",
                            str(tmp_path), "--configfile", str(ROOT / "config" / "config.yaml")],
               env={"CUDA_VISIBLE_DEVICES": "0,1"})
    bare = proc.stdout + proc.stderr
    assert {r: job_resources(bare, r)["gpu"] for r in ("pretrain", "mmbench_eval")} == {"pretrain": "2", "mmbench_eval": "2"}
    given_jobs = run(SNAKEMAKE + ["all", "-n", "--jobs", "4", "--snakefile", str(ROOT / "Snakefile"), "--directory",
                                  str(tmp_path), "--configfile", str(ROOT / "config" / "config.yaml")],
                     env={"CUDA_VISIBLE_DEVICES": "0,1"}, check=False)
    assert "GPU jobs would run side by side on cuda:0; add --resources gpu=2" in given_jobs.stdout + given_jobs.stderr
    slurm = dry_run(tmp_path, "all", "config.yaml", "--profile", str(ROOT / "profiles" / "slurm"))
    assert {r: job_resources(slurm, r)["gpu"] for r in ("finetune", "mmbench_eval")} == {"finetune": "8", "mmbench_eval": "1"}


def test_slurm_profile_resources(tmp_path):
    out = dry_run(tmp_path, "results/iter_hf", "config.yaml", "--profile", str(ROOT / "profiles" / "slurm"))
    resources = job_resources(out, "finetune")
    # what the plugin turns into: -p gpu -C h100 --nodes=1 --gpus=8 --cpus-per-task=64 --mem 480000 -t 2880
    assert resources["slurm_partition"] == "gpu" and resources["constraint"] == "h100"
    assert resources["gpu"] == "8" and resources["nodes"] == "1"
    assert resources["cpus_per_task"] == "64" and resources["runtime"] == "2880" and resources["mem_mb"] == "480000"
    profile = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())
    forbidden = ("--gres", "--gpus", "--nodes", "--ntasks", "--mem", "--cpus-per", "-t ", "--time", "-p ", "-A ")
    assert not any(f in str(v) for r in profile.get("set-resources", {}).values() for k, v in r.items()
                   if k == "slurm_extra" for f in forbidden)
    assert not (ROOT / "profiles" / "default").exists()  # would be layered silently onto every profile


def test_slurm_profile_sends_every_gpu_job_to_the_gpu_partition(tmp_path):
    out = dry_run(tmp_path, "all", "config.yaml", "--profile", str(ROOT / "profiles" / "slurm"))
    rules = {block.split(":")[0] for block in out.split("rule ")[1:] if "resources: " in block}
    gpu_rules = {r for r in rules if "gpu" in job_resources(out, r) or "gres" in job_resources(out, r)}
    assert {"pretrain", "finetune", "mmbench_eval", "mmbench_predict"} <= gpu_rules
    assert {r: job_resources(out, r)["slurm_partition"] for r in gpu_rules} == {r: "gpu" for r in gpu_rules}


def _requirements():
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return {re.split(r"[<>=!~ ]", d)[0].lower().replace("_", "-"): d for d in deps}


def _env_pip():
    env = yaml.safe_load((ROOT / "envs" / "llavaflow.yaml").read_text())
    return next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))


def test_env_pins_satisfy_the_package_requirements():
    from packaging.requirements import Requirement

    pins = {p.split("==")[0].lower().replace("_", "-"): p.split("==")[1] for p in _env_pip() if "==" in p}
    reqs = _requirements()
    for name, version in pins.items():
        assert name in reqs, f"{name} is pinned in envs/ but not a dependency of the package"
        assert Requirement(reqs[name]).specifier.contains(version), f"{name}=={version} violates {reqs[name]}"
    missing = set(reqs) - set(pins) - {"snakemake", "snakemake-executor-plugin-slurm"}
    assert not missing, f"dependencies without a pin in envs/llavaflow.yaml: {missing}"


def test_env_torch_has_the_varlen_attention_of_packing():
    import torch
    from packaging.version import Version

    from llavaflow.model import packing

    pin = next(p.split("==")[1] for p in _env_pip() if p.startswith("torch=="))
    assert Version(pin) >= Version("2.10")  # the first varlen_attn with window_size, which packing needs
    if Version(torch.__version__).base_version == pin:  # the torch install.sh puts here: check it for real
        assert packing.varlen_attn is not None


def test_env_installs_this_checkout(tmp_path):
    """The env's last pip line installs the checkout that runs the workflow, editable, through the variable
    that rules/common.smk sets: given to pip as conda does (a requirements file in another folder)."""
    line = _env_pip()[-1]
    assert line == "-e ${LLAVAFLOW_ROOT}"
    (tmp_path / "requirements.txt").write_text(line + "\n")
    proc = run([sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--no-build-isolation", "--report",
                str(tmp_path / "report.json"), "-r", "requirements.txt"], cwd=tmp_path, env={"LLAVAFLOW_ROOT": str(ROOT)})
    report = json.loads((tmp_path / "report.json").read_text())
    (item,) = report["install"]
    assert item["metadata"]["name"] == "llavaflow" and item["download_info"]["dir_info"] == {"editable": True}
    assert item["download_info"]["url"] == ROOT.as_uri(), proc.stdout


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
    # per-node GPUs as gres, one task per node, no --ntasks-per-gpu
    assert resources["nodes"] == "2" and resources["gres"] == "gpu:8" and resources["mpi"] == "srun"
    assert resources["tasks"] == "2" and resources["tasks_per_gpu"] == "0" and "gpu" not in resources
    shell = finetune.split("Shell command: ")[1].split("\n")[0]
    assert " srun --nodes 2 --ntasks-per-node 1 --cpus-per-task 64 --gres gpu:8 --kill-on-bad-exit=1 bash -c " in shell
    assert '--nnodes "$SLURM_NNODES" --node_rank "$SLURM_NODEID" --nproc_per_node 8 --rdzv_backend c10d' in shell
    assert '"$0" "$@"\' -m llavaflow.cli train --recipe ' in shell
    pretrain = out.split("rule pretrain:")[1].split("resources: ")[1].split("\n")[0]
    assert "gpu=8" in pretrain and "nodes=1" in pretrain  # the single-node stage keeps --gpus


def test_snakemake_outside_its_activated_environment_stops_naming_the_fix(tmp_path):
    """Jobs call `llavaflow` and `python` from PATH: another environment's (here: none) is refused up front."""
    import os
    import subprocess
    from pathlib import Path

    bare = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if Path(p) != Path(sys.executable).parent)
    proc = subprocess.run(SNAKEMAKE + ["-n", "--cores", "1", "--snakefile", str(ROOT / "Snakefile"), "--directory",
                                       str(tmp_path), "--configfile", str(ROOT / "config" / "tiny.yaml")],
                          env={**os.environ, "PATH": bare}, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert f"activate that environment (e.g. `source {Path(sys.executable).parent}/activate`)" in proc.stderr + proc.stdout
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("dtype", ["auto", "fp16"])
def test_evaluation_runs_in_the_configured_dtype(tmp_path, dtype):
    """mmbench.torch_dtype reaches the evaluation's command: auto (bf16 on a GPU, training's dtype) or xtuner
    mmbench's fp16."""
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg["mmbench"]["torch_dtype"] = dtype
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = run(SNAKEMAKE + ["results/mmbench/MMBench_DEV_EN/summary.json", "-n", "-p", "--cores", "1", "--snakefile",
                            str(ROOT / "Snakefile"), "--directory", str(tmp_path), "--configfile", str(path)])
    shell = (proc.stdout + proc.stderr).split("rule mmbench_eval:")[1].split("Shell command: ")[1].split("\n")[0]
    assert f" --torch-dtype {dtype} " in shell, shell


# Modules that shape no result: atomic publishing, the hashing itself, experiment-tracker adapters.
NOT_RESULT_CODE = {"atomic.py", "identity.py", "train/tracking.py"}


@pytest.mark.parametrize("stage, entry_modules", [
    ("TRAIN_CODE", ["llavaflow.train.loop"]),
    ("EVAL_CODE", ["llavaflow.eval.mmbench", "llavaflow.eval.predict", "llavaflow.model.loading"]),
    ("CONVERT_CODE", ["llavaflow.convert.exports", "llavaflow.convert.pth_to_hf", "llavaflow.convert.phi3_llama",
                      "llavaflow.convert.gguf"]),
    ("CHECK_CODE", ["llavaflow.data.check"]),
    ("ASSETS_CODE", ["llavaflow.tiny"]),
    ("REPORT_CODE", ["llavaflow.report", "llavaflow.eval.score"]),
])
def test_each_stage_hashes_the_modules_it_imports(stage, entry_modules):
    """A module a stage imports is part of its code hash (an edit reruns the stage), unless it shapes no result."""
    from llavaflow import identity

    script = (f"import sys, {', '.join(entry_modules)}; import llavaflow; from pathlib import Path; "
              "root = Path(llavaflow.__file__).parent; "
              "print('\\n'.join(str(Path(m.__file__).relative_to(root)) for n, m in list(sys.modules.items()) "
              "if n.startswith('llavaflow') and getattr(m, '__file__', None)))")
    imported = {p for p in run([sys.executable, "-c", script]).stdout.split() if not p.endswith("__init__.py")}
    parts = getattr(identity, stage)
    covered = {p for p in imported if any(p == part or p.startswith(part + "/") for part in parts)}
    assert imported - covered - NOT_RESULT_CODE == set()
    rules = "".join(p.read_text() for p in (ROOT / "rules").glob("*.smk"))
    assert f"code_hash(*identity.{stage})" in rules or f"{stage} = code_hash(*identity.{stage})" in rules
    assert (identity.PACKAGE / "train" / "tracking.py").is_file()  # the exemptions name real files


def test_snakemake_touch_keeps_a_folders_identity(tmp_path):
    """`snakemake --touch` rewrites a directory output's .snakemake_timestamp; a training or evaluation state
    keyed on that folder must survive it (only a real rewrite is a new input)."""
    import os

    from llavaflow.identity import path_fingerprint

    (tmp_path / "model.safetensors").write_bytes(b"w" * 10)
    before = path_fingerprint(tmp_path)
    (tmp_path / ".snakemake_timestamp").write_text("")
    assert path_fingerprint(tmp_path) == before
    os.utime(tmp_path / "model.safetensors", ns=(1, 1))
    assert path_fingerprint(tmp_path) != before
