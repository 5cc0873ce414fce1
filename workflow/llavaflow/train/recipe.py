"""A training stage's recipe: every value that changes the result, read from the pipeline config.

The defaults below are the one source of defaults for the keys a config may omit (VOLATILE: bookkeeping and
speed settings); the config schema requires every other key, so a preset never inherits a value silently.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import MISSING, asdict, dataclass, field, fields


@dataclass(frozen=True)
class Recipe:
    stage: str
    llm: str
    visual_encoder: str
    datasets: list  # [{annotation, image_folder}]
    train: list  # model parts that train: llm, visual_encoder, projector
    init_from: str | None = None  # a stage checkpoint (iter_N.pth) whose weights start this stage
    prompt_template: str = "phi3_chat"
    visual_select_layer: int = -2
    projector_depth: int = 2
    max_length: int = 3520
    pad_image_to_square: bool = False
    micro_batch_size: int = 16
    accumulative_counts: int = 2
    lr: float = 1e-3
    betas: list = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_ratio: float = 0.03
    max_norm: float = 1.0
    epochs: int = 1
    sampler: str = "shuffle"  # shuffle | length_grouped
    deepspeed_stage: int = 2
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    seed: int = 1024
    on_bad_sample: str = "error"
    # Not part of the result (excluded from the fingerprint): bookkeeping, and the speed settings, which
    # compute the same loss and gradients (tests/test_speed.py), so a run may change them and resume.
    save_steps: int = 1000
    save_total_limit: int = 2
    num_workers: int = 4
    log_interval: int = 10
    gradient_checkpointing: bool | str = True  # true/full, selective, false/none
    checkpoint_every_n_layers: int = 1
    packing: bool = False  # padding-free micro-batches with per-sample (varlen) attention
    fused_loss: bool = False  # chunked lm_head + cross-entropy on labelled rows only
    fused_optimizer: bool | str = "auto"  # torch's fused AdamW; auto = on GPU
    compile: bool = False  # torch.compile each LLM and ViT block
    offload_optimizer: str = "none"  # none | cpu: DeepSpeed keeps fp32 master + Adam moments in host memory
    report_to: list = field(default_factory=list)  # experiment trackers: tensorboard, mlflow, wandb

    VOLATILE = ("save_steps", "save_total_limit", "num_workers", "log_interval", "gradient_checkpointing",
                "checkpoint_every_n_layers", "packing", "fused_loss", "fused_optimizer", "compile",
                "offload_optimizer", "report_to")

    POSITIVE = ("max_length", "micro_batch_size", "accumulative_counts", "epochs", "save_steps", "log_interval",
                "checkpoint_every_n_layers", "projector_depth")

    @classmethod
    def from_dict(cls, d: dict) -> "Recipe":
        """A recipe from a mapping (a config section, a recipe file), every key checked and named: a value
        of the wrong kind would otherwise fail deep in training, after the work dir was prepared."""
        known = {f.name: f for f in fields(cls)}
        unknown = set(d) - set(known)
        if unknown:
            raise ValueError(f"unknown recipe keys {sorted(unknown)}")
        missing = [name for name, f in known.items() if f.default is MISSING and f.default_factory is MISSING
                   and name not in d]
        if missing:
            raise ValueError(f"recipe key(s) {missing}: missing")
        for key, value in d.items():
            default = known[key].default
            kinds = (int, float) if type(default) is float else (type(default),)
            if isinstance(default, (bool, int, float)) and not isinstance(value, kinds) and not (
                    key in ("gradient_checkpointing", "fused_optimizer") and isinstance(value, str)):
                raise ValueError(f"recipe key {key}: expected {kinds[-1].__name__}, got {value!r}")
            if isinstance(value, bool) and type(default) in (int, float):
                raise ValueError(f"recipe key {key}: expected a number, got {value!r}")
            if key in cls.POSITIVE and value < 1:
                raise ValueError(f"recipe key {key}: must be at least 1, got {value!r}")
        for key, why in combination_errors(d).items():
            raise ValueError(f"recipe key {key}: {why}")
        return cls(**d)

    def to_dict(self) -> dict:
        return asdict(self)

    def fingerprint(self, world_size: int) -> str:
        semantic = {k: v for k, v in self.to_dict().items() if k not in self.VOLATILE}
        semantic["world_size"] = world_size
        return hashlib.sha256(json.dumps(semantic, sort_keys=True).encode()).hexdigest()[:16]


def combination_errors(values: dict) -> dict[str, str]:
    """Keys of a stage's values (a config section or a recipe; omitted keys take Recipe's defaults) whose
    value cannot go with the others, each with why."""
    defaults = {f.name: f.default for f in fields(Recipe)}
    save, accumulate, stage, offload = (values.get(k, defaults[k]) for k in
                                        ("save_steps", "accumulative_counts", "deepspeed_stage", "offload_optimizer"))
    errors = {}
    if stage == 3:
        # ZeRO-3 saves per-rank shards (zero_pp_rank_*_model_states.pt): init_from and the converters read one
        # consolidated mp_rank_00 file, so the stage would train to its end and publish what nothing reads.
        errors["deepspeed_stage"] = ("3 is not supported: ZeRO-3 checkpoints are per-rank shards that init_from and "
                                     "the converters cannot read; use 2 (with offload_optimizer: cpu to fit one GPU)")
    elif offload != "none" and stage == 0:
        errors["offload_optimizer"] = (f"{offload} needs deepspeed_stage 1 or 2 (DeepSpeed offloads ZeRO's "
                                       "optimizer partitions), not 0")
    if save % accumulate:
        # DeepSpeed saves no partial gradients and restarts its micro-step count at 0: a resume from there
        # would lose the accumulated micro-batches and step at other iterations than an unbroken run.
        errors["save_steps"] = (f"{save} is not a multiple of accumulative_counts ({accumulate}): a checkpoint "
                                f"inside an accumulation cannot be resumed exactly")
    return errors
