"""Padding-free packing: a micro-batch's samples laid end to end in one row, attention kept per sample.

The packed row carries position ids that restart at 0 for every sample and `cu_seq_lens` (the sample
boundaries). Attention goes through a function registered with transformers' `AttentionInterface`
under `VARLEN`: on a GPU in bf16/fp16 it calls torch's `varlen_attn` (flash attention over the
boundaries, no `flash_attn` package needed); elsewhere it runs exact SDPA under a block-diagonal causal mask.
Either way no token attends across samples, so the loss equals the padded batch's.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F

from ..constants import IGNORE_INDEX

VARLEN = "llavaflow_varlen"

try:
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # pragma: no cover - torch < 2.9: the block-diagonal SDPA path serves
    varlen_attn = None
if varlen_attn is not None and "window_size" not in inspect.signature(varlen_attn).parameters:
    varlen_attn = None  # torch 2.9's first version: is_causal only, no window or scale; not used


def pack_rows(rows_embeds: list[torch.Tensor], rows_labels: list[torch.Tensor] | None) -> dict:
    """Concatenate per-sample [n_i, hidden] rows into a [1, sum n_i, hidden] batch of one packed row.

    The first label of every sample is ignored, so the last token of one sample never learns to
    predict the first token of the next (labels are shifted by one inside the loss).
    """
    lengths = torch.tensor([r.shape[0] for r in rows_embeds])
    device = rows_embeds[0].device
    cu = torch.zeros(len(rows_embeds) + 1, dtype=torch.int32)
    cu[1:] = lengths.cumsum(0)
    position_ids = torch.cat([torch.arange(int(n)) for n in lengths]).unsqueeze(0).to(device)
    labels = None
    if rows_labels is not None:
        labels = torch.cat([torch.cat([lab.new_full((1,), IGNORE_INDEX), lab[1:]]) for lab in rows_labels])[None]
    max_len = int(lengths.max())
    return {
        "inputs_embeds": torch.cat(rows_embeds).unsqueeze(0),
        "labels": labels,
        "position_ids": position_ids,
        "cu_seq_lens_q": cu.to(device),
        "cu_seq_lens_k": cu.to(device),
        "max_length_q": max_len,
        "max_length_k": max_len,
    }


def _window(sliding_window: int | None, max_len: int) -> tuple[int, int]:
    # transformers' sliding mask keeps kv_idx > q_idx - sliding_window: sliding_window - 1 tokens to the left.
    if sliding_window is not None and max_len > sliding_window:
        return (sliding_window - 1, 0)
    return (-1, 0)


def _block_causal_sdpa(q, k, v, cu: torch.Tensor, scale: float | None, window: tuple[int, int]) -> torch.Tensor:
    """Reference path: q/k/v [T, heads, d]; one SDPA call under a block-diagonal causal (windowed) mask.

    Exact, and free of data-dependent Python (compiles without graph breaks), but the mask is T x T:
    meant for CPUs and fp32, where sequences are short.
    """
    t = torch.arange(q.shape[0], device=q.device)
    sample = torch.searchsorted(cu[1:].to(q.device), t, right=True)
    mask = (sample[:, None] == sample[None, :]) & (t[None, :] <= t[:, None])
    if window[0] >= 0:
        mask &= t[None, :] >= t[:, None] - window[0]
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask,
                                         scale=scale)
    return out.transpose(0, 1)


def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                             sliding_window=None, cu_seq_lens_q=None, max_length_q=None, **kwargs):
    """transformers attention function for a packed row: query [1, heads, T, d] -> ([1, T, heads, d], None)."""
    if cu_seq_lens_q is None or query.shape[0] != 1:
        raise ValueError(f"the {VARLEN!r} attention serves packed rows only (batch of 1 with cu_seq_lens_q); "
                         "build padded batches with attn_implementation='sdpa'")
    if dropout:
        raise ValueError(f"{VARLEN!r} attention has no dropout; got attention dropout {dropout}")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, heads, d]
    if k.shape[1] != q.shape[1]:  # grouped-query attention: one kv head per group of query heads
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    window = _window(sliding_window, int(max_length_q))
    if varlen_attn is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        out = varlen_attn(q.contiguous(), k.contiguous(), v.contiguous(), cu_seq_lens_q, cu_seq_lens_q,
                          int(max_length_q), int(max_length_q), scale=scaling, window_size=window)
    else:
        out = _block_causal_sdpa(q, k, v, cu_seq_lens_q, scaling, window)
    return out.unsqueeze(0), None


def register_varlen_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, varlen_attention_forward)
