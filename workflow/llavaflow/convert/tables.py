"""Tensor-name mappings, one table per format pair; the way back is the same table inverted.

A table maps each part of the xtuner-style folder (llm, visual_encoder, projector) to a list of
(prefix in the xtuner folder, prefix in the target format). The longest matching prefix wins, both
ways. Every converter and every test reads these tables, so a format fact lives here only.
"""

from __future__ import annotations

# Our and xtuner's iter_N.pth checkpoints: the prefix of each part in LLaVAModel.state_dict().
CHECKPOINT_PREFIX = {"llm": "llm.", "visual_encoder": "visual_encoder.", "projector": "projector."}

# A CLIP vision tower on disk always carries the legacy `vision_model.` prefix (transformers < 5.6
# requires it; 5.x accepts it). transformers >= 5.6 names the same tensors without it in memory.
CLIP_LEGACY_PREFIX = "vision_model."


def _projector_layers(depth: int) -> list[int]:
    """Indices of the Linear layers of an MLP projector of `depth` layers (xtuner: Linear, GELU, Linear, ...)."""
    return list(range(0, 2 * depth, 2))


class UnsupportedProjector(ValueError):
    pass


def xtuner_to_hf(depth: int = 2) -> dict:
    """xtuner folder (LLM in Llama names) -> HF LlavaForConditionalGeneration, legacy on-disk names.

    transformers' LlavaMultiModalProjector is exactly linear_1 -> act -> linear_2: only depth 2 exists there.
    """
    if depth != 2:
        raise UnsupportedProjector(f"a {depth}-layer projector has no HF LLaVA form: transformers' "
                                   "LlavaMultiModalProjector is exactly two Linear layers (linear_1, linear_2)")
    return {
        "llm": [("model.", "language_model.model."), ("lm_head.", "language_model.lm_head.")],
        "visual_encoder": [("vision_model.", "vision_tower.vision_model.")],
        "projector": [("model.0.", "multi_modal_projector.linear_1."), ("model.2.", "multi_modal_projector.linear_2.")],
    }


def xtuner_to_llava(depth: int = 2) -> dict:
    """xtuner folder (LLM in Llama names) -> official LLaVA (LlavaLlamaForCausalLM).

    LLaVA builds `linear` (one nn.Linear, keys without an index) or `mlp{N}x_gelu` (an nn.Sequential
    laid out as xtuner's: keys .0, .2, ...), see llava_mm_projector_type.
    """
    if depth == 1:
        projector = [("model.0.", "model.mm_projector.")]
    else:
        projector = [(f"model.{i}.", f"model.mm_projector.{i}.") for i in _projector_layers(depth)]
    return {
        "llm": [("model.", "model."), ("lm_head.", "lm_head.")],
        "visual_encoder": [("vision_model.", "model.vision_tower.vision_tower.vision_model.")],
        "projector": projector,
    }


def llava_mm_projector_type(depth: int, hidden_act: str, bias: bool) -> str:
    """LLaVA's mm_projector_type for an xtuner projector; refuses what LLaVA's builder cannot express."""
    if not bias:
        raise UnsupportedProjector("LLaVA's projectors always have biases; this projector has none")
    if depth == 1:
        return "linear"
    if hidden_act != "gelu":
        raise UnsupportedProjector(f"LLaVA's MLP projectors use exact GELU (mlp{{N}}x_gelu); this one uses {hidden_act!r}")
    return f"mlp{depth}x_gelu"


# The reference recipe's 2-layer projector (what the tables above give for depth 2).
XTUNER_TO_HF = xtuner_to_hf(2)
XTUNER_TO_LLAVA = xtuner_to_llava(2)


# A full CLIPModel folder (as openai/clip-vit-large-patch14-336 ships, and xtuner's converter accepts) also
# holds the text tower, both projections and the logit temperature: no LLaVA vision tower has them.
CLIP_NOT_VISION = ("text_model.", "text_projection.", "visual_projection.", "logit_scale")


def clip_legacy(name: str) -> str:
    return name if name.startswith(CLIP_LEGACY_PREFIX) else CLIP_LEGACY_PREFIX + name


def _longest(name: str, pairs) -> tuple | None:
    hits = [p for p in pairs if name.startswith(p[0])]
    return max(hits, key=lambda p: len(p[0])) if hits else None


def rename(part: str, name: str, table: dict) -> str:
    """xtuner-folder name of `part` -> target-format name."""
    hit = _longest(name, table[part])
    if hit is None:
        raise KeyError(f"{part} tensor {name!r} has no mapping")
    return hit[1] + name[len(hit[0]):]


def split_name(name: str, table: dict) -> tuple[str, str]:
    """Target-format name -> (part, xtuner-folder name): the table inverted."""
    inverted = [(dst, src, part) for part, pairs in table.items() for src, dst in pairs]
    hit = _longest(name, inverted)
    if hit is None:
        raise KeyError(f"tensor {name!r} belongs to no part")
    dst, src, part = hit
    return part, src + name[len(dst):]
