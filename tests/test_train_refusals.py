"""Training refuses, before any work, what would train for nothing or lose data; checkpoints reach the disk
before their marker."""

import json
import os

import pytest
import torch

from llavaflow.train.recipe import Recipe
from test_train import recipe, torchrun


def test_what_would_train_for_nothing_or_lose_data_is_refused_before_training(tiny, subset, tmp_path):
    """ZeRO-3 (per-rank shards nothing downstream reads), fewer iterations than one accumulation (no optimizer
    step), and an --output that holds data of the user's or an input: refused before any training."""
    from llavaflow.atomic import OutputError
    from llavaflow.train.loop import train

    with pytest.raises(ValueError, match="recipe key deepspeed_stage: 3 is not supported"):
        Recipe.from_dict(recipe(tiny, deepspeed_stage=3))
    with pytest.raises(ValueError, match="recipe key deepspeed_stage: 3 is not supported"):  # built in code
        train(Recipe(**recipe(tiny, deepspeed_stage=3)), work_dir=tmp_path / "w", output=tmp_path / "o")

    user = tmp_path / "user_stuff"
    (user / "work").mkdir(parents=True)
    (user / "notes.txt").write_text("mine")
    rec = Recipe(**recipe(tiny, datasets=subset))
    with pytest.raises(OutputError, match=r"user_stuff: exists and is not empty; pass --overwrite"):
        train(rec, work_dir=tmp_path / "w", output=user)
    with pytest.raises(OutputError, match=r"user_stuff: the output is or contains the input .*user_stuff/work"):
        train(rec, work_dir=user / "work", output=user, overwrite=True)
    assert (user / "notes.txt").read_text() == "mine" and not (tmp_path / "w").exists()

    # a typo in an input, a work dir that is not ours or that holds an input: refused before the work dir moves
    work = tmp_path / "w_ours"
    work.mkdir()
    (work / "fingerprint.json").write_text("{}")
    with pytest.raises(ValueError, match=r"recipe key llm: .*llm_typo: no such file or folder"):
        train(Recipe(**recipe(tiny, datasets=subset, llm=str(tiny["llm"]) + "_typo")), work_dir=work, output=tmp_path / "o")
    with pytest.raises(ValueError, match=r"recipe key datasets\[0\].annotation: .*nope.jsonl: no such file"):
        train(Recipe(**recipe(tiny, datasets=[{"annotation": str(tmp_path / "nope.jsonl")}])), work_dir=work,
              output=tmp_path / "o")
    assert sorted(p.name for p in tmp_path.glob("w_ours*")) == ["w_ours"]  # not set aside
    with pytest.raises(ValueError, match=r"user_stuff: not empty and not a work dir of ours"):
        train(rec, work_dir=user, output=tmp_path / "o")
    with pytest.raises(ValueError, match=r"the work dir is or contains the input"):
        train(rec, work_dir=tiny["root"], output=tmp_path / "o")
    assert (user / "notes.txt").read_text() == "mine" and not list(tmp_path.glob("user_stuff.stale-*"))
    # all refused before a process group exists (a group left in this process would leak into later tests)
    assert not torch.distributed.is_initialized() and "RANK" not in os.environ

    proc = torchrun(1, recipe(tiny, datasets=subset, micro_batch_size=8, accumulative_counts=8, save_steps=8),
                    tmp_path / "w", tmp_path / "o", check=False)  # 48 samples: 6 iterations
    assert proc.returncode != 0 and ("finetune: 6 iteration(s) (48 samples, micro_batch_size 8, 1 rank(s), 1 epoch(s)) "
                                     "are fewer than accumulative_counts (8)") in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "o").exists()


def test_a_published_checkpoint_is_replaced_by_a_rerun_and_nothing_else_is(tmp_path):
    from llavaflow.atomic import OutputError
    from llavaflow.train.resume_state import publish

    ckpt = tmp_path / "work" / "iter_4.pth"
    ckpt.mkdir(parents=True)
    (ckpt / "mp_rank_00_model_states.pt").write_bytes(b"new")
    (ckpt / "complete").touch()
    out = tmp_path / "final.pth"
    out.mkdir()
    for name in ("mp_rank_00_model_states.pt", "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "metrics.jsonl"):
        (out / name).write_bytes(b"old")  # an earlier publish
    publish(ckpt, out, inputs=[tmp_path / "work"])
    assert sorted(p.name for p in out.iterdir()) == ["mp_rank_00_model_states.pt"]
    assert (out / "mp_rank_00_model_states.pt").read_bytes() == b"new"
    (out / "README.md").write_text("the user's")
    with pytest.raises(OutputError, match="final.pth: exists and is not empty"):
        publish(ckpt, out)
    assert (out / "README.md").exists()


def test_recipe_files_with_bad_values_are_named(tmp_path):
    from llavaflow.cli import ArgumentError, _load_recipe

    base = {"stage": "pretrain", "llm": "a", "visual_encoder": "b", "datasets": [], "train": ["projector"]}
    cases = [('{"stage": "pretrain",\n', r"r0.json: not a readable recipe \(JSONDecodeError"),
             (json.dumps({**base, "lr": "fast"}), r"r1.json: recipe key lr: expected float, got 'fast'"),
             (json.dumps({**base, "micro_batch_size": 0}), r"r2.json: recipe key micro_batch_size: must be at least 1"),
             (json.dumps({"stage": "pretrain"}), r"r3.json: recipe key\(s\) \['llm', 'visual_encoder', 'datasets', 'train'\]: missing"),
             (json.dumps([base]), r"r4.json: a recipe is a mapping of keys, got list")]
    for i, (text, expected) in enumerate(cases):
        (tmp_path / f"r{i}.json").write_text(text)
        with pytest.raises(ArgumentError, match=expected):
            _load_recipe(str(tmp_path / f"r{i}.json"))
    with pytest.raises(ArgumentError, match=r"^--set: not valid JSON"):
        _load_recipe(json.dumps(base), "{lr: 1}")
    (tmp_path / "good.json").write_text(json.dumps(base))
    with pytest.raises(ArgumentError, match=r"^--set: recipe key save_steps: expected int, got 'x'$"):  # not the file's
        _load_recipe(str(tmp_path / "good.json"), '{"save_steps": "x"}')


def test_fsync_tree_flushes_every_file_and_folder(tmp_path, monkeypatch):
    """A checkpoint's files reach the disk before its `complete` marker is written (loop._save)."""
    import os

    from llavaflow.atomic import fsync_tree

    (tmp_path / "ckpt" / "sub").mkdir(parents=True)
    for name in ("a.pt", "sub/b.pt"):
        (tmp_path / "ckpt" / name).write_bytes(b"x")
    synced, real = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    fsync_tree(tmp_path / "ckpt")
    root = str(tmp_path / "ckpt")
    assert synced == [f"{root}/a.pt", f"{root}/sub/b.pt", f"{root}/sub", root]
