"""Shared by the GPU benchmarks: the real LLaVA-Phi-3-mini architecture at random init (llavaflow.model.sizes)."""

from __future__ import annotations

import re
import subprocess
import sys
import time

from llavaflow.model.sizes import CLIP_VIT_L_336, PHI3_MINI_4K, build_reference_llava

H100_BF16_PEAK = 989.4e12  # dense bf16 (NVIDIA H100 SXM datasheet)


def build_model(small: bool = False, attn: str = "sdpa", tiny: bool = False):
    """(model, device, dtype): bf16 on a GPU, fp32 on a CPU; `small`: 2-layer stand-ins of the same widths;
    `tiny`: 2 layers of width 64 (Phi-3's vocabulary, CLIP's 336-pixel 14-patch grid), for CPU smoke tests."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if tiny:
        model = build_tiny_llava(device, attn)
    else:
        layers = 2 if small else None
        model = build_reference_llava(device, llm_layers=layers, vit_layers=layers, attn=attn)
    return model.to(dtype), device, dtype


def build_tiny_llava(device: str, attn: str):
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel, Phi3Config, Phi3ForCausalLM

    from llavaflow.model.build import new_projector
    from llavaflow.model.llava import LlavaModel

    narrow = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    phi = Phi3Config(**{**PHI3_MINI_4K, **narrow, "num_key_value_heads": 4}, attn_implementation=attn)
    vit = CLIPVisionConfig(**{**CLIP_VIT_L_336, **narrow}, attn_implementation=attn)
    with torch.device(device):
        return LlavaModel(Phi3ForCausalLM(phi), CLIPVisionModel(vit), new_projector(64, 64, 2))


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def timed_llavaflow(*args: str) -> tuple[float, float]:
    """Run `llavaflow ARGS` (this interpreter's) under /usr/bin/time -v: (wall seconds, peak RSS in GB).
    Exits with its stderr when it fails."""
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "llavaflow.cli", *args]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    return seconds, rss_kb / 1e6
