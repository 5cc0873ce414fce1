"""The training loop: one readable loop over micro-iterations on a DeepSpeed ZeRO engine.

Launched by torchrun (any number of ranks, GPU with NCCL or CPU with gloo). Resumes from the newest
iter_N.pth in the work dir; publishes the last checkpoint to `output` when the run completes. As in
nanoGPT, the loss stays on the device between log intervals: the only GPU syncs the loop adds are the
all_reduce and .item() of each logged row.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import random
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..atomic import fsync_tree, held_input
from ..constants import IMAGE_TOKEN_INDEX
from ..data.collate import collate
from ..data.dataset import DataError, LlavaDataset
from ..data.images import ImageTransform
from ..data.sampler import LengthGroupedSampler, ShuffleSampler
from ..distributed import init_distributed
from ..identity import TRAIN_CODE, code_hash, path_fingerprint
from ..model.activation_checkpointing import normalise_policy
from ..model.build import build_llava
from ..model.llava import compile_counts
from ..model.checkpoint_reader import load_state_dict
from ..template import get_template
from . import resume_state
from .flops import FlopModel
from .memory import reduce_bucket_elements
from .metrics import MetricLogger
from .recipe import Recipe, combination_errors
from .schedule import lr_at

log = logging.getLogger(__name__)


def _precision(recipe: Recipe, device: torch.device) -> str:
    if recipe.precision != "auto":
        return recipe.precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def deepspeed_config(recipe: Recipe, world: int, precision: str, *, trainable: int) -> dict:
    zero = {"stage": recipe.deepspeed_stage, "overlap_comm": precision != "fp32", "contiguous_gradients": True,
            "reduce_bucket_size": reduce_bucket_elements(trainable)}
    if recipe.offload_optimizer != "none":
        # fp32 master weights, their gradients and the Adam moments live in host memory; the step runs
        # there (our torch AdamW on the CPU partitions, hence zero_force_ds_cpu_optimizer off).
        zero["offload_optimizer"] = {"device": recipe.offload_optimizer, "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": recipe.micro_batch_size,
        "gradient_accumulation_steps": recipe.accumulative_counts,
        "train_batch_size": recipe.micro_batch_size * recipe.accumulative_counts * world,
        "gradient_clipping": recipe.max_norm,
        "zero_optimization": zero,
        "zero_force_ds_cpu_optimizer": False,
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
    # from_pretrained hands back the LLM and ViT in eval mode, where transformers' blocks skip activation
    # checkpointing (and dropout): the whole model trains in training mode, frozen parts included, as xtuner's.
    return model.train()


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


def build_dataset(recipe: Recipe, tokenizer) -> LlavaDataset:
    transform = ImageTransform.from_folder(recipe.visual_encoder, recipe.pad_image_to_square)
    return LlavaDataset(recipe.datasets, tokenizer, get_template(recipe.prompt_template), transform,
                        recipe.max_length, recipe.on_bad_sample)


def shared_dataset(recipe: Recipe, tokenizer, work_dir: Path, rank: int) -> LlavaDataset:
    """Rank 0 tokenises (as xtuner's rank 0 does) and saves the samples in the work dir; every rank then maps that
    one copy. The work dir belongs to this recipe, code and these inputs (its fingerprint), so a resumed attempt
    reuses the samples, and the same samples in the same order as the attempt it resumes."""
    saved = work_dir / "dataset"
    transform = ImageTransform.from_folder(recipe.visual_encoder, recipe.pad_image_to_square)
    failure = None
    if rank == 0:
        try:
            try:
                LlavaDataset.load(saved, transform, recipe.on_bad_sample)
                print(f"{recipe.stage}: samples tokenised by an earlier attempt, from {saved}", flush=True)
            except FileNotFoundError:
                build_dataset(recipe, tokenizer).save(saved)
            except (ValueError, OSError, KeyError) as e:  # torn by a crash of the machine: ours, made again
                print(f"{recipe.stage}: {saved} is unreadable ({e}); tokenising again", flush=True)
                build_dataset(recipe, tokenizer).save(saved, overwrite=True)
        except Exception as e:  # bad data: every rank stops with it, none waits for a rank 0 that is gone
            failure = e
    # The others wait while rank 0 tokenises, a million samples and an is_file per image: longer than the
    # 30-minute default of a collective on a slow file system, hence a CPU group of its own with hours.
    waiting_room = torch.distributed.new_group(backend="gloo", timeout=datetime.timedelta(hours=6))
    outcome = [None if failure is None else str(failure)]
    torch.distributed.broadcast_object_list(outcome, src=0, group=waiting_room)
    torch.distributed.destroy_process_group(waiting_room)
    if failure is not None:
        raise failure
    if outcome[0] is not None:
        raise DataError(f"rank 0 could not tokenise the samples: {outcome[0]}")
    if not saved.is_dir():
        raise DataError(f"{saved} (written by rank 0) is not visible here: the work dir must be on a file system "
                        "that every node shares")
    return LlavaDataset.load(saved, transform, recipe.on_bad_sample)


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


@dataclass
class Run:
    """What a training stage holds while it runs: the engine, its data, and where it stands."""

    recipe: Recipe
    engine: object  # deepspeed.DeepSpeedEngine
    dataset: LlavaDataset
    sampler: object
    work_dir: Path
    rank: int
    world: int
    device: torch.device
    patches: int  # image feature rows per image
    flop_model: FlopModel
    start: int  # first micro-iteration to run (resume point)
    total: int
    iters_per_epoch: int

    def batches(self):
        """(iteration, epoch, micro-batch) from `start` to `total`, the sampler skipping what already ran."""
        loader = None
        for it in range(self.start, self.total):
            epoch, k = divmod(it, self.iters_per_epoch)
            if loader is None or k == 0:
                self.sampler.set_epoch(epoch, skip=k * self.recipe.micro_batch_size)
                loader = iter(DataLoader(self.dataset, batch_size=self.recipe.micro_batch_size, sampler=self.sampler,
                                         num_workers=self.recipe.num_workers, collate_fn=collate,
                                         pin_memory=self.device.type == "cuda"))
            yield it, epoch, next(loader)


def train(recipe: Recipe, *, work_dir: str | Path, output: str | Path, overwrite: bool = False) -> None:
    """Run (or resume) one training stage into `work_dir`; publish its last checkpoint as `output`.

    An existing `output` is replaced when it is an earlier publish of ours, or with `overwrite`; one that
    is or holds the work dir or an input is refused either way, before any training."""
    work_dir, output = Path(work_dir), Path(output)
    validate(recipe)
    inputs = [recipe.llm, recipe.visual_encoder, recipe.init_from,
              *(d[k] for d in recipe.datasets for k in ("annotation", "image_folder") if d.get(k))]
    _check_inputs(recipe, work_dir, inputs)  # before the work dir is touched: a typo must not set it aside
    resume_state.check_work_dir_is_ours(work_dir)
    resume_state.check_publish_target(output, [work_dir, *inputs], overwrite)
    rank, world, device = init_distributed(group_of_one=True)
    fingerprint = {"recipe": recipe.fingerprint(world), "world_size": world, "stage": recipe.stage,
                   "code": code_hash(*TRAIN_CODE), "inputs": input_identity(recipe)}
    with ExitStack() as stack:
        if rank == 0:
            stack.enter_context(resume_state.WorkDirLock(work_dir))
            resume_state.prepare_work_dir(work_dir, fingerprint, stale_because=_images_found_since(work_dir))
        torch.distributed.barrier()
        run = _prepare(recipe, work_dir, rank, world, device)
        logger = None
        if rank == 0:
            logger = stack.enter_context(MetricLogger(work_dir, resume_at=run.start, report_to=recipe.report_to,
                                                      params=recipe.to_dict(), run_name=f"{recipe.stage}-{work_dir.name}"))
        _loop(run, logger)
        if rank == 0 and any(run.dataset.bad_sample_counts().values()):  # on_bad_sample: skip
            print(f"bad samples skipped or replaced (rank 0): {run.dataset.bad_sample_counts()}", flush=True)
        if rank == 0:
            _, last = resume_state.newest_checkpoint(work_dir)
            resume_state.publish(last, output, [work_dir / "metrics.jsonl"], inputs=inputs, overwrite=overwrite)
            print(f"published {last.name} as {output}", flush=True)
        torch.distributed.barrier()
    # NCCL warns of leaked resources otherwise; only after a clean finish (a failed rank's peers may still
    # be inside a collective, and torchrun ends them)
    torch.distributed.destroy_process_group()


def _check_inputs(recipe: Recipe, work_dir: Path, inputs: list) -> None:
    """Every local input exists (a base model may also be a hub id, 'org/name'), and none is the work dir or
    inside it: a work dir for another configuration is set aside whole."""
    for key in ("llm", "visual_encoder", "init_from"):
        value = getattr(recipe, key)
        hub_id = key != "init_from" and not value.startswith(("/", ".", "~")) and value.count("/") == 1
        if value and not hub_id and not Path(value).expanduser().exists():
            raise ValueError(f"recipe key {key}: {value}: no such file or folder")
    for i, d in enumerate(recipe.datasets):
        if not Path(d["annotation"]).is_file():
            raise ValueError(f"recipe key datasets[{i}].annotation: {d['annotation']}: no such file")
        if d.get("image_folder") and not Path(d["image_folder"]).is_dir():
            raise ValueError(f"recipe key datasets[{i}].image_folder: {d['image_folder']}: no such folder")
    given = held_input(work_dir, inputs)
    if given is not None:
        raise ValueError(f"{work_dir}: the work dir is or contains the input {given}; choose another work dir")


def _images_found_since(work_dir: Path) -> str | None:
    """Images are not in the input identity (hundreds of thousands of files), but under on_bad_sample: skip the
    saved samples name those they skipped as missing: once any is there (downloaded or copied in after the data
    check), the samples and the checkpoints trained on them are stale."""
    found = LlavaDataset.images_found_since_saved(work_dir / "dataset")
    if not found:
        return None
    return (f"was trained without {len(found)} image(s) that were missing then and exist now (first: {found[0]})")


def input_identity(recipe: Recipe) -> dict:
    """The files the stage reads (base models, annotations, the checkpoint it starts from), by names, sizes
    and mtimes: a rerun for new inputs starts fresh instead of resuming what the old ones trained. Image
    folders are left out (hundreds of thousands of files); their annotation file names what is read."""
    paths = {"llm": recipe.llm, "visual_encoder": recipe.visual_encoder, "init_from": recipe.init_from,
             **{f"annotation{i}": d["annotation"] for i, d in enumerate(recipe.datasets)}}
    return {name: path_fingerprint(path) for name, path in paths.items() if path}


def validate(recipe: Recipe) -> None:
    """Reject option combinations that cannot work, before any process group or model exists."""
    from .jit_build_lock import build_lock, check_build_lock
    from .tracking import check_trackers

    for key, why in combination_errors(recipe.to_dict()).items():  # a Recipe built in code skipped from_dict
        raise ValueError(f"recipe key {key}: {why}")
    check_trackers(recipe.report_to)
    check_build_lock(build_lock())  # else a killed run's lock file stalls deepspeed.initialize forever


def _prepare(recipe: Recipe, work_dir: Path, rank: int, world: int, device: torch.device) -> Run:
    import deepspeed
    from transformers import AutoTokenizer

    precision = _precision(recipe, device)
    _seed_all(recipe.seed)
    tokenizer = AutoTokenizer.from_pretrained(recipe.llm, padding_side="right")
    dataset = shared_dataset(recipe, tokenizer, work_dir, rank)
    dataset.check_same_on_every_rank()
    sampler = build_sampler(recipe, dataset, rank, world)
    iters_per_epoch = math.ceil(sampler.num_samples / recipe.micro_batch_size)
    total = iters_per_epoch * recipe.epochs
    if total < recipe.accumulative_counts:  # DeepSpeed steps only at the end of an accumulation
        raise ValueError(f"{recipe.stage}: {total} iteration(s) ({len(dataset)} samples, micro_batch_size "
                         f"{recipe.micro_batch_size}, {world} rank(s), {recipe.epochs} epoch(s)) are fewer than "
                         f"accumulative_counts ({recipe.accumulative_counts}): no optimizer step would be taken")
    if total % recipe.accumulative_counts and rank == 0:
        print(f"{recipe.stage}: the last {total % recipe.accumulative_counts} of {total} iterations end inside an "
              f"accumulation of {recipe.accumulative_counts} and reach no optimizer step (as in xtuner under "
              "DeepSpeed)", flush=True)

    model = build_model(recipe)
    patches = (model.visual_encoder.config.image_size // model.visual_encoder.config.patch_size) ** 2
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, recipe, device)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           config=deepspeed_config(recipe, world, precision,
                                                                   trainable=sum(p.numel() for p in params)))
    start = _resume(engine, work_dir)
    if rank == 0:
        checkpointed, blocks = model.checkpointed_blocks()
        print(f"{recipe.stage}: {len(dataset)} samples, {world} rank(s), {precision}, {total} iterations "
              f"({iters_per_epoch}/epoch), {sum(p.numel() for p in params):,} trainable parameters, "
              f"checkpointing {normalise_policy(recipe.gradient_checkpointing)} on {checkpointed} of {blocks} blocks, "
              f"{'resuming at iteration ' + str(start) if start else 'starting fresh'}", flush=True)
    return Run(recipe=recipe, engine=engine, dataset=dataset, sampler=sampler, work_dir=work_dir, rank=rank,
               world=world, device=device, patches=patches, flop_model=FlopModel.of(model), start=start, total=total,
               iters_per_epoch=iters_per_epoch)


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
    _, path = found
    _, client = engine.load_checkpoint(str(work_dir), tag=path.name, load_module_strict=False)
    _set_rng_state(client["rng"])
    return client["iter"]


def _save(run: Run, it: int) -> None:
    tag = f"iter_{it}.pth"
    client = {"iter": it, "rng": _rng_state()}
    # Frozen parameters are left out (the stage's checkpoint holds what it trains, as
    # llava.trainable_state_dict says; tests/test_train.py checks the two agree). They come back from the
    # base weights on resume, and ZeRO does not copy them into the file as "frozen fragments" either.
    run.engine.save_checkpoint(str(run.work_dir), tag=tag, client_state=client, exclude_frozen_parameters=True)
    fsync_tree(run.work_dir / tag)  # each rank's files on disk before `complete` can be (a node crash)
    torch.distributed.barrier()
    if run.rank == 0:
        (run.work_dir / tag / "complete").touch()
        fsync_tree(run.work_dir / tag)  # the marker too, before the older checkpoints it replaces are pruned
        resume_state.prune_checkpoints(run.work_dir, run.recipe.save_total_limit)
    torch.distributed.barrier()


def _loop(run: Run, logger: MetricLogger | None) -> None:
    recipe, engine, device = run.recipe, run.engine, run.device
    bar = tqdm(total=run.total, initial=run.start, disable=run.rank != 0, desc=recipe.stage, dynamic_ncols=True,
               mininterval=1.0)
    tokens, flops, samples, t0 = 0, 0.0, 0, time.perf_counter()
    max_rows = 0  # the largest micro-batch in decoder rows (padding included): what activation memory follows
    loss_sum, losses, stepped = torch.zeros((), device=device), 0, False  # since the last logged row
    for it, epoch, batch in run.batches():
        sizes, images = _sample_sizes(batch, run.patches)  # from the CPU batch: no device sync
        tokens, samples = tokens + sum(sizes), samples + len(sizes)
        max_rows = max(max_rows, sum(sizes) if recipe.packing else len(sizes) * max(sizes))
        flops += sum(run.flop_model.sample_flops(t, i) for t, i in zip(sizes, images))
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        loss = engine(**batch).loss
        engine.backward(loss)
        lr = lr_at(it, run.total, recipe.lr, recipe.warmup_ratio)
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        stepped |= engine.is_gradient_accumulation_boundary()
        engine.step()
        loss_sum += loss.detach().float()
        losses += 1
        bar.update(1)
        saving = (it + 1) % recipe.save_steps == 0 or it + 1 == run.total
        if (it + 1) % recipe.log_interval == 0 or saving:
            torch.distributed.all_reduce(loss_sum)
            mean_loss = loss_sum.item() / run.world / losses
            if logger:
                elapsed = time.perf_counter() - t0
                rate = run.world / elapsed if elapsed > 0 else 0.0  # this rank's work x ranks: an estimate
                grad_norm = engine.get_global_grad_norm() if stepped else None
                row = {"iter": it + 1, "epoch": epoch, "loss": mean_loss, "lr": lr,
                       "grad_norm": float(grad_norm) if grad_norm is not None else None,
                       "tokens_per_s": tokens * rate, "samples_per_s": samples * rate,
                       "mean_tokens_per_sample": tokens / samples, "model_tflops_per_s": flops * rate / 1e12,
                       "max_micro_batch_rows": max_rows, "elapsed_s": elapsed}
                if device.type == "cuda":
                    row["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                logger.log(row)
                bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.3g}", tok_s=f"{row['tokens_per_s']:.0f}",
                                refresh=False)
            loss_sum.zero_()
            losses, stepped = 0, False
        if it + 1 == run.total and run.rank == 0 and recipe.compile:
            # before the final save (a minute at the real size), where bench/train_e2e.py stops a measured run
            print(f"torch.compile (rank 0): {json.dumps(compile_counts())}", flush=True)
        if saving:
            _save(run, it + 1)
    bar.close()
