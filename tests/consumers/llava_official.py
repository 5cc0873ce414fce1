"""Child script, run with the official LLaVA venv's python (llava-torch 1.2.2.post1, transformers 4.37.2).

Loads an official-LLaVA export with LLaVA's own `load_pretrained_model` on the CPU and reports, as one
JSON line on stdout, what the loader did: key mismatches (its log and the key sets), its tokenizer, LLaVA's
tokenization (`tokenizer_image_token`) and preprocessing (`process_images`) of the given prompt and image.
The loader always loads fp16 (and builds its rotary cos/sin caches in fp16, 1.7e-5 off in logits even
after `.float()`), so the fp32 logits come from LLaVA's own `LlavaLlamaForCausalLM.from_pretrained` in
fp32, resized to the tokenizer as the loader does. Logits and both models' vision-tower weights go to a
safetensors file for the test to compare.

usage: python llava_official.py FOLDER INPUTS.safetensors PROMPT IMAGE OUT.safetensors
"""

import glob
import json
import logging
import os
import sys

import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

folder, inputs_path, prompt, image_path, out_path = sys.argv[1:6]

messages = []


class Collect(logging.Handler):
    def emit(self, record):
        messages.append(record.getMessage())


logging.getLogger("transformers.modeling_utils").addHandler(Collect(level=logging.WARNING))

from llava.constants import IMAGE_TOKEN_INDEX  # noqa: E402
from llava.mm_utils import get_model_name_from_path, process_images, tokenizer_image_token  # noqa: E402
from llava.model import LlavaLlamaForCausalLM  # noqa: E402
from llava.model.builder import load_pretrained_model  # noqa: E402

name = get_model_name_from_path(folder)
tokenizer, model, image_processor, context_len = load_pretrained_model(folder, None, name, device="cpu")
loaded_dtype = str(next(model.parameters()).dtype)
fp32 = LlavaLlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
fp32.resize_token_embeddings(len(tokenizer))

file_keys = set()
for shard in glob.glob(os.path.join(folder, "*.safetensors")):
    with safe_open(shard, framework="pt") as f:
        file_keys |= set(f.keys())
model_keys = set(model.state_dict())

inputs = load_file(inputs_path)
ids = inputs["input_ids"]
pixels = inputs["pixel_values"].float()
with torch.no_grad():
    logits = fp32(input_ids=ids, attention_mask=torch.ones_like(ids), images=pixels).logits

image = Image.open(image_path).convert("RGB")
llava_pixels = process_images([image], image_processor, model.config).float()
llava_ids = tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX)

tensors = {"logits": logits.contiguous(), "llava_pixels": llava_pixels.contiguous()}
for prefix, m in (("loader_tower.", model), ("fp32_tower.", fp32)):
    tower = m.get_model().get_vision_tower().vision_tower
    tensors |= {prefix + k: v.clone().contiguous() for k, v in tower.state_dict().items()}
with torch.no_grad():  # the loader's own (fp16-loaded) model, run in fp32
    tensors["loader_logits"] = model.float()(input_ids=ids, attention_mask=torch.ones_like(ids), images=pixels).logits
save_file(tensors, out_path)
print(json.dumps({
    "model_name": name, "tokenizer_class": type(tokenizer).__name__, "len_tokenizer": len(tokenizer),
    "loaded_dtype": loaded_dtype, "context_len": context_len, "projector_type": model.config.mm_projector_type,
    "projector": str(model.get_model().mm_projector),
    "load_warnings": [m for m in messages if "not used" in m or "initialized" in m],
    "missing": sorted(model_keys - file_keys), "unexpected": sorted(file_keys - model_keys),
    "llava_ids": llava_ids, "bos": tokenizer.bos_token_id,
}))
