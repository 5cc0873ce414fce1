"""Faults and bad input (issue 14): processes killed at random points and rerun, bad training samples.

Every killed process is one this test started, ended through its process group (and, for launchers that
put their workers in sessions of their own, through its process tree), never by a name pattern.
"""

import json
import os
import random
import subprocess
import sys
import threading
import time

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from conftest import ROOT, run
from processes import kill_tree
from llavaflow.data.dataset import DataError, LlavaDataset
from llavaflow.template import PHI3_CHAT
from test_chat import bomb_png

# ---- bad training samples -------------------------------------------------------------------------


def annotation(tmp_path, images):
    ann = tmp_path / "data.json"
    ann.write_text(json.dumps([{"id": f"s{i}", "image": name, "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": f"Picture {i}."}]}
        for i, name in enumerate(images)]))
    return ann


@pytest.mark.parametrize("workers", [0, 2])
def test_replaced_images_are_counted_across_loader_workers(tiny, tokenizer, tmp_path, workers, caplog):
    from transformers import CLIPImageProcessor

    from llavaflow.data.images import ImageTransform

    for i in range(4):
        Image.new("RGB", (30, 20), (60 * i, 0, 0)).save(tmp_path / f"ok{i}.png")
    (tmp_path / "text.png").write_text("not an image")
    bomb_png(tmp_path / "bomb.png")
    ann = annotation(tmp_path, ["ok0.png", "text.png", "ok1.png", "bomb.png", "ok2.png", "ok3.png"])
    transform = ImageTransform(CLIPImageProcessor.from_pretrained(tiny["vit"]), pad_to_square=True)
    source = [{"annotation": str(ann), "image_folder": str(tmp_path)}]
    strict = LlavaDataset(source, tokenizer, PHI3_CHAT, transform, 64)
    with pytest.raises(DataError, match=r"data.json entry 2 \(id s1\): .*text.png: not a readable image"):
        strict[1]
    with pytest.raises(DataError, match=r"data.json entry 4 \(id s3\): .*bomb.png: refused as a possible "
                                        r"decompression bomb"):
        strict[3]
    ds = LlavaDataset(source, tokenizer, PHI3_CHAT, transform, 64, on_bad_sample="skip")
    batches = list(DataLoader(ds, batch_size=2, num_workers=workers, collate_fn=lambda b: b))
    assert sum(len(b) for b in batches) == 6  # shapes stay fixed: a bad sample is replaced by the next one
    assert ds.replaced_images == 2 and ds.bad_sample_counts()["replaced_image"] == 2
    labels = [tuple(item["labels"].tolist()) for b in batches for item in b]
    assert labels[1] == labels[2] and labels[3] == labels[4]  # replaced by their successors


# ---- the command line: one line per error, --debug for the traceback ----------------------------


def cli(*args):
    return run([sys.executable, "-m", "llavaflow.cli", *args], check=False, timeout=300)


def test_library_errors_are_one_line_and_debug_shows_the_traceback(tmp_path):
    junk = tmp_path / "iter_1.pth"
    junk.write_bytes(random.Random(0).randbytes(4096))
    args = ["convert", "pth_to_hf", str(junk), str(tmp_path / "out"), "--llm", "org/llm", "--visual-encoder", "org/vit"]
    r = cli(*args)
    # the error is the last line (log lines of the work done before it may precede it)
    assert r.returncode == 1 and r.stderr.splitlines()[-1:] == [
        f"llavaflow convert: error: {junk}: not a checkpoint (not a file written by torch.save: it starts with "
        f"{junk.read_bytes()[:4]!r}) (--debug shows the traceback)"]
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()
    r = cli(*args, "--debug")
    assert r.returncode == 1 and "Traceback (most recent call last)" in r.stderr and "CheckpointError" in r.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["mmbench", "/no/such/model", "--data-path", "x.tsv", "--work-dir", "w"],
     "argument model_name_or_path: /no/such/model: no such folder"),
    (["chat", "./no/such/model", "--prompt", "hi"], "argument model_name_or_path: ./no/such/model: no such folder"),
    (["convert", "pth_to_hf", "x.pth", "out", "--llm", "/no/such/llm"], "argument pth_model: x.pth: no such file"),
    (["convert", "to_hf", "--text_model_id", "/no/llama", "--vision_model_id", "/no/vit", "--projector_weight", "p",
      "--save_path", "o"], "argument --text_model_id: /no/llama: no such folder"),
    (["convert", "to_gguf", "/no/xtuner", "out"], "argument xtuner_folder: /no/xtuner: no such folder"),
])
def test_missing_local_paths_are_named_as_missing(args, message, capsys):
    from llavaflow.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_missing_model_folder_is_not_called_a_bad_repo_id(tmp_path, capsys):
    from llavaflow.cli import main

    pth = tmp_path / "iter_1.pth"
    torch.save({"state_dict": {"projector.model.0.weight": torch.zeros(2, 2)}}, pth)
    with pytest.raises(SystemExit):
        main(["convert", "pth_to_hf", str(pth), str(tmp_path / "o"), "--llm", "/no/such/llm", "--visual-encoder", "v/v"])
    assert "argument --llm: /no/such/llm: no such folder (a hub repo id looks like 'org/name')" in capsys.readouterr().err


