"""pth_to_hf: a training checkpoint (ours or xtuner's) -> the xtuner-style HF folder.

<save_dir>/ holds the LLM and tokenizer at the root (if the LLM trained), visual_encoder/ (if the ViT
trained) and projector/ (always; it loads with AutoModel + trust_remote_code like xtuner's, and with our
own loader without any remote code). Tensors stream from the (memory-mapped) checkpoint to the shards.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..atomic import atomic_output, check_output
from ..model.checkpoint_reader import load_state_dict
from .io import (DTYPES, TOKENIZER_FILES, ConversionError, ShardWriter, copy_files,
                 local_folder, meta_shapes, read_json, write_json)
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


def _check_shapes(what: str, tensors: dict, expected: dict, source) -> None:
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ConversionError(f"{source}: {what} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, t in tensors.items():
        if tuple(t.shape) != expected[k]:
            raise ConversionError(f"{source}: {what} tensor {k} has shape {tuple(t.shape)}, config says {expected[k]}")


def projector_config(tensors: dict, source, visual_select_layer: int = -2):
    """The projector's config from its weights (depth, widths, bias) plus the facts the weights do not hold."""
    from ..model.configuration_projector import ProjectorConfig

    layers = sorted({int(k.split(".")[1]) for k in tensors if k.startswith("model.") and k.split(".")[1].isdigit()})
    if not layers or "model.0.weight" not in tensors:
        raise ConversionError(f"{source}: no projector weights (projector.model.0.weight missing)")
    if layers != list(range(0, 2 * len(layers), 2)):
        raise ConversionError(f"{source}: projector Linear layers at {layers}; expected model.0, model.2, ... (Linear, GELU, Linear, ...)")
    w0 = tensors["model.0.weight"]
    return ProjectorConfig(visual_hidden_size=w0.shape[1], llm_hidden_size=w0.shape[0], depth=len(layers),
                           hidden_act="gelu", bias="model.0.bias" in tensors, visual_select_layer=visual_select_layer,
                           visual_select_feature="patch")


def check_parts_fit(projector, vit_hidden: int, vit_layers: int, llm_hidden: int, source) -> None:
    """Projector input = ViT width, output = LLM width, select layer inside the ViT: one line each."""
    if projector.visual_hidden_size != vit_hidden:
        raise ConversionError(f"{source}: projector takes {projector.visual_hidden_size} features, the visual encoder "
                              f"gives {vit_hidden}; projector and visual encoder do not belong together")
    if projector.llm_hidden_size != llm_hidden:
        raise ConversionError(f"{source}: projector gives {projector.llm_hidden_size} features, the LLM's hidden size "
                              f"is {llm_hidden}; projector and LLM do not belong together")
    layer = projector.visual_select_layer
    if not -(vit_layers + 1) <= layer <= vit_layers:
        raise ConversionError(f"{source}: visual_select_layer {layer} is outside the visual encoder's "
                              f"{vit_layers + 1} hidden states")


class _Plan:
    """Everything read and checked before the first byte is written."""

    def __init__(self, parts: dict, llm: str, visual_encoder: str, source, visual_select_layer: int,
                 projector_depth: int | None):
        from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel

        self.parts, self.source = parts, source
        self.llm_src = local_folder(llm, ["*.json", "tokenizer.model"])
        self.vit_src = local_folder(visual_encoder, ["*.json"])
        self.llm_config = AutoConfig.from_pretrained(self.llm_src)
        self.vit_config = CLIPVisionConfig.from_pretrained(self.vit_src)
        if parts["llm"]:
            self.llm = {k: v for k, v in parts["llm"].items() if not k.endswith("rotary_emb.inv_freq")}
            _check_shapes("LLM", self.llm, meta_shapes(lambda: AutoModelForCausalLM.from_config(self.llm_config)), source)
        if parts["visual_encoder"]:
            self.vit = {clip_legacy(k): v for k, v in parts["visual_encoder"].items()}
            expected = {clip_legacy(k): v for k, v in meta_shapes(lambda: CLIPVisionModel(self.vit_config)).items()}
            _check_shapes("visual encoder", self.vit, expected, source)
        self.projector = projector_config(parts["projector"], source, visual_select_layer)
        if projector_depth is not None and projector_depth != self.projector.depth:
            raise ConversionError(f"{source}: the projector has {self.projector.depth} Linear layers, "
                                  f"the recipe says projector_depth {projector_depth}")
        text = self.llm_config.get_text_config() if hasattr(self.llm_config, "get_text_config") else self.llm_config
        check_parts_fit(self.projector, self.vit_config.hidden_size, self.vit_config.num_hidden_layers,
                        text.hidden_size, source)


