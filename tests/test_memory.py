"""The memory model (llavaflow.train.memory) against what torch really keeps: the tensors autograd saves
for backward in a Phi-3 decoder layer and a CLIP encoder layer (tiny width, fp32 and bf16), the optimizer
state DeepSpeed ZeRO-2 allocates for a tiny LLaVA, and the real architecture's parameters on the meta device."""

import json
import sys

import pytest
import torch
from transformers import CLIPVisionConfig, Phi3Config
from transformers.models.clip.modeling_clip import CLIPEncoderLayer
from transformers.models.phi3.modeling_phi3 import Phi3DecoderLayer, Phi3RotaryEmbedding

from conftest import ROOT, run
from llavaflow.model.build import build_llava
from llavaflow.model.sizes import build_reference_llava
from llavaflow.train.memory import GiB, Shapes, estimate, llm_layer_saved, vit_layer_saved


def saved_bytes(fn, params) -> int:
    """Bytes of the distinct storages autograd saves while fn runs (parameters left out)."""
    param_storages = {p.untyped_storage().data_ptr() for p in params}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_storages:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_activations_per_token_are_what_autograd_keeps(dtype):
    torch.manual_seed(0)
    cfg = Phi3Config(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=8,
                     num_hidden_layers=1, vocab_size=100, pad_token_id=0, eos_token_id=1, bos_token_id=1,
                     attn_implementation="sdpa")
    layer, tokens = Phi3DecoderLayer(cfg, 0).to(dtype), 64
    x = torch.randn(1, tokens, 256, dtype=dtype, requires_grad=True)
    pos = torch.arange(tokens)[None]
    cos_sin = tuple(t.to(dtype) for t in Phi3RotaryEmbedding(cfg)(x, pos))
    got = saved_bytes(lambda: layer(x, attention_mask=None, position_ids=pos, position_embeddings=cos_sin),
                      layer.parameters())
    rotary = 2 * 32 * dtype.itemsize  # cos and sin, head_dim 32: shared by every layer of a model
    assert got == tokens * (llm_layer_saved(256, 512, 8, "none", dtype.itemsize) + rotary)

    vit = CLIPEncoderLayer(CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_attention_heads=4,
                                            attn_implementation="sdpa")).to(dtype)
    x = torch.randn(2, 50, 128, dtype=dtype, requires_grad=True)
    got = saved_bytes(lambda: vit(x, None), vit.parameters())
    # exact in fp32; in bf16 torch keeps LayerNorm's mean/rstd in fp32 per row, as the model counts (+-4 B/token)
    assert got == pytest.approx(100 * vit_layer_saved(128, 512, 4, "none", dtype.itemsize), abs=100 * 8)


def test_full_checkpointing_keeps_the_block_input_only():
    cfg = Phi3Config(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=8,
                     num_hidden_layers=1, vocab_size=100, pad_token_id=0, eos_token_id=1, bos_token_id=1,
                     attn_implementation="sdpa")
    layer, tokens = Phi3DecoderLayer(cfg, 0), 64
    x = torch.randn(1, tokens, 256, requires_grad=True)
    pos = torch.arange(tokens)[None]
    cos_sin = Phi3RotaryEmbedding(cfg)(x, pos)
    got = saved_bytes(lambda: torch.utils.checkpoint.checkpoint(
        layer, x, None, pos, position_embeddings=cos_sin, use_reentrant=False), layer.parameters())
    assert got == tokens * (llm_layer_saved(256, 512, 8, "full", 4) + 8)  # + the int64 position ids


@pytest.mark.parametrize("packing", [False, True])
def test_full_checkpointing_applies_to_every_block_of_the_whole_model(tiny, packing):
    """LlavaModel end to end (ViT, projector, splice, every LLM block, HF's loss) on a ragged batch: without
    checkpointing autograd keeps about what the memory model counts; under full checkpointing no block's
    insides are kept in the graph (the checkpoint holds each block's input). The model is put in training mode
    here; that the training loop does so too is the next test's."""
    from test_speed import ragged_batch

    saved, counted = {}, {}
    for policy in ("none", "full"):
        torch.manual_seed(0)
        model = build_llava(str(tiny["llm"]), str(tiny["vit"])).train()
        if policy == "full":
            model.enable_gradient_checkpointing(policy)
        if packing:
            model.enable_packing()
        batch = ragged_batch(model, lengths=(40, 23, 31))
        image_rows = model.encode_images(batch["pixel_values"][:1]).shape[1]
        rows = sum(n - 1 + image_rows for n in (40, 23, 31)) if packing else 3 * (40 - 1 + image_rows)
        saved[policy] = saved_bytes(lambda: model(**batch).loss, model.parameters())
        counted[policy] = estimate(Shapes.of(model), tokens=rows, images=3, policy=policy, dtype_bytes=4).activations
    assert saved["none"] == pytest.approx(counted["none"], rel=0.2), (saved, counted)
    assert saved["full"] <= counted["full"] and saved["full"] < saved["none"] / 3, (saved, counted)


