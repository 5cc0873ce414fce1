"""The SLURM profile on a real cluster: Debian's SLURM 22.05 on this host (tests/slurm_cluster.py), driven by
Snakemake's real executor plugin with profiles/slurm as shipped plus what a user fills in (account, partitions).

- the tiny DAG (its fine-tune cut to one epoch) through sbatch ends with the same DAG's local results;
- a fine-tune ended by its time limit (TIMEOUT) and by scancel (CANCELLED) is retried and resumes;
- pretrain with `nodes: 2` runs one torchrun per node over two slurmd and matches 2 local ranks.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from conftest import ROOT, run
from slurm_cluster import SlurmCluster, Unavailable, install

pytestmark = pytest.mark.slurm
PARTITIONS = {"cpu": "short", "gpu": "accel"}  # the profile's placeholders -> this cluster's partitions


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    try:
        install()
        root = tmp_path_factory.mktemp("slurm")
        cluster = SlurmCluster(root, partitions=tuple(PARTITIONS.values()))
        cluster.__enter__()
    except Unavailable as e:
        pytest.skip(f"no SLURM test cluster: {e}")
    yield cluster
    cluster.__exit__(None, None, None)


@pytest.fixture(scope="session")
def profile(cluster, tmp_path_factory):
    """profiles/slurm as a user fills it in: account and partition names, nothing else."""
    prof = yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())
    prof["default-resources"]["slurm_account"] = cluster.account
    for res in [prof["default-resources"], *prof["set-resources"].values()]:
        if "slurm_partition" in res:
            res["slurm_partition"] = PARTITIONS[res["slurm_partition"]]
    folder = tmp_path_factory.mktemp("profile")
    (folder / "config.yaml").write_text(yaml.safe_dump(prof))
    return folder


def config_with(tmp_path, **stages):
    cfg = yaml.safe_load((ROOT / "config" / "tiny.yaml").read_text())
    for stage, values in stages.items():
        cfg[stage].update(values)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def snakemake_cmd(workdir, target, configfile, *extra):
    return [sys.executable, "-m", "snakemake", target, "--snakefile", str(ROOT / "Snakefile"), "--directory",
            str(workdir), "--configfile", str(configfile), *extra]


def on_slurm(workdir, target, profile, configfile=ROOT / "config" / "tiny.yaml", *extra, check=True, timeout=1200):
    return run(snakemake_cmd(workdir, target, configfile, "--profile", str(profile), *extra), cwd=workdir,
               check=check, timeout=timeout)


def sacct(*args):
    out = subprocess.run(["sacct", "-X", "-n", "--parsable2", *args], capture_output=True, text=True, check=True).stdout
    return [line.split("|") for line in out.splitlines()]


def metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def sbatch_calls(snakemake_output: str, rule: str) -> list[str]:
    """The plugin's logged sbatch calls (--verbose) for a rule."""
    return [line.removeprefix("sbatch call: ") for line in snakemake_output.splitlines()
            if line.startswith("sbatch call: ") and f"--comment rule_{rule} " in line]


def assert_readme_shows(call: str, workdir: Path, account: str):
    """The README's sbatch line for the same rule is this call, up to the run's uuid, folder, account, partition
    and the jobstep command in --wrap."""
    flags, wrap = call.split(" --wrap=")
    assert wrap.endswith("--executor slurm-jobstep --jobs 1 --mode 'remote'\""), wrap[-200:]
    flags = re.sub(r"--job-name \S+", "--job-name <run uuid>", flags).replace(str(workdir), "<workdir>")
    flags = flags.replace(f" -A {account} ", " -A <account> ")
    for placeholder, name in PARTITIONS.items():
        flags = flags.replace(f" -p {name} ", f" -p <{placeholder} partition> ")
    rule = re.search(r"--comment (\S+)", flags).group(1)
    readme = [line.split(" --wrap=")[0] for line in (ROOT / "README.md").read_text().splitlines()
              if line.startswith("sbatch --parsable") and f"--comment {rule} " in line]
    assert readme == [" ".join(flags.split())], (readme, flags)


