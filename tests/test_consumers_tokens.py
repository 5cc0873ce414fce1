"""Every reader of our tokenizer files gives training's token ids (transformers 5.x side; the older
consumers are in test_consumers.py).

Training follows xtuner: the prompt is encoded in chunks around `<image>`, each answer on its own. With
Phi-3's tokenizer layout (`Prepend("▁")` normalizer, no pre-tokenizer) every text segment between added
tokens starts with "▁", so the HF processor's one-string encoding of a prompt equals the chunked one.
"""

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from tokenizers import Tokenizer

from llavaflow.chat import Session
from llavaflow.constants import IMAGE_TOKEN_INDEX
from llavaflow.convert.tokenizer_files import copy_tokenizer
from llavaflow.data.conversation import Turn, encode_prompt, encode_turns, llava_turns
from llavaflow.data.dataset import read_annotations
from llavaflow.eval.predict import Predictor, Prompt
from llavaflow.template import PHI3_CHAT

from conftest import ROOT

XTUNER = ROOT.parent / "shared" / "fixtures" / "xtuner-0.2.0"
EXPORTS = ("iter_xtuner", "iter_xtuner_llama_llm", "iter_llava", "iter_hf")


class FileTokenizer:
    """tokenizer.json read by the tokenizers library alone: what xtuner's transformers 4.48
    (LlamaTokenizerFast, which uses the file as written) encodes."""

    def __init__(self, folder: Path):
        self.tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.bos_token_id = self.tok.token_to_id("<s>")
        self.eos_token_id = self.tok.token_to_id("<|endoftext|>")

    def encode(self, text, add_special_tokens=True):
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids


@pytest.fixture(scope="module")
def conversations(tiny):
    records, _ = read_annotations(tiny["data"] / "finetune" / "conversations.jsonl")
    return [llava_turns(r.conversations) for r in records[:300]]


def test_training_ids_are_xtuners(tiny, tokenizer, conversations):
    """transformers 5 loads the Phi-3 folder as written: training's ids are those of the file itself."""
    raw = FileTokenizer(tiny["llm"])
    assert type(tokenizer).__name__ == "TokenizersBackend"
    for turns in conversations:
        assert encode_turns(turns, tokenizer, PHI3_CHAT, None) == encode_turns(turns, raw, PHI3_CHAT, None)
    ids = tokenizer.encode("<|user|>\n<|end|>\n<|assistant|>\n")
    assert tokenizer.convert_ids_to_tokens(ids)[1:4] == ["<|user|>", "▁", "\n"]  # Phi-3's "▁" after added tokens


@pytest.mark.parametrize("export", EXPORTS)
def test_every_export_tokenizes_like_training(export, converted, tokenizer, conversations, tiny):
    from transformers import AutoTokenizer

    folder = converted["out"] / export
    tok = AutoTokenizer.from_pretrained(folder)
    assert type(tok).__name__ == "TokenizersBackend"  # as written, also where config.json says llama
    for turns in conversations:
        assert encode_turns(turns, tok, PHI3_CHAT, None) == encode_turns(turns, tokenizer, PHI3_CHAT, None)
    base = json.loads((tiny["llm"] / "tokenizer.json").read_text())
    ours = json.loads((folder / "tokenizer.json").read_text())
    added, base_added = ours.pop("added_tokens"), base.pop("added_tokens")
    assert ours == base  # model, normalizer, pre-tokenizer, post-processor, decoder: the base's
    if export == "iter_hf":  # <image> and <pad> appended right after the last id, as add_tokens would
        assert added[:-2] == base_added
        assert [(t["content"], t["id"]) for t in added[-2:]] == [("<image>", len(tokenizer)), ("<pad>", len(tokenizer) + 1)]
        assert tok.pad_token == "<pad>" and tok.convert_tokens_to_ids("<image>") == len(tokenizer)
    else:
        assert added == base_added


