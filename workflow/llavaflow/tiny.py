"""The embedded tiny preset: a tiny Phi-3, a tiny CLIP, a Phi-3-layout tokenizer and learnable data.

Everything is built from a fixed seed in seconds on a CPU. The data is about pictures of coloured
shapes (colour, shape, count, side), written in the real formats: LLaVA JSON captions for pretrain,
JSONL conversations for fine-tune, MMBench/CCBench TSVs with base64 images and circular copies.

The benchmark's multiple-choice questions ask for the colour (phrased per category) among 2, 3 or 4
colours in a random order, and circular copies rotate them as MMBench does, so only matching the
picture's colour to an option's text scores. The fine-tune data teaches that with shuffled options and
answers that name the matching option, then its letter ("blue C"): a 2-layer model soon learns to copy
the letter before a word it has just written, but hardly the bare letter, which needs the colour and the
lookup in one position (README: the tiny preset). Text-only lookups ("Which option is blue?") train the
second step on its own. Open questions about every attribute stay.
"""

from __future__ import annotations

import base64
import io
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from PIL import Image, ImageDraw

from .atomic import atomic_output, check_output
from .constants import PHI3_ADDED_TOKENS
from .eval.prompt import mcq_text

COLOURS = {"red": (220, 30, 30), "green": (20, 160, 20), "blue": (30, 60, 220), "black": (20, 20, 20)}
SHAPES = ("circle", "square", "triangle")
COUNTS = {1: "one", 2: "two", 3: "three"}
SIDES = ("left", "right")
CN = {"red": "红色", "green": "绿色", "blue": "蓝色", "black": "黑色", "circle": "圆形", "square": "正方形",
      "triangle": "三角形", "left": "左边", "right": "右边", "one": "一个", "two": "两个", "three": "三个"}
SIZES = ((64, 48), (48, 64), (56, 56), (80, 60), (60, 80), (72, 40))

# Question kinds: (English question, Chinese question, answer vocabulary, MMBench category, L2 category).
KINDS = {
    "colour": ("What colour are the shapes?", "图中形状是什么颜色？", tuple(COLOURS), "attribute_recognition",
               "finegrained_perception (instance-level)"),
    "shape": ("What shape is shown?", "图中是什么形状？", SHAPES, "image_topic", "coarse_perception"),
    "count": ("How many shapes are there?", "图中有几个形状？", tuple(COUNTS.values()), "image_quality",
              "coarse_perception"),
    "side": ("On which side are the shapes?", "形状在哪一边？", SIDES, "spatial_relationship",
             "relation_reasoning"),
}
CCBENCH_CATEGORIES = ("calligraphy_painting", "cultural_relic", "food_clothes", "historical_figure")
# The benchmark's multiple-choice questions (all about the colour): English, Chinese, category, L2 category.
MC_QUESTIONS = (
    ("What colour are the shapes?", "图中形状是什么颜色？", "attribute_recognition", "finegrained_perception (instance-level)"),
    ("Which colour are the shapes painted in?", "这些形状涂的是哪种颜色？", "image_style", "coarse_perception"),
    ("Look at the shapes. What is their colour?", "看这些形状，它们是什么颜色？", "attribute_comparison",
     "finegrained_perception (cross-instance)"),
    ("Identify the colour of the shapes.", "请识别形状的颜色。", "physical_property_reasoning", "attribute_reasoning"),
)
# MMBench puts a row's hint before its question; a quarter of the benchmark's rows (not CCBench's) carry this
# one, and so does a quarter of the fine-tune's multiple-choice questions. Without any in training, whether the
# model still found the option's letter behind a hint followed the CPU's rounding: from the same seed, 50 %,
# 80 % or nearly all of DEV_CN's hinted rows right (bench/README.md, 2026-12-02).
MC_HINT = "Look at the picture.\nThen answer."


@dataclass(frozen=True)
class Scene:
    colour: str
    shape: str
    count: int
    side: str
    size: tuple[int, int]

    def answer(self, kind: str) -> str:
        return {"colour": self.colour, "shape": self.shape, "count": COUNTS[self.count], "side": self.side}[kind]

    def caption(self) -> str:
        plural = "s" if self.count > 1 else ""
        return f"{COUNTS[self.count].capitalize()} {self.colour} {self.shape}{plural} on the {self.side}."


