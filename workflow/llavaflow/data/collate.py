"""Batching as xtuner's default_collate_fn: right padding with id 0, mask from real lengths."""

from __future__ import annotations

import torch

from ..constants import DEFAULT_PAD_TOKEN_INDEX, IGNORE_INDEX


def collate(batch: list[dict], pad_id: int = DEFAULT_PAD_TOKEN_INDEX) -> dict:
    lengths = [len(b["input_ids"]) for b in batch]
    width = max(lengths)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.bool)
    for i, (b, n) in enumerate(zip(batch, lengths)):
        input_ids[i, :n] = b["input_ids"]
        labels[i, :n] = b["labels"]
        attention_mask[i, :n] = True
    return {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": attention_mask,
        "pixel_values": torch.stack([b["pixel_values"] for b in batch]),
    }
