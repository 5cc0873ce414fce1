"""Predictions for multiple-choice rows: greedy decoding, batched, with an exact two-token fast path.

Fast path: every batch is first decoded for two greedy steps. A row whose answer has ended by then
(e.g. "B" then <|end|>) has exactly the text full greedy generation would give, so it is done; only
the others are decoded further, in a smaller batch. In exact arithmetic the predictions are full
generation's (tests/test_pipeline.py checks them in fp32), for a fraction of the steps; in bf16 a row decoded
again beside other rows sees other padding widths, which can move low-order bits and, rarely, a greedy choice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.conversation import encode_prompt
from ..data.images import ImageTransform, open_image
from ..template import PromptTemplate


@dataclass
class Prompt:
    key: int
    text: str  # the user message, "<image>\n..." when there is an image
    image: bytes | None
    where: str = ""  # how errors name this row, e.g. "MMBench_DEV_EN.tsv index 241"


def prompt_pixels(prompts: list[Prompt], transform: ImageTransform) -> torch.Tensor:
    """The batch's pixel values; an unreadable image is an error naming its row (Prompt.where)."""
    return torch.stack([transform(open_image(p.image, p.where or None)) if p.image is not None else transform.blank()
                        for p in prompts])


class Predictor:
    def __init__(self, model, tokenizer, transform: ImageTransform, template: PromptTemplate,
                 max_new_tokens: int = 100, system: str = ""):
        self.model, self.tokenizer, self.transform, self.template = model, tokenizer, transform, template
        self.max_new_tokens, self.system = max_new_tokens, system
        stops = [tokenizer.convert_tokens_to_ids(w) for w in template.stop_words]
        self.stop_ids = sorted({i for i in stops if i is not None} | {tokenizer.eos_token_id})
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def ids(self, prompt: Prompt) -> list[int]:
        text = self.template.format_system(self.system) + self.template.format_instruction(prompt.text)
        return encode_prompt(self.tokenizer, text, with_bos=True)

    def _generate(self, ids, pixels, max_new_tokens):
        return self.model.generate(ids, pixels, max_new_tokens=max_new_tokens, do_sample=False,
                                   eos_token_id=self.stop_ids, pad_token_id=self.pad_id)

    def _finished(self, tokens: list[int]) -> bool:
        return any(t in self.stop_ids for t in tokens)

    def _decode(self, tokens: list[int]) -> str:
        cut = next((i for i, t in enumerate(tokens) if t in self.stop_ids), len(tokens))
        return self.tokenizer.decode(tokens[:cut], skip_special_tokens=True).strip()

    def predict_batch(self, prompts: list[Prompt], fast: bool = True) -> dict[int, str]:
        ids = [self.ids(p) for p in prompts]
        pixels = prompt_pixels(prompts, self.transform)
        out: dict[int, str] = {}
        todo = list(range(len(prompts)))
        if fast and self.max_new_tokens > 2:
            first = self._generate(ids, pixels, 2)
            for i, tokens in zip(list(todo), first):
                if self._finished(tokens):
                    out[prompts[i].key] = self._decode(tokens)
                    todo.remove(i)
        if todo:
            rest = self._generate([ids[i] for i in todo], pixels[todo], self.max_new_tokens)
            for i, tokens in zip(todo, rest):
                out[prompts[i].key] = self._decode(tokens)
        return out
