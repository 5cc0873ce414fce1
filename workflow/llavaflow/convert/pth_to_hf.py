"""pth_to_hf: a training checkpoint (ours or xtuner's) -> the xtuner-style HF folder.

<save_dir>/ holds the LLM and tokenizer at the root (if the LLM trained), visual_encoder/ (if the ViT
trained) and projector/ (always; it loads with AutoModel + trust_remote_code like xtuner's, and with our
own loader without any remote code). Tensors stream from the (memory-mapped) checkpoint to the shards.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..model.checkpoint_reader import load_state_dict
from ..atomic import atomic_output
from .io import (DTYPES, TOKENIZER_FILES, ConversionError, ShardWriter, copy_files, local_folder,
                 write_json)
from .tables import CHECKPOINT_PREFIX, clip_legacy

log = logging.getLogger(__name__)


def split_checkpoint(state: dict) -> dict[str, dict]:
    parts: dict[str, dict] = {p: {} for p in CHECKPOINT_PREFIX}
    for name, tensor in state.items():
        for part, prefix in CHECKPOINT_PREFIX.items():
            if name.startswith(prefix):
                parts[part][name[len(prefix):]] = tensor
                break
        else:
            raise ConversionError(f"checkpoint tensor {name!r} belongs to no part ({list(CHECKPOINT_PREFIX.values())})")
    return parts


def _expected_shapes(model_cls, config) -> dict:
    with torch.device("meta"):
        model = model_cls(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check_shapes(what: str, tensors: dict, expected: dict, source) -> None:
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ConversionError(f"{source}: {what} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, t in tensors.items():
        if tuple(t.shape) != expected[k]:
            raise ConversionError(f"{source}: {what} tensor {k} has shape {tuple(t.shape)}, config says {expected[k]}")


def write_llm(tensors: dict, base: str, out: Path, dtype: torch.dtype, source, shard_bytes: int) -> None:
    from transformers import AutoConfig

    src = local_folder(base, ["*.json", "tokenizer.model"])
    config = AutoConfig.from_pretrained(src)
    ours = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
    _check_shapes("LLM", ours, _llm_shapes(config), source)
    writer = ShardWriter(out, shard_bytes, release_sources=True)
    for name in sorted(ours):
        writer.add(name, ours[name], dtype)
    writer.close()
    config.use_cache = True
    config.dtype = dtype
    config.save_pretrained(out)
    copy_files(src, out, TOKENIZER_FILES + ("generation_config.json",))


def _llm_shapes(config) -> dict:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def write_visual_encoder(tensors: dict, base: str, out: Path, source) -> None:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    src = local_folder(base, ["*.json"])
    config = CLIPVisionConfig.from_pretrained(src)
    legacy = {clip_legacy(k): v for k, v in tensors.items()}
    expected = {clip_legacy(k): v for k, v in _expected_shapes(CLIPVisionModel, config).items()}
    _check_shapes("visual encoder", legacy, expected, source)
    out.mkdir()
    writer = ShardWriter(out, max_shard_bytes=1 << 40, release_sources=True)
    for name in sorted(legacy):
        writer.add(name, legacy[name], torch.float32)  # the ViT stays in its training dtype, fp32, as xtuner's
    writer.close()
    config.architectures = ["CLIPVisionModel"]
    config.save_pretrained(out)
    CLIPImageProcessor.from_pretrained(src).save_pretrained(out)


def projector_config(tensors: dict, source):
    from ..model.configuration_projector import ProjectorConfig

    layers = sorted({int(k.split(".")[1]) for k in tensors if k.startswith("model.")})
    if not layers or "model.0.weight" not in tensors:
        raise ConversionError(f"{source}: no projector weights (projector.model.0.weight missing)")
    w0 = tensors["model.0.weight"]
    return ProjectorConfig(visual_hidden_size=w0.shape[1], llm_hidden_size=w0.shape[0], depth=len(layers),
                           hidden_act="gelu", bias="model.0.bias" in tensors)


def write_projector(tensors: dict, out: Path, source) -> None:
    from ..model.modeling_projector import ProjectorModel

    model = ProjectorModel(projector_config(tensors, source))
    result = model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ConversionError(f"{source}: projector keys do not match: missing {result.missing_keys}, "
                              f"unexpected {result.unexpected_keys}")
    model.save_pretrained(out)  # also copies configuration_/modeling_projector.py and sets auto_map


def pth_to_hf(pth: str | Path, save_dir: str | Path, llm: str, visual_encoder: str, dtype: str = "bf16",
              max_shard_size: int = 2 * 1024**3, recipe: dict | None = None) -> None:
    """Convert iter_N.pth (file or DeepSpeed directory) into the xtuner-style HF folder at save_dir."""
    state = load_state_dict(pth)
    parts = split_checkpoint(state)
    with atomic_output(Path(save_dir)) as tmp:
        if parts["llm"]:
            write_llm(parts["llm"], llm, tmp, DTYPES[dtype], pth, max_shard_size)
        if parts["visual_encoder"]:
            write_visual_encoder(parts["visual_encoder"], visual_encoder, tmp / "visual_encoder", pth)
        write_projector(parts["projector"], tmp / "projector", pth)
        if recipe is not None:
            write_json(tmp / "llavaflow_recipe.json", recipe)
    log.info("wrote %s (%s)", save_dir, ", ".join(p for p, t in parts.items() if t))
