"""What padding costs under each sampler, and so what packing (padding-free batches) saves: JSON per sampler.

Right-padded micro-batches compute every row to the longest sample's length; the padding fraction is the
share of that compute spent on padding. Packing removes it; length grouping shrinks it. Lengths are the
LLM's (an image sample's -200 counts as its 576 patches). From a real annotation file (tokenised as the
training dataset does it) or a synthetic mix: 90 % image samples with U(64, 832) text tokens, 10 %
text-only samples with U(32, 1024). Runs on a CPU in seconds.

  python3 padding.py --micro-batch 8 --accumulation 2 --world 8
  python3 padding.py --annotation results/data/finetune/... --image-folder ... --llm <tokenizer dir>
"""

import argparse
import json
import random

from llavaflow.data.sampler import LengthGroupedSampler, ShuffleSampler


def synthetic_lengths(n: int, seed: int) -> list[int]:
    """Signed modality lengths as the dataset gives them: + image samples, - text-only samples."""
    rng = random.Random(seed)
    return [rng.randint(64, 832) if rng.random() < 0.9 else -rng.randint(32, 1024) for _ in range(n)]


def dataset_lengths(annotation: str, image_folder: str, llm: str) -> list[int]:
    from transformers import AutoTokenizer

    from llavaflow.data.dataset import LlavaDataset
    from llavaflow.template import get_template

    tokenizer = AutoTokenizer.from_pretrained(llm)
    ds = LlavaDataset([{"annotation": annotation, "image_folder": image_folder}], tokenizer,
                      get_template("phi3_chat"), transform=None, max_length=3520, on_bad_sample="skip")
    return ds.modality_lengths


def padding_fraction(lengths: list[int], sampler, micro_batch: int, patches: int, rank_samplers) -> dict:
    real = padded = 0
    for s in rank_samplers:
        order = list(s)
        for i in range(0, len(order) - micro_batch + 1, micro_batch):
            widths = [abs(lengths[j]) + (patches - 1 if lengths[j] > 0 else 0) for j in order[i : i + micro_batch]]
            real += sum(widths)
            padded += len(widths) * max(widths)
    return {"sampler": sampler, "padding_fraction": round(1 - real / padded, 4),
            "padded_tokens_per_real_token": round(padded / real, 4)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=100_000)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--accumulation", type=int, default=2)
    p.add_argument("--world", type=int, default=8)
    p.add_argument("--patches", type=int, default=576, help="image tokens per image (CLIP ViT-L/14-336: 576)")
    p.add_argument("--annotation")
    p.add_argument("--image-folder", default=".")
    p.add_argument("--llm", help="tokenizer folder, with --annotation")
    args = p.parse_args()

    if args.annotation:
        lengths, source = dataset_lengths(args.annotation, args.image_folder, args.llm), args.annotation
    else:
        lengths, source = synthetic_lengths(args.samples, seed=0), "synthetic"
    per_device = args.micro_batch * args.accumulation
    samplers = {
        "shuffle": [ShuffleSampler(len(lengths), 0, r, args.world) for r in range(args.world)],
        "length_grouped": [LengthGroupedSampler(lengths, per_device, 0, r, args.world) for r in range(args.world)],
    }
    for name, ranks in samplers.items():
        for s in ranks:
            s.set_epoch(0)
        row = padding_fraction(lengths, name, args.micro_batch, args.patches, ranks)
        print(json.dumps({"bench": "padding", "source": source, "samples": len(lengths), "micro_batch": args.micro_batch,
                          "accumulation": args.accumulation, "world": args.world, **row,
                          "packing_padding_fraction": 0.0}))


if __name__ == "__main__":
    main()
