"""Training runs for real: torchrun, DeepSpeed ZeRO-2 on CPU ranks with gloo, checkpoints and resume."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, run
from processes import kill_tree
from llavaflow.model.checkpoint_reader import CheckpointError, load_state_dict
from llavaflow.train.recipe import Recipe
from llavaflow.train.schedule import lr_at

TRAIN = ["-m", "llavaflow.cli", "train"]  # torchrun runs the installed command's module


def recipe(tiny, **overrides) -> dict:
    base = Recipe(
        stage="finetune", llm=str(tiny["llm"]), visual_encoder=str(tiny["vit"]),
        datasets=[{"annotation": str(tiny["data"] / "finetune" / "conversations.jsonl"),
                   "image_folder": str(tiny["data"] / "finetune")}],
        train=["llm", "visual_encoder", "projector"], pad_image_to_square=True, micro_batch_size=2,
        accumulative_counts=2, lr=1e-3, epochs=1, sampler="shuffle", gradient_checkpointing=True,
        precision="fp32", seed=7, save_steps=4, save_total_limit=2, num_workers=0, log_interval=1, max_length=256,
    ).to_dict()
    base.update(overrides)
    return base


def torchrun(nproc, rec, work, out, env_extra=None, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *TRAIN,
           "--recipe", json.dumps(rec), "--work-dir", str(work), "--output", str(out)]
    return run(cmd, env={"OMP_NUM_THREADS": "1", **(env_extra or {})}, **kw)


def metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def rank0_micro_batch_rows(rec: dict, *, world: int, patches: int) -> tuple[list[int], list[int]]:
    """Per iteration, the running max of rank 0's micro-batch in decoder rows (padded, packed), from the
    dataset's own samples in the sampler's order: what each metrics row's max_micro_batch_rows should say."""
    from transformers import AutoTokenizer

    from llavaflow.constants import IMAGE_TOKEN_INDEX
    from llavaflow.train.loop import build_dataset, build_sampler

    r = Recipe(**rec)
    dataset = build_dataset(r, AutoTokenizer.from_pretrained(r.llm, padding_side="right"))
    sampler = build_sampler(r, dataset, 0, world)
    padded, packed = [0], [0]
    for epoch in range(r.epochs):
        sampler.set_epoch(epoch)
        order = list(sampler)
        for start in range(0, len(order), r.micro_batch_size):
            rows = [len(ids) + (patches - 1) * int((ids == IMAGE_TOKEN_INDEX).sum())
                    for ids in (dataset[i]["input_ids"] for i in order[start:start + r.micro_batch_size])]
            padded.append(max(padded[-1], len(rows) * max(rows)))
            packed.append(max(packed[-1], sum(rows)))
    return padded[1:], packed[1:]


def test_two_ranks_match_one_rank_with_doubled_accumulation(tiny, subset, tmp_path):
    # micro-batch 1, so both runs average the same 4 per-sample losses per optimizer step.
    one = recipe(tiny, datasets=subset, micro_batch_size=1, accumulative_counts=4, save_steps=1000)
    two = dict(one, accumulative_counts=2)
    torchrun(1, one, tmp_path / "w1", tmp_path / "o1")
    torchrun(2, two, tmp_path / "w2", tmp_path / "o2")
    m1, m2 = metrics(tmp_path / "o1" / "metrics.jsonl"), metrics(tmp_path / "o2" / "metrics.jsonl")
    assert len(m1) == 48 and len(m2) == 24
    # Loss per optimizer step: mean of 4 micro-iterations (1 rank) vs of 2 rank-averaged ones (2 ranks).
    step1 = [sum(r["loss"] for r in m1[i:i + 4]) / 4 for i in range(0, 48, 4)]
    step2 = [sum(r["loss"] for r in m2[i:i + 2]) / 2 for i in range(0, 24, 2)]
    norm1 = [r["grad_norm"] for r in m1 if r["grad_norm"] is not None]
    norm2 = [r["grad_norm"] for r in m2 if r["grad_norm"] is not None]
    assert len(norm1) == len(norm2) == 12
    # Up to the first optimizer step both runs see the same samples and weights: the losses and the
    # global gradient norm (reduced over ranks by ZeRO-2) agree up to float summation order.
    assert step1[0] == pytest.approx(step2[0], rel=1e-6)
    assert norm1[0] == pytest.approx(norm2[0], rel=1e-5)
    # After it they drift apart a little by design: the reference steps its lr per micro-iteration, so
    # with 48 vs 24 micro-iterations the optimizer steps sit at other points of the cosine.
    # Tolerance: 1 % (measured 0.4 %); a wrong gradient reduction shows up in the first step already.
    assert step1 == pytest.approx(step2, rel=1e-2)


