"""The training loop: one readable loop over micro-iterations on a DeepSpeed ZeRO engine.

Launched by torchrun (any number of ranks, GPU with NCCL or CPU with gloo). Resumes from the newest
iter_N.pth in the work dir; publishes the last checkpoint to `output` when the run completes.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..constants import IMAGE_TOKEN_INDEX
from ..data.collate import collate
from ..data.dataset import LlavaDataset
from ..data.images import ImageTransform
from ..data.sampler import LengthGroupedSampler, ShuffleSampler
from ..distributed import init_distributed
from ..model.activation_checkpointing import normalise_policy
from ..model.build import build_llava
from ..model.checkpoint_reader import load_state_dict
from ..template import get_template
from . import resume_state
from .flops import FlopModel
from .recipe import Recipe
from .schedule import lr_at

log = logging.getLogger(__name__)


def _precision(recipe: Recipe, device: torch.device) -> str:
    if recipe.precision != "auto":
        return recipe.precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def deepspeed_config(recipe: Recipe, world: int, precision: str) -> dict:
    return {
        "train_micro_batch_size_per_gpu": recipe.micro_batch_size,
        "gradient_accumulation_steps": recipe.accumulative_counts,
        "train_batch_size": recipe.micro_batch_size * recipe.accumulative_counts * world,
        "gradient_clipping": recipe.max_norm,
        "zero_optimization": {"stage": recipe.deepspeed_stage, "overlap_comm": precision != "fp32",
                              "contiguous_gradients": True},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
    }


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(recipe: Recipe):
    model = build_llava(recipe.llm, recipe.visual_encoder, recipe.projector_depth, recipe.visual_select_layer)
    if recipe.init_from:
        state = load_state_dict(recipe.init_from)
        result = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
        if result.unexpected_keys:
            raise ValueError(f"{recipe.init_from}: keys that are not in this model: {result.unexpected_keys[:5]}")
        log.info("initialised %d tensors from %s", len(state), recipe.init_from)
    model.set_trainable(recipe.train)
    apply_speedups(model, recipe)
    return model


def apply_speedups(model, recipe: Recipe) -> None:
    """The recipe's speed settings (from a Recipe, or anything with its attribute names, as the benchmarks
    pass); none of them changes the loss or gradients (tests/test_speed.py)."""
    policy = normalise_policy(recipe.gradient_checkpointing)
    if policy != "none":
        model.enable_gradient_checkpointing(policy, recipe.checkpoint_every_n_layers)
    if recipe.packing:
        model.enable_packing()
    if recipe.fused_loss:
        model.enable_fused_loss()
    if recipe.compile:
        model.compile_blocks()


def build_optimizer(params, recipe: Recipe, device: torch.device) -> torch.optim.Optimizer:
    fused = device.type == "cuda" if recipe.fused_optimizer == "auto" else bool(recipe.fused_optimizer)
    return torch.optim.AdamW(params, lr=recipe.lr, betas=tuple(recipe.betas), eps=recipe.eps,
                             weight_decay=recipe.weight_decay, fused=fused, foreach=None if fused else True)


def build_dataset(recipe: Recipe, image_processor, tokenizer) -> LlavaDataset:
    transform = ImageTransform(image_processor, recipe.pad_image_to_square)
    return LlavaDataset(recipe.datasets, tokenizer, get_template(recipe.prompt_template), transform,
                        recipe.max_length, recipe.on_bad_sample)


def build_sampler(recipe: Recipe, dataset: LlavaDataset, rank: int, world: int):
    if recipe.sampler == "length_grouped":
        per_device = recipe.micro_batch_size * recipe.accumulative_counts
        return LengthGroupedSampler(dataset.modality_lengths, per_device, recipe.seed, rank, world)
    if recipe.sampler == "shuffle":
        return ShuffleSampler(len(dataset), recipe.seed, rank, world)
    raise ValueError(f"unknown sampler {recipe.sampler!r}")


def _sample_sizes(batch: dict, patches: int) -> tuple[list[int], list[int]]:
    """Per sample: tokens the LLM sees (each -200 becomes `patches` rows) and images it holds."""
    images = (batch["input_ids"] == IMAGE_TOKEN_INDEX).sum(dim=1)
    tokens = batch["attention_mask"].sum(dim=1) + images * (patches - 1)
    return tokens.tolist(), images.tolist()


def train(recipe: Recipe, work_dir: str | Path, output: str | Path) -> None:
    import deepspeed
    from transformers import AutoTokenizer, CLIPImageProcessor

    work_dir, output = Path(work_dir), Path(output)
    rank, world, device = init_distributed(group_of_one=True)
    precision = _precision(recipe, device)
    fingerprint = {"recipe": recipe.fingerprint(world), "world_size": world, "stage": recipe.stage}
    lock = resume_state.WorkDirLock(work_dir) if rank == 0 else None
    if lock:
        lock.__enter__()
        resume_state.prepare_work_dir(work_dir, fingerprint)
    torch.distributed.barrier()
    try:
        _seed_all(recipe.seed)
        tokenizer = AutoTokenizer.from_pretrained(recipe.llm, padding_side="right")
        image_processor = CLIPImageProcessor.from_pretrained(recipe.visual_encoder)
        dataset = build_dataset(recipe, image_processor, tokenizer)
        sampler = build_sampler(recipe, dataset, rank, world)
        iters_per_epoch = math.ceil(sampler.num_samples / recipe.micro_batch_size)
        total = iters_per_epoch * recipe.epochs

        model = build_model(recipe)
        patches = (model.visual_encoder.config.image_size // model.visual_encoder.config.patch_size) ** 2
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer(params, recipe, device)
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                       config=deepspeed_config(recipe, world, precision))
        start = _resume(engine, work_dir)
        if rank == 0:
            print(f"{recipe.stage}: {len(dataset)} samples, {world} rank(s), {precision}, {total} iterations "
                  f"({iters_per_epoch}/epoch), {sum(p.numel() for p in params):,} trainable parameters, "
                  f"{'resuming at iteration ' + str(start) if start else 'starting fresh'}", flush=True)
        _run(engine, recipe, dataset, sampler, start, total, iters_per_epoch, work_dir, rank, world, device, patches,
             FlopModel.of(model))
        if rank == 0 and any(dataset.bad_sample_counts().values()):  # on_bad_sample: skip
            print(f"bad samples skipped or replaced (rank 0): {dataset.bad_sample_counts()}", flush=True)
        if rank == 0:
            _, last = resume_state.newest_checkpoint(work_dir)
            resume_state.publish(last, output, [work_dir / "metrics.jsonl"])
            print(f"published {last.name} as {output}", flush=True)
        torch.distributed.barrier()
    finally:
        if lock:
            lock.__exit__(None, None, None)


def _rng_state() -> dict:
    # Tensors and plain tuples only, so the checkpoint reads back with torch.load(weights_only=True).
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
            "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])


def _resume(engine, work_dir: Path) -> int:
    found = resume_state.newest_checkpoint(work_dir)
    if found is None:
        return 0
    n, path = found
    _, client = engine.load_checkpoint(str(work_dir), tag=path.name, load_module_strict=False)
    _set_rng_state(client["rng"])
    # Drop metrics logged after the checkpoint: those iterations are about to run again.
    metrics = work_dir / "metrics.jsonl"
    if metrics.exists() and torch.distributed.get_rank() == 0:
        kept = [ln for ln in metrics.read_text().splitlines() if json.loads(ln)["iter"] <= n]
        metrics.write_text("".join(ln + "\n" for ln in kept))
    return client["iter"]


def _save(engine, work_dir: Path, it: int, keep: int, rank: int) -> None:
    tag = f"iter_{it}.pth"
    client = {"iter": it, "rng": _rng_state()}
    engine.save_checkpoint(str(work_dir), tag=tag, client_state=client)
    torch.distributed.barrier()
    if rank == 0:
        (work_dir / tag / "complete").touch()
        resume_state.prune_checkpoints(work_dir, keep)
    torch.distributed.barrier()


def _run(engine, recipe, dataset, sampler, start, total, iters_per_epoch, work_dir, rank, world, device, patches,
         flop_model: FlopModel):
    bar = tqdm(total=total, initial=start, disable=rank != 0, desc=recipe.stage, dynamic_ncols=True,
               mininterval=1.0)
    metrics = open(work_dir / "metrics.jsonl", "a") if rank == 0 else None
    loader = None
    tokens, flops, samples, t0 = 0, 0.0, 0, time.perf_counter()
    for it in range(start, total):
        epoch, k = divmod(it, iters_per_epoch)
        if loader is None or k == 0:
            sampler.set_epoch(epoch, skip=k * recipe.micro_batch_size)
            loader = iter(DataLoader(dataset, batch_size=recipe.micro_batch_size, sampler=sampler,
                                     num_workers=recipe.num_workers, collate_fn=collate,
                                     pin_memory=device.type == "cuda"))
        batch = next(loader)
        sizes, images = _sample_sizes(batch, patches)
        tokens, samples = tokens + sum(sizes), samples + len(sizes)
        flops += sum(flop_model.sample_flops(t, i) for t, i in zip(sizes, images))
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        loss = engine(**batch).loss
        engine.backward(loss)
        lr = lr_at(it, total, recipe.lr, recipe.warmup_ratio)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        boundary = engine.is_gradient_accumulation_boundary()
        engine.step()
        loss_value = loss.detach().float()
        torch.distributed.all_reduce(loss_value)
        loss_value = loss_value.item() / world
        if rank == 0:
            elapsed = time.perf_counter() - t0
            rate = world / elapsed if elapsed > 0 else 0.0  # this rank's work x ranks: an estimate
            tps = tokens * rate
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.3g}", tok_s=f"{tps:.0f}", refresh=False)
            bar.update(1)
            grad_norm = engine.get_global_grad_norm() if boundary else None
            record = {"iter": it + 1, "epoch": epoch, "loss": loss_value, "lr": lr,
                      "grad_norm": float(grad_norm) if grad_norm is not None else None, "tokens_per_s": tps,
                      "samples_per_s": samples * rate, "mean_tokens_per_sample": tokens / samples,
                      "model_tflops_per_s": flops * rate / 1e12, "elapsed_s": elapsed}
            if device.type == "cuda":
                record["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
            metrics.write(json.dumps(record) + "\n")
            if (it + 1) % recipe.log_interval == 0:
                metrics.flush()
        if (it + 1) % recipe.save_steps == 0 or it + 1 == total:
            if metrics:
                metrics.flush()
            _save(engine, work_dir, it + 1, recipe.save_total_limit, rank)
    bar.close()
    if metrics:
        metrics.close()
