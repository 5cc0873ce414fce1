"""The LLM's tokenizer as GGUF metadata: llama.cpp's `llama` (SentencePiece-style) tokenizer model.

Phi-3's tokenizer is a byte-fallback BPE in SentencePiece's layout (`<unk> <s> </s>`, 256 `<0xNN>` byte
tokens, `▁` for spaces), followed by Phi-3's added tokens. llama.cpp runs it with its SPM tokenizer, which
merges adjacent pieces greedily by *score*. Where the folder has a `tokenizer.model`, pieces, scores and
types come from it, as llama.cpp's own Phi-3 converter reads them. Where it has only `tokenizer.json`
(transformers 5 saves no `tokenizer.model`), llama.cpp's fallback (`LlamaHfVocab`) gives every piece the
same score, -1000, so its SPM tokenizer would merge in text order instead of BPE rank order. We derive the
scores from the BPE merges instead: a piece made by merge number r gets score -r, so SPM's "best score
first" is BPE's "lowest rank first" (the tests compare the ids both give on the training text).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from gguf import TokenType

from .io import ConversionError, read_json

BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass
class Vocab:
    tokens: list[str]
    scores: list[float]
    types: list[int]
    bos: int
    eos: int
    unk: int
    pad: int | None
    eot: int | None  # Phi-3's end of turn, <|end|>: llama.cpp stops on it
    add_bos: bool


def _from_sentencepiece(path: Path) -> tuple[list[str], list[float], list[int]]:
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(path))
    tokens, scores, types = [], [], []
    for i in range(sp.vocab_size()):
        tokens.append(sp.IdToPiece(i))
        scores.append(sp.GetScore(i))
        types.append(TokenType.UNKNOWN if sp.IsUnknown(i) else TokenType.CONTROL if sp.IsControl(i)
                     else TokenType.UNUSED if sp.IsUnused(i) else TokenType.BYTE if sp.IsByte(i)
                     else TokenType.NORMAL)
    return tokens, scores, types


def _from_bpe_json(model: dict, path: Path) -> tuple[list[str], list[float], list[int]]:
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        raise ConversionError(f"{path}: the GGUF export needs a byte-fallback BPE tokenizer (Llama/Phi-3 style), "
                              f"found model type {model.get('type')!r}, byte_fallback={model.get('byte_fallback')}")
    vocab: dict[str, int] = model["vocab"]
    n = max(vocab.values()) + 1
    if sorted(vocab.values()) != list(range(n)):
        raise ConversionError(f"{path}: model.vocab ids are not 0..{n - 1} without gaps")
    tokens = [""] * n
    for piece, i in vocab.items():
        tokens[i] = piece
    rank: dict[str, int] = {}
    for r, merge in enumerate(model.get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, r)
    scores = [-float(rank[t]) if t in rank else 0.0 for t in tokens]
    types = [TokenType.BYTE if BYTE_PIECE.fullmatch(t) else TokenType.NORMAL for t in tokens]
    unk = model.get("unk_token")
    if unk in vocab:
        types[vocab[unk]] = TokenType.UNKNOWN
    return tokens, scores, types


def read_vocab(folder: Path, n_vocab: int) -> Vocab:
    """Pieces, scores and types for the n_vocab embedding rows; rows past the tokenizer are [PAD{i}] (unused)."""
    from transformers import AutoTokenizer

    tok_json = folder / "tokenizer.json"
    spm_model = folder / "tokenizer.model"
    if not tok_json.exists() and not spm_model.exists():
        raise ConversionError(f"{folder}: no tokenizer.json or tokenizer.model")
    data = read_json(tok_json) if tok_json.exists() else {"model": {}, "added_tokens": []}
    if spm_model.exists():
        tokens, scores, types = _from_sentencepiece(spm_model)
    else:
        tokens, scores, types = _from_bpe_json(data["model"], tok_json)
    for added in data.get("added_tokens", []):
        i = added["id"]
        if i >= len(tokens):
            tokens += [f"[PAD{j}]" for j in range(len(tokens), i + 1)]
            scores += [-1000.0] * (i + 1 - len(scores))
            types += [TokenType.UNUSED] * (i + 1 - len(types))
        if tokens[i] == added["content"] and types[i] in (TokenType.UNKNOWN, TokenType.CONTROL):
            continue  # <unk> <s> </s> of a tokenizer.model keep their SentencePiece types
        tokens[i] = added["content"]
        scores[i] = -1000.0
        types[i] = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
    if len(tokens) > n_vocab:
        raise ConversionError(f"{folder}: the tokenizer has {len(tokens)} tokens, the embedding only {n_vocab} rows")
    pad = n_vocab - len(tokens)
    tokens += [f"[PAD{i}]" for i in range(len(tokens), n_vocab)]
    scores += [-1000.0] * pad
    types += [TokenType.UNUSED] * pad

    hf = AutoTokenizer.from_pretrained(folder)
    for name in ("bos_token", "eos_token", "unk_token"):
        if getattr(hf, name + "_id") is None:
            raise ConversionError(f"{folder}: the tokenizer has no {name}")
    end = hf.convert_tokens_to_ids("<|end|>")
    # Training puts BOS before every sample (xtuner's encode_fn; data.conversation.encode_prompt), whatever the base
    # tokenizer_config's add_bos_token says (a base model may ship false), and the chat template has no
    # BOS of its own: llama.cpp must add it, or every prompt starts unlike every training sample.
    return Vocab(tokens=tokens, scores=scores, types=[int(t) for t in types], bos=hf.bos_token_id,
                 eos=hf.eos_token_id, unk=hf.unk_token_id, pad=hf.pad_token_id,
                 eot=end if end != hf.unk_token_id else None, add_bos=True)


def phi3_chat_jinja(template) -> str:
    """A Jinja chat template for llama.cpp made from our prompt template (llama.cpp recognises it as Phi-3's)."""
    content = "{{ message['content'] }}"
    return ("{% for message in messages %}"
            "{% if message['role'] == 'system' %}" + template.system.replace("{system}", content)
            + "{% elif message['role'] == 'user' %}" + template.instruction.replace("{input}", content)
            + "{% elif message['role'] == 'assistant' %}" + content + template.suffix + template.sep
            + "{% endif %}{% endfor %}")
