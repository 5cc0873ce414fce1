"""Loaders for the folder formats, with stock transformers classes only (no remote code is executed)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from .configuration_projector import ProjectorConfig
from .llava import LlavaModel
from .modeling_projector import ProjectorModel


log = logging.getLogger(__name__)


class FolderError(ValueError):
    pass


def from_pretrained_complete(model_class, folder, **kwargs):
    """model_class.from_pretrained, refusing a folder whose files lack weights its config asks for:
    transformers fills those with random values and only logs it, so a wrong config.json (a layer count,
    a truncated copy) would run, answer and score as if it were the model."""
    from safetensors import SafetensorError

    try:
        model, info = model_class.from_pretrained(folder, output_loading_info=True, **kwargs)
    except SafetensorError as e:  # names no file: a shard cut short, or not safetensors
        raise FolderError(f"{folder}: cannot read its weights ({e}); the copy is incomplete or damaged") from None
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise FolderError(f"{folder}: {len(missing)} weight(s) that its config.json asks for are not in its files "
                          f"(e.g. {missing[0]}): the config does not describe these weights, or the copy is incomplete")
    return model


SELECT_FEATURES = ("patch",)  # LlavaModel.encode_images drops CLS, as xtuner and LLaVA-1.5 do


def inference_dtype(name: str, device: str) -> torch.dtype:
    """`--torch-dtype` (mmbench.torch_dtype): auto is bf16 on a GPU (training's dtype), fp32 on a CPU. Here, in
    the evaluation's hashed code, so that changing it reruns the evaluations."""
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[name]


def read_projector_config(folder: str | Path) -> ProjectorConfig:
    """projector/config.json as data (its configuration_projector.py is not run), with the shape facts
    checked. A folder written by xtuner records no select layer: xtuner's default (-2) applies."""
    folder = Path(folder)
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        raise FolderError(f"{folder}: no config.json; not a projector folder") from None
    except json.JSONDecodeError as e:
        raise FolderError(f"{folder}/config.json: not valid JSON ({e})") from None
    if cfg.get("model_type") != "projector":
        raise FolderError(f"{folder}/config.json: model_type is {cfg.get('model_type')!r}, expected 'projector'")
    fields = ("visual_hidden_size", "llm_hidden_size", "depth", "hidden_act", "bias", "visual_select_layer",
              "visual_select_feature")
    config = ProjectorConfig(**{k: cfg[k] for k in fields if k in cfg})
    if "visual_select_layer" not in cfg:
        log.info("%s/config.json records no visual_select_layer (an xtuner folder): using xtuner's default %d",
                 folder, config.visual_select_layer)
    if config.visual_select_feature not in SELECT_FEATURES:
        raise FolderError(f"{folder}/config.json: visual_select_feature {config.visual_select_feature!r} is not "
                          f"supported (only {list(SELECT_FEATURES)})")
    if not isinstance(config.visual_select_layer, int) or isinstance(config.visual_select_layer, bool):
        raise FolderError(f"{folder}/config.json: visual_select_layer must be an integer, got {config.visual_select_layer!r}")
    return config


def load_projector(folder: str | Path, dtype: torch.dtype = torch.float32) -> ProjectorModel:
    """An xtuner projector/ folder, read as data: its configuration_/modeling_projector.py are not run."""
    folder = Path(folder)
    model = ProjectorModel(read_projector_config(folder))
    weights = folder / "model.safetensors"
    if not weights.exists():
        raise FolderError(f"{folder}: no model.safetensors")
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model.to(dtype)


def check_fit(projector: ProjectorConfig, vit_config, llm_config, where) -> None:
    if projector.visual_hidden_size != vit_config.hidden_size:
        raise FolderError(f"{where}: projector takes {projector.visual_hidden_size} features, the visual encoder "
                          f"gives {vit_config.hidden_size}")
    if projector.llm_hidden_size != llm_config.hidden_size:
        raise FolderError(f"{where}: projector gives {projector.llm_hidden_size} features, the LLM's hidden size "
                          f"is {llm_config.hidden_size}")
    n = vit_config.num_hidden_layers
    if not -(n + 1) <= projector.visual_select_layer <= n:
        raise FolderError(f"{where}: visual_select_layer {projector.visual_select_layer} is outside the visual "
                          f"encoder's {n + 1} hidden states")


def load_xtuner_llava(folder: str | Path, dtype: torch.dtype = torch.float32, visual_encoder: str | None = None,
                      visual_select_layer: int | None = None, device: str | torch.device = "cpu") -> LlavaModel:
    """The xtuner-style folder: LLM at the root, visual_encoder/ (or --visual-encoder), projector/.

    The select layer is the one projector/config.json records; `visual_select_layer` overrides it.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel

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
    projector_config = read_projector_config(folder / "projector")
    if visual_select_layer is not None:
        projector_config.visual_select_layer = visual_select_layer
    check_fit(projector_config, CLIPVisionConfig.from_pretrained(vit_path), AutoConfig.from_pretrained(folder), folder)
    llm = from_pretrained_complete(AutoModelForCausalLM, folder, dtype=dtype)
    vit = from_pretrained_complete(CLIPVisionModel, vit_path, dtype=dtype)
    projector = load_projector(folder / "projector", dtype)
    model = LlavaModel(llm, vit, projector, projector_config.visual_select_layer).to(device)
    model.requires_grad_(False)
    return model.eval()


def load_xtuner_for_inference(folder: str | Path, dtype: torch.dtype = torch.float32, visual_encoder: str | None = None,
                              visual_select_layer: int | None = None, device: str | torch.device = "cpu"):
    """(model, tokenizer, image transform) of an xtuner-style folder, preprocessing as in training (padded)."""
    from transformers import AutoTokenizer

    from ..data.images import ImageTransform

    model = load_xtuner_llava(folder, dtype, visual_encoder, visual_select_layer, device)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    vit = visual_encoder or Path(folder) / "visual_encoder"
    return model, tokenizer, ImageTransform.from_folder(vit, pad_to_square=True)