@pytest.mark.parametrize("policy", ["full", "selective"])
def test_a_training_stage_checkpoints_the_model_it_builds(tiny, policy):
    """The training loop's own model (build_model from a recipe, the LLM and ViT read with from_pretrained) runs
    its blocks checkpointed. Until 2026-12-01 it did not: from_pretrained returns modules in eval mode, where
    transformers' blocks skip checkpointing, so the H200's runs of 2026-11-30 trained with none (bench/README.md)."""
    from test_speed import ragged_batch

    from llavaflow.train.loop import build_model
    from llavaflow.train.recipe import Recipe

    saved = {}
    for setting in ("none", policy):
        torch.manual_seed(0)
        model = build_model(Recipe(stage="finetune", llm=str(tiny["llm"]), visual_encoder=str(tiny["vit"]), datasets=[],
                                   train=["llm", "visual_encoder", "projector"], gradient_checkpointing=setting))
        batch = ragged_batch(model, lengths=(40, 23, 31))
        saved[setting] = saved_bytes(lambda: model(**batch).loss, model.parameters())
    rows = 3 * (40 - 1 + model.encode_images(batch["pixel_values"][:1]).shape[1])
    assert saved["none"] == pytest.approx(estimate(Shapes.of(model), tokens=rows, images=3, policy="none",
                                                   dtype_bytes=4).activations, rel=0.2), saved
    # Either policy leaves only the blocks' inputs in autograd's graph (what selective keeps besides is held by
    # the checkpoint's own cache, which these hooks do not see; test_speed checks its values).
    assert saved[policy] < saved["none"] / 3, saved


def test_a_frozen_vit_stays_out_of_the_graph(tiny):
    """The pretrain (projector only, checkpointing on): the frozen ViT's features need no gradient, so autograd
    keeps nothing of it and backward stops at the projector, as the memory model counts. xtuner's
    enable_input_require_grads, which reentrant checkpointing needs, made the frozen ViT run backward."""
    from llavaflow.train.loop import build_model
    from llavaflow.train.recipe import Recipe

    model = build_model(Recipe(stage="pretrain", llm=str(tiny["llm"]), visual_encoder=str(tiny["vit"]), datasets=[],
                               train=["projector"], gradient_checkpointing=True))
    size = model.visual_encoder.config.image_size
    pixels = torch.randn(2, 3, size, size)
    hidden = model.visual_encoder(pixels, output_hidden_states=True).hidden_states
    assert not any(h.requires_grad for h in hidden)
    assert model.encode_images(pixels).requires_grad


def test_deepspeed_allocates_what_the_model_counts(tiny, tmp_path):
    """DeepSpeed's ZeRO-2 through the training loop's own model, optimizer and config (CPU, one rank), from its
    initialisation on; where the GPU and host parts would be apart, a CPU run holds both.
    - The states after backward: weights, the gradient partition, fp32 master and moments (16 B/param in bf16);
      offloaded, the weights and a one-parameter staging buffer, and on the host master, moments and fp32
      gradients (16 B), the bf16 partition the weights go back through (2 B), with accumulative_counts > 1 a
      bf16 gradient accumulator (2 B), and a second staging buffer: 4 B more than the model counted until
      2026-12-01, 15.4 GiB at the real size.
    - Backward's reduce buckets, allocated whole at every backward and gone by the step, where the model counted
      them too: two of the trainable count's bf16 elements, as the loop caps DeepSpeed's 5e8 (uncapped, DeepSpeed
      allocated 1.9 GiB of them for a projector); the gradient being copied in comes on top.
    - The step: the fp32 gradient copy and the bf16 copy it is cast from (6 B/param), 4 in fp32; a foreach
      AdamW's temporary comes after the partition is freed (6 B/param too; offloaded, 4 on the host)."""
    cases = [{"precision": "bf16", "fused_optimizer": True}, {"precision": "fp32", "fused_optimizer": True},
             {"precision": "bf16", "fused_optimizer": False},
             {"precision": "bf16", "fused_optimizer": True, "offload_optimizer": "cpu", "accumulative_counts": 2},
             {"precision": "bf16", "fused_optimizer": False, "offload_optimizer": "cpu"}]
    job = {"stage": "finetune", "llm": str(tiny["llm"]), "visual_encoder": str(tiny["vit"]), "datasets": [],
           "train": ["llm"], "micro_batch_size": 4, "accumulative_counts": 1, "gradient_checkpointing": False,
           "cases": cases}
    (tmp_path / "job.json").write_text(json.dumps(job))
    out = run([sys.executable, str(ROOT / "tests" / "zero_memory_probe.py"), str(tmp_path / "job.json")], timeout=600)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [{k: r[k] for k in c} for r, c in zip(rows, cases)] == cases, out.stdout
    model = build_llava(str(tiny["llm"]), str(tiny["vit"]))
    model.set_trainable(["llm"])
    shapes = Shapes.of(model)
    frozen = shapes.params - shapes.trainable
    for row, step_per_param in zip(rows, (6, 4, 6, 0, 4)):
        c = 2 if row["precision"] == "bf16" else 4
        est = estimate(shapes, tokens=1, images=1, policy="none", dtype_bytes=c, overlap_comm=c == 2,
                       offload_optimizer=row.get("offload_optimizer", "none"),
                       accumulative_counts=row.get("accumulative_counts", 1), fused_optimizer=row["fused_optimizer"])
        assert row["trainable"] == shapes.trainable, row
        # an fp32 model's frozen parameters are not copied by the engine, so not counted by the probe
        resident = est.resident - (frozen * c if c == 4 else 0)
        assert est.buckets - 1024 <= row["backward_extra"] <= est.buckets + 2 * c * shapes.largest_trainable, row
        assert row["step_extra"] == pytest.approx(step_per_param * shapes.trainable, rel=1e-3, abs=64), row
        if "offload_optimizer" in row:
            assert row["resident"] + row["step_extra"] == pytest.approx(resident + est.host, rel=1e-4), row
        else:
            assert row["resident"] == pytest.approx(resident, rel=1e-4), row
            assert row["step_extra"] == pytest.approx(est.step_grad, rel=1e-3), row


