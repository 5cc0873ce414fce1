"""Exports of the xtuner-style folder (after phi_to_llama) to the official LLaVA and the HF LLaVA formats.

Both take xtuner's converter arguments: the Llama LLM folder, the vision folder (xtuner's
visual_encoder/), the projector weights, and the output folder.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

from safetensors import safe_open

from ..atomic import atomic_output, check_output
from .io import DTYPES, ConversionError, ShardWriter, iter_tensors, meta_shapes, read_json, tensor_shapes, write_json
from .tokenizer_files import copy_tokenizer, generation_config
from .tables import CLIP_NOT_VISION, UnsupportedProjector, clip_legacy, llava_mm_projector_type, rename, xtuner_to_hf, xtuner_to_llava

log = logging.getLogger(__name__)

# Phi-3's chat template (each turn closed by <|end|>); a list content puts "<image>\n" before the text,
# the prompt layout of training (phi3_chat INSTRUCTION with "<image>\n" + question; test_convert.py checks that
# the exported processor renders exactly that prompt).
PHI3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\\n' }}{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def _sources(text_model: Path, vision_model: Path, projector_weight: Path):
    """(part, xtuner-folder name, tensor) for every tensor, streamed."""
    for name, t in iter_tensors(text_model):
        yield "llm", name, t
    dropped = []
    for name, t in iter_tensors(vision_model):
        if name.startswith(CLIP_NOT_VISION):
            dropped.append(name)
            continue
        yield "visual_encoder", clip_legacy(name), t
    if dropped:
        log.info("%s: a full CLIP model; left out its %d non-vision tensors (%s, ...)", vision_model, len(dropped),
                 ", ".join(dropped[:3]))
    try:
        with safe_open(str(projector_weight), framework="pt") as f:
            for name in f.keys():
                yield "projector", name, f.get_tensor(name)
    except Exception as e:  # safetensors raises its own error type for a corrupt header
        raise ConversionError(f"{projector_weight}: cannot read projector weights ({e})") from e


def _check_llama(text_model: Path) -> dict:
    cfg = read_json(text_model / "config.json")
    if cfg.get("model_type") != "llama":
        raise ConversionError(f"{text_model}: model_type {cfg.get('model_type')!r}; convert Phi-3 with phi_to_llama first")
    return cfg


def _check_weights_fit_configs(text_model: Path, vision_model: Path, vision_cfg) -> None:
    """Every tensor the configs ask for is in the files, in its shape: a config.json that says one layer more or
    lacks a key (CLIPVisionConfig then takes CLIP-B's defaults) would give an export that does not load, or
    loads with random layers. Extra tensors (an old CLIP's position_ids, a full CLIP's text side) are let be."""
    from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionModel

    text_cfg = AutoConfig.from_pretrained(text_model)
    expected = {
        text_model: meta_shapes(lambda: AutoModelForCausalLM.from_config(text_cfg)),
        vision_model: {clip_legacy(k): v for k, v in meta_shapes(lambda: CLIPVisionModel(vision_cfg)).items()},
    }
    for folder, shapes in expected.items():
        found = {clip_legacy(n) if folder == vision_model else n: shape for n, shape in tensor_shapes(folder)}
        missing = sorted(set(shapes) - set(found))
        if missing:
            raise ConversionError(f"{folder}: {len(missing)} tensor(s) its config.json asks for are not in its files "
                                  f"(e.g. {missing[0]}): the config does not describe these weights")
        for name, shape in shapes.items():
            if found[name] != shape:
                raise ConversionError(f"{folder}: {name} has shape {found[name]}, its config.json says {shape}")


# LlavaModel's select feature -> HF vision_feature_select_strategy (LLaVA's mm_vision_select_feature is the same word).
HF_SELECT_STRATEGY = {"patch": "default"}


def _projector_facts(projector_weight, vision_cfg, text_cfg: dict, visual_select_layer: int | None):
    """The projector's shape facts from projector/config.json next to its weights (the model's own record),
    checked against its weights and against the ViT and LLM, before anything is written."""
    from ..model.loading import FolderError, check_fit, read_projector_config

    projector_weight = Path(projector_weight)
    try:
        proj = read_projector_config(projector_weight.parent)
    except FolderError as e:
        raise ConversionError(f"{e} (the projector's depth, activation and select layer are read from the "
                              f"config.json next to {projector_weight.name})") from None
    if visual_select_layer is not None:
        proj.visual_select_layer = visual_select_layer
    try:
        with safe_open(str(projector_weight), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error type for a corrupt header
        raise ConversionError(f"{projector_weight}: cannot read projector weights ({e})") from e
    if shapes.get("model.0.weight") != (proj.llm_hidden_size, proj.visual_hidden_size):
        raise ConversionError(f"{projector_weight}: model.0.weight is {shapes.get('model.0.weight')}, its config.json "
                              f"says ({proj.llm_hidden_size}, {proj.visual_hidden_size})")
    if f"model.{2 * (proj.depth - 1)}.weight" not in shapes or f"model.{2 * proj.depth}.weight" in shapes:
        raise ConversionError(f"{projector_weight}: the weights do not have the {proj.depth} Linear layers its config.json says")
    try:
        check_fit(proj, vision_cfg, SimpleNamespace(hidden_size=text_cfg["hidden_size"]), projector_weight.parent)
    except FolderError as e:
        raise ConversionError(str(e)) from None
    return proj


def _write_weights(out: Path, table: dict, text_model, vision_model, projector_weight, dtype, shard_bytes) -> None:
    writer = ShardWriter(out, shard_bytes)
    for part, name, tensor in _sources(Path(text_model), Path(vision_model), Path(projector_weight)):
        writer.add(rename(part, name, table), tensor, dtype)
    writer.close()


def _legacy_text_config(cfg: dict, dtype: str) -> dict:
    """The Llama config in 4.x spelling (rope_theta, rope_scaling, torch_dtype), from either spelling: a
    5.x config keeps theta and any scaling in rope_parameters, which 4.x readers do not know."""
    rope = {k: v for k, v in (cfg.get("rope_parameters") or {}).items() if k != "rope_theta"}
    scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
    text = {k: v for k, v in cfg.items() if k not in ("rope_parameters", "dtype", "_name_or_path", "architectures")}
    text.update(rope_theta=cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
                rope_scaling=scaling, torch_dtype=dtype)
    return text


def to_hf(text_model_id, vision_model_id, projector_weight, save_path, dtype: str = "bf16",
          max_shard_size: int = 5 * 1024**3, *, visual_select_layer: int | None = None, overwrite: bool = False) -> None:
    """HF LlavaForConditionalGeneration folder (formats.md §2): its weights and tokenizer read in transformers
    4.37+ and 5.x, its processor (AutoProcessor) from 4.49 on (README, tests/test_consumers.py).

    Projector activation, select layer and strategy come from projector/config.json (`visual_select_layer`
    overrides). Only a 2-layer projector has an HF form; other depths are refused before anything is written.
    """
    from transformers import CLIPImageProcessor, CLIPVisionConfig, PreTrainedTokenizerFast

    text_model, vision_model = Path(text_model_id), Path(vision_model_id)
    text_cfg = _check_llama(text_model)
    vision_cfg = CLIPVisionConfig.from_pretrained(vision_model)
    proj = _projector_facts(projector_weight, vision_cfg, text_cfg, visual_select_layer)
    _check_weights_fit_configs(text_model, vision_model, vision_cfg)
    try:
        table = xtuner_to_hf(proj.depth)
    except UnsupportedProjector as e:
        raise ConversionError(f"{projector_weight}: {e}; export it with to_llava instead") from None
    check_output(Path(save_path), [text_model, vision_model, projector_weight], overwrite)
    clip_proc = CLIPImageProcessor.from_pretrained(vision_model)
    torch_dtype = str(DTYPES[dtype]).removeprefix("torch.")
    patches = (vision_cfg.image_size // vision_cfg.patch_size) ** 2
    vision = {k: v for k, v in vision_cfg.to_dict().items() if k not in ("dtype", "torch_dtype")}
    # the tower's tensors are written in `dtype` too: a vision_config still saying the source's float32 makes
    # transformers 4.57 load the tower in fp32 beside a bf16 projector under torch_dtype="auto" (a dtype error)
    vision.update(model_type="clip_vision_model", torch_dtype=torch_dtype)
    size = clip_proc.crop_size["height"]
    preprocessor = {
        "image_processor_type": "LlavaImageProcessor", "processor_class": "LlavaProcessor", "do_pad": True,
        "do_resize": True, "size": {"shortest_edge": clip_proc.size["shortest_edge"]}, "resample": 3,
        "do_center_crop": True, "crop_size": {"height": size, "width": size}, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(clip_proc.image_mean),
        "image_std": list(clip_proc.image_std), "do_convert_rgb": True,
    }
    with atomic_output(Path(save_path), inputs=[text_model, vision_model, projector_weight], overwrite=overwrite) as tmp:
        # The training tokenizer's files with <image> and <pad> appended (the llava-hf converter's tokens).
        added = copy_tokenizer(text_model, tmp, add_special=("<image>",), pad_token="<pad>",
                               chat_template=PHI3_CHAT_TEMPLATE)
        image_id, pad_id = added["<image>"], added["<pad>"]
        if max(image_id, pad_id) >= text_cfg["vocab_size"]:
            raise ConversionError(f"<image>/<pad> ids {image_id}/{pad_id} do not fit the {text_cfg['vocab_size']} embedding rows")
        tok = PreTrainedTokenizerFast.from_pretrained(tmp)
        config = {
            "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava",
            "image_token_index": image_id, "pad_token_id": pad_id, "image_seq_length": patches,
            "projector_hidden_act": proj.hidden_act,
            "vision_feature_select_strategy": HF_SELECT_STRATEGY[proj.visual_select_feature],
            "vision_feature_layer": proj.visual_select_layer, "multimodal_projector_bias": proj.bias,
            "tie_word_embeddings": False, "torch_dtype": torch_dtype,
            "text_config": _legacy_text_config(text_cfg, torch_dtype), "vision_config": vision,
        }
        _write_weights(tmp, table, text_model, vision_model, projector_weight, DTYPES[dtype], max_shard_size)
        write_json(tmp / "config.json", config)
        (tmp / "chat_template.jinja").write_text(PHI3_CHAT_TEMPLATE)
        write_json(tmp / "chat_template.json", {"chat_template": PHI3_CHAT_TEMPLATE})
        write_json(tmp / "processor_config.json", {
            "image_token": "<image>", "patch_size": vision_cfg.patch_size, "num_additional_image_tokens": 1,
            "vision_feature_select_strategy": HF_SELECT_STRATEGY[proj.visual_select_feature],
            "processor_class": "LlavaProcessor"})
        write_json(tmp / "preprocessor_config.json", preprocessor)
        write_json(tmp / "generation_config.json", generation_config(tok, pad_id))


def to_llava(text_model_id, vision_model_id, projector_weight, save_path, mm_vision_tower: str,
             dtype: str = "bf16", model_max_length: int = 2047, max_shard_size: int = 2 * 1024**3, *,
             visual_select_layer: int | None = None, overwrite: bool = False) -> None:
    """Official LLaVA folder (LlavaLlamaForCausalLM, formats.md §3). The folder name must contain 'llava'.

    mm_projector_type (linear / mlp{N}x_gelu), mm_vision_select_layer and mm_vision_select_feature come
    from projector/config.json (`visual_select_layer` overrides).
    """
    from transformers import CLIPImageProcessor, CLIPVisionConfig, PreTrainedTokenizerFast

    save_path = Path(save_path)
    name = save_path.name.lower()
    if "llava" not in name or any(bad in name for bad in ("mpt", "mistral", "lora")):
        raise ConversionError(f"{save_path}: LLaVA's loader needs 'llava' in the folder name (and no mpt/mistral/lora)")
    text_model, vision_model = Path(text_model_id), Path(vision_model_id)
    text_cfg = _check_llama(text_model)
    vision_cfg = CLIPVisionConfig.from_pretrained(vision_model)
    proj = _projector_facts(projector_weight, vision_cfg, text_cfg, visual_select_layer)
    _check_weights_fit_configs(text_model, vision_model, vision_cfg)
    try:
        projector_type = llava_mm_projector_type(proj.depth, proj.hidden_act, proj.bias)
    except UnsupportedProjector as e:
        raise ConversionError(f"{projector_weight}: {e}") from None
    check_output(save_path, [text_model, vision_model, projector_weight], overwrite)
    torch_dtype = str(DTYPES[dtype]).removeprefix("torch.")
    config = _legacy_text_config(text_cfg, torch_dtype)
    config.update({
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
        "mm_vision_tower": mm_vision_tower, "mm_hidden_size": vision_cfg.hidden_size,
        "mm_projector_type": projector_type, "mm_vision_select_layer": proj.visual_select_layer,
        "mm_vision_select_feature": proj.visual_select_feature,
        "mm_patch_merge_type": "flat", "image_aspect_ratio": "pad", "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False, "use_mm_proj": True, "tune_mm_mlp_adapter": False,
        "freeze_mm_mlp_adapter": False, "unfreeze_mm_vision_tower": True, "tokenizer_padding_side": "right",
        "tokenizer_model_max_length": model_max_length, "mm_projector_lr": None, "use_cache": True,
    })
    with atomic_output(save_path, inputs=[text_model, vision_model, projector_weight], overwrite=overwrite) as tmp:
        copy_tokenizer(text_model, tmp)  # LLaVA's loader builds it from tokenizer.json too (use_fast=False kept)
        tok = PreTrainedTokenizerFast.from_pretrained(tmp)
        _write_weights(tmp, xtuner_to_llava(proj.depth), text_model, vision_model, projector_weight, DTYPES[dtype], max_shard_size)
        write_json(tmp / "config.json", config)
        CLIPImageProcessor.from_pretrained(vision_model).save_pretrained(tmp)
        write_json(tmp / "generation_config.json", generation_config(tok, tok.pad_token_id))