# The SLURM DAG's fine-tune: one epoch (100 iterations) instead of the preset's 10, so that the local
# reference it is compared with costs one short fine-tune rather than a second full one.
SHORT_FINETUNE = {"epochs": 1}


@pytest.fixture(scope="session")
def short_config(tmp_path_factory):
    return config_with(tmp_path_factory.mktemp("short_config"), finetune=SHORT_FINETUNE)


@pytest.fixture(scope="session")
def slurm_dag(cluster, profile, short_config, tmp_path_factory):
    """The whole tiny DAG (short fine-tune) through sbatch, from nothing; the Snakemake output kept for the
    README's sbatch lines."""
    work = tmp_path_factory.mktemp("slurm_dag")
    start = time.time()
    proc = on_slurm(work, "all", profile, short_config, "--verbose")
    (work / "snakemake.out").write_text(proc.stdout + proc.stderr)
    print(f"tiny DAG through SLURM: {time.time() - start:.0f} s")
    return work


@pytest.fixture(scope="session")
def local_short_dag(dag, short_config, tmp_path_factory):
    """The same DAG run locally: tests/test_pipeline.py's run (same assets and pretrain) with the short
    fine-tune, which Snakemake reruns with everything after it."""
    work = tmp_path_factory.mktemp("local_short_dag") / "w"
    shutil.copytree(dag, work, symlinks=True)
    run(snakemake_cmd(work, "all", short_config, "--cores", "2"), cwd=work, timeout=1800)
    return work


def test_tiny_dag_through_sbatch_gives_the_local_results(slurm_dag, local_short_dag, cluster):
    """Every job of the tiny DAG ran as a SLURM job and the results are those of the same DAG run locally."""
    out = (slurm_dag / "snakemake.out").read_text()
    calls = [line for line in out.splitlines() if line.startswith("sbatch call: ")]
    run_id = re.search(r"SLURM run ID: (\S+)", out).group(1)  # every job of the run is named so
    jobs = {row[1]: row[2] for row in sacct("--format=JobIdRaw,Comment,State", "--starttime", "now-1days",
                                            "--name", run_id)}
    for rule in ("build_tiny_assets", "pretrain", "finetune", "pth_to_hf", "phi_to_llama", "export_hf", "export_llava"):
        assert any(f"--comment rule_{rule}" in c for c in calls), rule
        assert jobs.get(f"rule_{rule}") == "COMPLETED", (rule, jobs)
    assert sum("--comment rule_mmbench_eval_wildcards_" in c for c in calls) == 3  # the DEV sets and CCBench
    assert sum("--comment rule_mmbench_predict_wildcards_" in c for c in calls) == 1  # MMBench_TEST_EN
    [finetune] = sbatch_calls(out, "finetune")
    assert_readme_shows(finetune, slurm_dag, cluster.account)
    res = slurm_dag / "results"
    table = pd.read_csv(res / "report" / "mmbench_summary.tsv", sep="\t").set_index("dataset")
    assert list(table.index) == ["MMBench_DEV_EN", "MMBench_TEST_EN", "MMBench_DEV_CN", "CCBench"], table
    assert table["vanilla_0"].notna().sum() == 3, table  # scored where there are answers (not the TEST split)
    # the same numbers as the local run of the same DAG: same seeds, same world size
    local = local_short_dag
    for stage, iterations in (("pretrain", 50), ("finetune", 100)):
        ours = [m["loss"] for m in metrics(res / stage / "final.pth" / "metrics.jsonl")]
        theirs = [m["loss"] for m in metrics(local / "results" / stage / "final.pth" / "metrics.jsonl")]
        assert len(ours) == iterations // 5 and ours == pytest.approx(theirs, rel=1e-5), stage
    pd.testing.assert_frame_equal(table, pd.read_csv(local / "results" / "report" / "mmbench_summary.tsv",
                                                     sep="\t").set_index("dataset"))
    attempts = (res / "logs" / "finetune.log.attempts").read_text()
    assert attempts.lstrip().startswith("== attempt 1 of finetune started ") and "SLURM job " in attempts
    assert "== attempt 1 of finetune ended: exit 0 after " in attempts


