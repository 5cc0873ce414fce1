"""xtuner-style folder (Phi-3 LLM) -> GGUF for llama.cpp / Ollama: the LLM, the mmproj, quantized variants.

<out>/ holds `llm-<dtype>.gguf` (arch phi3, with its tokenizer and chat template), `mmproj-<dtype>.gguf`
(arch clip: the fine-tuned vision tower from visual_encoder/ and the projector), `llm-<QTYPE>.gguf` for
each quantized variant (made by llama.cpp's own quantizer) and an Ollama `Modelfile`.

Each file is written with gguf-py's writer in two passes over the safetensors headers and data: tensor
infos first (shapes only), then the tensors one at a time, so memory stays near the largest tensor.
The folder is published atomically. Tensor names: gguf_names.py; tokenizer: gguf_vocab.py.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import torch
from safetensors import safe_open

from ..atomic import atomic_output
from ..template import get_template
from .gguf_names import CLIP_TO_GGUF, PHI3_DROPPED, PHI3_TO_GGUF, PROJECTOR_TO_GGUF, block_of, gguf_name
from .gguf_vocab import phi3_chat_jinja, read_vocab
from .io import ConversionError, read_json, safetensors_files
from .phi3_llama import partial_rotary_factor

log = logging.getLogger(__name__)

QT = gguf.GGMLQuantizationType
# --dtype of the LLM (and, as f32 or f16, of the mmproj's matrices): GGML type and general.file_type.
DTYPES = {"f32": (QT.F32, gguf.LlamaFileType.ALL_F32), "f16": (QT.F16, gguf.LlamaFileType.MOSTLY_F16),
          "bf16": (QT.BF16, gguf.LlamaFileType.MOSTLY_BF16), "q8_0": (QT.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0)}
# A name containing "phi3"/"phi-3" makes llama.cpp strip the whitespace after every special token
# (src/llama-vocab.cpp), so "<|user|>\n" would lose the "\n" that training saw. Ours avoids both.
GENERAL_NAME = "llavaflow-llava"
CONTEXT_LENGTH_OLLAMA = 4096


def _encode(t: torch.Tensor, qtype: QT) -> tuple[np.ndarray, QT]:
    """A tensor in GGML's encoding: 1-D tensors (norms, biases) stay f32; q8_0 needs rows of 32."""
    if t.ndim <= 1 or qtype == QT.F32:
        return t.float().numpy(), QT.F32
    if qtype == QT.F16:
        return t.half().numpy(), QT.F16
    if qtype == QT.BF16:
        return t.bfloat16().view(torch.uint8).numpy(), QT.BF16
    if t.shape[-1] % 32:
        return t.half().numpy(), QT.F16
    return gguf.quants.quantize(t.float().numpy(), qtype), qtype


def _out_type(shape: tuple, qtype: QT) -> QT:
    if len(shape) <= 1 or qtype == QT.F32:
        return QT.F32
    if qtype == QT.Q8_0 and shape[-1] % 32:
        return QT.F16
    return qtype


def _nbytes(shape: tuple, qtype: QT) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * size


class Source:
    """A tensor in a safetensors file, read only when written."""

    def __init__(self, path: Path, name: str, shape: tuple):
        self.path, self.name, self.shape = path, name, shape

    def load(self) -> torch.Tensor:
        with safe_open(str(self.path), framework="pt") as f:
            return f.get_tensor(self.name)


def _sources(folder: Path) -> dict[str, Source]:
    out = {}
    for path in safetensors_files(folder):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    out[name] = Source(path, name, tuple(f.get_slice(name).get_shape()))
        except Exception as e:  # safetensors raises its own error type for a corrupt header
            raise ConversionError(f"{path}: cannot read safetensors file ({e})") from e
    return out


Plan = list[tuple[str, Source, QT, Callable[[torch.Tensor], torch.Tensor] | None]]