def test_killed_run_resumes_to_the_same_weights(tiny, subset, tmp_path):
    rec = recipe(tiny, datasets=subset, micro_batch_size=2, accumulative_counts=2, epochs=4, save_steps=4)
    torchrun(1, rec, tmp_path / "ref_work", tmp_path / "ref")

    work, out = tmp_path / "work", tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", *TRAIN,
           "--recipe", json.dumps(rec), "--work-dir", str(work), "--output", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 300
    while not (work / "iter_8.pth" / "complete").exists():
        assert proc.poll() is None and time.time() < deadline, "training ended before it could be killed"
        time.sleep(0.05)
    # Kill the launcher and its ranks (torchrun starts them in sessions of their own), as a scheduler would:
    # this test's process tree only, never a name pattern.
    kill_tree(proc)
    assert not out.exists(), "the run finished before it was killed"

    resumed = torchrun(1, rec, work, out)
    assert "resuming at iteration" in resumed.stdout + resumed.stderr
    # the samples rank 0 tokenised and saved in the work dir: mapped again, not tokenised again
    assert f"samples tokenised by an earlier attempt, from {work / 'dataset'}" in resumed.stdout
    ref, got = load_state_dict(tmp_path / "ref"), load_state_dict(out)
    # Tolerance: float rounding only (measured max |diff| 1.2e-6 after 96 iterations, fp32 on CPU);
    # a resume from the wrong position or without the optimizer state moves weights by ~1e-3.
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-5, msg=k)
    # The published metrics cover every iteration once, and the lr is the closed form at each one.
    m = metrics(out / "metrics.jsonl")
    assert [r["iter"] for r in m] == list(range(1, 97))
    assert [r["loss"] for r in m] == pytest.approx([r["loss"] for r in metrics(tmp_path / "ref" / "metrics.jsonl")])
    assert [r["lr"] for r in m] == pytest.approx([lr_at(i, 96, 1e-3, 0.03) for i in range(96)])
    kept = sorted(p.name for p in work.glob("iter_*.pth"))
    assert kept == ["iter_92.pth", "iter_96.pth"]  # save_total_limit


def test_a_changed_recipe_or_input_starts_fresh(tiny, subset, tmp_path):
    """A finished run's work dir is kept only for the same recipe, world size, training code and inputs: a
    rerun for anything else would resume its last checkpoint and publish it again, untrained on the new ones
    (as a rewritten input did until 2026-12-01). The old work dir is moved aside, never deleted."""
    from llavaflow.identity import TRAIN_CODE, code_hash

    rec = recipe(tiny, datasets=subset, micro_batch_size=4, accumulative_counts=1, save_steps=6)
    torchrun(1, rec, tmp_path / "work", tmp_path / "out")
    fingerprint = json.loads((tmp_path / "work" / "fingerprint.json").read_text())
    assert fingerprint["code"] == code_hash(*TRAIN_CODE)
    assert sorted(fingerprint["inputs"]) == ["annotation0", "llm", "visual_encoder"]
    proc = torchrun(1, dict(rec, lr=5e-4), tmp_path / "work", tmp_path / "out")
    assert "starting fresh" in proc.stdout + proc.stderr
    assert len(list(tmp_path.glob("work.stale-*"))) == 1
    time.sleep(1.1)  # the stale folder's name has a resolution of one second
    annotation = Path(subset[0]["annotation"])
    annotation.write_text(annotation.read_text())  # re-downloaded: the same path, written again
    proc = torchrun(1, dict(rec, lr=5e-4), tmp_path / "work", tmp_path / "out")
    assert "starting fresh" in proc.stdout + proc.stderr
    assert len(list(tmp_path.glob("work.stale-*"))) == 2
    # the saved samples torn (a machine crash after the rename): tokenised again, not a failure on every retry
    ids = tmp_path / "work" / "dataset" / "ids.npy"
    ids.write_bytes(ids.read_bytes()[:100])
    proc = torchrun(1, dict(rec, lr=5e-4), tmp_path / "work", tmp_path / "out")
    assert f"{tmp_path / 'work' / 'dataset'} is unreadable (" in proc.stdout and "tokenising again" in proc.stdout
    assert len(np.load(ids)) > 100


