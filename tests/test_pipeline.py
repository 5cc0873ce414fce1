"""The whole DAG on the tiny preset, for real: snakemake from nothing, then reruns and evaluation checks."""

import json
import shutil
import sys
from pathlib import Path

import pandas as pd
import pytest

from conftest import ROOT, run

pytestmark = pytest.mark.slow


def snakemake(workdir, *args, check=True):
    return run([sys.executable, "-m", "snakemake", *args, "--cores", "2", "--snakefile", str(ROOT / "Snakefile"),
                "--directory", str(workdir), "--configfile", str(ROOT / "config" / "tiny.yaml")],
               timeout=1200, check=check)


def test_whole_dag_runs_and_the_model_answers_from_the_image(dag):
    res = dag / "results"
    for out in ("iter_xtuner", "iter_xtuner_llama_llm", "iter_llava", "iter_hf", "report/mmbench_summary.tsv"):
        assert (res / out).exists(), out
    table = pd.read_csv(res / "report" / "mmbench_summary.tsv", sep="\t").set_index("dataset")
    for dataset in ("MMBench_DEV_EN", "MMBench_DEV_CN", "CCBench"):
        # chance over the main rows' 2/3/4 options is about 0.35
        assert table.loc[dataset, "vanilla_0"] >= 0.8, table
    assert pd.isna(table.loc["MMBench_TEST_EN", "vanilla_0"])  # no answers: predictions only
    for name in ("pretrain", "finetune", "pth_to_hf", "export_hf", "mmbench_eval/MMBench_DEV_EN"):
        assert (res / "logs" / f"{name}.log").exists() and (res / "benchmarks" / f"{name}.tsv").exists()
    metrics = [json.loads(line) for line in (res / "finetune" / "final.pth" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["loss"] < metrics[0]["loss"] / 5


def test_unchanged_rerun_does_nothing(dag):
    out = snakemake(dag, "all", "-n").stdout
    assert "Nothing to be done" in out


@pytest.mark.parametrize("extra", [["--no-fast-path"], ["--batch-size", "1"]])
def test_fast_path_and_batching_give_the_same_predictions(dag, tmp_path, extra):
    res = dag / "results"
    run([sys.executable, "-m", "llavaflow.cli", "mmbench", str(res / "iter_xtuner"), "--data-path",
         str(res / "mmbench" / "data" / "MMBench_DEV_EN.tsv"), "--work-dir", str(tmp_path), "--dataset", "MMBench_DEV_EN",
         *extra], cwd=dag)
    ours = pd.read_csv(tmp_path / "predictions.csv").set_index("index")["prediction"]
    dags = pd.read_csv(res / "mmbench" / "MMBench_DEV_EN" / "predictions.csv").set_index("index")["prediction"]
    assert ours.sort_index().astype(str).tolist() == dags.sort_index().astype(str).tolist()


def scheduled(workdir, snakefile=ROOT / "Snakefile", configfile=ROOT / "config" / "tiny.yaml"):
    proc = run([sys.executable, "-m", "snakemake", "all", "-n", "--cores", "2", "--snakefile", str(snakefile),
                "--directory", str(workdir), "--configfile", str(configfile)])
    out = proc.stdout
    if "Nothing to be done" in out:
        return set()
    table = out.split("Job stats:")[1].split("total")[0]
    import re

    return {m.group(1) for m in re.finditer(r"^(\w+)\s+\d+$", table, re.M)}


def changed_config(tmp_path, section, key, value):
    import yaml

    cfg = yaml.safe_load((ROOT / "config" / "tiny.yaml").read_text())
    cfg[section][key] = value
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


AFTER_FINETUNE = {"finetune", "pth_to_hf", "phi_to_llama", "export_hf", "export_llava", "mmbench_eval", "report", "all"}


def test_changed_finetune_lr_reruns_finetune_and_after_but_not_pretrain(dag, tmp_path):
    assert scheduled(dag, configfile=changed_config(tmp_path, "finetune", "lr", 5e-4)) == AFTER_FINETUNE


def test_changed_evaluation_setting_reruns_only_evaluation(dag, tmp_path):
    assert scheduled(dag, configfile=changed_config(tmp_path, "mmbench", "max_new_tokens", 50)) == {
        "mmbench_eval", "report", "all"}


@pytest.mark.parametrize("key,value", [("num_workers", 0), ("packing", False), ("gradient_checkpointing", "full")])
def test_runtime_and_speed_settings_are_not_part_of_the_result(dag, tmp_path, key, value):
    assert scheduled(dag, configfile=changed_config(tmp_path, "finetune", key, value)) == set()


@pytest.fixture
def checkout(tmp_path):
    """A copy of the code, to edit a module without touching the real checkout."""
    copy = tmp_path / "repo"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".venv", "results", ".git", ".snakemake", "__pycache__"))
    return copy


