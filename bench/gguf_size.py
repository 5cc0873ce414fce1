"""to_gguf at the real size on a CPU: wall time against a plain copy of the same bytes, and peak RSS.

Builds an xtuner-style iter_xtuner folder with the real shapes (Phi-3-mini LLM in bf16 shards, CLIP
ViT-L/14-336 fp32, 2-layer projector fp32; random weights, written tensor by tensor) and times
`llavaflow convert to_gguf --dtype f16` under /usr/bin/time against copying the folder's bytes. Prints JSON.
"""

import argparse
import json
import shutil
import subprocess
import time
from pathlib import Path

import torch

from common import CLIP_VIT_L_336, PHI3_MINI_4K, timed_llavaflow

ROOT = Path(__file__).resolve().parents[1]


def _random(writer, model, dtype, g):
    for name, t in model.state_dict().items():
        writer.add(name, (torch.randn(t.shape, generator=g) * 0.02).to(dtype))


def make_folder(work: Path) -> Path:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, Phi3Config, Phi3ForCausalLM

    from llavaflow.convert.io import ShardWriter
    from llavaflow.convert.pth_to_hf import projector_config
    from llavaflow.convert.tables import clip_legacy
    from llavaflow.model.modeling_projector import ProjectorModel
    from llavaflow.tiny import build_tokenizer

    folder = work / "iter_xtuner"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    config = Phi3Config(**PHI3_MINI_4K)
    with torch.device("meta"):
        llm = Phi3ForCausalLM(config)
    writer = ShardWriter(folder, 2 * 1024**3)  # each tensor is cast and written when its shard fills
    _random(writer, llm, torch.bfloat16, g)
    writer.close()
    config.save_pretrained(folder)
    build_tokenizer(folder, ["a red circle", "two blue squares"] * 20, 0)
    vit_dir = folder / "visual_encoder"
    vit_dir.mkdir()
    vit_config = CLIPVisionConfig(**CLIP_VIT_L_336)
    with torch.device("meta"):
        vit = CLIPVisionModel(vit_config)
    writer = ShardWriter(vit_dir, 1 << 40)
    for name, t in vit.state_dict().items():
        writer.add(clip_legacy(name), (torch.randn(t.shape, generator=g) * 0.02))
    writer.close()
    vit_config.save_pretrained(vit_dir)
    CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}).save_pretrained(vit_dir)
    w0 = torch.randn(3072, 1024, generator=g) * 0.02
    tensors = {"model.0.weight": w0, "model.0.bias": torch.zeros(3072),
               "model.2.weight": torch.randn(3072, 3072, generator=g) * 0.02, "model.2.bias": torch.zeros(3072)}
    projector = ProjectorModel(projector_config(tensors, "bench"))
    projector.load_state_dict(tensors)
    projector.save_pretrained(folder / "projector")
    return folder


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _load_in_llama_cpp(python: str, out: Path, work: Path, dtype: str) -> dict:
    import numpy as np

    np.save(work / "rgb.npy", np.random.default_rng(0).integers(0, 256, (336, 336, 3), dtype=np.uint8))
    mmproj = "f32" if dtype == "f32" else "f16"
    job = {"model": str(out / f"llm-{dtype}.gguf"), "tokenize": ["<|user|>\nHi<|end|>\n<|assistant|>\n"],
           "mtmd": {"mmproj": str(out / f"mmproj-{mmproj}.gguf"), "rgb": str(work / "rgb.npy"),
                    "prompt": "<|user|>\n<__media__>\nWhat is it?<|end|>\n<|assistant|>\n"}}
    (work / "job.json").write_text(json.dumps(job))
    subprocess.run([python, str(ROOT / "tests" / "gguf_probe.py"), str(work / "job.json"), str(work / "res.npz")],
                   check=True, capture_output=True)
    with np.load(work / "res.npz") as res:
        return {"llama_cpp_n_vocab": int(res["n_vocab"]), "mtmd_image_embd_shape": list(res["image_embd"].shape),
                "mtmd_embd_finite": bool(np.isfinite(res["image_embd"]).all())}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--work", default="/tmp/llavaflow-gguf-bench")
    p.add_argument("--dtype", default="f16")
    p.add_argument("--llama-python", help="a Python with llama-cpp-python (the tests' cached venv): also load both "
                   "files in llama.cpp and encode a 336-px image with libmtmd (tests/gguf_probe.py)")
    args = p.parse_args()
    work = Path(args.work)
    folder = work / "iter_xtuner"
    if not (folder / "projector" / "config.json").exists():
        folder = make_folder(work)

    shutil.rmtree(work / "copy", ignore_errors=True)
    t0 = time.perf_counter()
    shutil.copytree(folder, work / "copy")
    copy_s = time.perf_counter() - t0
    shutil.rmtree(work / "copy")

    out = work / "iter_gguf"
    shutil.rmtree(out, ignore_errors=True)
    convert_s, rss_gb = timed_llavaflow("convert", "to_gguf", str(folder), str(out), "--dtype", args.dtype)
    loaded = _load_in_llama_cpp(args.llama_python, out, work, args.dtype) if args.llama_python else {}
    print(json.dumps({**loaded, "bench": "gguf_size", "dtype": args.dtype, "input_gb": round(_bytes(folder) / 1e9, 2),
                      "output_gb": round(_bytes(out) / 1e9, 2), "copy_s": round(copy_s, 1),
                      "to_gguf_s": round(convert_s, 1), "ratio_to_copy": round(convert_s / copy_s, 2),
                      "peak_rss_gb": round(rss_gb, 2),
                      "files_gb": {p.name: round(p.stat().st_size / 1e9, 3) for p in sorted(out.glob("*.gguf"))}}))
    shutil.rmtree(out)


if __name__ == "__main__":
    main()
