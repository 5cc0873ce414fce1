"""Activation checkpointing policies: what a checkpointed block keeps for backward and what it recomputes.

`full`: keep only each block's input; recompute the whole block in backward (+1 forward of FLOPs).
`selective`: keep the outputs of matmuls and attention, recompute the cheap memory-bound ops between them
(norms, rotary, activations, residual adds). Backward then re-runs no matmul, so the FLOPs equal no
checkpointing while the elementwise intermediates (about 40 % of a Phi-3 layer's activations) are freed.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

POLICIES = ("none", "full", "selective")


def _expensive_ops() -> set:
    aten = torch.ops.aten
    names = ["mm", "addmm", "bmm", "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
             "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu",
             "_flash_attention_forward", "_efficient_attention_forward"]
    ops = {getattr(aten, n).default for n in names if hasattr(aten, n)}
    varlen = getattr(getattr(torch.ops, "torch_attn", None), "_varlen_attn", None)  # torch.nn.attention.varlen
    if varlen is not None:
        ops.add(varlen.default)
    return ops


def _save_expensive(ops, ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in ops else CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_kwargs(policy: str) -> dict:
    """Keyword arguments for torch.utils.checkpoint.checkpoint under `policy` (full or selective)."""
    if policy == "full":
        return {"use_reentrant": False}
    if policy == "selective":
        saver = functools.partial(_save_expensive, _expensive_ops())
        return {"use_reentrant": False, "context_fn": functools.partial(create_selective_checkpoint_contexts, saver)}
    raise ValueError(f"activation checkpointing policy {policy!r}: expected one of {POLICIES[1:]}")


def normalise_policy(value) -> str:
    """The recipe's `gradient_checkpointing`: xtuner's boolean (true = full) or a policy name."""
    if value is True:
        return "full"
    if value is False or value is None:
        return "none"
    if value not in POLICIES:
        raise ValueError(f"gradient_checkpointing {value!r}: expected true, false or one of {POLICIES}")
    return value