def test_unknown_download_section_is_named(tmp_path):
    from llavaflow.cli import main

    config = ROOT / "config" / "config.yaml"
    with pytest.raises(SystemExit, match=rf"{config} has no downloads.nope section \(it has: .*mmbench"):
        main(["download", "--root", str(tmp_path), "--config", str(config), "--section", "nope"])


def test_empty_benchmark_and_bad_repo_id_are_explained(tmp_path):
    from llavaflow.cli import explain
    from llavaflow.eval.mmbench_data import BenchmarkError, read_benchmark

    (tmp_path / "empty.tsv").write_text("")
    with pytest.raises(BenchmarkError) as e:  # pandas' own EmptyDataError names no file
        read_benchmark(tmp_path / "empty.tsv")
    assert explain(e.value) == f"{tmp_path / 'empty.tsv'}: the file is empty"
    from huggingface_hub.errors import HFValidationError

    hub = HFValidationError("Repo id must be in the form 'repo_name' or 'namespace/repo_name': '/a/b/c'.")
    assert explain(hub).startswith("not an existing folder, nor a valid Hugging Face repo id (Repo id must")


# ---- kill -9 at random points, then rerun: the result of an uninterrupted run, nothing left behind ----

def kill_points(test: str) -> random.Random:
    """Seeded per test: the same kill points on every run, whichever tests are selected."""
    return random.Random(f"issue-14/{test}")


