"""Conversions, proven equivalent: bit-exact tensors both ways, equal logits across all formats."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llavaflow.constants import IMAGE_TOKEN_INDEX
from llavaflow.convert.exports import to_hf, to_llava
from llavaflow.convert.io import ConversionError, iter_tensors
from llavaflow.convert.phi3_llama import phi_to_llama, split_tensor
from llavaflow.convert.pth_to_hf import pth_to_hf
from llavaflow.convert.tables import CHECKPOINT_PREFIX, XTUNER_TO_HF, XTUNER_TO_LLAVA, clip_legacy, split_name
from llavaflow.data.conversation import encode_prompt
from llavaflow.data.images import ImageTransform
from llavaflow.model.build import build_llava
from llavaflow.model.loading import FolderError, load_xtuner_llava
from llavaflow.template import PHI3_CHAT
from llavaflow.tiny import Scene, draw


def folder_tensors(folder: Path) -> dict:
    return dict(iter_tensors(folder))


def test_pth_to_hf_layout_and_bit_exact_tensors(converted):
    out, state = converted["out"], converted["state"]
    x = out / "iter_xtuner"
    assert {p.name for p in (x / "projector").iterdir()} == {"config.json", "configuration_projector.py",
                                                            "modeling_projector.py", "model.safetensors"}
    assert {p.name for p in (x / "visual_encoder").iterdir()} == {"config.json", "model.safetensors",
                                                                 "preprocessor_config.json"}
    assert (x / "tokenizer.model").exists() and json.loads((x / "config.json").read_text())["use_cache"] is True
    cfg = json.loads((x / "projector" / "config.json").read_text())
    assert cfg["auto_map"] == {"AutoConfig": "configuration_projector.ProjectorConfig",
                               "AutoModel": "modeling_projector.ProjectorModel"}
    assert (cfg["model_type"], cfg["depth"], cfg["hidden_act"], cfg["bias"]) == ("projector", 2, "gelu", True)
    back = {}
    for name, t in folder_tensors(x).items():
        back[CHECKPOINT_PREFIX["llm"] + name] = t
    for name, t in folder_tensors(x / "visual_encoder").items():
        assert name.startswith("vision_model.")  # legacy names, readable by transformers 4.x and 5.x
        back[CHECKPOINT_PREFIX["visual_encoder"] + name.removeprefix("vision_model.")] = t
    for name, t in load_file(x / "projector" / "model.safetensors").items():
        back[CHECKPOINT_PREFIX["projector"] + name] = t
    assert back.keys() == state.keys()
    for k in state:
        assert torch.equal(back[k], state[k]), k


def test_xtuner_projector_folder_loads_like_xtuners(converted):
    from transformers import AutoModel

    proj = AutoModel.from_pretrained(converted["out"] / "iter_xtuner" / "projector", trust_remote_code=True)
    x = torch.randn(2, 5, proj.config.visual_hidden_size)
    with torch.no_grad():
        assert torch.equal(proj(x), converted["model"].projector(x))


def test_pretrain_checkpoint_gives_projector_only(tiny, converted, tmp_path):
    state = {k: v for k, v in converted["state"].items() if k.startswith("projector.")}
    torch.save({"state_dict": state}, tmp_path / "iter_1.pth")
    pth_to_hf(tmp_path / "iter_1.pth", tmp_path / "pre", str(tiny["llm"]), str(tiny["vit"]))
    assert sorted(p.name for p in (tmp_path / "pre").iterdir()) == ["projector"]


def test_phi_to_llama_splits_exactly(converted):
    phi = folder_tensors(converted["out"] / "iter_xtuner")
    llama = folder_tensors(converted["out"] / "iter_xtuner_llama_llm")
    cfg = json.loads((converted["out"] / "iter_xtuner" / "config.json").read_text())
    expected = {n: t for name, tensor in phi.items() for n, t in split_tensor(name, tensor, cfg)}
    assert expected.keys() == llama.keys()
    for k in llama:
        assert torch.equal(llama[k], expected[k]), k
    for i in range(cfg["num_hidden_layers"]):  # and back: the fused tensors are the concatenations
        p = f"model.layers.{i}."
        qkv = torch.cat([llama[p + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        assert torch.equal(qkv, phi[p + "self_attn.qkv_proj.weight"])
        assert torch.equal(torch.cat([llama[p + "mlp.gate_proj.weight"], llama[p + "mlp.up_proj.weight"]]),
                           phi[p + "mlp.gate_up_proj.weight"])
    llama_cfg = json.loads((converted["out"] / "iter_xtuner_llama_llm" / "config.json").read_text())
    assert llama_cfg["model_type"] == "llama" and "sliding_window" not in llama_cfg
    assert llama_cfg["rope_theta"] == 10000.0 and llama_cfg["rope_scaling"] is None and "torch_dtype" in llama_cfg
    assert llama_cfg["head_dim"] == cfg["hidden_size"] // cfg["num_attention_heads"]


def test_llama_logits_equal_phi3_logits(converted):
    from transformers import AutoModelForCausalLM

    phi = AutoModelForCausalLM.from_pretrained(converted["out"] / "iter_xtuner").eval()
    llama = AutoModelForCausalLM.from_pretrained(converted["out"] / "iter_xtuner_llama_llm").eval()
    assert type(llama).__name__ == "LlamaForCausalLM"
    ids = torch.randint(3, 500, (2, 40))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # a left-padded row too
    with torch.no_grad():
        assert torch.equal(phi(ids, attention_mask=mask).logits, llama(ids, attention_mask=mask).logits)
        g1 = phi.generate(ids[:1], max_new_tokens=8, do_sample=False)
        g2 = llama.generate(ids[:1], max_new_tokens=8, do_sample=False)
    assert torch.equal(g1, g2)


@pytest.mark.parametrize("table, folder", [(XTUNER_TO_HF, "iter_hf"), (XTUNER_TO_LLAVA, "iter_llava")])
def test_every_exported_tensor_traces_back_bit_exactly(converted, table, folder):
    out = converted["out"]
    sources = {
        "llm": folder_tensors(out / "iter_xtuner_llama_llm"),
        "visual_encoder": {clip_legacy(k): v for k, v in folder_tensors(out / "iter_xtuner" / "visual_encoder").items()},
        "projector": load_file(out / "iter_xtuner" / "projector" / "model.safetensors"),
    }
    exported = folder_tensors(out / folder)
    seen = {part: set() for part in sources}
    for name, tensor in exported.items():
        part, src = split_name(name, table)
        assert torch.equal(tensor, sources[part][src]), name
        seen[part].add(src)
    assert all(seen[p] == set(sources[p]) for p in sources)  # nothing dropped


def _inputs(tokenizer, tiny):
    from transformers import CLIPImageProcessor

    image = draw(Scene("red", "circle", 2, "left", (64, 40)), __import__("random").Random(0))
    text = PHI3_CHAT.format_instruction("<image>\nWhat colour are the shapes?")
    ids = encode_prompt(tokenizer, text, with_bos=True)
    pixels = ImageTransform(CLIPImageProcessor.from_pretrained(tiny["vit"]), pad_to_square=True)(image)[None]
    return image, text, ids, pixels


def test_same_logits_and_text_in_every_format(converted, tiny, tokenizer):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    image, text, ids, pixels = _inputs(tokenizer, tiny)
    ours = converted["model"]
    folder = load_xtuner_llava(converted["out"] / "iter_xtuner")
    hf = AutoModelForImageTextToText.from_pretrained(converted["out"] / "iter_hf").eval()
    proc = AutoProcessor.from_pretrained(converted["out"] / "iter_hf")
    hf_pixels = proc.image_processor(image, return_tensors="pt")["pixel_values"]
    assert torch.equal(hf_pixels, pixels)  # the processor pads to a square exactly as training did

    n = hf.config.image_seq_length
    hf_ids = []
    for i in ids:
        hf_ids += [hf.config.image_token_index] * n if i == IMAGE_TOKEN_INDEX else [i]
    with torch.no_grad():
        a = ours(torch.tensor([ids]), pixel_values=pixels).logits
        b = folder(torch.tensor([ids]), pixel_values=pixels).logits
        c = hf(input_ids=torch.tensor([hf_ids]), pixel_values=hf_pixels).logits
    assert torch.equal(a, b)
    # Tolerance for stock transformers: it runs the same ops but not always in the same order.
    torch.testing.assert_close(c[..., : a.shape[-1]], a, rtol=1e-5, atol=1e-5)

    # The same greedy text: our splice + LLM.generate, and HF generate with its generation config.
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    with torch.no_grad():
        embeds, mask, _, _ = folder.splice(torch.tensor([ids]), None, None, folder.encode_images(pixels))
        g1 = folder.llm.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=12, do_sample=False,
                                 eos_token_id=end, pad_token_id=tokenizer.pad_token_id)
        g2 = hf.generate(input_ids=torch.tensor([hf_ids]), pixel_values=hf_pixels, max_new_tokens=12, do_sample=False)
    assert g1[0].tolist() == g2[0, len(hf_ids):].tolist()
    assert end in hf.generation_config.eos_token_id

    # Its own processor builds the prompt from the chat template; the one difference from xtuner's
    # chunked encoding is the dummy-prefix piece after the image, and nothing else.
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour are the shapes?"}]}]
    prompt = proc.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == text
    enc = proc(images=image, text=prompt, return_tensors="pt")["input_ids"][0].tolist()
    prefix = tokenizer.convert_tokens_to_ids("▁")
    assert [i for i in hf_ids if i != prefix] == [i for i in enc if i != prefix]


def test_official_llava_config(converted, tiny):
    cfg = json.loads((converted["out"] / "iter_llava" / "config.json").read_text())
    assert cfg["model_type"] == "llava_llama" and cfg["architectures"] == ["LlavaLlamaForCausalLM"]
    assert cfg["mm_projector_type"] == "mlp2x_gelu" and cfg["mm_vision_select_layer"] == -2
    assert cfg["mm_vision_select_feature"] == "patch" and cfg["image_aspect_ratio"] == "pad"
    assert cfg["unfreeze_mm_vision_tower"] is True
    assert cfg["mm_use_im_patch_token"] is False and cfg["mm_use_im_start_end"] is False
    assert cfg["tokenizer_model_max_length"] == 2047  # Phi-3's sliding window, which Llama lacks (README)
    assert Path(cfg["mm_vision_tower"]).is_dir() and (converted["out"] / "iter_llava" / "tokenizer.model").exists()


def test_shapes_at_full_size_on_meta_device():
    """Phi-3-mini + CLIP-L/336 through the tables, against LlavaForConditionalGeneration's own shapes."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlamaConfig, Phi3Config

    from llavaflow.convert.phi3_llama import llama_config
    from llavaflow.convert.tables import rename
    from llavaflow.model.llava import LlavaModel
    from llavaflow.model.build import new_projector
    from transformers import CLIPVisionModel, Phi3ForCausalLM

    phi_cfg = Phi3Config(vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)
    vit_cfg = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                               image_size=336, patch_size=14, projection_dim=768)
    with torch.device("meta"):
        ours = LlavaModel(Phi3ForCausalLM(phi_cfg), CLIPVisionModel(vit_cfg), new_projector(1024, 3072, 2))
        hf = LlavaForConditionalGeneration(LlavaConfig(
            text_config=LlamaConfig(**{k: v for k, v in llama_config(phi_cfg.to_dict()).items()
                                       if k not in ("architectures", "model_type")}),
            vision_config=vit_cfg, vision_feature_layer=-2))
    expected = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    # transformers 5.x renames the legacy on-disk names at load time; do the same to compare.
    to_memory = [("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                 ("vision_tower.vision_model.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector.")]
    got = {}
    cfg = phi_cfg.to_dict()
    for name, t in ours.state_dict().items():
        part = next(p for p, prefix in CHECKPOINT_PREFIX.items() if name.startswith(prefix))
        local = name[len(CHECKPOINT_PREFIX[part]):]
        pieces = split_tensor(local, t, cfg) if part == "llm" else [(clip_legacy(local) if part == "visual_encoder" else local, t)]
        for n, tensor in pieces:
            disk = rename(part, n, XTUNER_TO_HF)
            src, dst = next((s, d) for s, d in to_memory if disk.startswith(s))
            got[dst + disk[len(src):]] = tuple(tensor.shape)
    assert got == expected
    assert got["model.multi_modal_projector.linear_1.weight"] == (3072, 1024)
    assert got["model.language_model.layers.0.self_attn.k_proj.weight"] == (3072, 3072)


def test_bad_inputs_stop_with_a_clear_error_and_no_output(tiny, converted, tmp_path):
    state = dict(converted["state"])
    # missing keys
    torch.save({"state_dict": {k: v for k, v in state.items() if "layers.1." not in k}}, tmp_path / "a.pth")
    with pytest.raises(ConversionError, match="LLM does not match its config: missing"):
        pth_to_hf(tmp_path / "a.pth", tmp_path / "out", str(tiny["llm"]), str(tiny["vit"]))
    # shape mismatch with the config
    bad = dict(state)
    bad["llm.model.norm.weight"] = torch.zeros(7)
    torch.save({"state_dict": bad}, tmp_path / "b.pth")
    with pytest.raises(ConversionError, match=r"model.norm.weight has shape \(7,\)"):
        pth_to_hf(tmp_path / "b.pth", tmp_path / "out", str(tiny["llm"]), str(tiny["vit"]))
    # a corrupt shard
    broken = tmp_path / "broken"
    shutil.copytree(converted["out"] / "iter_xtuner", broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(ConversionError, match="cannot read safetensors file"):
        phi_to_llama(broken, tmp_path / "out")
    # a config without a shape field (Llama would take its own default: 32 layers)
    shapeless = tmp_path / "shapeless"
    shutil.copytree(converted["out"] / "iter_xtuner", shapeless)
    cfg = json.loads((shapeless / "config.json").read_text())
    del cfg["num_hidden_layers"]
    (shapeless / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match=r"shapeless/config.json: no num_hidden_layers: the model's shapes cannot be known"):
        phi_to_llama(shapeless, tmp_path / "out")
    # a folder that is not Phi-3
    with pytest.raises(ConversionError, match="not 'phi3'"):
        phi_to_llama(converted["out"] / "iter_xtuner_llama_llm", tmp_path / "out")
    # a vision config.json without its layer count (CLIPVisionConfig takes 12) or with another patch size
    for key, value, expected in (("num_hidden_layers", None, r"\d+ tensor\(s\) its config.json asks for are not in its files"),
                                 ("patch_size", 7, r".*patch_embedding.weight has shape .*, its config.json says")):
        vit = tmp_path / f"vit_{key}"
        shutil.copytree(converted["out"] / "iter_xtuner" / "visual_encoder", vit)
        cfg = json.loads((vit / "config.json").read_text())
        cfg.pop(key) if value is None else cfg.update({key: value})
        (vit / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(ConversionError, match=f"vit_{key}: " + expected):
            to_hf(converted["out"] / "iter_xtuner_llama_llm", vit,
                  converted["out"] / "iter_xtuner" / "projector" / "model.safetensors", tmp_path / "out")
    # exports want the Llama LLM
    with pytest.raises(ConversionError, match="convert Phi-3 with phi_to_llama first"):
        to_hf(converted["out"] / "iter_xtuner", tiny["vit"], converted["out"] / "iter_xtuner" / "projector" / "model.safetensors", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp*"))
    with pytest.raises(FolderError, match="no projector/"):
        load_xtuner_llava(tiny["llm"])


# --- a non-default recipe: the shape facts travel with the model into every format ------------------------------

def _recipe_model(tiny, depth: int, layer: int, seed: int):
    torch.manual_seed(seed)
    model = build_llava(str(tiny["llm"]), str(tiny["vit"]), projector_depth=depth, visual_select_layer=layer)
    state = {k: v + 0.02 * torch.randn_like(v) for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    return model.eval(), state


def _llava_as_llava_builds_it(folder: Path):
    """The official-LLaVA folder read the way LLaVA's builder reads it: projector type `linear` (one Linear,
    keys without an index) or by its regex `^mlp(\\d+)x_gelu$`, select layer from mm_vision_select_layer, tower
    config from mm_vision_tower."""
    import re

    from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

    from llavaflow.convert.tables import xtuner_to_llava
    from llavaflow.model.configuration_projector import ProjectorConfig
    from llavaflow.model.llava import LlavaModel
    from llavaflow.model.modeling_projector import ProjectorModel

    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["mm_vision_select_feature"] == "patch"
    kind = cfg["mm_projector_type"]
    depth = 1 if kind == "linear" else int(re.match(r"^mlp(\d+)x_gelu$", kind).group(1))
    llm = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")}))
    vit = CLIPVisionModel(CLIPVisionConfig.from_pretrained(cfg["mm_vision_tower"]))
    proj = ProjectorModel(ProjectorConfig(visual_hidden_size=cfg["mm_hidden_size"], llm_hidden_size=cfg["hidden_size"],
                                          depth=depth))
    parts = {"llm": {}, "visual_encoder": {}, "projector": {}}
    in_memory = set(vit.state_dict())
    for name, t in folder_tensors(folder).items():
        part, src = split_name(name, xtuner_to_llava(depth))
        if part == "visual_encoder" and src not in in_memory:
            src = src.removeprefix("vision_model.")  # transformers >= 5.6 names CLIP without the wrapper
        parts[part][src] = t
    for module, part in ((llm, "llm"), (vit, "visual_encoder"), (proj, "projector")):
        module.load_state_dict(parts[part], strict=True)
    return LlavaModel(llm, vit, proj, cfg["mm_vision_select_layer"]).eval()


@pytest.mark.parametrize("depth, layer, llava_type", [(3, -3, "mlp3x_gelu"), (1, -1, "linear")])
def test_non_default_projector_through_every_format(tiny, tokenizer, tmp_path, depth, layer, llava_type):
    model, state = _recipe_model(tiny, depth=depth, layer=layer, seed=depth)
    torch.save({"state_dict": state}, tmp_path / "iter_2.pth")
    pth_to_hf(tmp_path / "iter_2.pth", tmp_path / "iter_xtuner", str(tiny["llm"]), str(tiny["vit"]), dtype="fp32",
              visual_select_layer=layer, projector_depth=depth)
    proj_cfg = json.loads((tmp_path / "iter_xtuner" / "projector" / "config.json").read_text())
    assert (proj_cfg["depth"], proj_cfg["visual_select_layer"], proj_cfg["hidden_act"]) == (depth, layer, "gelu")
    phi_to_llama(tmp_path / "iter_xtuner", tmp_path / "iter_xtuner_llama_llm")
    args = (tmp_path / "iter_xtuner_llama_llm", tmp_path / "iter_xtuner" / "visual_encoder",
            tmp_path / "iter_xtuner" / "projector" / "model.safetensors")
    to_llava(*args, tmp_path / "iter_llava", mm_vision_tower=str(tiny["vit"]), dtype="fp32")
    llava_cfg = json.loads((tmp_path / "iter_llava" / "config.json").read_text())
    assert (llava_cfg["mm_projector_type"], llava_cfg["mm_vision_select_layer"]) == (llava_type, layer)
    assert f"model.mm_projector.{'4.' if depth == 3 else ''}weight" in folder_tensors(tmp_path / "iter_llava")
    with pytest.raises(ConversionError, match=f"{depth}-layer projector has no HF LLaVA form: transformers' "
                                              "LlavaMultiModalProjector is exactly two Linear layers"):
        to_hf(*args, tmp_path / "iter_hf")
    assert not (tmp_path / "iter_hf").exists()

    _, _, ids, pixels = _inputs(tokenizer, tiny)
    folder = load_xtuner_llava(tmp_path / "iter_xtuner")  # what chat and mmbench load
    assert folder.visual_select_layer == layer
    overridden = load_xtuner_llava(tmp_path / "iter_xtuner", visual_select_layer=-2)  # an explicit --visual-select-layer
    assert overridden.visual_select_layer == -2
    llava = _llava_as_llava_builds_it(tmp_path / "iter_llava")
    x = torch.tensor([ids])
    with torch.no_grad():
        ref = model(x, pixel_values=pixels).logits
        assert torch.equal(folder(x, pixel_values=pixels).logits, ref)
        assert torch.equal(llava(x, pixel_values=pixels).logits, ref)
        # the select layer matters: xtuner's default layer would give other logits
        assert not torch.allclose(overridden(x, pixel_values=pixels).logits, ref)


def test_layer_minus3_through_stock_transformers(tiny, tokenizer, tmp_path):
    from transformers import AutoModelForImageTextToText

    model, state = _recipe_model(tiny, depth=2, layer=-3, seed=2)
    torch.save({"state_dict": state}, tmp_path / "iter_2.pth")
    pth_to_hf(tmp_path / "iter_2.pth", tmp_path / "iter_xtuner", str(tiny["llm"]), str(tiny["vit"]), dtype="fp32",
              visual_select_layer=-3)
    phi_to_llama(tmp_path / "iter_xtuner", tmp_path / "iter_xtuner_llama_llm")
    to_hf(tmp_path / "iter_xtuner_llama_llm", tmp_path / "iter_xtuner" / "visual_encoder",
          tmp_path / "iter_xtuner" / "projector" / "model.safetensors", tmp_path / "iter_hf", dtype="fp32")
    hf = AutoModelForImageTextToText.from_pretrained(tmp_path / "iter_hf").eval()
    assert hf.config.vision_feature_layer == -3
    _, _, ids, pixels = _inputs(tokenizer, tiny)
    hf_ids = []
    for i in ids:
        hf_ids += [hf.config.image_token_index] * hf.config.image_seq_length if i == IMAGE_TOKEN_INDEX else [i]
    with torch.no_grad():
        ref = model(torch.tensor([ids]), pixel_values=pixels).logits
        got = hf(input_ids=torch.tensor([hf_ids]), pixel_values=pixels).logits
    torch.testing.assert_close(got[..., : ref.shape[-1]], ref, rtol=1e-5, atol=1e-5)


def test_config_facts_that_only_a_real_hub_model_carries_reach_every_consumer_form(tiny, converted, tmp_path):
    """What the tiny models lack and real ones have: Phi-3's hub config names remote code (auto_map), a Llama
    config saved by transformers 5 keeps its rope in rope_parameters, old CLIP checkpoints hold int64
    position_ids. None may reach an output wrongly."""
    from transformers import AutoModelForCausalLM

    from llavaflow.convert.exports import _legacy_text_config
    from llavaflow.convert.io import ShardWriter

    llm = tmp_path / "phi3_with_auto_map"
    shutil.copytree(tiny["llm"], llm)
    cfg = json.loads((llm / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "configuration_phi3.Phi3Config",
                       "AutoModelForCausalLM": "modeling_phi3.Phi3ForCausalLM"}
    (llm / "config.json").write_text(json.dumps(cfg))
    pth_to_hf(converted["out"] / "iter_9.pth", tmp_path / "iter_xtuner", str(llm), str(tiny["vit"]), dtype="fp32")
    assert "auto_map" not in json.loads((tmp_path / "iter_xtuner" / "config.json").read_text())
    AutoModelForCausalLM.from_pretrained(tmp_path / "iter_xtuner", trust_remote_code=True)  # as xtuner chat loads it

    five = {"model_type": "llama", "vocab_size": 10, "dtype": "bfloat16",
            "rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0}}
    legacy = _legacy_text_config(five, "bfloat16")
    assert legacy["rope_theta"] == 500000.0 and legacy["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0}
    plain = _legacy_text_config({"model_type": "llama", "rope_parameters": {"rope_theta": 1e4, "rope_type": "default"}},
                                "float32")
    assert plain["rope_theta"] == 1e4 and plain["rope_scaling"] is None and "rope_parameters" not in plain

    (tmp_path / "shards").mkdir()
    writer = ShardWriter(tmp_path / "shards", 1 << 20)
    writer.add("position_ids", torch.arange(577)[None], torch.bfloat16)
    writer.add("weight", torch.full((2,), 1.0 / 3), torch.bfloat16)
    writer.close()
    [shard] = (tmp_path / "shards").glob("*.safetensors")
    written = load_file(shard)
    assert written["position_ids"].dtype == torch.int64 and torch.equal(written["position_ids"], torch.arange(577)[None])
    assert written["weight"].dtype == torch.bfloat16