def write_llm(plan: _Plan, out: Path, dtype: torch.dtype, shard_bytes: int, name_or_path: str) -> None:
    writer = ShardWriter(out, shard_bytes, release_sources=True)
    for name in sorted(plan.llm):
        writer.add(name, plan.llm[name], dtype)
    writer.close()
    config = plan.llm_config
    config.use_cache = True
    config.dtype = dtype
    config.save_pretrained(out)
    # xtuner's convert_phi_to_llama.py pops _name_or_path (KeyError without it); transformers 5 omits it.
    # Phi-3's hub config names remote code (auto_map) whose .py files are not copied: xtuner's chat and
    # mmbench load allowing remote code and would look for them. The model type is native (AutoConfig
    # read it without remote code), so the entry goes.
    cfg = {k: v for k, v in read_json(out / "config.json").items() if k != "auto_map"}
    write_json(out / "config.json", {"_name_or_path": name_or_path, **cfg})
    copy_files(plan.llm_src, out, TOKENIZER_FILES + ("generation_config.json",))


def write_visual_encoder(plan: _Plan, out: Path) -> None:
    from transformers import CLIPImageProcessor

    out.mkdir()
    writer = ShardWriter(out, max_shard_bytes=1 << 40, release_sources=True)
    for name in sorted(plan.vit):
        writer.add(name, plan.vit[name], torch.float32)  # the ViT stays in its training dtype, fp32, as xtuner's
    writer.close()
    config = plan.vit_config
    config.architectures = ["CLIPVisionModel"]
    config.save_pretrained(out)
    CLIPImageProcessor.from_pretrained(plan.vit_src).save_pretrained(out)


def write_projector(plan: _Plan, out: Path) -> None:
    from ..model.modeling_projector import ProjectorModel

    tensors = plan.parts["projector"]
    model = ProjectorModel(plan.projector)
    result = model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ConversionError(f"{plan.source}: projector keys do not match: missing {result.missing_keys}, "
                              f"unexpected {result.unexpected_keys}")
    model.save_pretrained(out)  # also copies configuration_/modeling_projector.py and sets auto_map


def pth_to_hf(pth: str | Path, save_dir: str | Path, llm: str, visual_encoder: str, dtype: str = "bf16",
              max_shard_size: int = 2 * 1024**3, recipe: dict | None = None, *, visual_select_layer: int | None = None,
              projector_depth: int | None = None, overwrite: bool = False) -> None:
    """Convert iter_N.pth (file or DeepSpeed directory) into the xtuner-style HF folder at save_dir.

    The checkpoint holds weights only: the vision layer the projector reads (`visual_select_layer`, from
    the recipe) is written into projector/config.json here, for every later reader. Everything is read
    and checked (shapes of each part against its config and of the parts against each other) before
    anything is written; an existing non-empty save_dir is replaced only with `overwrite`, never when it
    holds the checkpoint.
    """
    save_dir = Path(save_dir)
    inputs = [pth, llm, visual_encoder]  # the base models too, when they are local folders
    check_output(save_dir, inputs, overwrite)
    if visual_select_layer is None:
        visual_select_layer = (recipe or {}).get("visual_select_layer")
    if visual_select_layer is None:
        visual_select_layer = -2
        log.warning("no visual_select_layer given: recording xtuner's default -2 in projector/config.json "
                    "(pass the one the model trained with if it differs)")
    if projector_depth is None:
        projector_depth = (recipe or {}).get("projector_depth")
    state = load_state_dict(pth)
    parts = split_checkpoint(state)
    plan = _Plan(parts, llm, visual_encoder, pth, visual_select_layer, projector_depth)
    with atomic_output(save_dir, inputs=inputs, overwrite=overwrite) as tmp:
        if parts["llm"]:
            write_llm(plan, tmp, DTYPES[dtype], max_shard_size, llm)
        if parts["visual_encoder"]:
            write_visual_encoder(plan, tmp / "visual_encoder")
        write_projector(plan, tmp / "projector")
        if recipe is not None:
            write_json(tmp / "llavaflow_recipe.json", recipe)
    log.info("wrote %s (%s)", save_dir, ", ".join(p for p, t in parts.items() if t))