def _write(path: Path, arch: str, metadata: Callable[[gguf.GGUFWriter], None], plan: Plan) -> None:
    writer = gguf.GGUFWriter(path, arch)
    metadata(writer)
    for name, src, qtype, _ in plan:
        out = _out_type(src.shape, qtype)
        writer.add_tensor_info(name, src.shape, np.dtype(np.float32), _nbytes(src.shape, out), raw_dtype=out)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for name, src, qtype, transform in plan:
        t = src.load()
        if transform is not None:
            t = transform(t)
        data, _ = _encode(t, qtype)
        writer.write_tensor_data(data)
        del t, data
    writer.close()


def _llm_plan(folder: Path, qtype: QT) -> tuple[Plan, int]:
    sources = _sources(folder)
    plan, n_vocab = [], None
    for name, src in sources.items():
        target = gguf_name(name, PHI3_TO_GGUF)
        if target is None:
            if gguf_name(name, dict.fromkeys(PHI3_DROPPED, "")) is not None:
                continue
            raise ConversionError(f"{folder}: LLM tensor {name!r} has no GGUF name (is the LLM Phi-3?)")
        if target == "token_embd.weight":
            n_vocab = src.shape[0]
        plan.append((target, src, qtype, None))
    if n_vocab is None:
        raise ConversionError(f"{folder}: no model.embed_tokens.weight")
    plan.sort(key=lambda p: (block_of(p[0]) if block_of(p[0]) is not None else -1, p[0]))
    return plan, n_vocab


def _check_llm(folder: Path) -> None:
    if not (folder / "config.json").exists():
        raise ConversionError(f"{folder}: no config.json; the GGUF export needs iter_xtuner with its LLM")
    model_type = read_json(folder / "config.json").get("model_type")
    if model_type != "phi3":
        raise ConversionError(f"{folder}/config.json: model_type is {model_type!r}; the GGUF export reads the "
                              "Phi-3 LLM of iter_xtuner (arch phi3)")


def write_llm(folder: Path, path: Path, dtype: str, template_name: str = "phi3_chat", name: str = GENERAL_NAME) -> None:
    from transformers import AutoConfig

    _check_llm(folder)
    config = AutoConfig.from_pretrained(folder)
    qtype, file_type = DTYPES[dtype]
    plan, n_vocab = _llm_plan(folder, qtype)
    vocab = read_vocab(folder, n_vocab)
    rope = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if rope.get("long_factor") or rope.get("rope_type") not in (None, "default"):
        raise ConversionError(f"{folder}/config.json: rope scaling {rope.get('rope_type')!r} (Phi-3 128k) is not "
                              "supported by this export")
    head_dim = config.hidden_size // config.num_attention_heads
    rotary = int(partial_rotary_factor(config.to_dict()) * head_dim)

    def metadata(w: gguf.GGUFWriter) -> None:
        w.add_name(name)
        w.add_context_length(config.max_position_embeddings)
        w.add_rope_scaling_orig_ctx_len(getattr(config, "original_max_position_embeddings", None)
                                        or config.max_position_embeddings)
        w.add_embedding_length(config.hidden_size)
        w.add_feed_forward_length(config.intermediate_size)
        w.add_block_count(config.num_hidden_layers)
        w.add_head_count(config.num_attention_heads)
        w.add_head_count_kv(config.num_key_value_heads)
        w.add_layer_norm_rms_eps(config.rms_norm_eps)
        w.add_rope_dimension_count(rotary)
        w.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
        w.add_sliding_window(config.sliding_window or 0)
        w.add_file_type(file_type)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(vocab.tokens)
        w.add_token_scores(vocab.scores)
        w.add_token_types(vocab.types)
        w.add_bos_token_id(vocab.bos)
        w.add_eos_token_id(vocab.eos)
        w.add_unk_token_id(vocab.unk)
        if vocab.pad is not None:
            w.add_pad_token_id(vocab.pad)
        if vocab.eot is not None:
            w.add_eot_token_id(vocab.eot)
        w.add_add_bos_token(vocab.add_bos)
        w.add_add_eos_token(False)
        w.add_chat_template(phi3_chat_jinja(get_template(template_name)))

    _write(path, "phi3", metadata, plan)