def random_scene(rng: random.Random) -> Scene:
    return Scene(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.randint(1, 3), rng.choice(SIDES), rng.choice(SIZES))


def draw(scene: Scene, rng: random.Random) -> Image.Image:
    w, h = scene.size
    img = Image.new("RGB", (w, h), (255, 255, 255))
    d = ImageDraw.Draw(img)
    r = max(3, min(w // 5, h // (2 * scene.count + 2)) - 1)
    x0 = 0 if scene.side == "left" else w // 2
    for k in range(scene.count):
        cx = x0 + w // 4 + rng.randint(-2, 2)
        cy = int(h * (k + 1) / (scene.count + 1)) + rng.randint(-1, 1)
        box = (cx - r, cy - r, cx + r, cy + r)
        fill = COLOURS[scene.colour]
        if scene.shape == "circle":
            d.ellipse(box, fill=fill)
        elif scene.shape == "square":
            d.rectangle(box, fill=fill)
        else:
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    return img


def _save_image(img: Image.Image, path: Path, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))


def _letters(opts: list[str]) -> dict[str, str]:
    return {chr(ord("A") + i): o for i, o in enumerate(opts)}


def _cn(word: str) -> str:
    return CN[word]


def mc_options(rng: random.Random, answer: str) -> list[str]:
    """2, 3 or 4 colours in a random order, the answer among them."""
    others = rng.sample([c for c in COLOURS if c != answer], rng.choice((1, 2, 3, 3)))
    opts = [answer, *others]
    rng.shuffle(opts)
    return opts


MC_ANSWERS = ("option_letter", "letter")


def mc_answer(option: str, letter: str, style: str = "option_letter") -> str:
    """The fine-tune answer to a multiple-choice question: the matching option's text, then its letter
    ("blue C"); or the bare letter, the style bench/tiny_mcq.py compares it with."""
    if style not in MC_ANSWERS:
        raise ValueError(f"unknown multiple-choice answer style {style!r}; known: {MC_ANSWERS}")
    return f"{option} {letter}" if style == "option_letter" else letter


def make_training_data(root: Path, n_pretrain: int, n_finetune: int, seed: int,
                       mc_style: str = "option_letter") -> list[str]:
    """Write pretrain (JSON) and fine-tune (JSONL) data under root; returns all text, for the tokenizer."""
    rng = random.Random(seed)
    texts: list[str] = []
    pretrain = []
    for i in range(n_pretrain):
        scene = random_scene(rng)
        fmt = "PNG" if i % 2 else "JPEG"
        rel = f"images/pt_{i:05d}.{'png' if fmt == 'PNG' else 'jpg'}"
        _save_image(draw(scene, rng), root / "pretrain" / rel, fmt)
        human = rng.choice(["<image>\nDescribe the image briefly.", "Write a short caption.\n<image>", "<image>"])
        pretrain.append({"id": f"pt{i}", "image": rel, "conversations": [
            {"from": "human", "value": human}, {"from": "gpt", "value": scene.caption()}]})
        texts.append(scene.caption())
    (root / "pretrain").mkdir(parents=True, exist_ok=True)
    (root / "pretrain" / "captions.json").write_text(json.dumps(pretrain, indent=1))

    lines = []
    hints = random.Random(seed + 1)  # its own stream: every other sample stays as it was
    for i in range(n_finetune):
        chinese = rng.random() < 0.5
        shown = _cn if chinese else str
        if i % 10 in (3, 9):  # text-only: which option is the named colour
            target = rng.choice(list(COLOURS))
            opts = mc_options(rng, target)
            q = f"哪个选项是{_cn(target)}？" if chinese else f"Which option is {target}?"
            conv = [{"from": "human", "value": mcq_text(q, _letters([shown(o) for o in opts]))},
                    {"from": "gpt", "value": mc_answer(shown(target), "ABCD"[opts.index(target)], mc_style)}]
            lines.append({"id": i, "conversations": conv})
            texts += [c["value"] for c in conv]
            continue
        scene = random_scene(rng)
        fmt = "PNG" if i % 3 else "JPEG"
        rel = f"images/ft_{i:05d}.{'png' if fmt == 'PNG' else 'jpg'}"
        _save_image(draw(scene, rng), root / "finetune" / rel, fmt)
        conv = []
        if rng.random() < 0.8:  # a multiple-choice colour question in the benchmark's format
            q_en, q_cn = rng.choice(MC_QUESTIONS)[:2]
            opts = mc_options(rng, scene.colour)
            hint = MC_HINT if hints.random() < 0.25 else None
            conv += [{"from": "human", "value": "<image>\n" + mcq_text(q_cn if chinese else q_en,
                                                                       _letters([shown(o) for o in opts]), hint)},
                     {"from": "gpt", "value": mc_answer(shown(scene.colour), "ABCD"[opts.index(scene.colour)],
                                                         mc_style)}]
        # open questions about the attributes, as a first turn or as follow-up turns
        n_open = 0 if conv and rng.random() < 0.6 else rng.randint(1, 2)
        for kind in rng.sample(list(KINDS), n_open):
            q_en, q_cn = KINDS[kind][:2]
            answer = scene.answer(kind)
            q, a = (q_cn, _cn(answer)) if chinese else (q_en, answer.capitalize() + ".")
            conv += [{"from": "human", "value": q if conv else "<image>\n" + q}, {"from": "gpt", "value": a}]
        texts += [c["value"] for c in conv]
        lines.append({"id": i, "image": rel, "conversations": conv})
    with open(root / "finetune" / "conversations.jsonl", "w") as f:
        for line in lines:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    return texts


def _b64(img: Image.Image, fmt: str) -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def make_mmbench_tsv(path: Path, dataset: str, n_questions: int, seed: int) -> None:
    """A TSV in MMBench/CCBench layout: main rows + circular copies whose image points at the main row."""
    rng = random.Random(seed)
    chinese = dataset.endswith("_CN")
    ccbench = dataset == "CCBench"
    test = "_TEST_" in dataset
    rows = []
    for q in range(n_questions):
        g = 100 + 7 * q  # non-contiguous indices, as in the real files
        scene = random_scene(rng)
        q_en, q_cn, category, l2 = MC_QUESTIONS[(q // 4) % len(MC_QUESTIONS)]
        answer = scene.colour
        opts = mc_options(rng, answer)
        img = draw(scene, rng)
        if q % 5 == 4:
            img = img.convert("RGBA")  # the RGBA PNG case
        image = _b64(img, "PNG" if q % 2 or img.mode == "RGBA" else "JPEG")
        hint = MC_HINT if (q % 4 == 3 and not ccbench) else None
        for k in range(len(opts)):
            shifted = opts[k:] + opts[:k]
            shown = [_cn(o) for o in shifted] if chinese else shifted
            row = {"index": k * 1_000_000 + g, "question": q_cn if chinese else q_en}
            if not ccbench:
                row["hint"] = hint
            row.update({L: (shown[i] if i < len(shown) else None) for i, L in enumerate("ABCD")})
            if not test:
                row["answer"] = "ABCD"[shifted.index(answer)]
            row["category"] = CCBENCH_CATEGORIES[q % 4] if ccbench else category
            row["image"] = image if k == 0 else str(g)
            row["source"] = "synthetic"
            if not ccbench:
                row.update({"l2-category": l2, "comment": None, "split": "test" if test else "dev"})
            rows.append(row)
    rng.shuffle(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(path, sep="\t", index=False)


def build_tokenizer(out: Path, texts: list[str], seed: int):
    """Phi-3's tokenizer, small: a SentencePiece BPE with byte fallback (`tokenizer.model`) and the
    `tokenizer.json` laid out as microsoft/Phi-3-mini-4k-instruct ships it.

    That layout: the BPE's vocabulary and merges, a `Sequence[Prepend("▁"), Replace(" ", "▁")]`
    normalizer and no pre-tokenizer (so every text segment between added tokens gets its own "▁"),
    `<unk> <s> </s>`, the 256 byte pieces, the learned pieces, then Phi-3's 11 added tokens in order;
    merges are written as "a b" strings as in Phi-3's file, the form tokenizers < 0.20 read too.
    """
    import sentencepiece as spm
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    out.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()  # in memory: a model_prefix path would be recorded in the file
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=model, vocab_size=700, model_type="bpe",
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False,
        character_coverage=1.0, num_threads=1, minloglevel=2,
    )
    (out / "tokenizer.model").write_bytes(model.getvalue())
    pieces = SentencePieceExtractor(str(out / "tokenizer.model")).extract(BPE)
    vocab, merges = pieces["vocab"], pieces["merges"]
    tok = Tokenizer(BPE(vocab, merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1",
                                                       special_tokens=[("<s>", vocab["<s>"])])
    special = ("<unk>", "<s>", "</s>") + PHI3_ADDED_TOKENS
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    layout = json.loads(tok.to_str())
    layout["model"]["merges"] = [f"{a} {b}" for a, b in merges]  # no piece holds a space: "▁" stands for it
    (out / "tokenizer.json").write_text(json.dumps(layout, ensure_ascii=False, indent=2) + "\n")

    added = {str(vocab[t] if t in vocab else tok.token_to_id(t)): {
        "content": t, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
        for t in special}
    names = {"bos_token": "<s>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<unk>"}
    (out / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": added, **names,
        "clean_up_tokenization_spaces": False, "legacy": False, "model_max_length": 4096, "padding_side": "left",
        "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer", "use_default_system_prompt": False},
        indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(names, indent=2) + "\n")
    from transformers import PreTrainedTokenizerFast  # the files as written; the LLM's config comes later

    return PreTrainedTokenizerFast.from_pretrained(out)


def build_llm(out: Path, tokenizer, seed: int):
    import torch
    from transformers import GenerationConfig, Phi3Config, Phi3ForCausalLM

    torch.manual_seed(seed)
    rows = math.ceil((len(tokenizer) + 2) / 64) * 64  # Phi-3 style: rows padded to 64, free rows at the end
    ids = tokenizer.convert_tokens_to_ids
    cfg = Phi3Config(
        vocab_size=rows, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, original_max_position_embeddings=4096,
        sliding_window=2047, rope_theta=10000.0, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False,
    )
    model = Phi3ForCausalLM(cfg)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=[ids("<|endoftext|>"), ids("<|assistant|>"), ids("<|end|>")])
    model.save_pretrained(out)
    return model


def build_vision(out: Path, seed: int):
    import torch
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           image_size=56, patch_size=14, projection_dim=32, hidden_act="quick_gelu")
    model = CLIPVisionModel(cfg)
    model.save_pretrained(out)
    CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}).save_pretrained(out)
    return model