def test_images_found_after_a_run_that_skipped_them_start_fresh(tiny, subset, tmp_path):
    """Under on_bad_sample: skip, a sample whose image is missing is left out. Images are not in the input
    identity, so once the missing one is there (copied in after the data check, which then reruns the stage)
    the work dir must not be resumed: its samples and checkpoints were made without it."""
    folder = tmp_path / "images"
    shutil.copytree(subset[0]["image_folder"], folder)
    lines = Path(subset[0]["annotation"]).read_text().splitlines(keepends=True)[:12]
    (tmp_path / "twelve.jsonl").write_text("".join(lines))
    data = [{"annotation": str(tmp_path / "twelve.jsonl"), "image_folder": str(folder)}]
    first = json.loads(lines[0])
    image = folder / first["image"]
    held_back = image.rename(tmp_path / "held-back.png")
    rec = recipe(tiny, datasets=data, micro_batch_size=4, accumulative_counts=1, save_steps=1000,
                 on_bad_sample="skip")
    torchrun(1, rec, tmp_path / "work", tmp_path / "out")
    saved = json.loads((tmp_path / "work" / "dataset" / "samples.json").read_text())
    assert saved["missing_images"] == [str(image)] and saved["skipped"]["missing_image"] == 1
    proc = torchrun(1, rec, tmp_path / "work", tmp_path / "out")  # nothing changed: the finished run is kept
    assert "moved to" not in proc.stdout and not list(tmp_path.glob("work.stale-*"))
    held_back.rename(image)
    proc = torchrun(1, rec, tmp_path / "work", tmp_path / "out")
    assert (f"work dir {tmp_path / 'work'} was trained without 1 image(s) that were missing then and exist now "
            f"(first: {image}); moved to") in proc.stdout, proc.stdout[-2000:]
    assert len(list(tmp_path.glob("work.stale-*"))) == 1
    saved = json.loads((tmp_path / "work" / "dataset" / "samples.json").read_text())
    assert saved["missing_images"] == [] and len(saved["images"]) == 12

def test_speed_settings_train_like_the_plain_run_and_may_change_on_resume(tiny, subset, tmp_path):
    """Packing, fused loss, selective checkpointing and fused AdamW on 2 ranks follow the plain run's loss
    curve; they are not part of the run's identity, so a run resumes across a change of them."""
    plain = recipe(tiny, datasets=subset, micro_batch_size=4, accumulative_counts=1, save_steps=3, epochs=2)
    fast = dict(plain, packing=True, fused_loss=True, gradient_checkpointing="selective", fused_optimizer=True)
    plain_log = torchrun(2, plain, tmp_path / "w1", tmp_path / "o1").stdout
    fast_log = torchrun(2, fast, tmp_path / "w2", tmp_path / "o2").stdout
    # every block of the tiny LLM and ViT (2 + 2) checkpoints, as the run says
    assert "checkpointing full on 4 of 4 blocks" in plain_log, plain_log
    assert "checkpointing selective on 4 of 4 blocks" in fast_log, fast_log
    m1, m2 = metrics(tmp_path / "o1" / "metrics.jsonl"), metrics(tmp_path / "o2" / "metrics.jsonl")
    assert len(m1) == len(m2) == 12
    # Same math, other summation order: the first loss agrees to float rounding, and after 12 steps of
    # lr 1e-3 the curves stay within 1e-3 (a wrong mask or lost sample moves them by > 1e-2).
    assert m2[0]["loss"] == pytest.approx(m1[0]["loss"], rel=1e-5)
    assert [r["loss"] for r in m2] == pytest.approx([r["loss"] for r in m1], rel=1e-3)
    # The largest micro-batch rank 0 ran, in decoder rows: padded to its longest sample, or packed end to end
    padded, packed = rank0_micro_batch_rows(plain, world=2, patches=16)  # 56 px images of 14 px patches
    assert [r["max_micro_batch_rows"] for r in m1] == padded
    assert [r["max_micro_batch_rows"] for r in m2] == packed
    assert packed[-1] < padded[-1]

    shutil.rmtree(tmp_path / "w2" / "iter_12.pth")  # as if killed after iteration 9
    proc = torchrun(2, dict(fast, packing=False, fused_optimizer=False, compile=True), tmp_path / "w2", tmp_path / "o3")
    assert "resuming at iteration 9" in proc.stdout + proc.stderr
    # compiled blocks, checkpointed: whole graphs, none broken (each ViT block once broke at transformers'
    # hidden-states hook, and with checkpointing ran eagerly whole), as the run reports and train_e2e.py reads
    said = [line for line in proc.stdout.splitlines() if line.startswith("torch.compile (rank 0): ")]
    assert len(said) == 1, proc.stdout
    counts = json.loads(said[0].partition(": ")[2])
    assert counts["graphs"] > 0 and counts["graph_breaks"] == 0 and counts["unsupported"] == 0, counts
    m3 = metrics(tmp_path / "o3" / "metrics.jsonl")
    assert [r["loss"] for r in m3] == pytest.approx([r["loss"] for r in m2], rel=1e-3)


