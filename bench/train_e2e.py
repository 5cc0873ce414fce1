"""End-to-end training throughput at the real size through `llavaflow train`, printed as JSON.

What a user's fine-tune pays: DeepSpeed ZeRO-2 (bf16 weights, fp32 master, AdamW), the data loader
decoding JPEG files, the prompt template and loss mask, the training loop's own bookkeeping. Built once
under --work: a random-init Phi-3-mini-4k (bf16 safetensors) with a small tokenizer carrying Phi-3's
special tokens, a random-init CLIP ViT-L/14-336 with its image processor, and --samples synthetic
samples (640x480 JPEG; conversations of 64-832 text tokens). Then one torchrun training run with the
given speed settings; the rate is taken from metrics.jsonl over the iterations after --skip (so
compilation and warm-up are left out). Next to the measured peak memory it prints what the memory model
(llavaflow.train.memory) predicts for the run's largest micro-batch, so a GPU run checks the model.

  python3 train_e2e.py --work /tmp/e2e --set packing=true fused_loss=true gradient_checkpointing=selective
"""

import argparse
import json
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

from common import H100_BF16_PEAK, build_model, device_name
from gpu_suite import kill_tree

from llavaflow.train.recipe import Recipe

ROOT = Path(__file__).resolve().parents[1]
WORDS = "red green blue black white shape circle square image colour left right top bottom what which".split()


def build_assets(work: Path, samples: int, small: bool, tiny: bool = False) -> None:
    build_data(work, samples)
    build_weights(work, small, tiny)


