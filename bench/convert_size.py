"""pth_to_hf at the real size on a CPU: wall time against a plain copy of the same bytes, and peak RSS.

Writes a random-init LLaVA-Phi-3-mini fine-tune checkpoint (all 4.1B parameters, bf16, the single-file
{"state_dict": ...} form) and base-model folders with the real configs, then times
`llavaflow convert pth_to_hf` under /usr/bin/time and `cp` of the checkpoint. Prints JSON.
"""

import argparse
import json
import shutil
import time
from pathlib import Path

import torch

from common import CLIP_VIT_L_336, PHI3_MINI_4K, timed_llavaflow



def make_inputs(work: Path) -> Path:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, Phi3Config, Phi3ForCausalLM, CLIPVisionModel

    from llavaflow.model.build import new_projector
    from llavaflow.model.llava import LlavaModel
    from llavaflow.tiny import build_tokenizer

    llm_dir, vit_dir = work / "base_llm", work / "base_vit"
    Phi3Config(**PHI3_MINI_4K).save_pretrained(llm_dir)
    build_tokenizer(llm_dir, ["a red circle", "two blue squares"] * 20, 0)  # tokenizer files to copy along
    CLIPVisionConfig(**CLIP_VIT_L_336).save_pretrained(vit_dir)
    CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}).save_pretrained(vit_dir)
    with torch.device("meta"):
        model = LlavaModel(Phi3ForCausalLM(Phi3Config(**PHI3_MINI_4K)), CLIPVisionModel(CLIPVisionConfig(**CLIP_VIT_L_336)),
                           new_projector(1024, 3072, 2))
    g = torch.Generator().manual_seed(0)
    state = {k: (torch.randn(v.shape, generator=g) * 0.02).to(torch.bfloat16) for k, v in model.state_dict().items()}
    ckpt = work / "iter_39620.pth"
    torch.save({"state_dict": state}, ckpt)
    return ckpt


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--work", default="/tmp/llavaflow-convert-bench")
    args = p.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "iter_39620.pth"
    if not ckpt.exists():
        ckpt = make_inputs(work)
    size = ckpt.stat().st_size

    t0 = time.perf_counter()
    shutil.copyfile(ckpt, work / "copy.pth")
    copy_s = time.perf_counter() - t0
    (work / "copy.pth").unlink()

    out = work / "iter_xtuner"
    shutil.rmtree(out, ignore_errors=True)
    convert_s, rss_gb = timed_llavaflow("convert", "pth_to_hf", str(ckpt), str(out), "--llm", str(work / "base_llm"),
                                        "--visual-encoder", str(work / "base_vit"), "--dtype", "bf16")
    print(json.dumps({"bench": "convert_size", "checkpoint_gb": round(size / 1e9, 2), "copy_s": round(copy_s, 1),
                      "pth_to_hf_s": round(convert_s, 1), "ratio_to_copy": round(convert_s / copy_s, 2),
                      "peak_rss_gb": round(rss_gb, 2)}))


if __name__ == "__main__":
    main()