def test_bad_inputs_are_named(tiny, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]}\n'
                   '{"id": 2, "conversations": [\n')
    rec = recipe(tiny, datasets=[{"annotation": str(bad), "image_folder": str(tmp_path)}])
    # two ranks: rank 0 tokenises for both, and the other stops with it instead of waiting for it
    proc = torchrun(2, rec, tmp_path / "w", tmp_path / "o", check=False, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and f"{bad}:2: malformed JSON line" in out
    assert "rank 0 could not tokenise the samples" in out and not (tmp_path / "w" / "dataset").exists()

    missing = tmp_path / "missing.jsonl"
    missing.write_text('{"id": "s7", "image": "nope.png", "conversations": [{"from": "human", "value": "<image>"}, '
                       '{"from": "gpt", "value": "x"}]}\n')
    rec = recipe(tiny, datasets=[{"annotation": str(missing), "image_folder": str(tmp_path)}])
    proc = torchrun(1, rec, tmp_path / "w2", tmp_path / "o2", check=False)
    assert proc.returncode != 0 and f"{missing} line 1 (id s7): image {tmp_path}/nope.png not found" in proc.stdout + proc.stderr


def test_a_stale_deepspeed_build_lock_is_named_instead_of_waited_on_forever(tiny, subset, tmp_path, caplog,
                                                                           monkeypatch):
    """A run killed while torch's JIT loader held DeepSpeed's op lock leaves the file; every later CPU run would
    wait on it silently. Ours fails before any work with the file's name, and leaves the file alone."""
    import logging
    import os

    from llavaflow.train.jit_build_lock import build_lock, check_build_lock

    extensions = tmp_path / "torch_extensions"
    lock = extensions / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    os.utime(lock, (time.time() - 3600, time.time() - 3600))
    proc = torchrun(1, recipe(tiny, datasets=subset), tmp_path / "w", tmp_path / "o", check=False,
                    env_extra={"TORCH_EXTENSIONS_DIR": str(extensions)}, timeout=300)
    assert proc.returncode != 0
    assert f"{lock}: left by a DeepSpeed op build that was killed 60 min ago" in proc.stdout + proc.stderr
    assert lock.exists() and not (tmp_path / "w").exists()
    # a young lock is a build under way: waited for, with a line in the log
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(extensions))
    assert build_lock() == lock
    os.utime(lock)
    with caplog.at_level(logging.WARNING):
        check_build_lock(lock)
    assert f"{lock} exists: waiting" in caplog.text


def test_checkpoint_reader_rejects_what_is_not_a_checkpoint(tiny, tmp_path):
    with pytest.raises(CheckpointError, match="HF-format folder"):
        load_state_dict(tiny["llm"])
    corrupt = tmp_path / "iter_3.pth"
    corrupt.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_state_dict(corrupt)
    with pytest.raises(CheckpointError, match="not found"):
        load_state_dict(tmp_path / "nothing.pth")


