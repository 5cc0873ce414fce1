"""The LLaVA module: feature splicing, count checks, text-only samples, trainable parts."""

from pathlib import Path

import pytest
import torch

from llavaflow.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from llavaflow.model.build import build_llava
from llavaflow.model.llava import trainable_state_dict


@pytest.fixture(scope="module")
def model(tiny):
    torch.manual_seed(0)
    return build_llava(str(tiny["llm"]), str(tiny["vit"])).eval()


def test_features_are_spliced_into_the_placeholder(model):
    embed = model.llm.get_input_embeddings()
    ids = torch.tensor([[1, 5, IMAGE_TOKEN_INDEX, 6, 7], [1, 8, 9, 0, 0]])  # second: text-only, padded
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 6, 7], [IGNORE_INDEX, 8, 9, IGNORE_INDEX, IGNORE_INDEX]])
    feats = torch.randn(2, 3, model.llm.config.hidden_size)
    embeds, new_mask, new_labels, pos = model.splice(ids, mask, labels, feats)
    assert embeds.shape == (2, 4 + 3, model.llm.config.hidden_size)
    with torch.no_grad():
        assert torch.equal(embeds[0, :2], embed(torch.tensor([1, 5])))
        assert torch.equal(embeds[0, 2:5], feats[0])
        assert torch.equal(embeds[0, 5:], embed(torch.tensor([6, 7])))
        assert torch.equal(embeds[1, :3], embed(torch.tensor([1, 8, 9])))
        assert not embeds[1, 3:].any()  # right padding with zeros
    assert new_labels.tolist() == [[-100, -100, -100, -100, -100, 6, 7], [-100, 8, 9, -100, -100, -100, -100]]
    assert new_mask.tolist() == [[True] * 7, [True] * 3 + [False] * 4]
    assert pos.tolist() == [list(range(7)), [0, 1, 2, 0, 0, 0, 0]]
    # Left padding (batched generation): the same rows, shifted to the end.
    left, left_mask, _, left_pos = model.splice(ids, mask, None, feats, padding_side="left")
    assert torch.equal(left[1, 4:], embeds[1, :3]) and not left[1, :4].any()
    assert left_mask[1].tolist() == [False] * 4 + [True] * 3 and left_pos[1].tolist() == [0, 0, 0, 0, 0, 1, 2]


def test_count_mismatches_raise(model):
    h = model.llm.config.hidden_size
    ids = torch.tensor([[1, IMAGE_TOKEN_INDEX, 5]])
    with pytest.raises(ValueError, match="image placeholders in the text but no images"):
        model.splice(ids, None, None, None)
    with pytest.raises(ValueError, match="got 2 images for a batch of 1"):
        model.splice(ids, None, None, torch.randn(2, 3, h))
    with pytest.raises(ValueError, match="2 image placeholders"):
        model.splice(torch.tensor([[1, IMAGE_TOKEN_INDEX, IMAGE_TOKEN_INDEX]]), None, None, torch.randn(1, 3, h))


def test_image_features_come_from_layer_minus_2_without_cls(model):
    size = model.visual_encoder.config.image_size
    pixels = torch.randn(1, 3, size, size)
    with torch.no_grad():
        out = model.visual_encoder(pixels, output_hidden_states=True)
        expected = model.projector(out.hidden_states[-2][:, 1:])
        got = model.encode_images(pixels)
    patches = (size // model.visual_encoder.config.patch_size) ** 2
    assert got.shape == (1, patches, model.llm.config.hidden_size)
    assert torch.equal(got, expected)


def test_text_only_batch_keeps_every_part_in_the_graph(tiny):
    torch.manual_seed(0)
    m = build_llava(str(tiny["llm"]), str(tiny["vit"]))
    m.set_trainable(["llm", "visual_encoder", "projector"])
    size = m.visual_encoder.config.image_size
    out = m(torch.tensor([[1, 5, 6, 7]]), labels=torch.tensor([[-100, 5, 6, 7]]), pixel_values=torch.zeros(1, 3, size, size))
    out.loss.backward()
    assert all(p.grad is not None for p in m.projector.parameters())  # zero-row slice keeps the projector used


def test_trainable_parts_and_checkpoint_filter(tiny):
    m = build_llava(str(tiny["llm"]), str(tiny["vit"]))
    m.set_trainable(["projector"])
    assert {n.split(".")[0] for n, p in m.named_parameters() if p.requires_grad} == {"projector"}
    assert set(trainable_state_dict(m)) == {"projector.model.0.weight", "projector.model.0.bias",
                                   "projector.model.2.weight", "projector.model.2.bias"}
    m.set_trainable(["llm", "visual_encoder", "projector"])
    keys = set(trainable_state_dict(m))
    assert "llm.model.layers.0.self_attn.qkv_proj.weight" in keys and "llm.lm_head.weight" in keys
    assert any(k.startswith("visual_encoder.") for k in keys)
    with pytest.raises(ValueError, match="unknown model parts"):
        m.set_trainable(["vit"])


def test_a_folder_whose_weights_do_not_cover_its_config_is_refused(converted, tmp_path):
    """transformers fills weights missing from the files with random values and only logs it: a config.json
    that asks for one layer more (LLM, vision tower, or the HF export's text model) would run and score."""
    import json
    import shutil

    from llavaflow.chat import HFBackend
    from llavaflow.model.loading import FolderError, load_xtuner_llava

    def one_layer_more(config: Path, *keys):
        cfg = json.loads(config.read_text())
        node = cfg
        for key in keys[:-1]:
            node = node[key]
        node[keys[-1]] += 1
        config.write_text(json.dumps(cfg))

    for part, keys in ((".", ("num_hidden_layers",)), ("visual_encoder", ("num_hidden_layers",))):
        folder = tmp_path / f"xtuner_{part.strip('.') or 'llm'}"
        shutil.copytree(converted["out"] / "iter_xtuner", folder)
        one_layer_more(folder / part / "config.json", *keys)
        with pytest.raises(FolderError, match=r"weight\(s\) that its config.json asks for are not in its files"):
            load_xtuner_llava(folder)
    cut = tmp_path / "xtuner_cut"
    shutil.copytree(converted["out"] / "iter_xtuner", cut)
    data = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(FolderError, match=r"xtuner_cut: cannot read its weights .*incomplete or damaged"):
        load_xtuner_llava(cut)
    hf = tmp_path / "iter_hf"
    shutil.copytree(converted["out"] / "iter_hf", hf)
    one_layer_more(hf / "config.json", "text_config", "num_hidden_layers")
    with pytest.raises(FolderError, match=r"iter_hf: \d+ weight\(s\) .* \(e\.g\. .*layers\.\d+\."):
        HFBackend(str(hf), torch.float32, "cpu")
