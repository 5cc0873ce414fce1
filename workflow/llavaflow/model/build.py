"""Build a LlavaModel from its parts: HF folders / hub ids for training, plus a fresh projector."""

from __future__ import annotations

import torch

from .configuration_projector import ProjectorConfig
from .llava import LlavaModel
from .modeling_projector import ProjectorModel


def new_projector(visual_hidden: int, llm_hidden: int, depth: int, visual_select_layer: int = -2) -> ProjectorModel:
    """The projector; its config also records the vision layer it reads (saved with it in projector/)."""
    return ProjectorModel(ProjectorConfig(visual_hidden_size=visual_hidden, llm_hidden_size=llm_hidden, depth=depth,
                                          visual_select_layer=visual_select_layer))


def build_llava(llm_path: str, vision_path: str, projector_depth: int = 2, visual_select_layer: int = -2,
                dtype: torch.dtype = torch.float32, attn_implementation: str | None = None) -> LlavaModel:
    """Base model for pretrain: pretrained LLM and ViT, projector with nn.Linear's default init."""
    from transformers import AutoModelForCausalLM, CLIPVisionModel

    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    from .loading import from_pretrained_complete

    llm = from_pretrained_complete(AutoModelForCausalLM, llm_path, dtype=dtype, **kwargs)
    vit = from_pretrained_complete(CLIPVisionModel, vision_path, dtype=dtype)
    projector = new_projector(vit.config.hidden_size, llm.config.hidden_size, projector_depth, visual_select_layer).to(dtype)
    return LlavaModel(llm, vit, projector, visual_select_layer)