def test_rows_average_their_interval_and_a_torn_last_row_is_redone(tiny, subset, tmp_path):
    """Rows every log_interval (and at each checkpoint) hold the mean loss of their micro-iterations; a row
    torn by a kill mid-write is cut off on resume and the iterations after the checkpoint are logged once."""
    ref = recipe(tiny, datasets=subset, micro_batch_size=2, accumulative_counts=2, save_steps=8, log_interval=1)
    torchrun(1, ref, tmp_path / "w1", tmp_path / "o1")
    per_iter = [r["loss"] for r in metrics(tmp_path / "o1" / "metrics.jsonl")]
    assert len(per_iter) == 24

    sparse = dict(ref, log_interval=5)
    work, out = tmp_path / "w2", tmp_path / "o2"
    torchrun(1, sparse, work, out)
    shutil.rmtree(work / "iter_24.pth")  # as if killed after the checkpoint of iteration 16 ...
    with open(work / "metrics.jsonl", "a") as f:
        f.write('{"iter": 25, "epoch": 0, "lo')  # ... while writing a row
    proc = torchrun(1, sparse, work, out)
    assert "resuming at iteration 16" in proc.stdout and "torn last row" in proc.stdout
    rows = metrics(out / "metrics.jsonl")
    ends = [r["iter"] for r in rows]
    assert ends == [5, 8, 10, 15, 16, 20, 24]  # log interval 5, checkpoints at 8, 16 and the end
    starts = [0] + ends[:-1]
    for row, a, b in zip(rows, starts, ends):
        assert row["loss"] == pytest.approx(sum(per_iter[a:b]) / (b - a), rel=1e-5), row


def test_metrics_reader_names_a_malformed_row(tmp_path):
    from llavaflow.train.metrics import cut_rows_after

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"iter": 1, "loss": 2.0}\nnot json\n{"iter": 3, "loss": 1.0}\n')
    with pytest.raises(ValueError, match=rf"{path}:2: malformed metrics row"):
        cut_rows_after(path, 3)
    path.write_text('{"iter": 1, "loss": 2.0}\n{"iter": 2, "loss": 1.0}\n{"iter": 3, "lo')
    cut_rows_after(path, 1)
    assert path.read_text() == '{"iter": 1, "loss": 2.0}\n'


def _without_flock(monkeypatch) -> None:
    """As on Lustre mounted without -o flock."""
    import errno
    import fcntl

    def no_flock(*args):
        raise OSError(errno.ENOSYS, "Function not implemented")
    monkeypatch.setattr(fcntl, "flock", no_flock)


@pytest.mark.parametrize("flock", ["works", "ENOSYS"])
def test_work_dir_lock_is_exclusive_even_without_flock(tmp_path, monkeypatch, flock):
    from llavaflow.train.resume_state import WorkDirLock

    if flock == "ENOSYS":
        _without_flock(monkeypatch)
    with WorkDirLock(tmp_path / "work", lease_s=1.0):
        with pytest.raises(RuntimeError, match="is locked: another job is training into this work dir"):
            with WorkDirLock(tmp_path / "work", lease_s=1.0):
                pass
    with WorkDirLock(tmp_path / "work", lease_s=1.0):  # released on exit
        pass
    if flock == "ENOSYS":  # asking whether flock works created no lock file that a lease could be taken for
        assert not (tmp_path / "work.lock").exists()


HOLD_THE_LOCK = """
import errno, fcntl, sys, time
from pathlib import Path

def no_flock(*args):
    raise OSError(errno.ENOSYS, "Function not implemented")

fcntl.flock = no_flock  # as on Lustre mounted without -o flock
from llavaflow.train.resume_state import WorkDirLock

with WorkDirLock(Path(sys.argv[1]), lease_s=2.0):
    print("held", flush=True)
    time.sleep(600)
"""