def build_tiny_assets(out: Path, mmbench_dir: Path, datasets: list[str], seed: int = 0,
                      n_pretrain: int = 400, n_finetune: int = 6400, n_questions: int = 48,
                      mc_style: str = "option_letter", overwrite: bool = False) -> None:
    """Build llm/, vit/ and data/{pretrain,finetune} under `out`, and one TSV per dataset in mmbench_dir.

    An existing `out`, or a TSV of that name (a real benchmark file would be replaced by a synthetic one
    and scored as it), is refused unless `overwrite`; each of them appears whole or not at all."""
    out, mmbench_dir = Path(out), Path(mmbench_dir)
    tsvs = [mmbench_dir / f"{name}.tsv" for name in datasets]
    for tsv in tsvs:  # all checked before anything is built
        check_output(tsv, overwrite=overwrite)
    check_output(out, inputs=[mmbench_dir], overwrite=overwrite)
    with atomic_output(out, inputs=[mmbench_dir], overwrite=overwrite) as tmp:
        texts = make_training_data(tmp / "data", n_pretrain, n_finetune, seed, mc_style)
        corpus = texts + [CN[k] for k in CN] + [mcq_text(q, {"A": "x"}) for mc in MC_QUESTIONS for q in mc[:2]]
        tokenizer = build_tokenizer(tmp / "llm", corpus, seed)
        build_llm(tmp / "llm", tokenizer, seed)
        build_vision(tmp / "vit", seed)
    for name, tsv in zip(datasets, tsvs):
        with atomic_output(tsv, folder=False, overwrite=overwrite) as tmp:
            make_mmbench_tsv(tmp, name, n_questions, seed + 1 + len(name))
