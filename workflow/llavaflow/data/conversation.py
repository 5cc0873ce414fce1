"""LLaVA conversations -> turns -> input_ids + labels, token for token as xtuner does it.

xtuner: llava_map_fn (dataset/map_fns/dataset_map_fns/llava_map_fn.py), template_map_fn and
encode_fn (dataset/utils.py). Chunks are encoded by separate tokenizer calls, exactly like xtuner,
because SentencePiece adds a dummy-prefix piece per call: one joined encode would give other ids.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX, IMAGE_TOKEN_INDEX
from ..template import PromptTemplate


@dataclass(frozen=True)
class Turn:
    input: str
    output: str


class ConversationError(ValueError):
    pass


def llava_turns(conversations: list[dict]) -> list[Turn]:
    """llava_map_fn: pair human messages with the gpt reply that follows them."""
    turns: list[Turn] = []
    pending = ""
    messages = list(conversations)
    for msg in messages:
        if not isinstance(msg, dict) or msg.get("from") not in ("human", "gpt") or not isinstance(msg.get("value"), str):
            raise ConversationError(f"message must be {{from: human|gpt, value: str}}, got {msg!r}")
    while messages and messages[0]["from"] == "gpt":
        messages.pop(0)
    for msg in messages:
        role, value = msg["from"], msg["value"]
        if role == "human":
            if DEFAULT_IMAGE_TOKEN in value:  # an image-only message keeps no "\n" (xtuner strips again)
                value = (DEFAULT_IMAGE_TOKEN + "\n" + value.replace(DEFAULT_IMAGE_TOKEN, "").strip()).strip()
            pending += value
        else:
            turns.append(Turn(pending, value))
            pending = ""
    images = sum(t.input.count(DEFAULT_IMAGE_TOKEN) for t in turns)
    if images > 1:  # xtuner would give the extra placeholder the next sample's image features
        raise ConversationError(f"{images} {DEFAULT_IMAGE_TOKEN} placeholders in one conversation; a sample holds one image")
    return turns


def sample_turns(conversations: list, has_image: bool) -> list[Turn]:
    """The turns of a training sample, refused (ConversationError) where training cannot use them."""
    turns = llava_turns(conversations)
    if not has_image and any(DEFAULT_IMAGE_TOKEN in t.input for t in turns):
        raise ConversationError(f"{DEFAULT_IMAGE_TOKEN} in a sample without an image")
    return turns


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def encode_prompt(tokenizer, text: str, with_bos: bool) -> list[int]:
    """Encode prompt text that may hold one <image>: chunks encoded apart, joined by -200."""
    chunks = text.split(DEFAULT_IMAGE_TOKEN)
    if len(chunks) > 2:
        raise ConversationError(f"at most one {DEFAULT_IMAGE_TOKEN} per prompt, found {len(chunks) - 1}")
    ids: list[int] = [tokenizer.bos_token_id] if with_bos else []
    for i, chunk in enumerate(chunks):
        if i:
            ids.append(IMAGE_TOKEN_INDEX)
        ids += _encode(tokenizer, chunk)
    return ids


def encode_turns(
    turns: list[Turn],
    tokenizer,
    template: PromptTemplate,
    max_length: int | None,
    system: str = "",
) -> tuple[list[int], list[int]]:
    """encode_fn with template_map_fn: returns (input_ids, labels); only answers are supervised."""
    input_ids: list[int] = []
    labels: list[int] = []
    need_eos = not template.suffix_as_eos
    # BOS opens the first turn and any turn after one that ended with EOS (never, for phi3_chat).
    with_bos = True
    for i, turn in enumerate(turns):
        prompt = template.format_instruction(turn.input)
        if i == 0 and system:
            prompt = template.format_system(system) + prompt
        prompt_ids = encode_prompt(tokenizer, prompt, with_bos)
        output_ids = _encode(tokenizer, turn.output + template.suffix)
        if need_eos:
            output_ids.append(tokenizer.eos_token_id)
        with_bos = need_eos
        sep_ids = _encode(tokenizer, template.sep) if template.sep else []
        input_ids += prompt_ids + output_ids + sep_ids
        labels += [IGNORE_INDEX] * len(prompt_ids) + output_ids + [IGNORE_INDEX] * len(sep_ids)
    if max_length is not None:
        input_ids, labels = input_ids[:max_length], labels[:max_length]
    return input_ids, labels
