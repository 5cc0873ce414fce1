"""Training step throughput at the real architecture (random init): tokens/s and MFU, printed as JSON.

Forward + backward + AdamW step of our LlavaModel on one device, bf16 weights and optimizer state on a GPU
(fp32 on a CPU), synthetic right-padded batches as the collate function makes them: 576 image tokens plus
text of a fixed length (`--lengths fixed`, the issue's baseline shape) or of lengths drawn uniformly from
[64, 832] (`--lengths varied`, mean 448: what padding costs and packing saves). No data loading.
Every speed setting of the recipe is a flag, so each one's gain is one pair of runs:

  python3 train_step.py --stage finetune --checkpointing full                    # baseline
  python3 train_step.py --stage finetune --checkpointing selective --packing --fused-loss --compile
"""

import argparse
import json
import time

import torch

from common import H100_BF16_PEAK, build_model, device_name

from llavaflow.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llavaflow.data.collate import collate
from llavaflow.train.flops import FlopModel
from llavaflow.train.loop import apply_speedups


def text_lengths(n: int, mode: str, fixed: int, seed: int) -> list[int]:
    if mode == "fixed":
        return [fixed] * n
    g = torch.Generator().manual_seed(seed)
    return torch.randint(64, 833, (n,), generator=g).tolist()


def make_batch(lengths: list[int], image_size: int, seed: int) -> dict:
    """Samples of `lengths` text tokens (the -200 counted as one), the second half of each labelled."""
    g = torch.Generator().manual_seed(seed)
    samples = []
    for n in lengths:
        ids = torch.randint(3, 32000, (n + 1,), generator=g)
        ids[0], ids[3] = 1, IMAGE_TOKEN_INDEX
        labels = ids.clone()
        labels[: (n + 1) // 2] = IGNORE_INDEX
        samples.append({"input_ids": ids, "labels": labels,
                        "pixel_values": torch.randn(3, image_size, image_size, generator=g)})
    return collate(samples)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--stage", choices=["pretrain", "finetune"], default="finetune")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--lengths", choices=["fixed", "varied"], default="fixed")
    p.add_argument("--text-tokens", type=int, default=448, help="text tokens per sample with --lengths fixed")
    p.add_argument("--checkpointing", dest="gradient_checkpointing", choices=["none", "full", "selective"],
                   default="none")
    p.add_argument("--every-n-layers", dest="checkpoint_every_n_layers", type=int, default=1)
    p.add_argument("--packing", action="store_true")
    p.add_argument("--fused-loss", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--optimizer", choices=["fused", "foreach"], default="fused")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation happens here)")
    p.add_argument("--small", action="store_true", help="2-layer stand-ins, for a CPU smoke test")
    args = p.parse_args()

    torch.manual_seed(0)
    model, device, dtype = build_model(args.small)
    model.set_trainable(["projector"] if args.stage == "pretrain" else ["llm", "visual_encoder", "projector"])
    apply_speedups(model, args)  # the training loop's own switchboard, fed from the flags
    model.train()
    params = [q for q in model.parameters() if q.requires_grad]
    fused = args.optimizer == "fused"
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0, fused=fused, foreach=None if fused else True)
    flop_model = FlopModel.of(model)
    image_size = model.visual_encoder.config.image_size
    patches = flop_model.vit_tokens - 1

    # A new draw of lengths every step (as real data gives), the same draws for every configuration.
    batches = []
    for i in range(args.warmup + args.steps):
        lengths = text_lengths(args.micro_batch, args.lengths, args.text_tokens, seed=i)
        batches.append((make_batch(lengths, image_size, seed=i), [n + patches for n in lengths]))

    def step(batch):
        loss = model(**{k: v.to(device, non_blocking=True) for k, v in batch.items()}).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for batch, _ in batches[: args.warmup]:
        step(batch)
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    timed = batches[args.warmup :]
    t0 = time.perf_counter()
    for batch, _ in timed:
        loss = step(batch)
    loss.item()
    sync()
    dt = time.perf_counter() - t0
    tokens = sum(sum(sizes) for _, sizes in timed)
    padded = sum(len(sizes) * max(sizes) for _, sizes in timed)
    flops = sum(flop_model.sample_flops(t) for _, sizes in timed for t in sizes)
    out = {
        "bench": "train_step", "stage": args.stage, "device": device_name(), "torch": torch.__version__,
        "micro_batch": args.micro_batch, "lengths": args.lengths,
        "mean_tokens_per_sample": round(tokens / (len(timed) * args.micro_batch), 1),
        "padding_fraction": round(1 - tokens / padded, 3), "checkpointing": args.gradient_checkpointing,
        "every_n_layers": args.checkpoint_every_n_layers, "packing": args.packing, "fused_loss": args.fused_loss,
        "compile": args.compile, "optimizer": args.optimizer, "small": args.small,
        "step_s": round(dt / len(timed), 4), "tokens_per_s": round(tokens / dt, 1),
        "model_tflops_per_s": round(flops / dt / 1e12, 2), "mfu_h100": round(flops / dt / H100_BF16_PEAK, 4),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if device == "cuda" else None,
        "note": "bf16 weights and AdamW state (not ZeRO-2's fp32 master), no data loading",
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
