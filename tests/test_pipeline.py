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


@pytest.fixture(scope="module")
def dag(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("dag")
    snakemake(workdir, "all")
    return workdir


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