def build_data(work: Path, samples: int) -> None:
    from PIL import Image

    rng = random.Random(0)
    data = work / "data"
    if not (data / "train.jsonl").exists():
        (data / "images").mkdir(parents=True, exist_ok=True)
        rows = []
        for i in range(samples):
            img = Image.effect_noise((640, 480), 64).convert("RGB")
            img.save(data / "images" / f"{i}.jpg", quality=90)
            question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 120)))
            answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 400)))
            rows.append({"id": i, "image": f"images/{i}.jpg", "conversations": [
                {"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]})
        (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def build_weights(work: Path, small: bool, tiny: bool = False) -> None:
    import torch
    from transformers import CLIPImageProcessor

    from llavaflow.tiny import build_tokenizer

    if not (work / "llm" / "config.json").exists():
        tokenizer = build_tokenizer(work / "llm", [" ".join(WORDS)] * 50, seed=0)
        model, _, _ = build_model(small, tiny=tiny)
        model.llm.config.update({"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                                 "pad_token_id": tokenizer.pad_token_id})
        model.llm.to(torch.bfloat16).save_pretrained(work / "llm")
        model.visual_encoder.to(torch.bfloat16).save_pretrained(work / "vit")
        CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}).save_pretrained(work / "vit")
        del model
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # ~23 GiB cached otherwise, beside the training run that follows


def windowed_rate(records: list[dict], skip: int) -> dict:
    """Rates between iteration `skip` and the last one, from the loop's cumulative figures."""
    # rows come every log_interval iterations: the window starts at the last row by `skip`
    a = ([r for r in records if r["iter"] <= skip] or records[:1])[-1]
    b = records[-1]
    dt = b["elapsed_s"] - a["elapsed_s"]

    def delta(key):
        return b[key] * b["elapsed_s"] - a[key] * a["elapsed_s"]

    return {"iterations": b["iter"] - a["iter"], "seconds": round(dt, 2),
            "tokens_per_s": round(delta("tokens_per_s") / dt, 1), "samples_per_s": round(delta("samples_per_s") / dt, 2),
            "model_tflops_per_s": round(delta("model_tflops_per_s") / dt, 2),
            "mfu_h100": round(delta("model_tflops_per_s") * 1e12 / dt / H100_BF16_PEAK, 4),
            "mean_tokens_per_sample": round(b["mean_tokens_per_sample"], 1),
            "max_micro_batch_rows": b["max_micro_batch_rows"],
            "max_memory_gib": round(b["max_memory_gib"], 1) if "max_memory_gib" in b else None}


TRAINS = {"pretrain": ["projector"], "finetune": ["llm", "visual_encoder", "projector"]}  # the recipe's stages


def predicted_peak_gib(work: Path, stage: str, speed: dict, micro_batch: int, rows: int, dtype_bytes: int) -> float:
    """The memory model's peak for this run's shapes (built on the meta device from the saved configs) and its
    largest micro-batch (`rows` decoder rows, `micro_batch` images), one rank."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel

    from llavaflow.model.activation_checkpointing import normalise_policy
    from llavaflow.model.build import new_projector
    from llavaflow.model.llava import LlavaModel
    from llavaflow.train.memory import GiB, Shapes, estimate

    with torch.device("meta"):
        llm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(work / "llm"))
        vit = CLIPVisionModel(CLIPVisionConfig.from_pretrained(work / "vit"))
        model = LlavaModel(llm, vit, new_projector(vit.config.hidden_size, llm.config.hidden_size, 2))
    model.set_trainable(TRAINS[stage])
    shapes = Shapes.of(model)
    est = estimate(shapes, tokens=rows, images=micro_batch, policy=normalise_policy(speed["gradient_checkpointing"]),
                   dtype_bytes=dtype_bytes, offload_optimizer=speed["offload_optimizer"], fused_loss=speed["fused_loss"],
                   trains_vit=stage == "finetune", overlap_comm=dtype_bytes == 2)
    return round(est.peak / GiB, 2)


def train_until_last_row(cmd: list[str], metrics: Path, *, wait_for_compile: bool) -> tuple[str, list[dict]]:
    """Run the training command until its last iteration is logged (and, with compile, what it compiled is
    printed), then end it: what follows is the final checkpoint, ~57 GB and a minute of the device call at the
    real size, which the rates leave out. Returns (its stdout, its metrics rows)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True, errors="replace",
                            start_new_session=True)
    lines: list[str] = []

    def read():  # the run's own lines, as they come, to the suite's log
        for line in proc.stdout:
            lines.append(line)
            sys.stdout.write(line)
            sys.stdout.flush()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    stopped = False
    while True:
        time.sleep(1)
        if proc.poll() is not None:
            break
        total = re.search(r" (\d+) iterations \(", "".join(lines))
        rows = logged_rows(metrics)
        if total and rows and rows[-1]["iter"] == int(total[1]) and (
                not wait_for_compile or any(line.startswith("torch.compile (rank 0): ") for line in lines)):
            kill_tree(proc.pid)
            stopped = True
            print("train_e2e: the last iteration is logged; the run is ended (its final checkpoint is not measured)",
                  flush=True)
            break
    proc.wait()
    reader.join(timeout=30)
    if proc.returncode != 0 and not stopped:
        raise subprocess.CalledProcessError(proc.returncode, cmd)
    return "".join(lines), logged_rows(metrics)


def logged_rows(metrics: Path) -> list[dict]:
    """The rows written so far (a line still being written is left for the next look)."""
    text = metrics.read_text() if metrics.exists() else ""
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines()]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--stage", choices=["pretrain", "finetune"], default="finetune")
    p.add_argument("--samples", type=int, default=480)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--skip", type=int, default=10, help="iterations left out of the rate (warm-up, compilation)")
    p.add_argument("--num-workers", type=int, default=8)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe speed settings (JSON values)")
    p.add_argument("--log-interval", type=int, default=1, help="metrics rows (and loss syncs) every this many iterations")
    p.add_argument("--small", action="store_true", help="2-layer stand-ins, for a CPU smoke test")
    p.add_argument("--tiny", action="store_true", help="2 layers of width 64, for a quick CPU smoke test")
    p.add_argument("--run-name", default=None, help="folder of this run under --work (default run-<stage>)")
    args = p.parse_args()

    build_assets(args.work, args.samples, args.small, args.tiny)
    recipe = {
        "stage": args.stage, "llm": str(args.work / "llm"), "visual_encoder": str(args.work / "vit"),
        "datasets": [{"annotation": str(args.work / "data" / "train.jsonl"), "image_folder": str(args.work / "data")}],
        "train": TRAINS[args.stage],
        "pad_image_to_square": args.stage == "finetune", "micro_batch_size": args.micro_batch,
        "accumulative_counts": 1, "lr": 2e-5, "epochs": 1, "max_length": 2048,
        "sampler": "length_grouped" if args.stage == "finetune" else "shuffle",
        "gradient_checkpointing": args.stage == "finetune", "save_steps": 10**9, "save_total_limit": 1,
        "num_workers": args.num_workers, "log_interval": args.log_interval,
    }
    for item in args.set:
        key, _, value = item.partition("=")
        recipe[key] = json.loads(value)
    run = args.work / (args.run_name or "run-" + args.stage)
    subprocess.run(["rm", "-rf", str(run)], check=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           "-m", "llavaflow.cli", "train", "--recipe", json.dumps(recipe),
           "--work-dir", str(run / "work"), "--output", str(run / "final.pth")]
    try:
        output, records = train_until_last_row(cmd, run / "work" / "metrics.jsonl", wait_for_compile=recipe.get("compile"))
    finally:  # a full fine-tune's final checkpoint (optimizer included) is ~57 GB: a GPU machine's disk holds one
        subprocess.run(["rm", "-rf", str(run)], check=True)
    defaults = Recipe(stage="", llm="", visual_encoder="", datasets=[], train=[])
    speed = {k: recipe.get(k, getattr(defaults, k)) for k in ("gradient_checkpointing", "checkpoint_every_n_layers",
                                                              "packing", "fused_loss", "fused_optimizer", "compile",
                                                              "offload_optimizer")}
    rate = windowed_rate(records, args.skip)
    # what the run says it checkpointed (the H200's runs of 2026-11-30 silently checkpointed nothing)
    said = re.search(r"checkpointing \w+ on (\d+) of (\d+) blocks", output)
    # what torch.compile did: until 2026-12-01 every compiled ViT block broke its graph at transformers'
    # hidden-states hook, and ran wholly eager when checkpointed
    compiled = re.search(r"^torch\.compile \(rank 0\): (\{.*\})$", output, re.MULTILINE)
    dtype_bytes = 2 if device_name() != "cpu" else 4  # the loop's precision: bf16 on a GPU, fp32 on a CPU
    predicted = predicted_peak_gib(args.work, args.stage, speed, args.micro_batch, rate["max_micro_batch_rows"],
                                   dtype_bytes)
    print(json.dumps({"bench": "train_e2e", "stage": args.stage, "device": device_name(), "small": args.small or args.tiny,
                      "micro_batch": args.micro_batch, **speed, **rate, "predicted_peak_gib": predicted,
                      "checkpointed_blocks": f"{said[1]}/{said[2]}" if said else None,
                      "compile_counts": json.loads(compiled[1]) if compiled else None}))


if __name__ == "__main__":
    main()
