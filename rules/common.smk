# Shared helpers: config validation, recipes, code hashes, launchers. No rules here.
import functools
import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from llavaflow import identity
from llavaflow.config import ConfigError, stage_recipe, validate_config
from llavaflow.identity import code_hash

try:
    validate_config(config)
except ConfigError as e:
    raise ValueError(f"invalid configuration:\n{e}") from None

shell.prefix("set -euo pipefail; ")

TINY = config["preset"] == "tiny"
STAGES = ("pretrain", "finetune")
# VLMEvalKit's TEST files carry no answers: their evaluation writes predictions for submission, no scores.
TEST_SPLITS = [d for d in config["mmbench"]["datasets"] if d in ("MMBench_TEST_EN", "MMBench_TEST_CN")]
SCORED_SPLITS = [d for d in config["mmbench"]["datasets"] if d not in TEST_SPLITS]


def _uses_conda():
    try:
        from snakemake.settings.types import DeploymentMethod

        return DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method
    except (ImportError, AttributeError):
        return False


if _uses_conda():
    # envs/llavaflow.yaml installs the checkout at LLAVAFLOW_ROOT (editable); pip expands the variable while
    # Snakemake builds the env, in this process.
    os.environ.setdefault("LLAVAFLOW_ROOT", workflow.basedir)

# Jobs run `llavaflow` and `python` from PATH: with --sdm conda those of envs/llavaflow.yaml, otherwise those of
# the environment Snakemake itself runs in (activate it), so the jobs run the code validated and hashed here.
PYTHON = "python"
if not _uses_conda():
    _bin = Path(sys.executable).parent
    for _tool in ("llavaflow", "python"):
        _found = shutil.which(_tool)
        if _found is None or Path(_found).parent != _bin:
            raise ValueError(f"`{_tool}` on PATH is {_found}, not the one in {_bin} (the environment running Snakemake): "
                             f"activate that environment (e.g. `source {_bin}/activate`), or run with --sdm conda")

# The llavaflow modules each stage depends on: a real edit reruns it (llavaflow.identity).
TRAIN_CODE = code_hash(*identity.TRAIN_CODE)


def recipe_json(stage):
    """The stage's recipe without its volatile keys: a tracked param, so changing it reruns the stage."""
    recipe = stage_recipe(config, stage)
    return json.dumps({k: v for k, v in recipe.to_dict().items() if k not in recipe.VOLATILE}, sort_keys=True)


def recipe_volatile(stage):
    """Checkpoint interval, workers, logging, speed settings: an untracked param (a function of resources)."""
    recipe = stage_recipe(config, stage)
    volatile = json.dumps({k: getattr(recipe, k) for k in recipe.VOLATILE}, sort_keys=True)

    def param(wildcards, resources):
        return volatile

    return param


def world_size(stage):
    return config[stage]["nodes"] * config[stage]["gpus_per_node"]


def training_inputs(stage):
    """The stage's data and base models: built by build_tiny_assets, or downloaded (real preset)."""
    inputs = {"data": "results/tiny" if TINY else f"results/data/{stage}.check.json"}
    if stage == "finetune":
        inputs["init"] = "results/pretrain/final.pth"
    return inputs


def torchrun(ranks, nodes=1):
    """The launcher; ranks come from config (they set the global batch), not from resources.

    One node: torchrun --standalone. Several (SLURM): one torchrun per node through srun, the SLURM
    variables read inside the step (the job shell has none of them); the script and its arguments reach
    torchrun as "$0" "$@", so nothing is quoted twice.
    """

    def launcher(wildcards, resources):
        if nodes == 1:
            return f"{PYTHON} -m torch.distributed.run --standalone --nproc_per_node {ranks}"
        cpus = getattr(resources, "cpus_per_task", None) or 8
        step = (f"exec {PYTHON} -m torch.distributed.run --nnodes \"$SLURM_NNODES\" --node_rank \"$SLURM_NODEID\""
                f" --nproc_per_node {ranks} --rdzv_backend c10d --rdzv_id \"$SLURM_JOB_ID\""
                " --rdzv_endpoint \"$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n1):29500\" \"$0\" \"$@\"")
        return (f"srun --nodes {nodes} --ntasks-per-node 1 --cpus-per-task {cpus} --gres gpu:{ranks}"
                f" --kill-on-bad-exit=1 bash -c '{step}'")

    return launcher


def attempt_frame(stage):
    """Header and exit line of one attempt (retry, TIMEOUT, scancel, rerun): its number, host, SLURM job, start,
    exit status and wall time. The training shells append everything to the undeclared {log}.attempts, because
    Snakemake deletes {log} before each attempt and writes the benchmark only for the one that succeeds. The
    frame lines start on a new line: progress bars leave theirs unfinished."""

    def frame(wildcards, resources):
        n = resources.attempt
        return (f"trap 'rc=$?; echo; echo \"== attempt {n} of {stage} ended: exit $rc after $SECONDS s\"' EXIT;"
                f" echo; echo \"== attempt {n} of {stage} started $(date -u +%FT%TZ) on $(hostname),"
                " SLURM job ${SLURM_JOB_ID:-none}\";")

    return frame


def _attempt(wildcards, attempt):
    return attempt


