"""Tensor names of the two GGUF files, as explicit tables (the tests check them against gguf-py's TensorNameMap).

LLM (GGUF arch `phi3`): Phi-3's fused qkv_proj and gate_up_proj are what llama.cpp's phi3 graph reads
(`attn_qkv`; `ffn_up` = gate‖up, split by its SwiGLU), and phi3 uses NeoX RoPE, so every tensor is copied
as it is: no permutation, no split.

mmproj (GGUF arch `clip`, projector type `mlp`): the CLIP vision tower's tensors (legacy `vision_model.`
names, as iter_xtuner/visual_encoder stores them) and the projector's `model.{0,2}` Linear layers.
"""

from __future__ import annotations

import re

# HF Phi3ForCausalLM -> GGUF phi3. `{i}` is the block index.
PHI3_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.qkv_proj.weight": "blk.{i}.attn_qkv.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.mlp.gate_up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
}
# Present in some Phi-3 checkpoints, recomputed by llama.cpp: dropped.
PHI3_DROPPED = ("model.layers.{i}.self_attn.rotary_emb.inv_freq",)

# CLIP vision tower (legacy on-disk names) -> mmproj. fc1 is `ffn_up`, fc2 `ffn_down` (the legacy
# llama.cpp script writes them swapped; clip.cpp accepts both, we write them the right way round).
CLIP_TO_GGUF = {
    "vision_model.embeddings.class_embedding": "v.class_embd",
    "vision_model.embeddings.patch_embedding.weight": "v.patch_embd.weight",
    "vision_model.embeddings.position_embedding.weight": "v.position_embd.weight",
    "vision_model.pre_layrnorm.weight": "v.pre_ln.weight",
    "vision_model.pre_layrnorm.bias": "v.pre_ln.bias",
    **{f"vision_model.encoder.layers.{{i}}.{hf}.{wb}": f"v.blk.{{i}}.{gg}.{wb}"
       for hf, gg in (("layer_norm1", "ln1"), ("layer_norm2", "ln2"), ("self_attn.q_proj", "attn_q"),
                      ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
                      ("self_attn.out_proj", "attn_out"), ("mlp.fc1", "ffn_up"), ("mlp.fc2", "ffn_down"))
       for wb in ("weight", "bias")},
}
# LLaVA reads hidden_states[select_layer] before the final LayerNorm: the post-LN, the position-id buffer
# and every block after the feature layer are never used by the llava graph, so they are not written.
CLIP_DROPPED = ("vision_model.post_layernorm.weight", "vision_model.post_layernorm.bias",
                "vision_model.embeddings.position_ids", "vision_model.encoder.layers.{i} (i >= feature_layer)")

# xtuner ProjectorModel (an MLP of Linear/GELU/Linear) -> mmproj. clip.cpp's `mlp` type has exactly two
# Linear layers with biases, at these indices.
PROJECTOR_TO_GGUF = {
    "model.0.weight": "mm.0.weight",
    "model.0.bias": "mm.0.bias",
    "model.2.weight": "mm.2.weight",
    "model.2.bias": "mm.2.bias",
}

_BLOCK = re.compile(r"\.(\d+)\.")


def _template(name: str) -> tuple[str, int | None]:
    m = _BLOCK.search(name)
    if m is None:
        return name, None
    return name[: m.start()] + ".{i}." + name[m.end():], int(m.group(1))


def block_of(name: str) -> int | None:
    return _template(name)[1]


def gguf_name(name: str, table: dict) -> str | None:
    """The GGUF name of a source tensor, or None when the table does not have it."""
    if name in table:
        return table[name]
    template, block = _template(name)
    target = table.get(template)
    return None if target is None else target.format(i=block)
