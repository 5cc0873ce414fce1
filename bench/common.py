"""Shared by the GPU benchmarks: the real LLaVA-Phi-3-mini architecture at random init (llavaflow.model.sizes)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow"))

from llavaflow.model.sizes import CLIP_VIT_L_336, PHI3_MINI_4K, build_reference_llava  # noqa: E402

H100_BF16_PEAK = 989.4e12  # dense bf16 (NVIDIA H100 SXM datasheet)


def build_model(small: bool = False, attn: str = "sdpa"):
    """(model, device, dtype): bf16 on a GPU, fp32 on a CPU; `small`: 2-layer stand-ins of the same widths."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    layers = 2 if small else None
    model = build_reference_llava(device, llm_layers=layers, vit_layers=layers, attn=attn)
    return model.to(dtype), device, dtype


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