def finetune_jobs():
    """{SLURM job id: state} of this cluster's fine-tune jobs. sacct learns a job's comment (the plugin's
    rule_<rule>) only when the job ends, so live jobs are matched through squeue's."""
    live = subprocess.run(["squeue", "-h", "-o", "%i|%k"], capture_output=True, text=True, check=True).stdout
    comments = dict(line.split("|", 1) for line in live.splitlines())
    rows = sacct("--format=JobIdRaw,Comment,State", "--starttime", "now-1days")
    return {int(j): state for j, comment, state in rows if (comment or comments.get(j)) == "rule_finetune"}


def newest_iter(work_dir: Path) -> int:
    done = [int(p.parent.name[5:-4]) for p in work_dir.glob("iter_*.pth/complete")]
    return max(done, default=0)


def restarts(job: int) -> int:
    """How often SLURM requeued the job (after a preemption)."""
    info = subprocess.run(["scontrol", "show", "job", "-o", str(job)], capture_output=True, text=True).stdout
    return int(info.split("Restarts=")[1].split()[0]) if "Restarts=" in info else 0


def wait_for(what, check, proc, timeout=900):
    deadline = time.time() + timeout
    while not check():
        assert proc.poll() is None, f"snakemake ended ({proc.returncode}) while waiting for {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(1)


