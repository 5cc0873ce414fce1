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
