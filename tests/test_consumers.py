"""Our exports read by the real consumers, each in its own cached venv (tests/consumer_venv.py), against
transformers 5.x here and against training's own token ids.

* official LLaVA: llava-torch 1.2.2.post1 (--no-deps) + transformers 4.37.2, `load_pretrained_model` on
  `iter_llava`; the same venv reads `iter_hf`'s weights with 4.37.2's LlavaForConditionalGeneration.
* `iter_hf` with AutoProcessor + the auto model in 4.49.0 (the oldest 4.x whose AutoProcessor reads it:
  `LlavaImageProcessor`, which pads to a square as training does, is unknown before 4.49) and 4.57.6
  (the newest 4.x).
"""

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from consumer_venv import HF_NEWEST, HF_OLDEST, hf4_venv, llava_official_venv, run_consumer
from llavaflow.constants import IMAGE_TOKEN_INDEX
from llavaflow.convert.tables import clip_legacy
from llavaflow.data.conversation import encode_prompt
from llavaflow.data.images import ImageTransform
from llavaflow.template import PHI3_CHAT
from llavaflow.tiny import Scene, draw

QUESTION = "What colour are the shapes?"
MESSAGES = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]


@pytest.fixture(scope="module")
def reference(converted, tiny, tokenizer, tmp_path_factory):
    """One prompt and image, as training encodes them, and what transformers 5.x makes of iter_hf."""
    from transformers import AutoModelForImageTextToText, AutoProcessor, CLIPImageProcessor

    work = tmp_path_factory.mktemp("consumers")
    image = draw(Scene("red", "circle", 2, "left", (64, 40)), random.Random(0))
    image.save(work / "image.png")
    prompt = PHI3_CHAT.format_instruction("<image>\n" + QUESTION)
    ids = encode_prompt(tokenizer, prompt, with_bos=True)
    pixels = ImageTransform(CLIPImageProcessor.from_pretrained(tiny["vit"]), pad_to_square=True)(image)[None]
    (work / "messages.json").write_text(json.dumps(MESSAGES))

    folder = converted["out"] / "iter_hf"
    proc = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    inputs = proc(images=image, text=proc.apply_chat_template(MESSAGES, add_generation_prompt=True),
                  return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    image_id = model.config.image_token_index
    single = [image_id if i == IMAGE_TOKEN_INDEX else i for i in ids]  # one <image>: 4.37-style input
    save_file({"input_ids": torch.tensor([ids]), "pixel_values": pixels}, work / "llava_inputs.safetensors")
    save_file({"input_ids": torch.tensor([single]), "pixel_values": pixels}, work / "hf_inputs.safetensors")
    return {"work": work, "prompt": prompt, "ids": ids, "pixels": pixels, "image_id": image_id,
            "expanded": [t for i in ids for t in ([image_id] * model.config.image_seq_length
                                                  if i == IMAGE_TOKEN_INDEX else [i])],
            "hf_ids": inputs["input_ids"][0].tolist(), "hf_pixels": inputs["pixel_values"], "logits": logits,
            "generated": generated[0, inputs["input_ids"].shape[1]:].tolist()}


def test_transformers_5_processor_gives_training_ids_and_pixels(reference):
    assert reference["hf_ids"] == reference["expanded"]  # the "▁" after <|user|>, the image and <|end|> kept
    assert torch.equal(reference["hf_pixels"], reference["pixels"])  # padded to a square like training


@pytest.fixture(scope="module")
def llava_python():
    return llava_official_venv()


@pytest.fixture(params=[HF_OLDEST, HF_NEWEST])
def hf4(request):
    """(version, python) of transformers 4.x with Pillow."""
    return request.param, hf4_venv(request.param)


def test_official_llava_loader_reads_iter_llava(llava_python, converted, tiny, reference):
    """llava-torch 1.2.2.post1 + transformers 4.37.2: load_pretrained_model(iter_llava) on the CPU."""
    folder, work = converted["out"] / "iter_llava", reference["work"]
    got = run_consumer(llava_python, "llava_official.py", folder, work / "llava_inputs.safetensors",
                       reference["prompt"], work / "image.png", work / "llava_out.safetensors")
    out = load_file(work / "llava_out.safetensors")
    assert got["missing"] == [] and got["unexpected"] == []
    assert not [m for m in got["load_warnings"] if str(folder) in m], got["load_warnings"]
    assert got["loaded_dtype"] == "torch.float16" and got["projector_type"] == "mlp2x_gelu"
    # Its tokenizer is ours as written, and its own chunked tokenizer_image_token gives training's ids.
    assert got["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert got["llava_ids"] == reference["ids"]
    assert torch.equal(out["llava_pixels"], reference["pixels"])  # process_images with image_aspect_ratio pad

    # The fine-tuned tower is the one in use (the loader's fp16 copy and the fp32 load), not the base's.
    ours = {clip_legacy(k.removeprefix("visual_encoder.")): v for k, v in converted["state"].items()
            if k.startswith("visual_encoder.")}
    base = {clip_legacy(k): v for k, v in load_file(tiny["vit"] / "model.safetensors").items()}
    for name, tensor in ours.items():
        assert torch.equal(out["fp32_tower." + name], tensor), name
        assert torch.equal(out["loader_tower." + name], tensor.half()), name
    moved = max((ours[k] - base[k]).abs().max().item() for k in ours)
    assert moved > 1e-2 and all(not torch.equal(out["fp32_tower." + k], base[k]) for k in ours if ours[k].numel() > 1)

    logits, ref = out["logits"], reference["logits"]
    assert logits.shape[:2] == ref.shape[:2] and logits.shape[-1] == got["len_tokenizer"]
    torch.testing.assert_close(logits, ref[..., : logits.shape[-1]], rtol=0, atol=1e-5)
    # The loader's own model: weights rounded to fp16 and fp16 rotary caches (9.2e-4 measured), bounded here.
    loader_diff = (out["loader_logits"] - ref[..., : logits.shape[-1]]).abs().max().item()
    print(f"official LLaVA loader (fp16 load, fp32 run): max abs logit diff {loader_diff:.2e}")
    assert loader_diff < 1e-2


def test_iter_hf_weights_in_transformers_4_37(llava_python, converted, reference):
    """Below the processor floor: 4.37.2 reads iter_hf's weights and tokenizer (inputs built by hand)."""
    work = reference["work"]
    got = run_consumer(llava_python, "hf_weights.py", converted["out"] / "iter_hf", work / "hf_inputs.safetensors",
                       reference["prompt"], work / "hf437_out.safetensors")
    assert got["transformers"] == "4.37.2"
    assert got["missing"] == got["unexpected"] == got["mismatched"] == []
    # Why the processor floor is 4.49: our LlavaImageProcessor config is unknown here.
    assert got["refused"]["AutoImageProcessor"].startswith("ValueError: Unrecognized image processor"), got["refused"]
    assert "AutoProcessor" in got["refused"], got["refused"]
    single = [reference["image_id"] if i == IMAGE_TOKEN_INDEX else i for i in reference["ids"]]
    assert got["prompt_ids"] == single
    logits = load_file(work / "hf437_out.safetensors")["logits"]
    torch.testing.assert_close(logits, reference["logits"], rtol=0, atol=1e-5)


def test_iter_hf_with_transformers_4x_processor(hf4, converted, reference):
    """AutoProcessor + auto model class in transformers 4.x: same prompt, ids, pixels, logits, text as 5.x."""
    version, python = hf4
    work = reference["work"]
    got = run_consumer(python, "hf_llava.py", converted["out"] / "iter_hf", work / "messages.json",
                       work / "image.png", work / f"hf{version}_out.safetensors")
    out = load_file(work / f"hf{version}_out.safetensors")
    assert got["transformers"] == version and got["image_processor"] == "LlavaImageProcessor"
    assert got["missing"] == got["unexpected"] == got["mismatched"] == []
    assert got["prompt"] == reference["prompt"]
    assert got["input_ids"] == reference["hf_ids"] == reference["expanded"]
    assert torch.equal(out["pixel_values"], reference["pixels"])
    torch.testing.assert_close(out["logits"], reference["logits"], rtol=0, atol=1e-5)
    assert got["generated"] == reference["generated"]


def test_bf16_export_loads_whole_in_bf16_with_dtype_auto_in_4x(hf4, converted, reference, tmp_path):
    """iter_hf as the pipeline writes it (bf16, from an fp32 visual_encoder/) loaded as its users would, with
    torch_dtype="auto": every part in bf16 (4.57 took the vision tower's float32 from its config and failed
    on the fp32 x bf16 product)."""
    from llavaflow.convert.exports import to_hf

    version, python = hf4
    out = converted["out"]
    to_hf(out / "iter_xtuner_llama_llm", out / "iter_xtuner" / "visual_encoder",
          out / "iter_xtuner" / "projector" / "model.safetensors", tmp_path / "iter_hf", dtype="bf16")
    work = reference["work"]
    got = run_consumer(python, "hf_llava.py", tmp_path / "iter_hf", work / "messages.json", work / "image.png",
                       tmp_path / "out.safetensors", "auto")
    assert got["transformers"] == version and got["dtypes"] == ["torch.bfloat16"]
    logits = load_file(tmp_path / "out.safetensors")["logits"]
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, reference["logits"], rtol=0, atol=0.1)  # bf16 weights and arithmetic


XTUNER = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "xtuner-0.2.0"


@pytest.mark.skipif(not XTUNER.is_dir(), reason="xtuner fixtures not found next to the repository")
def test_official_llava_reads_our_export_of_xtuners_own_model(llava_python, tmp_path):
    """xtuner 0.2.0's own fine-tuned folder (its tokenizer.json re-saved with [a, b] merges, no
    tokenizer.model) through our to_llava and to_hf: LLaVA's loader reads it cleanly and agrees with 5.x."""
    from transformers import AutoModelForImageTextToText, AutoTokenizer, CLIPImageProcessor
    from PIL import Image

    from llavaflow.convert.exports import to_hf, to_llava

    conv = XTUNER / "converted"
    args = (conv / "iter_4_xtuner_llama_llm", conv / "iter_4_xtuner" / "visual_encoder",
            conv / "iter_4_xtuner" / "projector" / "model.safetensors")
    to_llava(*args, tmp_path / "iter_llava", mm_vision_tower=str(args[1]), dtype="fp32")
    to_hf(*args, tmp_path / "iter_hf", dtype="fp32")
    prompt = PHI3_CHAT.format_instruction("<image>\nDescribe the image briefly.")
    ids = encode_prompt(AutoTokenizer.from_pretrained(conv / "iter_4_xtuner"), prompt, with_bos=True)  # training's
    image = Image.open(XTUNER / "data" / "x.png")
    pixels = ImageTransform(CLIPImageProcessor.from_pretrained(args[1]), pad_to_square=True)(image)[None]
    save_file({"input_ids": torch.tensor([ids]), "pixel_values": pixels}, tmp_path / "inputs.safetensors")
    got = run_consumer(llava_python, "llava_official.py", tmp_path / "iter_llava", tmp_path / "inputs.safetensors",
                       prompt, XTUNER / "data" / "x.png", tmp_path / "out.safetensors")
    out = load_file(tmp_path / "out.safetensors")
    assert got["missing"] == got["unexpected"] == got["load_warnings"] == []  # base tower in legacy names too
    assert got["llava_ids"] == ids and torch.equal(out["llava_pixels"], pixels)
    tower = load_file(args[1] / "model.safetensors")
    assert all(torch.equal(out["fp32_tower." + k], v.float()) for k, v in tower.items())

    hf = AutoModelForImageTextToText.from_pretrained(tmp_path / "iter_hf", dtype=torch.float32).eval()
    expanded = [t for i in ids for t in ([hf.config.image_token_index] * hf.config.image_seq_length
                                         if i == IMAGE_TOKEN_INDEX else [i])]
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor([expanded]), pixel_values=pixels).logits
    torch.testing.assert_close(out["logits"], ref[..., : out["logits"].shape[-1]], rtol=0, atol=1e-5)
