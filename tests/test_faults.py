"""Faults and bad input (issue 14): processes killed at random points and rerun, bad training samples.

Every killed process is one this test started, ended through its process group (and, for launchers that
put their workers in sessions of their own, through its process tree), never by a name pattern.
"""

import json
import random
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from conftest import ROOT, run
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
    err = [ln for ln in r.stderr.splitlines() if " INFO " not in ln and " WARNING " not in ln and "torchvision" not in ln]
    assert r.returncode == 1 and err == [
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


def test_benchmark_file_errors_name_the_file(tmp_path, capsys):
    from llavaflow.cli import explain
    from llavaflow.eval.mmbench_data import BenchmarkError, read_benchmark

    (tmp_path / "empty.tsv").write_text("")
    with pytest.raises(BenchmarkError) as e:  # pandas' own EmptyDataError names no file
        read_benchmark(tmp_path / "empty.tsv")
    assert explain(e.value) == f"{tmp_path / 'empty.tsv'}: the file is empty"
    from huggingface_hub.errors import HFValidationError

    hub = HFValidationError("Repo id must be in the form 'repo_name' or 'namespace/repo_name': '/a/b/c'.")
    assert explain(hub).startswith("not an existing folder, nor a valid Hugging Face repo id (Repo id must")