def test_chat_and_eval_prompts_are_training_prompts(tokenizer):
    q1, a1, q2 = "What colour are the shapes?", "Red.", "What shape is shown?"
    session = Session(backend=SimpleNamespace(tokenizer=tokenizer), template=PHI3_CHAT, pixels=torch.zeros(1))
    first = session.prompt_ids(q1)
    train, _ = encode_turns([Turn("<image>\n" + q1, a1)], tokenizer, PHI3_CHAT, None)
    assert train[: len(first)] == first
    session.turns.append(Turn("<image>\n" + q1, a1))
    train2, _ = encode_turns([Turn("<image>\n" + q1, a1), Turn(q2, "")], tokenizer, PHI3_CHAT, None)
    assert session.prompt_ids(q2) == train2[: len(session.prompt_ids(q2))]
    predictor = Predictor(None, tokenizer, None, PHI3_CHAT)
    assert predictor.ids(Prompt(0, "<image>\n" + q1, None)) == first


def test_hf_chat_template_differs_only_in_earlier_answers(converted, tokenizer):
    """Measured: a multi-turn history through the HF processor differs from training in one place only,
    the start of each earlier answer. xtuner encodes an answer on its own ("▁Red"); the processor encodes
    it inside the text after <|assistant|> ("\\nRed." -> "▁", "\\n", "R", "ed"). The prompt of the turn
    being answered is identical."""
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(converted["out"] / "iter_hf")
    image_id = proc.tokenizer.convert_tokens_to_ids("<image>")
    turns = [Turn("<image>\nWhat colour are the shapes?", "Red."), Turn("What shape is shown?", "Circle."),
             Turn("How many shapes are there?", "")]
    messages = []
    for i, t in enumerate(turns):
        text = t.input.removeprefix("<image>\n")
        messages.append({"role": "user", "content": ([{"type": "image"}] if i == 0 else []) + [{"type": "text", "text": text}]})
        if t.output:
            messages.append({"role": "assistant", "content": [{"type": "text", "text": t.output}]})
    prompt = proc.apply_chat_template(messages, add_generation_prompt=True)
    hf = proc.tokenizer(prompt).input_ids
    hf = [IMAGE_TOKEN_INDEX if i == image_id else i for i in hf]

    train, _ = encode_turns(turns[:-1], tokenizer, PHI3_CHAT, None)
    train += encode_prompt(tokenizer, PHI3_CHAT.format_instruction(turns[-1].input), with_bos=False)
    # Training's ids with each earlier answer re-encoded as the processor's one string does it.
    expected = list(train)
    for t in turns[:-1]:
        own = tokenizer.encode(t.output, add_special_tokens=False)
        joined = tokenizer.encode("\n" + t.output, add_special_tokens=False)[2:]  # after "▁", "\n"
        at = next(i for i in range(len(expected)) if expected[i:i + len(own)] == own)
        expected[at:at + len(own)] = joined
    assert hf == expected and hf != train
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("Red.", add_special_tokens=False))[0] == "▁Red"


@pytest.mark.skipif(not XTUNER.is_dir(), reason="xtuner fixtures not found next to the repository")
def test_xtuner_llama_folder_loses_the_prefix_pieces_and_ours_does_not(tmp_path):
    """xtuner's own convert_phi_to_llama output says `llama` + LlamaTokenizer: transformers 5 rebuilds its
    tokenizer and drops the "▁" after added tokens. The same files through copy_tokenizer keep them."""
    from transformers import AutoTokenizer

    src = XTUNER / "converted" / "iter_4_xtuner_llama_llm"
    text = "<|user|>\nWhat is this?<|end|>\n<|assistant|>\n"
    want = FileTokenizer(XTUNER / "converted" / "iter_4_xtuner").encode(text)
    assert AutoTokenizer.from_pretrained(src).encode(text) != want
    shutil.copy2(src / "config.json", tmp_path / "config.json")
    copy_tokenizer(src, tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path).encode(text) == want
    assert isinstance(json.loads((tmp_path / "tokenizer.json").read_text())["model"]["merges"][0], str)