@functools.cache
def _visible_gpus():
    """The GPUs jobs on this machine see: CUDA_VISIBLE_DEVICES where set, else nvidia-smi's list (none if it fails)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return len([d for d in listed.split(",") if d.strip() not in ("", "-1")])
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return 0
    try:
        proc = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(line.startswith("GPU ") for line in proc.stdout.splitlines()) if proc.returncode == 0 else 0


def _local_execution():
    """Whether jobs run on this machine: the executor's name once jobs run. A dry run stands for the executor it
    was asked for, and Snakemake's API (api.py, execute_workflow) sets use_threads for every remote one."""
    name = getattr(workflow.executor_plugin, "name", None)
    if name not in (None, "dryrun", "touch"):
        return name == "local"
    # --d3dag, --summary, --lint: no execution at all, so no execution settings to tell by
    return getattr(workflow, "execution_settings", None) is not None and not workflow.use_threads


# snakemake.md §12: a local run without a `gpu` limit gets one, the GPUs it sees. It must exist before the
# scheduler starts (which copies the limits), when only the missing --jobs limit tells a run local (remote
# executors need one); a local run given --jobs and no limit stops at its first GPU job (gpu_request).
# register_resource is internal, hence the guard.
try:
    if workflow.nodes is None and getattr(workflow.global_resources.get("gpu"), "value", None) is None \
            and _visible_gpus():
        workflow.register_resource("gpu", _visible_gpus())
except AttributeError:
    pass


def gpu_request(n):
    """A GPU job's `gpu`. In a local run it claims the run's whole GPU limit (a larger request is scaled down to
    it): Snakemake assigns no devices and torchrun puts rank i on cuda:i, so two GPU jobs side by side would both
    use cuda:0. One evaluation at a time on all GPUs: set mmbench.gpus to shard its rows over them. On SLURM,
    the job's own count."""

    def request(wildcards):
        if not _local_execution():
            return n
        limit = workflow.global_resources.get("gpu")
        limit = getattr(limit, "value", limit)
        if limit is None and _visible_gpus():
            raise ValueError(f"a local run given --jobs but no gpu limit, on a machine with {_visible_gpus()} GPUs: "
                             f"its GPU jobs would run side by side on cuda:0; add --resources gpu={_visible_gpus()}, "
                             "or use --cores (or --profile profiles/local)")
        return max(n, limit or 0)

    return request


def train_resources(stage, mem_mb, runtime):
    """Single node: gpu + nodes=1 (--gpus, --nodes=1). Several: per-node gres + an MPI-style job of one task
    per node (tasks_per_gpu=0 keeps the plugin from adding --ntasks-per-gpu). `attempt` (1, 2, … with
    retries) names each attempt in the log: no sbatch flag, and resources are never tracked for reruns."""
    s = config[stage]
    res = {"mem_mb": mem_mb, "runtime": runtime, "nodes": s["nodes"], "attempt": _attempt}
    if s["nodes"] == 1:
        return {**res, "gpu": gpu_request(s["gpus_per_node"])}
    return {**res, "gres": f"gpu:{s['gpus_per_node']}", "mpi": "srun", "tasks": s["nodes"], "tasks_per_gpu": 0}


CONVERT_CODE = code_hash(*identity.CONVERT_CODE)
EVAL_CODE = code_hash(*identity.EVAL_CODE)


def base_model_inputs():
    """The base LLM/ViT folders that conversions read configs and tokenizers from (tiny: built locally)."""
    return {"assets": "results/tiny"} if TINY else {}


def mm_vision_tower():
    """What the official LLaVA loader builds the tower from: the base vision model, as an absolute path if local."""
    tower = config["model"]["visual_encoder"]
    return str(Path(tower).resolve()) if TINY or Path(tower).exists() else tower


# What decides a download's bytes. Mirrors, manual steps and the worker count decide only how they are fetched:
# untracked (functions of resources), so editing them neither re-downloads nor retrains. Nor is download.py's
# code hashed: every file is checked where it lies, and a rerun of a download would rerun both trainings.
DOWNLOAD_IDENTITY = ("dest", "url", "hub", "md5", "sha256", "extract", "extract_to")


def download_identity(entries):
    return json.dumps([{k: e[k] for k in DOWNLOAD_IDENTITY if k in e} for e in entries], sort_keys=True)


def _download_manifest(wildcards):
    return config["downloads"][wildcards.stage]


def download_sources(wildcards):
    """Tracked: the stage manifest's identity."""
    return download_identity(_download_manifest(wildcards))


def download_entries(wildcards, resources):
    """Untracked: the whole manifest, as the command reads it."""
    return json.dumps(_download_manifest(wildcards), sort_keys=True)


def download_jobs(wildcards, resources):
    return config["downloads"]["jobs"]


def data_root(wildcards):
    return config["data"][wildcards.stage]["root"]


def check_sources(wildcards):
    return json.dumps(stage_recipe(config, wildcards.stage).datasets, sort_keys=True)


def _mmbench_manifest(wildcards):
    return [dict(config["downloads"]["mmbench"][wildcards.dataset], dest=f"{wildcards.dataset}.tsv")]


def mmbench_source(wildcards):
    """Tracked: the benchmark file's identity (its URL and md5, not its mirrors)."""
    return download_identity(_mmbench_manifest(wildcards))


def mmbench_entry(wildcards, resources):
    return json.dumps(_mmbench_manifest(wildcards))


def every_benchmark(wildcards):
    """The benchmark file of every job upstream of the report: each benchmark pattern of the workflow, expanded
    over the config's stages and datasets where the wildcard constraints of its producer allow it."""
    values = {"stage": STAGES, "dataset": config["mmbench"]["datasets"]}
    files = set()
    for producer in workflow.rules:
        if producer.name == "report" or not producer.benchmark:
            continue
        names = sorted(producer.benchmark.get_wildcard_names())
        for combo in itertools.product(*(values[n] for n in names)):
            path = producer.benchmark.apply_wildcards(dict(zip(names, combo)))
            if producer.is_producer(path):
                files.add(path)
    return sorted(files)
