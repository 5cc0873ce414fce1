"""The LLaVA module: vision tower + projector + causal LM, image features spliced into placeholders."""

from __future__ import annotations

import functools

import torch
import torch.nn as nn

from transformers.modeling_outputs import CausalLMOutputWithPast

from ..constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX, MODEL_PARTS
from .activation_checkpointing import checkpoint_kwargs
from .loss import fused_linear_cross_entropy
from .packing import VARLEN, pack_rows, register_varlen_attention


def compile_counts() -> dict:
    """What torch.compile did in this process: graphs compiled, graph breaks (the code between two graphs runs
    eagerly) with the first break's reason, and frames it gave up on (a recompile limit hit runs that block
    eagerly from then on). A fallback shows nowhere else but in the speed."""
    from torch._dynamo.utils import counters

    breaks = counters["graph_break"]
    return {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(breaks.values()),
            "first_break": next(iter(breaks), "").split("\n")[0] or None,
            "unsupported": sum(counters["unimplemented"].values())}


def _store_hidden_state(capture: dict, from_input: bool, module, args, output=None) -> None:
    hidden = args[0] if from_input else output[0] if isinstance(output, tuple) else output
    capture["hidden_state"] = hidden


def _hook_selected_hidden_state(visual_encoder: nn.Module, select_layer: int, capture: dict) -> None:
    """Have the vision tower's forward leave hidden state `select_layer` in `capture`, as `output_hidden_states`
    numbers them: 0 is the first block's input, i the output of block i - 1 (so -2 is the penultimate block's).

    Not through `output_hidden_states`: transformers records those in hooks that read a ContextVar, which
    torch.compile cannot trace, so every compiled ViT block broke its graph there and, under checkpointing, ran
    eagerly whole. A hook of ours on the one block compiles with it. A partial, not a closure: copy.deepcopy of the
    model then gives the copy's hook the copy's dict.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    blocks = [m for m in visual_encoder.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not -len(blocks) - 1 <= select_layer <= len(blocks):
        raise ValueError(f"visual_select_layer {select_layer}: the vision tower has {len(blocks)} blocks, so "
                         f"{len(blocks) + 1} hidden states")
    index = select_layer % (len(blocks) + 1)
    if index == 0:
        blocks[0].register_forward_pre_hook(functools.partial(_store_hidden_state, capture, True))
    else:
        blocks[index - 1].register_forward_hook(functools.partial(_store_hidden_state, capture, False))


class LlavaModel(nn.Module):
    """xtuner's LLaVAModel without mmengine: `llm`, `visual_encoder`, `projector` sub-modules.

    state_dict() is torch's, the whole model; trainable_state_dict() below is what a stage's checkpoint holds.
    """

    def __init__(self, llm: nn.Module, visual_encoder: nn.Module, projector: nn.Module, visual_select_layer: int = -2):
        super().__init__()
        self.llm = llm
        self.visual_encoder = visual_encoder
        self.projector = projector
        self.visual_select_layer = visual_select_layer
        self._vision_capture: dict = {}  # the selected hidden state of the forward in progress
        _hook_selected_hidden_state(visual_encoder, visual_select_layer, self._vision_capture)
        self.trainable_parts: tuple[str, ...] = MODEL_PARTS
        self.packing = False
        self.fused_loss = False

    # --- which parts train -------------------------------------------------------------------
    def set_trainable(self, parts) -> None:
        unknown = set(parts) - set(MODEL_PARTS)
        if unknown:
            raise ValueError(f"unknown model parts {sorted(unknown)}; known: {list(MODEL_PARTS)}")
        self.trainable_parts = tuple(p for p in MODEL_PARTS if p in parts)
        for name in MODEL_PARTS:
            getattr(self, name).requires_grad_(name in self.trainable_parts)

    def enable_gradient_checkpointing(self, policy: str = "full", every_n_layers: int = 1) -> None:
        """Checkpoint every `every_n_layers`-th block of the LLM and ViT (and the projector) under `policy`."""
        kwargs = checkpoint_kwargs(policy)
        # Non-reentrant checkpointing passes gradients on through frozen blocks by itself: xtuner's
        # enable_input_require_grads (for reentrant checkpointing) would only make a frozen ViT run backward.
        for name in MODEL_PARTS:
            module = getattr(self, name)
            if hasattr(module, "activation_checkpointing_enable"):  # transformers >= 5.2x names it so
                module.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers)
            else:
                module.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs, every_n_layers=every_n_layers)
        self.llm.config.use_cache = False

    def enable_packing(self) -> None:
        """Training forward packs each micro-batch into one row with per-sample (varlen) attention."""
        register_varlen_attention()
        self.llm.set_attn_implementation(VARLEN)
        self.packing = True

    def checkpointed_blocks(self) -> tuple[int, int]:
        """(blocks of the LLM and ViT that a training forward checkpoints now, all of them): transformers'
        blocks checkpoint only when enabled and in training mode."""
        from transformers.modeling_layers import GradientCheckpointingLayer

        blocks = [m for m in self.modules() if isinstance(m, GradientCheckpointingLayer)]
        return sum(1 for m in blocks if m.gradient_checkpointing and m.training), len(blocks)

    def compile_blocks(self) -> None:
        """torch.compile each transformer block of the LLM and ViT (as torchtune does): small graphs
        that compile once per block type, and no graph breaks from the Python splicing around them."""
        from transformers.modeling_layers import GradientCheckpointingLayer

        for module in self.modules():
            if isinstance(module, GradientCheckpointingLayer):
                module.compile()

    def enable_fused_loss(self) -> None:
        """Training forward computes the loss from hidden states with the fused, chunked lm_head + CE."""
        self.fused_loss = True

    # --- forward -----------------------------------------------------------------------------
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] -> [N, patches, llm_hidden]: hidden layer `visual_select_layer`, CLS dropped."""
        vit_dtype = next(self.visual_encoder.parameters()).dtype
        self.visual_encoder(pixel_values.to(vit_dtype))
        feats = self._vision_capture.pop("hidden_state")[:, 1:]
        return self.projector(feats)

    def sample_rows(self, input_ids, attention_mask, labels, image_features):
        """Per sample: its embeddings with the image's feature rows in place of the -200, and its labels.

        Every sample owns one image slot (text-only samples carry a blank image whose features are
        kept in the graph as an empty slice, as in xtuner, so all ranks use all parameters).
        """
        embed = self.llm.get_input_embeddings()
        batch = input_ids.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        n_placeholders = (input_ids == IMAGE_TOKEN_INDEX).logical_and(attention_mask.bool()).sum(dim=1)
        if image_features is None:
            if n_placeholders.any():
                raise ValueError(f"{int(n_placeholders.sum())} image placeholders in the text but no images given")
        elif image_features.shape[0] != batch:
            raise ValueError(f"got {image_features.shape[0]} images for a batch of {batch} samples (one slot each)")
        if (n_placeholders > 1).any():
            raise ValueError(f"a sample holds {int(n_placeholders.max())} image placeholders; one image per sample is supported")

        rows_e, rows_l = [], []
        for i in range(batch):
            keep = attention_mask[i].bool()
            ids = input_ids[i][keep]
            lab = labels[i][keep] if labels is not None else torch.full_like(ids, IGNORE_INDEX)
            pos = (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
            text = embed(ids.clamp(min=0))
            if not pos:
                pieces = [text] + ([image_features[i][:0]] if image_features is not None else [])
                rows_e.append(torch.cat(pieces))
                rows_l.append(lab)
                continue
            p = pos[0]
            feats = image_features[i].to(text.dtype)
            rows_e.append(torch.cat([text[:p], feats, text[p + 1 :]]))
            rows_l.append(torch.cat([lab[:p], lab.new_full((feats.shape[0],), IGNORE_INDEX), lab[p + 1 :]]))
        return rows_e, rows_l

    def splice(self, input_ids, attention_mask, labels, image_features, padding_side: str = "right"):
        """Replace each -200 with its image's feature rows; returns padded embeds/mask/labels/pos.

        Right padding (training, as xtuner) or left padding (batched generation).
        """
        rows_e, rows_l = self.sample_rows(input_ids, attention_mask, labels, image_features)
        batch = len(rows_e)
        width = max(r.shape[0] for r in rows_e)
        hidden = rows_e[0].shape[1]
        embeds = rows_e[0].new_zeros((batch, width, hidden))
        new_labels = input_ids.new_full((batch, width), IGNORE_INDEX)
        mask = torch.zeros((batch, width), dtype=torch.bool, device=input_ids.device)
        position_ids = torch.zeros((batch, width), dtype=torch.long, device=input_ids.device)
        for i, (e, lab) in enumerate(zip(rows_e, rows_l)):
            n = e.shape[0]
            span = slice(0, n) if padding_side == "right" else slice(width - n, width)
            embeds[i, span] = e
            new_labels[i, span] = lab
            mask[i, span] = True
            position_ids[i, span] = torch.arange(n, device=input_ids.device)
        return embeds, mask, (new_labels if labels is not None else None), position_ids

    def forward(self, input_ids, attention_mask=None, labels=None, pixel_values=None, **llm_kwargs):
        feats = self.encode_images(pixel_values) if pixel_values is not None else None
        if self.packing:
            rows_e, rows_l = self.sample_rows(input_ids, attention_mask, labels, feats)
            inputs = pack_rows(rows_e, rows_l if labels is not None else None)
            labels = inputs.pop("labels")
        else:
            embeds, mask, labels, position_ids = self.splice(input_ids, attention_mask, labels, feats)
            inputs = {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": position_ids}
        if labels is not None:
            llm_kwargs.setdefault("use_cache", False)  # training: a KV cache only holds memory
        if self.fused_loss and labels is not None:
            hidden = self.llm.get_decoder()(**inputs, **llm_kwargs).last_hidden_state
            loss = fused_linear_cross_entropy(hidden, self.llm.get_output_embeddings(), labels)
            return CausalLMOutputWithPast(loss=loss)
        return self.llm(**inputs, labels=labels, **llm_kwargs)

    @torch.no_grad()
    def generate(self, input_ids: list[list[int]], pixel_values: torch.Tensor | None, **generate_kwargs):
        """Greedy/sampled generation for a batch of prompts (lists of ids with -200), left-padded.

        Returns the new token ids only, one list per prompt.
        """
        device = self.llm.device
        width = max(len(ids) for ids in input_ids)
        padded = torch.zeros((len(input_ids), width), dtype=torch.long, device=device)
        mask = torch.zeros_like(padded, dtype=torch.bool)
        for i, ids in enumerate(input_ids):
            padded[i, : len(ids)] = torch.tensor(ids, device=device)
            mask[i, : len(ids)] = True
        feats = self.encode_images(pixel_values.to(device)) if pixel_values is not None else None
        embeds, emask, _, _ = self.splice(padded, mask, None, feats, padding_side="left")
        out = self.llm.generate(inputs_embeds=embeds, attention_mask=emask.long(), **generate_kwargs)
        return out.tolist()


def trainable_state_dict(model: LlavaModel) -> dict[str, torch.Tensor]:
    """The tensors of the parts that train (xtuner's checkpoint filter): what a stage's checkpoint carries,
    `projector.*` after pretrain, everything after fine-tune."""
    keep = tuple(f"{p}." for p in model.trainable_parts)
    return {k: v for k, v in model.state_dict().items() if k.startswith(keep)}
