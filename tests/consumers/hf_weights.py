"""Child script for transformers older than the processor floor (run in the official-LLaVA venv, 4.37.2):
`iter_hf` read with LlavaForConditionalGeneration and AutoTokenizer, inputs built by hand (its
AutoProcessor cannot read our `LlavaImageProcessor` config before 4.49). One `<image>` per image: these
versions expand it inside the model. One JSON line to stdout; logits to a safetensors file.

usage: python hf_weights.py FOLDER INPUTS.safetensors PROMPT OUT.safetensors
"""

import json
import sys

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer, LlavaForConditionalGeneration

folder, inputs_path, prompt, out_path = sys.argv[1:5]
refused = {}  # what these versions cannot load from the folder, and why
for name, auto in (("AutoImageProcessor", AutoImageProcessor), ("AutoProcessor", AutoProcessor)):
    try:
        auto.from_pretrained(folder)
    except (ValueError, TypeError, OSError) as e:
        refused[name] = f"{type(e).__name__}: {e}"[:300]
tokenizer = AutoTokenizer.from_pretrained(folder)
model, info = LlavaForConditionalGeneration.from_pretrained(folder, torch_dtype=torch.float32, output_loading_info=True)
model.eval()
inputs = load_file(inputs_path)
ids = inputs["input_ids"]
with torch.no_grad():
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=inputs["pixel_values"]).logits
save_file({"logits": logits.contiguous()}, out_path)
print(json.dumps({
    "transformers": transformers.__version__, "tokenizer": type(tokenizer).__name__,
    "prompt_ids": tokenizer(prompt).input_ids, "missing": sorted(info["missing_keys"]),
    "unexpected": sorted(info["unexpected_keys"]), "mismatched": [str(m) for m in info.get("mismatched_keys", [])],
    "refused": refused,
}))
