"""Child script, run with an older transformers' venv: what a consumer of `iter_hf` gets there.

AutoProcessor builds the prompt (chat template) and the inputs from our files, the auto model class
(LlavaForConditionalGeneration where AutoModelForImageTextToText does not exist yet) computes fp32 logits
and a greedy continuation. One JSON line goes to stdout; logits and pixels go to a safetensors file.
The test compares them with what transformers 5.x gives in the main environment.

usage: python hf_llava.py FOLDER MESSAGES.json IMAGE OUT.safetensors [auto]
With `auto` the model loads in the dtype its config says (torch_dtype="auto", as a user of a bf16 export
would load it) instead of fp32; the logits are then cast to fp32 for the file.
"""

import json
import sys

import torch
import transformers
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoProcessor

folder, messages_path, image_path, out_path = sys.argv[1:5]
dtype = "auto" if sys.argv[5:] == ["auto"] else torch.float32
messages = json.loads(open(messages_path).read())

processor = AutoProcessor.from_pretrained(folder)
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=Image.open(image_path), text=prompt, return_tensors="pt")

try:
    from transformers import AutoModelForImageTextToText as ModelClass
except ImportError:  # before 4.46
    from transformers import LlavaForConditionalGeneration as ModelClass
model, info = ModelClass.from_pretrained(folder, torch_dtype=dtype, output_loading_info=True)
model.eval()
with torch.no_grad():
    logits = model(**inputs).logits
    generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)

save_file({"logits": logits.float().contiguous(), "pixel_values": inputs["pixel_values"].float().contiguous()}, out_path)
print(json.dumps({
    "transformers": transformers.__version__, "processor": type(processor).__name__,
    "tokenizer": type(processor.tokenizer).__name__, "image_processor": type(processor.image_processor).__name__,
    "model_class": type(model).__name__, "dtypes": sorted({str(p.dtype) for p in model.parameters()}), "prompt": prompt, "input_ids": inputs["input_ids"][0].tolist(),
    "missing": sorted(info["missing_keys"]), "unexpected": sorted(info["unexpected_keys"]),
    "mismatched": [str(m) for m in info.get("mismatched_keys", [])],
    "generated": generated[0, inputs["input_ids"].shape[1]:].tolist(),
}))