def test_edited_conversion_module_reruns_the_conversions(dag, checkout):
    module = checkout / "workflow" / "llavaflow" / "convert" / "tables.py"
    module.write_text(module.read_text() + "\n# an edit\n")
    assert scheduled(dag, checkout / "Snakefile") == {
        "pth_to_hf", "phi_to_llama", "export_hf", "export_llava", "mmbench_eval", "report", "all"}


def test_touched_but_unchanged_files_do_not_retrain(dag, checkout):
    import os
    import time

    later = time.time() + 60
    for f in (checkout / "workflow" / "llavaflow" / "train" / "loop.py", checkout / "config" / "tiny.yaml"):
        os.utime(f, (later, later))
    assert scheduled(dag, checkout / "Snakefile", checkout / "config" / "tiny.yaml") == set()


def test_killed_training_job_resumes_with_rerun_incomplete(tmp_path):
    """Kill Snakemake and its training job mid-run; the rerun (--rerun-incomplete) resumes from iter_N.pth."""
    import os
    import signal
    import subprocess
    import time

    import yaml

    cfg = yaml.safe_load((ROOT / "config" / "tiny.yaml").read_text())
    cfg["finetune"].update(epochs=1, save_steps=20)
    path = tmp_path / "short.yaml"
    path.write_text(yaml.safe_dump(cfg))
    work = tmp_path / "w"
    work.mkdir()
    cmd = [sys.executable, "-m", "snakemake", "results/finetune/final.pth", "--cores", "2", "--snakefile",
           str(ROOT / "Snakefile"), "--directory", str(work), "--configfile", str(path)]
    proc = subprocess.Popen(cmd, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    ckpt_dir = work / "results" / "finetune" / "work_dir"
    deadline = time.time() + 600
    while not list(ckpt_dir.glob("iter_*.pth/complete")):
        assert proc.poll() is None and time.time() < deadline, "finetune ended before it could be killed"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver dies, as with a lost ssh session ...
    subprocess.run(["pkill", "-KILL", "-f", "--", f"--work-dir results/finetune/work_dir --output results/finetune/final.pth"])
    proc.wait()
    while subprocess.run(["pgrep", "-f", "--", "--work-dir results/finetune/work_dir"], capture_output=True).returncode == 0:
        time.sleep(0.1)  # ... and so do its training ranks
    assert not (work / "results" / "finetune" / "final.pth").exists()

    run(cmd + ["--unlock"], cwd=work)  # a killed driver leaves its lock behind
    rerun = run(cmd + ["--rerun-incomplete"], cwd=work, timeout=900)
    log = (work / "results" / "logs" / "finetune.log").read_text()
    assert "resuming at iteration 20" in log or "resuming at iteration 40" in log, log[-2000:]
    metrics = [json.loads(line) for line in (work / "results" / "finetune" / "final.pth" / "metrics.jsonl").read_text().splitlines()]
    assert [m["iter"] for m in metrics] == list(range(1, len(metrics) + 1))  # every iteration exactly once
    out = rerun.stdout + rerun.stderr
    assert "pretrain" not in out.split("Job stats:")[1].split("total")[0]  # finished stages stay done