def test_parameter_and_optimizer_state_counts():
    # The real architecture on the meta device: 4.137B parameters (performance.md §1), 7.7 GiB in bf16.
    shapes = Shapes.of(build_reference_llava("meta"))
    assert shapes.params == shapes.trainable == pytest.approx(4.137e9, rel=1e-3)
    est = estimate(shapes, tokens=8 * 1024, images=8, policy="full")
    assert est.weights / GiB == pytest.approx(7.71, abs=0.01)
    assert (est.master + est.adam) / GiB == pytest.approx(46.2, abs=0.1)  # 12 B per parameter
    # Plain ZeRO-2 on one GPU: the optimizer step needs 22 B per parameter whatever the batch; CPU offload
    # leaves the weights, buckets and activations on the GPU, and takes 20 B per parameter of host memory
    # with the recipe's gradient accumulation (18 without).
    assert est.peak / GiB > 79.6  # an H100 80GB's usable memory
    offload = estimate(shapes, tokens=8 * 1024, images=8, policy="full", offload_optimizer="cpu",
                       accumulative_counts=2)
    assert offload.peak / GiB < 40 and offload.host / GiB == pytest.approx(77.2, abs=0.1)
    single = estimate(shapes, tokens=8 * 1024, images=8, policy="full", offload_optimizer="cpu")
    assert single.host / GiB == pytest.approx(69.5, abs=0.1)  # no gradient accumulator


@pytest.mark.parametrize("policy,offload,micro_batch,peak_gib", [
    ("full", "none", 8, 84.8), ("selective", "none", 8, 84.8), ("none", "none", 8, 99.0),
    ("full", "cpu", 8, 13.9), ("selective", "cpu", 8, 28.1), ("selective", "cpu", 16, 46.4), ("none", "cpu", 8, 45.2)])
def test_the_predicted_peaks_in_bench_readme(policy, offload, micro_batch, peak_gib):
    """bench/README.md's table (and the README's 84.8 / 13.9 / 77.2 GiB): the fine-tune recipe (two accumulated
    micro-batches) at 780 tokens per sample."""
    shapes = Shapes.of(build_reference_llava("meta"))
    est = estimate(shapes, tokens=micro_batch * 780, images=micro_batch, policy=policy, offload_optimizer=offload,
                   accumulative_counts=2)
    assert round(est.peak / GiB, 1) == peak_gib
    assert round(est.host / GiB, 1) == (77.2 if offload == "cpu" else 0)


@pytest.mark.parametrize("rows,fused_loss,peak_gib", [(8696, False, 111.2), (8368, True, 107.1)])
def test_the_h200_runs_as_they_ran(rows, fused_loss, peak_gib):
    """bench/README.md: the model's peaks for the H200's two fine-tune runs as they ran (no checkpointing, their
    largest micro-batch of 8 images), against 105.2 and 88.8 GiB measured."""
    shapes = Shapes.of(build_reference_llava("meta"))
    est = estimate(shapes, tokens=rows, images=8, policy="none", fused_loss=fused_loss)
    assert round(est.peak / GiB, 1) == peak_gib


@pytest.mark.parametrize("policy,peak_gib", [("full", 20.4), ("selective", 34.6), ("none", 51.8)])
def test_the_per_rank_peaks_on_eight_ranks(policy, peak_gib):
    """bench/README.md: ZeRO-2 over eight ranks at micro-batch 8, 780 tokens per sample."""
    est = estimate(Shapes.of(build_reference_llava("meta")), tokens=8 * 780, images=8, policy=policy, world=8)
    assert round(est.peak / GiB, 1) == peak_gib


def test_the_pretrain_bench_fits_without_checkpointing():
    """bench/README.md: the pretrain (projector trains, ViT and LLM frozen) at micro-batch 8 with no checkpointing."""
    model = build_reference_llava("meta")
    model.set_trainable(["projector"])
    est = estimate(Shapes.of(model), tokens=8 * 780, images=8, policy="none", trains_vit=False)
    assert round(est.peak / GiB, 1) == 39.1
