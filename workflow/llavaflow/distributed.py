"""Joining the torchrun process group: one function for training and evaluation."""

from __future__ import annotations

import datetime
import os

import torch


def init_distributed(*, group_of_one: bool = False) -> tuple[int, int, torch.device]:
    """Rank, world size and device of this process.

    Under torchrun: join the process group (NCCL on GPU, gloo on CPU), one GPU per rank (LOCAL_RANK).
    Plain `python`: a single process, and with `group_of_one` (DeepSpeed needs a group) a one-rank group
    of its own on 127.0.0.1. The 30-minute timeout is DeepSpeed's default, which rank 0 needs while it
    publishes large checkpoints.
    """
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if "RANK" not in os.environ and group_of_one:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    if "RANK" in os.environ and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    initialized = torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if initialized else 0
    world = torch.distributed.get_world_size() if initialized else 1
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    return rank, world, device
