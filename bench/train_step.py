"""Training throughput at the real architecture (random init): tokens/s and MFU, printed as JSON.

Forward + backward + fused AdamW step of our LlavaModel on one GPU, bf16 weights and optimizer state,
synthetic batches of 576 image + 448 text tokens per sample (the issue's baseline shape), no data loading.
`--stage pretrain` trains the projector only; `--stage finetune` everything, with activation checkpointing.
"""

import argparse
import json
import time

import torch

from common import H100_BF16_PEAK, build_model, flops_per_sample

from llavaflow.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX


def batch(b: int, text: int, device, vocab: int = 32064):
    ids = torch.randint(3, 32000, (b, text), device=device)
    ids[:, 0] = 1
    ids[:, 3] = IMAGE_TOKEN_INDEX
    labels = ids.clone()
    labels[:, : text // 2] = IGNORE_INDEX
    labels[:, 3] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids, dtype=torch.bool),
            "pixel_values": torch.randn(b, 3, 336, 336, device=device)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--stage", choices=["pretrain", "finetune"], default="finetune")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--text-tokens", type=int, default=448)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-checkpointing", action="store_true")
    p.add_argument("--small", action="store_true", help="2-layer stand-ins, for a CPU smoke test")
    args = p.parse_args()

    torch.manual_seed(0)
    model, device, dtype = build_model(args.small)
    model.set_trainable(["projector"] if args.stage == "pretrain" else ["llm", "visual_encoder", "projector"])
    checkpointing = args.stage == "finetune" and not args.no_checkpointing
    if checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.999), weight_decay=0.0, fused=device == "cuda")
    data = batch(args.micro_batch, args.text_tokens + 1, device)  # +1: the -200 expands to 576 rows
    tokens = args.text_tokens + 576

    def step():
        loss = model(**data).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        step()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    loss.item()
    if device == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    layers = 2 if args.small else 32
    flops = flops_per_sample(args.stage, tokens, layers, 2 if args.small else 24) * args.micro_batch
    out = {
        "bench": "train_step", "stage": args.stage, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "torch": torch.__version__, "micro_batch": args.micro_batch, "tokens_per_sample": tokens,
        "activation_checkpointing": checkpointing, "step_s": round(dt, 4),
        "tokens_per_s": round(args.micro_batch * tokens / dt, 1), "model_tflops_per_s": round(flops / dt / 1e12, 1),
        "mfu": round(flops / dt / H100_BF16_PEAK, 4),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1) if device == "cuda" else None,
        "note": "bf16 weights and AdamW state (not ZeRO-2's fp32 master), no data loading",
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
