"""Causal-LM loss straight from hidden states: lm_head + cross-entropy fused, in chunks, labelled rows only.

HF's path materialises fp32 logits for every position ([tokens, 32064] x 4 B, plus their gradient),
although in LLaVA most positions (the 576 image rows, system prompt, questions) carry no label.
Here only the labelled rows go through lm_head, a chunk at a time, and the gradients with respect to
the hidden states and lm_head weight are computed in the forward pass (as Liger's fused linear
cross-entropy does), so no logits outlive their chunk and nothing is recomputed.
Same value as HF's `ForCausalLMLoss` (mean over labelled tokens, logits upcast to fp32).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..constants import IGNORE_INDEX


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows: int):
        n = hidden.shape[0]
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        for start in range(0, n, chunk_rows):
            h, y = hidden[start : start + chunk_rows], targets[start : start + chunk_rows]
            logits = (h @ weight.t()).float()
            loss += F.cross_entropy(logits, y, reduction="sum")
            if need_h or need_w:
                # d(sum CE)/d logits = softmax - onehot; the mean's 1/n is applied in backward.
                g = torch.softmax(logits, dim=-1)
                g[torch.arange(y.shape[0], device=y.device), y] -= 1.0
                g = g.to(hidden.dtype)
                if need_h:
                    grad_h[start : start + chunk_rows] = g @ weight
                if need_w:
                    grad_w.addmm_(g.t().float(), h.float())
        ctx.save_for_backward(grad_h, grad_w)
        ctx.n, ctx.weight_dtype = n, weight.dtype
        return loss / n

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        scale = grad_out / ctx.n
        dh = (grad_h * scale.to(grad_h.dtype)) if grad_h is not None else None
        dw = (grad_w * scale).to(ctx.weight_dtype) if grad_w is not None else None
        return dh, dw, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, lm_head: torch.nn.Linear, labels: torch.Tensor,
                               chunk_rows: int = 4096) -> torch.Tensor:
    """Mean next-token cross-entropy of `lm_head(hidden)` against `labels` ([B, T]; -100 = no loss).

    Position t is scored against labels[t + 1], as in transformers' ForCausalLMLoss.
    """
    if lm_head.bias is not None:
        raise ValueError("fused cross-entropy supports an lm_head without bias (Phi-3, Llama)")
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    if not keep.any():  # no labelled token: a zero loss that keeps the graph (HF would give NaN)
        return hidden.sum() * 0.0
    rows = hidden[:, :-1][keep]
    return _FusedLinearCrossEntropy.apply(rows, lm_head.weight, targets[keep], chunk_rows)
