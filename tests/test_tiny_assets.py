"""The tiny preset's assets: loadable with the Auto classes, Phi-3's token layout, readable data."""

import filecmp
import json

import pandas as pd
import pytest
import torch

from llavaflow.constants import PHI3_ADDED_TOKENS
from llavaflow.data.dataset import LlavaDataset, read_annotations
from llavaflow.data.images import ImageTransform, open_image
from llavaflow.eval.mmbench_data import image_bytes, option_letters, options, read_benchmark
from llavaflow.template import PHI3_CHAT

from conftest import TINY_DATASETS


def test_tokenizer_has_phi3_layout(tiny, tokenizer):
    """tokenizer.json laid out as microsoft/Phi-3-mini-4k-instruct's, and the SentencePiece model beside it."""
    import sentencepiece as spm
    from tokenizers import Tokenizer

    layout = json.loads((tiny["llm"] / "tokenizer.json").read_text())
    assert layout["normalizer"] == {"type": "Sequence", "normalizers": [
        {"type": "Prepend", "prepend": "▁"}, {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
    assert layout["pre_tokenizer"] is None
    model = layout["model"]
    assert model["type"] == "BPE" and model["byte_fallback"] is True and model["fuse_unk"] is True
    vocab = sorted(model["vocab"], key=model["vocab"].get)
    assert vocab[:3] == ["<unk>", "<s>", "</s>"] and vocab[3:259] == [f"<0x{b:02X}>" for b in range(256)]
    assert len(model["merges"]) > 100 and all(isinstance(m, str) and m.count(" ") == 1 for m in model["merges"])
    config = json.loads((tiny["llm"] / "tokenizer_config.json").read_text())
    assert config["legacy"] is False and config["tokenizer_class"] == "LlamaTokenizer" and config["add_bos_token"]

    sp = spm.SentencePieceProcessor(model_file=str(tiny["llm"] / "tokenizer.model"))
    base = sp.get_piece_size()
    assert base == len(model["vocab"])
    ids = tokenizer.convert_tokens_to_ids(list(PHI3_ADDED_TOKENS))
    assert ids == list(range(base, base + len(PHI3_ADDED_TOKENS)))  # same order, right after the base vocab
    assert [t["content"] for t in layout["added_tokens"]] == ["<unk>", "<s>", "</s>", *PHI3_ADDED_TOKENS]
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == ["<unk>", "<s>", "</s>"]
    assert tokenizer.bos_token_id == 1
    assert tokenizer.eos_token == tokenizer.pad_token == "<|endoftext|>"
    for token in ("<|user|>", "<|assistant|>", "<|end|>", "<|system|>", "<|endoftext|>"):
        enc = tokenizer.encode(token, add_special_tokens=False)
        assert enc == [tokenizer.convert_tokens_to_ids(token)], token
    # tokenizer.json is the SentencePiece model converted: the same pieces on plain text, bytes included.
    raw = Tokenizer.from_file(str(tiny["llm"] / "tokenizer.json"))
    for text in ("What colour are the shapes?", "Options:\nA. red\nB. blue", "  two  spaces", "图中 ü 42 ~"):
        assert raw.encode(text, add_special_tokens=False).ids == sp.encode(text), text
    # Every text segment after an added token starts with "▁", as in Phi-3; the newlines are kept.
    ids = tokenizer.encode("<|user|>\nhi<|end|>\n<|assistant|>\n", add_special_tokens=True)
    assert tokenizer.convert_ids_to_tokens(ids)[:4] == ["<s>", "<|user|>", "▁", "\n"]
    assert tokenizer.convert_tokens_to_ids("<|end|>") in ids and tokenizer.convert_tokens_to_ids("<|assistant|>") in ids
    assert tokenizer.decode(ids, skip_special_tokens=False).count("\n") == 3


def test_models_load_with_auto_classes_and_round_trip(tiny, tmp_path):
    from transformers import AutoImageProcessor, AutoModel, AutoModelForCausalLM, AutoTokenizer, CLIPVisionModel

    llm = AutoModelForCausalLM.from_pretrained(tiny["llm"])
    assert type(llm).__name__ == "Phi3ForCausalLM"
    tok = AutoTokenizer.from_pretrained(tiny["llm"])
    assert llm.config.vocab_size % 64 == 0 and llm.config.vocab_size > len(tok)  # free rows, as in Phi-3
    assert llm.config.num_key_value_heads < llm.config.num_attention_heads  # GQA, to exercise converters
    assert llm.generation_config.eos_token_id == tok.convert_tokens_to_ids(["<|endoftext|>", "<|assistant|>", "<|end|>"])
    vit = CLIPVisionModel.from_pretrained(tiny["vit"])
    assert type(AutoModel.from_pretrained(tiny["vit"])).__name__ == "CLIPVisionModel"
    proc = AutoImageProcessor.from_pretrained(tiny["vit"])
    assert proc.crop_size == {"height": vit.config.image_size, "width": vit.config.image_size}
    assert vit.config.patch_size == 14

    x = torch.tensor([[1, 5, 7, 9]])
    pixels = torch.randn(1, 3, vit.config.image_size, vit.config.image_size)
    llm.save_pretrained(tmp_path / "llm")
    vit.save_pretrained(tmp_path / "vit")
    with torch.no_grad():
        assert torch.equal(llm(x).logits, AutoModelForCausalLM.from_pretrained(tmp_path / "llm")(x).logits)
        assert torch.equal(vit(pixels).last_hidden_state,
                           CLIPVisionModel.from_pretrained(tmp_path / "vit")(pixels).last_hidden_state)
    tok.save_pretrained(tmp_path / "tok")
    text = "<|user|>\nWhat colour are the shapes?<|end|>\n<|assistant|>\nRed.<|end|>"
    assert AutoTokenizer.from_pretrained(tmp_path / "tok").encode(text) == tok.encode(text)


def test_training_data_parses_with_pipeline_readers(tiny, tokenizer):
    from transformers import CLIPImageProcessor

    pre, bad = read_annotations(tiny["data"] / "pretrain" / "captions.json")
    ft, bad2 = read_annotations(tiny["data"] / "finetune" / "conversations.jsonl")
    assert bad == bad2 == 0 and len(pre) >= 100 and len(ft) >= 300
    assert any(r.image is None for r in ft), "fine-tune data must hold text-only samples"
    assert any(len(r.conversations) >= 4 for r in ft), "fine-tune data must hold multi-turn samples"
    suffixes = {r.image.rsplit(".", 1)[1] for r in ft if r.image}
    assert suffixes == {"png", "jpg"}
    sizes = {open_image(tiny["data"] / "finetune" / r.image).size for r in ft[:60] if r.image}
    assert len(sizes) > 2 and any(w != h for w, h in sizes)  # mixed sizes and aspect ratios

    transform = ImageTransform(CLIPImageProcessor.from_pretrained(tiny["vit"]), pad_to_square=True)
    for stage, name in (("pretrain", "captions.json"), ("finetune", "conversations.jsonl")):
        ds = LlavaDataset([{"annotation": str(tiny["data"] / stage / name), "image_folder": str(tiny["data"] / stage)}],
                          tokenizer, PHI3_CHAT, transform, max_length=512)
        assert len(ds) == len(pre if stage == "pretrain" else ft)
        item = ds[0]
        assert item["pixel_values"].shape == (3, 56, 56)



def test_multiple_choice_answers_name_the_shuffled_option_then_its_letter(tiny):
    """What makes circular accuracy learnable: options in every order, answered "<option text> <letter>"."""
    import re

    from llavaflow.tiny import CN, COLOURS, MC_HINT

    ft, _ = read_annotations(tiny["data"] / "finetune" / "conversations.jsonl")
    orders, letters, lookups, hinted, with_image = set(), set(), 0, 0, 0
    for r in ft:
        question, answer = r.conversations[0]["value"], r.conversations[1]["value"]
        opts = dict(re.findall(r"^([A-D])\. (.+)$", question, flags=re.M))
        if not opts:
            continue
        text, letter = answer.rsplit(" ", 1)
        assert opts[letter] == text, (r.where, question, answer)
        colours = [next(c for c in COLOURS if o in (c, CN[c])) for o in opts.values()]
        if r.image is None:
            lookups += 1
            assert text in question.splitlines()[0], r.where  # the named colour is the answer
        else:  # some behind the benchmark's hint, as a quarter of its rows are
            with_image += 1
            hinted += question.startswith(f"<image>\n{MC_HINT}\n")
        orders.add(tuple(colours))
        letters.add(letter)
    assert letters == set("ABCD") and lookups > 100
    assert 0.2 < hinted / with_image < 0.3, (hinted, with_image)
    assert len(orders) > 40  # of the 60 ordered choices of 2-4 colours out of 4

@pytest.mark.parametrize("dataset", TINY_DATASETS)
def test_benchmark_tsvs_have_the_real_layout(tiny, dataset):
    df = read_benchmark(tiny["mmbench"] / f"{dataset}.tsv")
    header = (tiny["mmbench"] / f"{dataset}.tsv").read_text().split("\n", 1)[0].split("\t")
    if dataset == "CCBench":
        assert header == ["index", "question", "A", "B", "C", "D", "answer", "category", "image", "source"]
    elif "TEST" in dataset:
        assert header == ["index", "question", "hint", "A", "B", "C", "D", "category", "image", "source",
                          "l2-category", "comment", "split"]
    else:
        assert header == ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
                          "l2-category", "comment", "split"]
    main = df[df["index"] < 1_000_000]
    assert 40 <= len(main) <= 60
    letters = option_letters(df)
    counts = set()
    for idx, row in df.iterrows():
        opts = options(row, letters)
        counts.add(len(opts))
        # circular copies: one per option, pointing at the main row's picture
        g = idx % 1_000_000
        assert len(df[df["index"] % 1_000_000 == g]) == len(options(df.loc[g], letters))
        if idx != g:
            assert row["image"] == str(g)
        open_image(image_bytes(df, idx))
        if "answer" in df.columns:
            assert row["answer"] in opts
    assert counts >= {2, 3, 4}
    if dataset.endswith("_CN"):
        assert any("\u4e00" <= ch <= "\u9fff" for ch in df["question"].iloc[0])


def test_build_is_deterministic(tiny, tmp_path):
    from llavaflow.tiny import build_tiny_assets

    build_tiny_assets(tmp_path / "assets", tmp_path / "mmbench", ["MMBench_DEV_EN"], seed=0)
    for rel in ("llm/tokenizer.model", "llm/tokenizer.json", "llm/model.safetensors", "vit/model.safetensors",
                "data/finetune/conversations.jsonl", "data/pretrain/captions.json"):
        assert filecmp.cmp(tiny["root"] / "assets" / rel, tmp_path / "assets" / rel, shallow=False), rel
    assert filecmp.cmp(tiny["mmbench"] / "MMBench_DEV_EN.tsv", tmp_path / "mmbench" / "MMBench_DEV_EN.tsv", shallow=False)


def test_build_replaces_nothing_it_did_not_build(tmp_path):
    """--out with someone's files, or a TSV of a benchmark's name already there (a real file would be replaced by a
    synthetic one and scored as it): refused before anything is built, unless --overwrite."""
    from llavaflow.atomic import OutputError
    from llavaflow.tiny import build_tiny_assets

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.md").write_text("mine")
    real = tmp_path / "mmbench"
    real.mkdir()
    (real / "MMBench_DEV_EN.tsv").write_text("the real benchmark")
    with pytest.raises(OutputError, match=r"mine: exists and is not empty; pass --overwrite"):
        build_tiny_assets(mine, tmp_path / "other", ["MMBench_DEV_EN"])
    with pytest.raises(OutputError, match=r"MMBench_DEV_EN.tsv: exists; pass --overwrite"):
        build_tiny_assets(tmp_path / "new", real, ["CCBench", "MMBench_DEV_EN"])
    assert (mine / "notes.md").read_text() == "mine" and (real / "MMBench_DEV_EN.tsv").read_text() == "the real benchmark"
    assert not (tmp_path / "new").exists() and not (real / "CCBench.tsv").exists() and not (tmp_path / "other").exists()