def test_finetune_timed_out_preempted_and_cancelled_resumes_every_time(slurm_dag, profile, cluster, tmp_path):
    """One fine-tune, three faults, each once the running attempt has saved a checkpoint of its own:
    attempt 1 runs into its time limit (lowered to 1 s with scontrol: TIMEOUT), attempt 2 is preempted by a job
    of a higher-priority partition (requeued under the same job id) and then scancel'ed (CANCELLED); the
    profile's retries resubmit, and every start resumes from the work dir."""
    work = tmp_path / "w"
    shutil.copytree(slurm_dag, work, symlinks=True)
    shutil.rmtree(work / "results" / "finetune")
    (work / "results" / "logs" / "finetune.log.attempts").unlink()
    before = set(finetune_jobs())
    cfg = config_with(tmp_path, finetune={"epochs": 6, "save_steps": 10})  # 600 iterations: the TIMEOUT can take 30 s
    cmd = snakemake_cmd(work, "results/finetune/final.pth", cfg, "--profile", str(profile))
    ckpts = work / "results" / "finetune" / "work_dir"
    ours = lambda: {j: s for j, s in finetune_jobs().items() if j not in before}  # noqa: E731
    with open(tmp_path / "snakemake.out", "w") as out:
        proc = subprocess.Popen(cmd, cwd=work, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def saved_after(it, n_jobs):
            return lambda: len(ours()) == n_jobs and newest_iter(ckpts) > it

        wait_for("attempt 1's first checkpoint", saved_after(0, 1), proc)
        first = min(ours())
        cluster.run("scontrol", "update", f"JobId={first}", "TimeLimit=0:01")
        wait_for("attempt 1 to end by its time limit", lambda: ours()[first] == "TIMEOUT", proc)
        wait_for("attempt 2's checkpoint", saved_after(newest_iter(ckpts), 2), proc)
        second = max(ours())
        node = cluster.run("squeue", "-h", "-j", str(second), "-o", "%N").stdout.strip()
        cluster.run("sbatch", "-p", cluster.urgent, "-A", cluster.account, "-w", node, "--exclusive", "-t", "1",
                    "-o", str(cluster.root / "log" / "urgent-%j.out"), "--wrap", "sleep 5")
        wait_for("attempt 2 to be preempted and requeued", lambda: restarts(second) == 1, proc)
        at_requeue = newest_iter(ckpts)
        wait_for("attempt 2 to restart and save a checkpoint",
                 lambda: ours()[second] == "RUNNING" and newest_iter(ckpts) > at_requeue, proc)
        cluster.run("scancel", str(second))
        proc.wait(timeout=1800)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the driver cancels its SLURM jobs
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    log = (tmp_path / "snakemake.out").read_text()
    assert proc.returncode == 0, log[-3000:]
    # sacct says "CANCELLED by <uid>": the form plugin 2.8.0 does not recognise, hence squeue in the profile
    assert [state.split()[0] for _, state in sorted(ours().items())] == ["TIMEOUT", "CANCELLED", "COMPLETED"], ours()
    history = subprocess.run(["sacct", "-j", str(second), "--duplicates", "-X", "-n", "--parsable2", "--format=State"],
                             capture_output=True, text=True, check=True).stdout.splitlines()
    assert history[0] == "PREEMPTED" and history[-1].startswith("CANCELLED"), history  # one job id, two runs
    assert "SLURM status is: 'TIMEOUT'" in log and "SLURM status is: 'CANCELLED'" in log, log[-3000:]
    attempts = (work / "results" / "logs" / "finetune.log.attempts").read_text()
    starts = [line.split(" started")[0] for line in attempts.splitlines() if " started " in line]
    assert starts == ["== attempt 1 of finetune", "== attempt 2 of finetune", "== attempt 2 of finetune",
                      "== attempt 3 of finetune"], starts
    assert attempts.count("resuming at iteration") == 3, attempts[-3000:]
    done = metrics(work / "results" / "finetune" / "final.pth" / "metrics.jsonl")
    iters = [m["iter"] for m in done]  # a row per log interval (5) and checkpoint, each exactly once
    assert iters == sorted(set(iters)) and all(i % 5 == 0 for i in iters[:-1]), iters


def test_pretrain_on_two_nodes_matches_two_local_ranks(slurm_dag, profile, cluster, tmp_path):
    """nodes: 2 -> sbatch --nodes=2 --ntasks=2, srun starts one torchrun per node (rendezvous on the first
    node), 2 ranks in all; the losses are those of 2 ranks on one host (nodes: 1, gpus_per_node: 2)."""
    runs, outputs = {}, {}
    for name, shape, how in (("two_nodes", {"nodes": 2, "gpus_per_node": 1}, ["--profile", str(profile)]),
                             ("one_node", {"nodes": 1, "gpus_per_node": 2}, ["--cores", "2"])):
        work = runs[name] = tmp_path / name
        shutil.copytree(slurm_dag / "results" / "tiny", work / "results" / "tiny")
        (work / "cfg").mkdir()
        cfg = config_with(work / "cfg", pretrain={**shape, "epochs": 1})
        proc = run(snakemake_cmd(work, "results/pretrain/final.pth", cfg, *how, "--verbose"), cwd=work, timeout=1800)
        outputs[name] = proc.stdout + proc.stderr
    [call] = sbatch_calls(outputs["two_nodes"], "pretrain")
    assert_readme_shows(call, runs["two_nodes"], cluster.account)
    srun = "srun --nodes 2 --ntasks-per-node 1 --cpus-per-task 64 --gres gpu:1 --kill-on-bad-exit=1 bash -c"
    assert srun in outputs["two_nodes"]
    job = [r for r in sacct("--format=JobIdRaw,Comment,State,NNodes,NodeList", "--starttime", "now-1days")
           if r[1] == "rule_pretrain"][-1]
    assert job[2:] == ["COMPLETED", "2", "llfnode[1-2]"], job
    steps = subprocess.run(["sacct", "-j", job[0], "-n", "--parsable2", "--format=JobId,NTasks,NodeList,State"],
                           capture_output=True, text=True, check=True).stdout
    assert f"{job[0]}.0|2|llfnode[1-2]|COMPLETED" in steps, steps  # the srun step: one torchrun per node
    log = (runs["two_nodes"] / "results" / "logs" / "pretrain.log").read_text()
    two_nodes = [m["loss"] for m in metrics(runs["two_nodes"] / "results" / "pretrain" / "final.pth" / "metrics.jsonl")]
    one_node = [m["loss"] for m in metrics(runs["one_node"] / "results" / "pretrain" / "final.pth" / "metrics.jsonl")]
    assert len(two_nodes) == len(one_node) > 0
    assert two_nodes == pytest.approx(one_node, rel=1e-6), log[-2000:]
