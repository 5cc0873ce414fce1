"""How fast the tiny preset's model learns rotated multiple-choice questions, per answer style (CPU, #18).

Builds the tiny assets with the chosen fine-tune answer style ("blue C" or the bare letter "C"), trains the
whole model from them in a plain AdamW loop (no pretrain, no DeepSpeed: the fine-tune's recipe otherwise),
and every --eval-every steps scores DEV_EN, DEV_CN and CCBench with the pipeline's evaluator. One JSON line
per evaluation.

    python bench/tiny_mcq.py --answer letter --micro-batch 64 --steps 1000 --eval-every 200
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

DATASETS = ("MMBench_DEV_EN", "MMBench_DEV_CN", "CCBench")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--answer", choices=("option_letter", "letter"), default="option_letter")
    ap.add_argument("--micro-batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, help="assets and evaluation folders (default: a temporary folder)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = args.out or Path(tempfile.mkdtemp(prefix="tiny-mcq-"))

    from transformers import AutoTokenizer

    from llavaflow.data.collate import collate
    from llavaflow.data.images import ImageTransform
    from llavaflow.eval.mmbench import evaluate
    from llavaflow.tiny import build_tiny_assets
    from llavaflow.train.loop import build_dataset, build_model
    from llavaflow.train.recipe import Recipe
    from llavaflow.train.schedule import lr_at

    # the bench's own folder: a rerun rebuilds it
    build_tiny_assets(out / "assets", out / "mmbench", list(DATASETS), seed=0, mc_style=args.answer, overwrite=True)
    assets = out / "assets"
    recipe = Recipe(stage="finetune", llm=str(assets / "llm"), visual_encoder=str(assets / "vit"),
                    datasets=[{"annotation": str(assets / "data/finetune/conversations.jsonl"),
                               "image_folder": str(assets / "data/finetune")}],
                    train=["llm", "visual_encoder", "projector"], max_length=512, pad_image_to_square=True,
                    micro_batch_size=args.micro_batch, lr=args.lr, gradient_checkpointing=False, fused_loss=True)
    torch.manual_seed(recipe.seed)
    model = build_model(recipe)
    tokenizer = AutoTokenizer.from_pretrained(recipe.llm, padding_side="right")
    dataset = build_dataset(recipe, tokenizer)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=recipe.weight_decay, foreach=True)
    loader = torch.utils.data.DataLoader(dataset, batch_size=args.micro_batch, shuffle=True, collate_fn=collate,
                                         num_workers=1, drop_last=True, persistent_workers=True)

    transform = ImageTransform.from_folder(recipe.visual_encoder, pad_to_square=True)

    def scores(step: int) -> dict:
        model.eval()
        result = {}
        for name in DATASETS:
            s = evaluate(model, tokenizer, transform, out / "mmbench" / f"{name}.tsv",
                         out / "eval" / f"{name}-{step}", dataset=name, batch_size=64, max_new_tokens=8)
            result[name] = {mode: round(s[mode]["Overall"], 4) for mode in ("circular", "vanilla_0")}
        model.train()
        return result

    step, losses, train_s = 0, [], 0.0
    while step < args.steps:
        for batch in loader:
            t0 = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, args.steps, args.lr, recipe.warmup_ratio)
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, recipe.max_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            step += 1
            train_s += time.perf_counter() - t0
            if step % args.eval_every == 0 or step == args.steps:
                row = {"answer": args.answer, "micro_batch": args.micro_batch, "step": step,
                       "samples_seen": step * args.micro_batch, "loss": round(sum(losses) / len(losses), 4),
                       "train_s": round(train_s, 1), **scores(step)}
                print(json.dumps(row), flush=True)
                losses = []
            if step >= args.steps:
                break


if __name__ == "__main__":
    main()
