"""Phi-3 (Phi3ForCausalLM) -> Llama (LlamaForCausalLM): split the fused projections, rewrite the config.

Exact (bitwise logits) for the 4k model while prompt + generation stay below Phi-3's sliding window of
2047 tokens: Llama has no window, so from position 2047 on the two models differ.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..atomic import atomic_output, check_output
from .io import ConversionError, ShardWriter, iter_tensors, read_json, write_json
from .tokenizer_files import copy_tokenizer, generation_config

log = logging.getLogger(__name__)

SLIDING_WINDOW_CAVEAT = (
    "Phi-3 attends through a sliding window of {w} tokens and Llama has none: the Llama model gives the "
    "same logits as the Phi-3 model only while prompt + generated tokens stay below {w} (a LLaVA prompt "
    "spends 576 of them on the image)."
)

COPY_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "bos_token_id",
               "eos_token_id", "pad_token_id", "tie_word_embeddings", "initializer_range")


def head_dim(cfg: dict) -> int:
    return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


# What the Llama model's shapes come from: without one, Llama would take its own default (32 layers, ...)
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


def check_phi3(cfg: dict, where) -> None:
    if cfg.get("model_type") != "phi3":
        raise ConversionError(f"{where}: model_type is {cfg.get('model_type')!r}, not 'phi3'; not a Phi-3 model")
    rope = cfg.get("rope_scaling") or (cfg.get("rope_parameters") or {})
    if rope.get("type", rope.get("rope_type", "default")) not in (None, "default"):
        raise ConversionError(f"{where}: rope scaling {rope} (LongRoPE, 128k models) has no Llama equivalent")
    factor = partial_rotary_factor(cfg)
    if factor != 1.0:
        raise ConversionError(f"{where}: partial rotary factor {factor} has no Llama equivalent")


def partial_rotary_factor(cfg: dict) -> float:
    """The share of each head's dimensions that rotates: a top-level key in 4.x configs, inside
    rope_parameters in 5.x ones."""
    return float(cfg.get("partial_rotary_factor") or (cfg.get("rope_parameters") or {}).get("partial_rotary_factor") or 1.0)


def llama_config(cfg: dict) -> dict:
    """Copy the shared fields, add Llama's, write legacy rope/dtype keys for 4.x readers."""
    rope = cfg.get("rope_parameters") or {}
    dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"
    out = {k: cfg[k] for k in COPY_FIELDS if k in cfg}
    out.update({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "attention_bias": False, "mlp_bias": False,
        "attention_dropout": 0.0, "pretraining_tp": 1, "head_dim": head_dim(cfg),
        "rope_theta": cfg.get("rope_theta", rope.get("rope_theta", 10000.0)), "rope_scaling": None,
        "torch_dtype": dtype, "use_cache": True,
    })
    return out


def split_tensor(name: str, tensor, cfg: dict) -> list[tuple[str, object]]:
    """One Phi-3 tensor -> its Llama tensor(s): qkv_proj by GQA sizes, gate_up_proj in halves (gate first)."""
    if name.endswith("rotary_emb.inv_freq"):
        return []
    if name.endswith("self_attn.qkv_proj.weight"):
        nh = cfg["num_attention_heads"]
        hd, nkv = head_dim(cfg), cfg.get("num_key_value_heads") or nh  # absent: no grouping, as in Phi3Config
        sizes = [nh * hd, nkv * hd, nkv * hd]
        if tensor.shape[0] != sum(sizes):
            raise ConversionError(f"{name}: {tuple(tensor.shape)} does not split into q/k/v of {sizes} rows")
        base = name[: -len("qkv_proj.weight")]
        q, k, v = tensor.split(sizes, dim=0)
        return [(base + "q_proj.weight", q), (base + "k_proj.weight", k), (base + "v_proj.weight", v)]
    if name.endswith("mlp.gate_up_proj.weight"):
        if tensor.shape[0] != 2 * cfg["intermediate_size"]:
            raise ConversionError(f"{name}: {tuple(tensor.shape)} is not 2 x intermediate_size rows")
        base = name[: -len("gate_up_proj.weight")]
        gate, up = tensor.chunk(2, dim=0)
        return [(base + "gate_proj.weight", gate), (base + "up_proj.weight", up)]
    return [(name, tensor)]


def phi_to_llama(phi_path: str | Path, save_path: str | Path, max_shard_size: int = 2 * 1024**3, *,
                 overwrite: bool = False) -> None:
    """The Llama copy of the Phi-3 LLM in phi_path (an xtuner folder's root). save_path may not be or hold phi_path."""
    phi_path = Path(phi_path)
    check_output(Path(save_path), [phi_path], overwrite)
    cfg = read_json(phi_path / "config.json")
    check_phi3(cfg, phi_path / "config.json")
    missing = [k for k in SHAPE_FIELDS if k not in cfg]
    if missing:
        raise ConversionError(f"{phi_path / 'config.json'}: no {', '.join(missing)}: the model's shapes cannot be known")
    window = cfg.get("sliding_window")
    if window:
        log.warning(SLIDING_WINDOW_CAVEAT.format(w=window))
    with atomic_output(Path(save_path), inputs=[phi_path], overwrite=overwrite) as tmp:
        writer = ShardWriter(tmp, max_shard_size)
        for name, tensor in iter_tensors(phi_path):
            for new_name, new_tensor in split_tensor(name, tensor, cfg):
                writer.add(new_name, new_tensor)
        writer.close()
        write_json(tmp / "config.json", llama_config(cfg))
        copy_tokenizer(phi_path, tmp)  # as written: a `llama` config must not make 5.x rebuild it
        if (phi_path / "generation_config.json").exists():
            gen = read_json(phi_path / "generation_config.json")
        else:  # Phi-3's stop tokens, else generation would never stop (an empty file names no eos)
            from transformers import PreTrainedTokenizerFast

            tok = PreTrainedTokenizerFast.from_pretrained(tmp)
            gen = generation_config(tok, tok.pad_token_id)
        write_json(tmp / "generation_config.json", gen)
