"""Loaders for the folder formats, with stock transformers classes only (no remote code is executed)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from .configuration_projector import ProjectorConfig
from .llava import LlavaModel
from .modeling_projector import ProjectorModel


class FolderError(ValueError):
    pass


def load_projector(folder: str | Path, dtype: torch.dtype = torch.float32) -> ProjectorModel:
    """An xtuner projector/ folder, read as data: its configuration_/modeling_projector.py are not run."""
    folder = Path(folder)
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise FolderError(f"{folder}: no config.json; not a projector folder") from None
    if cfg.get("model_type") != "projector":
        raise FolderError(f"{folder}/config.json: model_type is {cfg.get('model_type')!r}, expected 'projector'")
    fields = ("visual_hidden_size", "llm_hidden_size", "depth", "hidden_act", "bias")
    model = ProjectorModel(ProjectorConfig(**{k: cfg[k] for k in fields if k in cfg}))
    weights = folder / "model.safetensors"
    if not weights.exists():
        raise FolderError(f"{folder}: no model.safetensors")
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model.to(dtype)


def load_xtuner_llava(folder: str | Path, dtype: torch.dtype = torch.float32, visual_encoder: str | None = None,
                      visual_select_layer: int = -2, device: str | torch.device = "cpu") -> LlavaModel:
    """The xtuner-style folder: LLM at the root, visual_encoder/ (or --visual-encoder), projector/."""
    from transformers import AutoModelForCausalLM, CLIPVisionModel

    folder = Path(folder)
    if not (folder / "projector").is_dir():
        raise FolderError(f"{folder}: no projector/ folder; not an xtuner-style LLaVA folder")
    vit_path = folder / "visual_encoder"
    if vit_path.is_dir():
        if visual_encoder is not None:
            raise FolderError(f"{folder} has its own visual_encoder/; do not pass a visual encoder as well")
    elif visual_encoder is None:
        raise FolderError(f"{folder} has no visual_encoder/; pass the visual encoder it was trained with")
    else:
        vit_path = visual_encoder
    llm = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    vit = CLIPVisionModel.from_pretrained(vit_path, dtype=dtype)
    projector = load_projector(folder / "projector", dtype)
    model = LlavaModel(llm, vit, projector, visual_select_layer).to(device)
    model.requires_grad_(False)
    return model.eval()


def load_xtuner_for_inference(folder: str | Path, dtype: torch.dtype = torch.float32, visual_encoder: str | None = None,
                              visual_select_layer: int = -2, device: str | torch.device = "cpu"):
    """(model, tokenizer, image transform) of an xtuner-style folder, preprocessing as in training (padded)."""
    from transformers import AutoTokenizer, CLIPImageProcessor

    from ..data.images import ImageTransform

    model = load_xtuner_llava(folder, dtype, visual_encoder, visual_select_layer, device)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    vit = visual_encoder or Path(folder) / "visual_encoder"
    return model, tokenizer, ImageTransform(CLIPImageProcessor.from_pretrained(vit), pad_to_square=True)
