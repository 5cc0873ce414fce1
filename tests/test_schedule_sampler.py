"""The closed-form lr schedule and the resumable samplers."""

import math

import pytest
import torch

from llavaflow.data.sampler import LengthGroupedSampler, ShuffleSampler
from llavaflow.train.schedule import lr_at, warmup_iters


def test_reference_warmup_and_cosine_points():
    # Pretrain at 8 GPUs: E = 9742, W = 292 (xtuner's LinearLR + CosineAnnealingLR by micro-iteration).
    total, lr0 = 9742, 1e-3
    assert warmup_iters(total, 0.03) == 292
    assert lr_at(0, total, lr0) == pytest.approx(1e-8)
    assert lr_at(291, total, lr0) == pytest.approx(lr0)  # factor reaches 1 at W - 1
    assert lr_at(100, total, lr0) == pytest.approx(lr0 * (1e-5 + (1 - 1e-5) * 100 / 291))
    assert lr_at(292, total, lr0) == pytest.approx(lr0)
    mid = 292 + 9450 // 2
    assert lr_at(mid, total, lr0) == pytest.approx(lr0 * (1 + math.cos(math.pi * 4725 / 9450)) / 2)
    assert lr_at(total - 1, total, lr0) == pytest.approx(lr0 * (1 + math.cos(math.pi * 9449 / 9450)) / 2)
    # Fine-tune: 2 epochs of 19810, W = 1188, I - W = 38432.
    assert warmup_iters(2 * 19810, 0.03) == 1188
    with pytest.raises(ValueError):
        lr_at(total, total, lr0)


def _ranks(sampler_cls, world, **kw):
    return [list(sampler_cls(rank=r, world=world, **kw)) for r in range(world)]


def test_shuffle_sampler_rounds_up_and_shards():
    shards = _ranks(ShuffleSampler, 3, n=10, seed=1)
    assert [len(s) for s in shards] == [4, 4, 4]
    assert set(sum(shards, [])) == set(range(10))


def test_length_grouped_sampler_keeps_modalities_apart_and_longest_first():
    lengths = [(i % 7 + 1) * (1 if i % 3 else -1) for i in range(200)]
    s = LengthGroupedSampler(lengths, per_device_batch_size=4, seed=0)
    order = list(s)
    assert sorted(order) == list(range(200))
    assert abs(lengths[order[0]]) == max(abs(x) for x in lengths)
    groups = [order[i:i + s.group_size] for i in range(0, 200 - s.group_size, s.group_size)][1:-1]
    for g in groups:  # full groups are one modality, sorted by length, descending
        signs = {x > 0 for x in (lengths[i] for i in g)}
        assert len(signs) == 1
        assert [abs(lengths[i]) for i in g] == sorted((abs(lengths[i]) for i in g), reverse=True)


def test_text_only_lengths_group_by_their_signed_length_as_xtuner():
    """One modality: xtuner sorts each group by the signed lengths, so all-text groups (negative modality
    lengths) run shortest first."""
    lengths = [-(i % 7 + 1) for i in range(200)]
    s = LengthGroupedSampler(lengths, per_device_batch_size=4, seed=0)
    order = list(s)
    groups = [order[i:i + s.group_size] for i in range(0, 200 - s.group_size, s.group_size)][1:-1]
    assert groups and all([lengths[i] for i in g] == sorted((lengths[i] for i in g), reverse=True) for g in groups)


@pytest.mark.parametrize("make", [
    lambda r: ShuffleSampler(37, seed=3, rank=r, world=2),
    lambda r: LengthGroupedSampler([i % 5 + 1 for i in range(37)], 4, seed=3, rank=r, world=2),
])
def test_resume_skips_exactly_what_was_consumed(make):
    for rank in (0, 1):
        s = make(rank)
        s.set_epoch(2)
        full = list(s)
        s.set_epoch(2, skip=6)
        assert list(s) == full[6:] and len(s) == len(full) - 6
        s.set_epoch(3)
        assert list(s) != full  # a new epoch, a new order
