"""The tokenizer files of an export: the base tokenizer's own files, with tokens added by editing them.

Exports never re-derive a tokenizer through AutoTokenizer + save_pretrained: transformers 5 rebuilds a
Llama-class tokenizer's normalizer and pre-tokenizer from its own defaults (Phi-3's
`Prepend("▁") + Replace(" ", "▁")` normalizer becomes `Metaspace(prepend_scheme="first")`), which drops
the "▁" piece that training puts after every added token (`<|user|>`, `<|end|>`, the image). So
`tokenizer.json` keeps the base's model, normalizer and merges (merges re-spelt, not changed, in the
form old readers parse); `<image>`/`<pad>` are appended to its added tokens; and `tokenizer_class`
becomes `PreTrainedTokenizerFast`, the class that transformers 4.x and 5.x (as `TokenizersBackend`)
both build from `tokenizer.json` as written - also for a folder whose config says `llama`, where
`LlamaTokenizer` would rebuild it, and for LLaVA's loader, whose `use_fast=False` keeps a class that
names itself fast.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .io import ConversionError, read_json

AS_WRITTEN = "PreTrainedTokenizerFast"


def _added(content: str, token_id: int) -> dict:
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": False, "special": True}


def _write(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def _merges_as_strings(model: dict) -> bool:
    """BPE merges as "a b" strings (Phi-3's own file has them so), where no piece holds a space.

    tokenizers >= 0.20 writes [a, b] pairs, which the tokenizers 0.15 that LLaVA's transformers 4.37.2
    pins cannot parse; both forms load to the same merges. Returns whether anything changed.
    """
    merges = model.get("merges") or []
    if not merges or isinstance(merges[0], str) or any(" " in piece for pair in merges for piece in pair):
        return False
    model["merges"] = [f"{a} {b}" for a, b in merges]
    return True


def generation_config(tokenizer, pad_token_id: int | None) -> dict:
    """generation_config.json: eos <|endoftext|>, <|assistant|>, <|end|>, as Phi-3's ships it."""
    return {"bos_token_id": tokenizer.bos_token_id, "pad_token_id": pad_token_id,
            "eos_token_id": tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|assistant|>", "<|end|>"])}


def copy_tokenizer(src: Path, dst: Path, *, add_special: tuple[str, ...] = (), pad_token: str | None = None,
                   chat_template: str | None = None) -> dict[str, int]:
    """Copy src's tokenizer files to dst, appending add_special (and pad_token) as special tokens.

    Returns {token: id} for every added token (ids follow the largest id in use, as `add_tokens` gives
    them; a token already in the vocabulary keeps its id).
    """
    src, dst = Path(src), Path(dst)
    if not (src / "tokenizer.json").is_file():
        raise ConversionError(f"{src}: no tokenizer.json; exports keep the base tokenizer's tokenizer.json as written")
    data = read_json(src / "tokenizer.json")
    vocab = data.get("model", {}).get("vocab")
    if not isinstance(vocab, dict) or not isinstance(data.get("added_tokens"), list):
        raise ConversionError(f"{src / 'tokenizer.json'}: no model.vocab mapping or added_tokens list")
    known = {t["content"]: t["id"] for t in data["added_tokens"]} | vocab
    new = [t for t in dict.fromkeys(add_special + ((pad_token,) if pad_token else ())) if t not in known]
    next_id = max(known.values()) + 1
    ids = {t: known[t] for t in add_special + ((pad_token,) if pad_token else ()) if t in known}
    for token in new:
        ids[token] = next_id
        data["added_tokens"].append(_added(token, next_id))
        next_id += 1
    if new or _merges_as_strings(data["model"]):
        _write(dst / "tokenizer.json", data)
    else:  # nothing to change: the very bytes of the base
        shutil.copy2(src / "tokenizer.json", dst / "tokenizer.json")

    config = read_json(src / "tokenizer_config.json") if (src / "tokenizer_config.json").exists() else {}
    config["tokenizer_class"] = AS_WRITTEN
    config["model_input_names"] = ["input_ids", "attention_mask"]  # the generic class would add token_type_ids
    decoder = config.setdefault("added_tokens_decoder", {})
    for token in new:
        entry = _added(token, ids[token])
        decoder[str(entry.pop("id"))] = entry
    extra = [t for t in add_special if t != pad_token]
    # 4.47-4.5x read extra_special_tokens as a {name: token} dict only and 5.x saves a list: keep the
    # version-neutral additional_special_tokens list instead.
    listed = config.pop("extra_special_tokens", None)
    listed = list(listed.values()) if isinstance(listed, dict) else list(listed or [])
    specials = list(dict.fromkeys(config.get("additional_special_tokens", []) + listed + extra))
    if specials:
        config["additional_special_tokens"] = specials
    if pad_token:
        config["pad_token"] = pad_token
    if chat_template is not None:
        config["chat_template"] = chat_template
    _write(dst / "tokenizer_config.json", config)

    smap = read_json(src / "special_tokens_map.json") if (src / "special_tokens_map.json").exists() else {}
    smap.update({k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if k in config})
    if specials:
        smap["additional_special_tokens"] = specials
    _write(dst / "special_tokens_map.json", smap)
    # The SentencePiece model (for anyone building the slow tokenizer by hand) and a chat template file.
    for name in ("tokenizer.model", "chat_template.jinja"):
        if (src / name).exists() and not (chat_template is not None and name == "chat_template.jinja"):
            shutil.copy2(src / name, dst / name)
    return ids
