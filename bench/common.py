"""Shared by the GPU benchmarks: the real LLaVA-Phi-3-mini architecture at random init, and FLOP counts."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow"))

H100_BF16_PEAK = 989.4e12  # dense bf16, performance.md

# Phi-3-mini-4k-instruct and CLIP ViT-L/14-336, as their HF configs give them (formats.md §1.2).
PHI3_MINI = dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                 original_max_position_embeddings=4096, sliding_window=2047, rope_theta=10000.0,
                 bos_token_id=1, eos_token_id=32000, pad_token_id=32000, tie_word_embeddings=False)
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
# A few-layer stand-in of the same shapes, to smoke-test the scripts on a CPU.
SMALL = dict(num_hidden_layers=2), dict(num_hidden_layers=2)


def build_model(small: bool = False, attn: str = "sdpa"):
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel, Phi3Config, Phi3ForCausalLM

    from llavaflow.model.build import new_projector
    from llavaflow.model.llava import LlavaModel

    phi = Phi3Config(**{**PHI3_MINI, **(SMALL[0] if small else {})}, attn_implementation=attn)
    vit = CLIPVisionConfig(**{**CLIP_L_336, **(SMALL[1] if small else {})}, attn_implementation=attn)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):
        model = LlavaModel(Phi3ForCausalLM(phi), CLIPVisionModel(vit), new_projector(1024, 3072, 2))
    return model.to(dtype), device, dtype


def flops_per_sample(stage: str, tokens: int, layers: int = 32, vit_layers: int = 24) -> float:
    """Model FLOPs (MFU convention, causal attention, no recompute) of one sample, performance.md §2."""
    n_mm = (3.624e9 * layers / 32) + 0.0985e9
    h = 3072
    f_vit = (2 * 0.3025e9 * 577 + 4 * 24 * 1024 * 577**2) * vit_layers / 24
    attn = 6 * layers * h * tokens**2
    if stage == "finetune":
        return 6 * n_mm * tokens + attn + 3 * f_vit
    return 4 * n_mm * tokens + attn + f_vit