def start(args, **kw):
    return subprocess.Popen([sys.executable, "-m", "llavaflow.cli", *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True, **kw)


def wait_for(condition, proc, what, timeout=300):
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            return False  # it finished before the kill point: a complete run, also fine to rerun
        assert time.time() < deadline, f"no {what} after {timeout} s"
        time.sleep(0.002)
    return True


def tree(root):
    """{relative path: bytes} of every file under root (extraction markers hold an mtime: name only)."""
    return {str(p.relative_to(root)): (b"" if p.name.startswith(".extracted-") else p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_download_killed_at_random_points_resumes_to_the_same_files(tmp_path):
    import hashlib
    import io
    import tarfile

    from test_download import Handler, Server

    rng = random.Random(0)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, size in (("imgs/a.bin", 900_000), ("imgs/b.bin", 700_000)):
            data = rng.randbytes(size)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    archive, table = buf.getvalue(), rng.randbytes(4_500_000)  # written in 1 MiB chunks: 5 steps
    srv = Server(("127.0.0.1", 0), Handler)
    srv.files, srv.log, srv.cut_once, srv.ignore_range = {"/data.tar.gz": archive, "/t.tsv": table}, [], set(), set()
    srv.chunk_delay = 0.01  # ~6 MB/s: long enough to be killed in the middle
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}"
    entries = json.dumps([
        {"dest": "data.tar.gz", "url": url + "/data.tar.gz", "md5": hashlib.md5(archive).hexdigest(), "extract": True},
        {"dest": "t.tsv", "url": url + "/t.tsv", "sha256": hashlib.sha256(table).hexdigest()}])
    kills = kill_points("download")
    try:
        run([sys.executable, "-m", "llavaflow.cli", "download", "--root", str(tmp_path / "ref"), "--entries", entries])
        root = tmp_path / "killed"
        part = root / "t.tsv.part"
        for _ in range(3):  # each kill lands at a random fraction of what is left of the file
            have = part.stat().st_size if part.exists() else 0
            goal = have + kills.uniform(0.05, 0.8) * (len(table) - have)
            proc = start(["download", "--root", str(root), "--entries", entries])
            wait_for(lambda: part.exists() and part.stat().st_size >= goal, proc, "download progress")
            kill_tree(proc)
        run([sys.executable, "-m", "llavaflow.cli", "download", "--root", str(root), "--entries", entries])
    finally:
        srv.shutdown()
    resumed = [int(r[6:-1]) for p, r in srv.log if p == "/t.tsv" and r]
    assert any(0 < b < len(table) for b in resumed), f"no rerun resumed mid-file: {resumed}"
    assert tree(root) == tree(tmp_path / "ref")  # same files, same bytes; no .part or .bad left behind


def test_conversion_killed_at_random_points_reruns_to_the_same_folder(converted, tiny, tmp_path):
    args = ["convert", "pth_to_hf", str(converted["out"] / "iter_9.pth"), "--llm", str(tiny["llm"]),
            "--visual-encoder", str(tiny["vit"]), "--dtype", "fp32"]
    from llavaflow.cli import main

    ref = tmp_path / "ref"
    began = time.time()
    assert main(args[:3] + [str(ref / "iter_xtuner")] + args[3:]) == 0  # the uninterrupted run, in this process
    window = time.time() - began  # at most this long is the folder being written: the kills land inside it
    kills = kill_points("conversion")
    for k in range(2):
        parent = tmp_path / f"killed{k}"
        parent.mkdir()
        out = parent / "iter_xtuner"
        proc = start(args[:3] + [str(out)] + args[3:])
        if wait_for(lambda: any(parent.glob(".iter_xtuner.tmp-*")), proc, "temporary folder"):
            time.sleep(kills.uniform(0, window))
        kill_tree(proc)
        assert not out.exists() or tree(out) == tree(ref / "iter_xtuner")  # all or nothing, never half a folder
        if not out.exists():
            run([sys.executable, "-m", "llavaflow.cli", *args[:3], str(out), *args[3:]])
        assert tree(out) == tree(ref / "iter_xtuner")
        assert sorted(p.name for p in parent.iterdir()) == ["iter_xtuner"]  # no temporary folder left behind


def test_evaluation_killed_at_random_points_resumes_to_the_same_results(converted, tiny, tmp_path):
    import pandas as pd

    full = pd.read_csv(tiny["mmbench"] / "MMBench_DEV_EN.tsv", sep="\t")
    mains = sorted(full["index"][full["index"] < 1_000_000])[:10]  # 10 questions with their rotations: quick
    tsv = tmp_path / "MMBench_DEV_EN.tsv"
    full[(full["index"] % 1_000_000).isin(mains)].to_csv(tsv, sep="\t", index=False)
    args = ["mmbench", str(converted["out"] / "iter_xtuner"), "--data-path", str(tsv), "--max-new-tokens", "6",
            "--batch-size", "4"]
    from llavaflow.cli import main

    assert main([*args, "--work-dir", str(tmp_path / "ref")]) == 0  # the uninterrupted run, in this process
    rows = len((tmp_path / "ref" / "cache" / "predictions.rank0.jsonl").read_text().splitlines())
    work = tmp_path / "killed"
    cache = work / "cache" / "predictions.rank0.jsonl"
    kills = kill_points("evaluation")
    for _ in range(2):
        have = len(cache.read_text().splitlines()) if cache.exists() else 0
        goal = have + int(kills.uniform(0.1, 0.7) * (rows - have))
        proc = start([*args, "--work-dir", str(work)])
        wait_for(lambda: cache.exists() and cache.read_text().count("\n") >= goal, proc, "predictions")
        kill_tree(proc)
    assert not (work / "summary.json").exists(), "the run finished before it was killed"
    run([sys.executable, "-m", "llavaflow.cli", *args, "--work-dir", str(work)])
    assert tree(work).keys() == tree(tmp_path / "ref").keys()  # the same files, nothing else left behind
    for name in ("predictions.csv", "MMBench_DEV_EN_acc.csv", "mmbench_result.json"):
        assert (work / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name
    assert json.loads((work / "summary.json").read_text()) == json.loads((tmp_path / "ref" / "summary.json").read_text())
    lines = cache.read_text().splitlines()
    assert len(lines) == rows and len({json.loads(ln)["index"] for ln in lines}) == rows  # each row once


def test_training_killed_at_random_points_resumes_to_the_same_weights(tiny, tmp_path):
    from test_train import load_state_dict, recipe, torchrun

    src = tiny["data"] / "finetune" / "conversations.jsonl"
    (tmp_path / "subset.jsonl").write_text("".join(src.read_text().splitlines(keepends=True)[:16]))
    data = [{"annotation": str(tmp_path / "subset.jsonl"), "image_folder": str(tiny["data"] / "finetune")}]
    rec = recipe(tiny, datasets=data, micro_batch_size=2, accumulative_counts=1, epochs=2, save_steps=3)
    torchrun(1, rec, tmp_path / "ref_work", tmp_path / "ref")
    total = 16
    work, out = tmp_path / "work", tmp_path / "out"
    kills = kill_points("training")
    # Once before the first checkpoint (iteration 3: the rerun starts afresh, so the metrics of the killed
    # iterations must go), once after it; each at a random iteration, inside a step, a write or a save.
    for kill_at in (kills.randint(1, 2), kills.randint(4, total - 1)):
        metrics = work / "metrics.jsonl"
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                                 "-m", "llavaflow.cli", "train", "--recipe", json.dumps(rec), "--work-dir", str(work),
                                 "--output", str(out)],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= kill_at, proc, "iterations")
        kill_tree(proc)
    assert not out.exists(), "the run finished before it was killed"
    torchrun(1, rec, work, out)
    ref, got = load_state_dict(tmp_path / "ref"), load_state_dict(out)
    for k in ref:  # float rounding only, as in test_train's resume test
        torch.testing.assert_close(got[k], ref[k], rtol=0, atol=1e-5, msg=k)
    assert [m["iter"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())] == list(range(1, 17))
    assert sorted(p.name for p in work.iterdir()) == sorted(p.name for p in (tmp_path / "ref_work").iterdir())


def test_malformed_samples_are_named_or_skipped_and_the_rest_kept(tiny, tokenizer, tmp_path):
    """An <image> in two turns, a message that is not an object, a line that is not UTF-8: with `error` the
    file and line are named; with `skip` they are counted and every other sample is kept, token for token."""
    from transformers import CLIPImageProcessor

    from llavaflow.data.conversation import encode_turns, llava_turns
    from llavaflow.data.images import ImageTransform

    Image.new("RGB", (30, 20), (90, 0, 0)).save(tmp_path / "ok.png")
    good = {"image": "ok.png", "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                                 {"from": "gpt", "value": "Red."}]}
    text = {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}
    lines = [json.dumps(good).encode(),
             json.dumps({**good, "conversations": good["conversations"] * 2}).encode(),
             json.dumps({**text, "conversations": ["hello", *text["conversations"]]}).encode(),
             b'{"conversations": [{"from": "human", "value": "\xff"}]}',
             json.dumps(text).encode()]
    ann = tmp_path / "data.jsonl"
    ann.write_bytes(b"\n".join(lines) + b"\n")
    transform = ImageTransform(CLIPImageProcessor.from_pretrained(tiny["vit"]), pad_to_square=True)
    source = [{"annotation": str(ann), "image_folder": str(tmp_path)}]
    with pytest.raises(DataError, match=r"data.jsonl:4: malformed JSON line: 'utf-8' codec can't decode"):
        LlavaDataset(source, tokenizer, PHI3_CHAT, transform, 64)
    listed = tmp_path / "data.json"  # entries of a JSON list are named by position (and id), not as lines
    listed.write_text(json.dumps([good, {"id": "x7", "conversations": "Hi"}], indent=2))
    with pytest.raises(DataError, match=r"^\S*data.json entry 2 \(id x7\): expected an object with a 'conversations' list$"):
        LlavaDataset([{**source[0], "annotation": str(listed)}], tokenizer, PHI3_CHAT, transform, 64)
    ann.write_bytes(b"\n".join([*lines[:3], b'{"id": 5, "image": 3, "conversations": []}']) + b"\n")
    with pytest.raises(DataError, match=r"^\S*data.jsonl:4 \(id 5\): 'image' must be a relative path string, got 3$"):
        LlavaDataset(source, tokenizer, PHI3_CHAT, transform, 64)
    ann.write_bytes(b"\n".join(lines[:3]) + b"\n")
    with pytest.raises(DataError, match=r"data.jsonl line 2 \(id 2\): 2 <image> placeholders in one conversation"):
        LlavaDataset(source, tokenizer, PHI3_CHAT, transform, 64)
    ann.write_bytes(b"\n".join(lines) + b"\n")
    ds = LlavaDataset(source, tokenizer, PHI3_CHAT, transform, 64, on_bad_sample="skip")
    assert len(ds) == 2 and ds.bad_sample_counts() == {"malformed": 3, "missing_image": 0, "no_label": 0,
                                                       "replaced_image": 0}
    for item, sample in zip((ds[0], ds[1]), (good, text)):
        ids, labels = encode_turns(llava_turns(sample["conversations"]), tokenizer, PHI3_CHAT, 64)
        assert item["input_ids"].tolist() == ids and item["labels"].tolist() == labels
        assert item["input_ids"].dtype == torch.long
    assert ds.modality_lengths == [len(ds[0]["input_ids"]), -len(ds[1]["input_ids"])]


def test_the_dataset_keeps_a_few_bytes_per_token(tiny, tokenizer, tmp_path):
    """Tokens in flat int32 arrays: 4000 samples of 258 tokens keep 9 bytes per token, where Python lists of
    ints and the conversations' dicts kept 44 (11.5 KB a sample: ~14 GB on every rank for ShareGPT4V-PT)."""
    import gc
    import tracemalloc

    from transformers import CLIPImageProcessor

    from llavaflow.data.images import ImageTransform

    answer = " ".join(f"word{i}" for i in range(40))
    sample = {"conversations": [{"from": "human", "value": "Describe it in detail."}, {"from": "gpt", "value": answer}]}
    ann = tmp_path / "data.json"
    ann.write_text(json.dumps([sample] * 4000))
    transform = ImageTransform(CLIPImageProcessor.from_pretrained(tiny["vit"]), pad_to_square=True)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    ds = LlavaDataset([{"annotation": str(ann), "image_folder": str(tmp_path)}], tokenizer, PHI3_CHAT, transform, 512)
    gc.collect()
    kept = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    tokens = len(ds[0]["input_ids"])
    assert tokens > 100 and kept / (len(ds) * tokens) < 12, (tokens, kept / len(ds))


def _build_on_rank(rank, folder, port, results):
    """One rank of a 2-rank gloo group: rank 1 sees an annotation file with one sample fewer."""
    import os

    from transformers import AutoTokenizer, CLIPImageProcessor

    from llavaflow.data.images import ImageTransform

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder / "llm")
        transform = ImageTransform(CLIPImageProcessor.from_pretrained(folder / "vit"), pad_to_square=True)
        ds = LlavaDataset([{"annotation": str(folder / f"rank{rank}.json"), "image_folder": str(folder)}],
                          tokenizer, PHI3_CHAT, transform, 64)
        try:
            ds.check_same_on_every_rank()
            results.put((rank, "ok"))
        except DataError as e:
            results.put((rank, str(e)))
    finally:
        torch.distributed.destroy_process_group()


def test_ranks_that_built_different_datasets_stop_at_the_start(tiny, tmp_path):
    import shutil

    import torch.multiprocessing as mp

    shutil.copytree(tiny["llm"], tmp_path / "llm")
    shutil.copytree(tiny["vit"], tmp_path / "vit")
    conv = [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]
    for rank, n in ((0, 3), (1, 2)):
        (tmp_path / f"rank{rank}.json").write_text(json.dumps([{"conversations": conv}] * n))
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.start_processes(_build_on_rank, args=(tmp_path, 29400 + os.getpid() % 500, results), nprocs=2,
                       start_method="spawn")
    got = dict(results.get() for _ in range(2))
    assert got[0] == got[1] and "the ranks built different datasets (samples, fingerprint per rank: [(3, " in got[0]
