"""Where one training step's GPU memory peaks, at the real size with a recipe's settings, printed as JSON.

Written when the H200's fine-tune runs of 2026-11-30 peaked 26 GiB above llavaflow.train.memory's figure (they
ran without checkpointing: the loop's model was left in eval mode; bench/README.md), it checks the model phase
by phase with checkpointing in effect. It runs the training loop's own pieces (`build_model`,
`build_optimizer`, `deepspeed_config`, one ZeRO-2 engine) for two steps on one synthetic micro-batch and
reports, for the second step (the first allocates the AdamW moments): the peak of forward, backward and the
optimizer step (`max_memory_allocated`, reset per phase), and the allocations alive at the step's peak grouped
by the first Python frame outside torch and DeepSpeed (from torch's allocation trace), largest first, next to
the model's figures.

  python3 memory_phases.py --work /tmp/llavaflow-gpu-suite                       # the recipe
  python3 memory_phases.py --work /tmp/llavaflow-gpu-suite --set packing=true 'gradient_checkpointing="selective"'
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections import Counter
from pathlib import Path

from llavaflow.train.memory import GiB

LIBRARY_PARTS = ("/torch/", "/deepspeed/", "/contextlib.py", "/functools.py", "/threading.py")


def live_at_peak(trace: list[dict], baseline: int) -> tuple[int, list[dict]]:
    """(peak bytes, the allocations alive at that moment) from a torch allocation trace (its `alloc` and
    `free_completed` events), `baseline` bytes being allocated before the trace began."""
    live, total, peak, peak_at = {}, baseline, baseline, -1
    for i, event in enumerate(trace):
        if event["action"] == "alloc":
            total += event["size"]
            if total > peak:
                peak, peak_at = total, i
        elif event["action"] == "free_completed":
            total -= event["size"]
    for event in trace[: peak_at + 1]:  # replay up to the peak for the live set
        if event["action"] == "alloc":
            live[event["addr"]] = event
        elif event["action"] == "free_completed":
            live.pop(event["addr"], None)
    return peak, list(live.values())


def where(frames: list[dict]) -> str:
    """The first frame that is not inside torch or DeepSpeed (llavaflow's or transformers' code), else the top one."""
    frames = [f for f in frames if f["filename"].endswith(".py")]  # C++ frames name a library or the interpreter
    ours = [f for f in frames if not any(part in f["filename"] for part in LIBRARY_PARTS)]
    if not frames:
        return "?"
    frame = (ours or frames)[0]
    return f"{frame['filename'].split('site-packages/')[-1]}:{frame['line']} {frame['name']}"


def by_place(allocations: list[dict], top: int = 12) -> list[tuple[str, float]]:
    sizes = Counter()
    for a in allocations:
        sizes[where(a.get("frames", []))] += a["size"]
    return [(place, round(size / GiB, 3)) for place, size in sizes.most_common(top)]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--work", type=Path, required=True, help="assets (shared with train_e2e.py's)")
    p.add_argument("--stage", choices=["pretrain", "finetune"], default="finetune")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--text", type=int, default=511, help="text tokens per sample (+576 image rows: 1087 rows)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe speed settings (JSON values)")
    p.add_argument("--tiny", action="store_true", help="2 layers of width 64, for a CPU smoke test")
    args = p.parse_args()

    import deepspeed
    import torch

    from train_e2e import build_weights, predicted_peak_gib
    from train_step import make_batch

    from llavaflow.distributed import init_distributed
    from llavaflow.train import loop
    from llavaflow.train.recipe import Recipe

    build_weights(args.work, small=False, tiny=args.tiny)
    finetune = args.stage == "finetune"
    recipe = Recipe(stage=args.stage, llm=str(args.work / "llm"), visual_encoder=str(args.work / "vit"), datasets=[],
                    train=["llm", "visual_encoder", "projector"] if finetune else ["projector"],
                    micro_batch_size=args.micro_batch, accumulative_counts=1, gradient_checkpointing=finetune)
    recipe = dataclasses.replace(recipe, **{k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)})
    _, _, device = init_distributed(group_of_one=True)
    cuda = device.type == "cuda"
    precision = "bf16" if cuda else "fp32"
    model = loop.build_model(recipe)
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = loop.build_optimizer(params, recipe, device)
    config = loop.deepspeed_config(recipe, 1, precision, trainable=sum(q.numel() for q in params))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    batch = make_batch([args.text] * args.micro_batch, model.visual_encoder.config.image_size, seed=0)
    batch = {k: v.to(device) for k, v in batch.items()}

    def phase_peak():  # GiB since the last call (None on a CPU); resets the peak for the next phase
        if not cuda:
            return None
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / GiB
        torch.cuda.reset_peak_memory_stats()
        return round(peak, 2)

    phases, trace, baseline = {}, [], 0
    for step in range(2):  # the second step is measured: the first allocates the AdamW moments
        if cuda and step == 1:
            baseline = torch.cuda.memory_allocated()
            # Python frames only: C++ stacks make the snapshot take minutes (torchtitan#3628: 461 s against 4 s)
            torch.cuda.memory._record_memory_history(stacks="python", max_entries=2_000_000)
        phase_peak()
        loss = engine(**batch).loss
        phases["forward"] = phase_peak()
        engine.backward(loss)
        phases["backward"] = phase_peak()
        engine.step()
        phases["step"] = phase_peak()
    speed = {k: getattr(recipe, k) for k in ("gradient_checkpointing", "packing", "fused_loss", "compile", "offload_optimizer")}
    rows = args.micro_batch * (args.text + 576)
    predicted = predicted_peak_gib(args.work, args.stage, speed, args.micro_batch, rows, 2 if cuda else 4)
    line = {"bench": "memory_phases", "stage": args.stage, "device": str(device), "micro_batch": args.micro_batch,
            "rows": rows, **speed, "loss": round(loss.item(), 4), "phase_peak_gib": phases,
            "states_gib_before_step_2": round(baseline / GiB, 2), "predicted_peak_gib": predicted}
    print(json.dumps(line), flush=True)  # the phase peaks, kept should the snapshot below run out of time
    if cuda:
        trace = torch.cuda.memory._snapshot()["device_traces"][0]
        torch.cuda.memory._record_memory_history(enabled=None)
    peak, live = live_at_peak(trace, baseline) if trace else (0, [])
    print(json.dumps({**line, "traced_peak_gib": round(peak / GiB, 2), "alive_at_peak_gib": by_place(live)}))


if __name__ == "__main__":
    main()
