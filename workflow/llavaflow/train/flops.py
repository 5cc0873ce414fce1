"""Model FLOPs of a LLaVA training sample, by the MFU convention of the PaLM paper (appendix B)
and nanoGPT's estimate_mfu.

Matmul FLOPs of the LLM (2 per parameter and token forward; weight gradients only where the LLM trains),
causal attention counted over each sample's own length (so packing does not inflate it), the ViT
forward (and backward where it trains). Recomputation from activation checkpointing is never counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn


def _linear_params(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


@dataclass(frozen=True)
class FlopModel:
    llm_matmul_params: int  # every nn.Linear of the LLM, lm_head included; the embedding is a lookup
    llm_layers: int
    llm_hidden: int
    vit_matmul_params: int
    vit_layers: int
    vit_hidden: int
    vit_tokens: int  # patches + CLS
    trains_llm: bool
    trains_vit: bool

    @classmethod
    def of(cls, model) -> "FlopModel":
        llm, vit = model.llm.config, model.visual_encoder.config
        patches = (vit.image_size // vit.patch_size) ** 2
        return cls(_linear_params(model.llm), llm.num_hidden_layers, llm.hidden_size,
                   _linear_params(model.visual_encoder), vit.num_hidden_layers, vit.hidden_size, patches + 1,
                   "llm" in model.trainable_parts, "visual_encoder" in model.trainable_parts)

    def vit_forward(self) -> float:
        return 2 * self.vit_matmul_params * self.vit_tokens + 4 * self.vit_layers * self.vit_hidden * self.vit_tokens**2

    def sample_flops(self, tokens: int, images: int = 1) -> float:
        """Training FLOPs of one sample of `tokens` tokens (image rows included) with `images` images."""
        matmul = (6 if self.trains_llm else 4) * self.llm_matmul_params * tokens  # fwd + dgrad (+ wgrad)
        attention = 6 * self.llm_layers * self.llm_hidden * tokens**2
        vit = (3 if self.trains_vit else 1) * self.vit_forward() * images
        return matmul + attention + vit