def test_a_lease_held_by_a_dead_job_on_another_node_is_taken_over(tmp_path, monkeypatch):
    """Without flock, a job killed on one node (a SLURM TIMEOUT) leaves its marker; the retry runs on another
    node, where the marker's pid means nothing. A live holder renews its lease and keeps the lock; a dead one's
    lease is taken over once it has stayed unchanged for lease_s (filelock's plain marker: locked for ever)."""
    from llavaflow.train.resume_state import WorkDirLock

    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK, str(tmp_path / "work")],
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert holder.stdout.readline() == "held\n"
        _without_flock(monkeypatch)
        started = time.monotonic()
        with pytest.raises(RuntimeError, match=r"work.lease is locked: .*its lease was renewed for 3 s"):
            with WorkDirLock(tmp_path / "work", lease_s=2.0):
                pass
        assert time.monotonic() - started >= 3.0
    finally:
        kill_tree(holder)
    marker = tmp_path / "work.lease"
    lines = marker.read_text().splitlines(keepends=True)
    assert any(line.startswith("host=") for line in lines)  # the marker as filelock writes it: pid and host
    marker.write_text("".join("host=another-node\n" if line.startswith("host=") else line for line in lines))
    started = time.monotonic()
    with WorkDirLock(tmp_path / "work", lease_s=2.0):
        waited = time.monotonic() - started
    assert 2.0 <= waited < 3.0 + 2.0, waited


def test_pretrain_checkpoint_holds_the_trainable_parts_only(tiny, subset, tmp_path):
    from llavaflow.model.build import build_llava
    from llavaflow.model.llava import trainable_state_dict

    rec = recipe(tiny, datasets=subset, train=["projector"], micro_batch_size=8, accumulative_counts=1,
                 gradient_checkpointing=False, save_steps=1000)
    torchrun(1, rec, tmp_path / "w", tmp_path / "o")
    model = build_llava(str(tiny["llm"]), str(tiny["vit"]))
    model.set_trainable(["projector"])
    assert set(load_state_dict(tmp_path / "o")) == set(trainable_state_dict(model))
    blob = torch.load(tmp_path / "o" / "mp_rank_00_model_states.pt", weights_only=True)
    assert not blob.get("frozen_param_fragments")  # ZeRO-2 copies no frozen LLM/ViT weights into the file


def test_a_finished_run_leaves_its_process_group(tiny, subset, tmp_path):
    """The stage destroys the group it joined (NCCL warns of leaked resources at exit otherwise)."""
    rec = recipe(tiny, datasets=subset, train=["projector"], micro_batch_size=8, accumulative_counts=1,
                 gradient_checkpointing=False, save_steps=1000)
    code = ("import sys, torch; from llavaflow.cli import main; "
            "rc = main(['train', '--recipe', sys.argv[1], '--work-dir', sys.argv[2], '--output', sys.argv[3]]); "
            "print('rc', rc, 'group left', not torch.distributed.is_initialized())")
    proc = run([sys.executable, "-c", code, json.dumps(rec), str(tmp_path / "w"), str(tmp_path / "o")],
               env={"OMP_NUM_THREADS": "1"})
    assert proc.stdout.splitlines()[-1] == "rc 0 group left True", proc.stdout[-2000:]


def test_optimizer_offload_trains_like_the_plain_run(tiny, subset, tmp_path):
    """offload_optimizer: cpu (DeepSpeed keeps fp32 master weights and AdamW moments in host memory and
    steps there) computes the same steps; a stage that cannot offload is rejected before training."""
    plain = recipe(tiny, datasets=subset, micro_batch_size=4, accumulative_counts=2, save_steps=1000)
    torchrun(1, plain, tmp_path / "w1", tmp_path / "o1")
    torchrun(1, dict(plain, offload_optimizer="cpu"), tmp_path / "w2", tmp_path / "o2")
    m1, m2 = metrics(tmp_path / "o1" / "metrics.jsonl"), metrics(tmp_path / "o2" / "metrics.jsonl")
    assert len(m1) == len(m2) == 12
    # Same fp32 AdamW on the same partitions (measured: equal to float rounding); a lost or doubled step
    # moves the loss by > 1e-3 within 6 steps of lr 1e-3.
    assert [r["loss"] for r in m2] == pytest.approx([r["loss"] for r in m1], rel=1e-5)
    ref, got = load_state_dict(tmp_path / "o1"), load_state_dict(tmp_path / "o2")
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-5, msg=k)

    proc = torchrun(1, dict(plain, offload_optimizer="cpu", deepspeed_stage=0), tmp_path / "w3", tmp_path / "o3",
                    check=False)
    assert proc.returncode != 0 and "recipe key offload_optimizer: cpu needs deepspeed_stage 1 or 2" in proc.stderr
    assert not (tmp_path / "w3").exists()