def _select_layer(folder: Path) -> int:
    """The projector's facts live with it (projector/config.json); older folders: recipe, then xtuner's -2."""
    projector = read_json(folder / "projector" / "config.json")
    if "visual_select_layer" in projector:
        return int(projector["visual_select_layer"])
    recipe = folder / "llavaflow_recipe.json"
    if recipe.exists():
        return int(read_json(recipe).get("visual_select_layer", -2))
    return -2


def write_mmproj(folder: Path, path: Path, dtype: str) -> None:
    vit_dir, proj_dir = folder / "visual_encoder", folder / "projector"
    if not (vit_dir / "config.json").exists():
        raise ConversionError(f"{vit_dir}: missing; the mmproj needs the fine-tuned vision tower of iter_xtuner")
    vit = read_json(vit_dir / "config.json")
    vit = vit.get("vision_config", vit)
    projector = read_json(proj_dir / "config.json")
    if projector.get("depth", 2) != 2 or not projector.get("bias", True):
        raise ConversionError(f"{proj_dir}/config.json: llama.cpp's `mlp` projector is Linear-GELU-Linear with "
                              f"biases; this projector has depth {projector.get('depth')}, bias {projector.get('bias')}")
    act = vit.get("hidden_act", "quick_gelu")
    if act not in ("quick_gelu", "gelu"):
        raise ConversionError(f"{vit_dir}/config.json: hidden_act {act!r}; clip.cpp runs quick_gelu or gelu")
    n_layers = vit["num_hidden_layers"]
    select = _select_layer(folder)
    feature_layer = n_layers + 1 + select if select < 0 else select  # index into hidden_states
    if not 0 < feature_layer <= n_layers:
        raise ConversionError(f"{proj_dir}/config.json: visual_select_layer {select} is outside a {n_layers}-layer ViT")
    processor = read_json(vit_dir / "preprocessor_config.json")
    qtype = QT.F32 if dtype == "f32" else QT.F16

    plan: Plan = []
    for name, src in _sources(vit_dir).items():
        target = gguf_name(name, CLIP_TO_GGUF)
        block = block_of(name)
        if target is None or (block is not None and block >= feature_layer):
            continue  # post-LN, position ids, blocks past the feature layer: see gguf_names.CLIP_DROPPED
        # The conv of the patch embedding runs in f16 in clip.cpp, whatever the file's dtype.
        plan.append((target, src, QT.F16 if target == "v.patch_embd.weight" else qtype, None))
    for name, src in _sources(proj_dir).items():
        target = gguf_name(name, PROJECTOR_TO_GGUF)
        if target is None:
            raise ConversionError(f"{proj_dir}: projector tensor {name!r} has no mmproj name")
        plan.append((target, src, qtype, None))
    expected = {v.format(i=i) for k, v in CLIP_TO_GGUF.items() for i in range(feature_layer)} | set(PROJECTOR_TO_GGUF.values())
    missing = sorted(expected - {p[0] for p in plan})
    if missing:
        raise ConversionError(f"{folder}: mmproj tensors missing from visual_encoder/ or projector/: {missing[:5]}")
    plan.sort(key=lambda p: (block_of(p[0]) if block_of(p[0]) is not None else -1, p[0]))

    def metadata(w: gguf.GGUFWriter) -> None:
        w.add_name(GENERAL_NAME + "-mmproj")
        w.add_file_type(DTYPES["f32" if qtype == QT.F32 else "f16"][1])
        w.add_bool(gguf.Keys.Clip.HAS_VISION_ENCODER, True)
        w.add_bool("clip.has_text_encoder", False)
        w.add_bool(gguf.Keys.Clip.HAS_LLAVA_PROJECTOR, True)
        w.add_string(gguf.Keys.Clip.PROJECTOR_TYPE, "mlp")
        w.add_vision_image_size(vit["image_size"])
        w.add_vision_patch_size(vit["patch_size"])
        w.add_vision_embedding_length(vit["hidden_size"])
        w.add_vision_feed_forward_length(vit["intermediate_size"])
        w.add_vision_projection_dim(vit.get("projection_dim", projector.get("llm_hidden_size", 0)))
        w.add_vision_head_count(vit["num_attention_heads"])
        w.add_vision_attention_layernorm_eps(vit.get("layer_norm_eps", 1e-5))
        w.add_vision_block_count(feature_layer)
        w.add_array("clip.vision.feature_layer", [feature_layer])
        w.add_vision_image_mean([float(x) for x in processor["image_mean"]])
        w.add_vision_image_std([float(x) for x in processor["image_std"]])
        w.add_vision_use_gelu(act == "gelu")

    _write(path, "clip", metadata, plan)


