"""Samplers as mmengine's DefaultSampler and xtuner's LengthGroupedSampler, made resumable.

Both are a pure function of (seed, epoch, rank, world): resuming mid-epoch replays the same order and
skips what was already consumed (`skip`), so resumed training sees exactly the remaining samples.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import Sampler


def _round_up_and_shard(indices: list[int], num_samples: int, rank: int, world: int) -> list[int]:
    total = num_samples * world
    indices = (indices * (total // len(indices) + 1))[:total]
    return indices[rank:total:world]


class _EpochSampler(Sampler[int]):
    def __init__(self, n: int, per_rank_batch: int, seed: int, rank: int, world: int):
        if n == 0:
            raise ValueError("cannot sample from an empty dataset")
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.num_samples = math.ceil(n / world / per_rank_batch) * per_rank_batch
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch's order; `skip` drops this rank's first samples (a resume point)."""
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return self.num_samples - self.skip

    def order(self, generator: torch.Generator) -> list[int]:
        raise NotImplementedError

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        indices = _round_up_and_shard(self.order(g), self.num_samples, self.rank, self.world)
        return iter(indices[self.skip :])


class ShuffleSampler(_EpochSampler):
    """mmengine DefaultSampler(shuffle=True, round_up=True); per_rank_batch only sizes the epoch."""

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1):
        super().__init__(n, 1, seed, rank, world)

    def order(self, generator):
        return torch.randperm(self.n, generator=generator).tolist()


def length_grouped_indices(lengths: list[int], group_size: int, generator: torch.Generator) -> list[int]:
    """xtuner get_length_grouped_indices: image and text samples grouped apart, longest first."""

    def groups(lens):
        perm = torch.randperm(len(lens), generator=generator).tolist()
        chunks = [perm[i : i + group_size] for i in range(0, len(lens), group_size)]
        return [sorted(c, key=lambda i: lens[i], reverse=True) for c in chunks]

    if 0 in lengths:
        raise ValueError("length-grouped sampling needs non-zero lengths")
    if all(x > 0 for x in lengths) or all(x < 0 for x in lengths):
        # xtuner sorts one modality by the signed lengths: all text (negative) comes shortest first
        megabatches = groups(lengths)
    else:
        mm = [i for i, x in enumerate(lengths) if x > 0]
        lang = [i for i, x in enumerate(lengths) if x < 0]
        mm_groups = [[mm[i] for i in g] for g in groups([lengths[i] for i in mm])]
        lang_groups = [[lang[i] for i in g] for g in groups([-lengths[i] for i in lang])]
        last = mm_groups[-1] + lang_groups[-1]
        megabatches = mm_groups[:-1] + lang_groups[:-1]
        megabatches = [megabatches[i] for i in torch.randperm(len(megabatches), generator=generator).tolist()]
        if last:
            megabatches.append(sorted(last, key=lambda i: abs(lengths[i]), reverse=True))
    longest = max(range(len(megabatches)), key=lambda k: abs(lengths[megabatches[k][0]]))
    megabatches[0][0], megabatches[longest][0] = megabatches[longest][0], megabatches[0][0]
    return [i for mb in megabatches for i in mb]


class LengthGroupedSampler(_EpochSampler):
    """xtuner LengthGroupedSampler; per_device_batch_size is micro-batch x accumulation there."""

    def __init__(self, lengths: list[int], per_device_batch_size: int, seed: int, rank: int = 0, world: int = 1):
        super().__init__(len(lengths), per_device_batch_size, seed, rank, world)
        self.lengths = lengths
        total_batch = per_device_batch_size * world
        mult = min(len(lengths) // (total_batch * 4), 50) or 1
        self.group_size = mult * total_batch

    def order(self, generator):
        return length_grouped_indices(self.lengths, self.group_size, generator)
