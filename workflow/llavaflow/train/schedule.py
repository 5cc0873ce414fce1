"""The reference learning-rate schedule in closed form (mmengine LinearLR warmup + CosineAnnealingLR).

Stepped once per micro-iteration, as mmengine's ParamSchedulerHook does; an optimizer step applies
the value of the micro-iteration on which it happens (as in xtuner's LLaVA-Phi-3 configs,
whose param_scheduler has by_epoch=True with convert_to_iter_based=True).
"""

from __future__ import annotations

import math


def warmup_iters(total_iters: int, warmup_ratio: float) -> int:
    return int(warmup_ratio * total_iters)


def lr_at(t: int, total_iters: int, peak_lr: float, warmup_ratio: float = 0.03,
          start_factor: float = 1e-5, eta_min: float = 0.0) -> float:
    """Learning rate at micro-iteration t (0-based) of a run of total_iters micro-iterations."""
    if not 0 <= t < total_iters:
        raise ValueError(f"iteration {t} outside [0, {total_iters})")
    w = warmup_iters(total_iters, warmup_ratio)
    if t < w:
        # mmengine's LinearLR runs over end - begin - 1 steps, so the factor reaches 1 at t = w - 1.
        frac = t / (w - 1) if w > 1 else 0.0
        return peak_lr * (start_factor + (1.0 - start_factor) * frac)
    return eta_min + (peak_lr - eta_min) * (1 + math.cos(math.pi * (t - w) / (total_iters - w))) / 2