def modelfile(llm: str, mmproj: str, template_name: str = "phi3_chat") -> str:
    """Ollama Modelfile: both files, the chat template, Phi-3's stop words (as xtuner's published one)."""
    t = get_template(template_name)
    ollama = ("{{ if .System }}" + t.system.replace("{system}", "{{ .System }}") + "{{ end }}"
              "{{ if .Prompt }}" + t.instruction.replace("{input}", "{{ .Prompt }}") + "{{ end }}"
              "{{ .Response }}" + t.suffix + t.sep)
    stops = dict.fromkeys((*t.stop_words, "<|user|>", "<|assistant|>", "<|system|>", "<|endoftext|>"))
    lines = [f"FROM ./{llm}", f"FROM ./{mmproj}", f'TEMPLATE """{ollama}"""']
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines += [f"PARAMETER num_ctx {CONTEXT_LENGTH_OLLAMA}", "PARAMETER num_keep 4"]
    return "\n".join(lines) + "\n"


def to_gguf(xtuner_folder: str | Path, save_path: str | Path, *, dtype: str = "f16",
            quantize: list[str] | tuple[str, ...] = (), template_name: str = "phi3_chat",
            overwrite: bool = False) -> list[str]:
    """Write the GGUF folder; returns the file names written. An existing non-empty save_path is replaced
    only with `overwrite`."""
    from .gguf_quantize import check_quantizer, quantize_file

    folder, out = Path(xtuner_folder), Path(save_path)
    if dtype not in DTYPES:
        raise ConversionError(f"gguf dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    quantize = list(dict.fromkeys(quantize))
    if quantize and dtype == "q8_0":  # llama.cpp refuses to requantize a quantized tensor unless told to
        raise ConversionError(f"gguf dtype q8_0 with quantize {quantize}: the variants are made from the LLM file, "
                              "which must then be unquantized; use dtype f16 (or bf16, f32)")
    check_quantizer(quantize)  # before any work: a missing llama.cpp or a bad type fails up front
    _check_llm(folder)
    get_template(template_name)
    llm, mmproj = f"llm-{dtype}.gguf", f"mmproj-{'f32' if dtype == 'f32' else 'f16'}.gguf"
    with atomic_output(out, inputs=[folder], overwrite=overwrite) as tmp:
        write_llm(folder, tmp / llm, dtype, template_name)
        log.info("wrote %s", llm)
        write_mmproj(folder, tmp / mmproj, dtype)
        log.info("wrote %s", mmproj)
        names = [llm, mmproj]
        for qtype in quantize:
            name = f"llm-{qtype}.gguf"
            quantize_file(tmp / llm, tmp / name, qtype)
            names.append(name)
            log.info("wrote %s", name)
        (tmp / "Modelfile").write_text(modelfile(names[2] if quantize else llm, mmproj, template_name))
    return names + ["Modelfile"]

