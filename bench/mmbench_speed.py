"""MMBench_DEV_EN-sized evaluation speed at the real architecture (random init): rows/s, printed as JSON.

A random model never says <|end|>, so what is timed are the decoding stages themselves, on 4329 rows of
576 image + ~90 prompt tokens, images preprocessed from PIL each time:
  fast_stage   - prefill + 1 decode step, batched (what the fast path costs for rows it settles);
  generate_100 - batched greedy generation to max_new_tokens=100 (the worst case, on a subset);
  batch1_fast  - the fast stage at batch size 1 (on a subset).
"""

import argparse
import json
import time

import numpy as np
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil

from common import build_model

from llavaflow.constants import IMAGE_TOKEN_INDEX
from llavaflow.data.images import ImageTransform


def rows(n, prompt_tokens, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        ids = [1] + rng.integers(3, 32000, prompt_tokens).tolist()
        ids[3] = IMAGE_TOKEN_INDEX
        img = Image.fromarray(rng.integers(0, 255, (rng.integers(200, 500), rng.integers(200, 500), 3), dtype=np.uint8))
        yield ids, img


def timed(model, transform, n, batch, new_tokens, prompt_tokens):
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0 = time.perf_counter()
    buf = []
    for ids, img in rows(n, prompt_tokens):
        buf.append((ids, img))
        if len(buf) == batch:
            pixels = torch.stack([transform(i) for _, i in buf])
            model.generate([x for x, _ in buf], pixels, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False, eos_token_id=None, pad_token_id=0)
            buf = []
    if buf:
        pixels = torch.stack([transform(i) for _, i in buf])
        model.generate([x for x, _ in buf], pixels, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                       do_sample=False, eos_token_id=None, pad_token_id=0)
    sync()
    return n / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=4329)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=90)
    p.add_argument("--subset", type=int, default=256)
    p.add_argument("--small", action="store_true")
    p.add_argument("--tiny", action="store_true", help="2 layers of width 64, for a quick CPU smoke test")
    args = p.parse_args()
    model, device, dtype = build_model(args.small, tiny=args.tiny)
    model.eval()
    model.llm.generation_config.eos_token_id = None
    # the pipeline's preprocessing (PIL, as xtuner's): CLIPImageProcessor would resize with torchvision where it
    # is installed, as on the GPU image, and time another path
    transform = ImageTransform(CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}),
                               pad_to_square=True)
    timed(model, transform, min(args.batch, 8), min(args.batch, 8), 2, args.prompt_tokens)  # warm-up
    fast = timed(model, transform, args.rows, args.batch, 2, args.prompt_tokens)
    line = {"bench": "mmbench_speed", "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
            "rows": args.rows, "batch": args.batch, "prompt_tokens": args.prompt_tokens + 576,
            "fast_stage_rows_per_s": round(fast, 1), "fast_stage_minutes_for_4329": round(4329 / fast / 60, 2)}
    print(json.dumps(line), flush=True)  # the goal's figure, kept should the samples below be cut off
    full = timed(model, transform, args.subset, args.batch, 100, args.prompt_tokens)
    bs1 = timed(model, transform, min(args.subset, 128), 1, 2, args.prompt_tokens)
    print(json.dumps({**line, "generate_100_rows_per_s": round(full, 2), "batch1_fast_rows_per_s": round(bs1, 2)}))


if __name__ == "__main__":
    main()
