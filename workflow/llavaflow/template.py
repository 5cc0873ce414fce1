"""Chat templates, defined once (xtuner/utils/templates.py)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PromptTemplate:
    name: str
    system: str
    instruction: str
    suffix: str
    suffix_as_eos: bool
    sep: str
    stop_words: tuple[str, ...]

    def format_system(self, system: str) -> str:
        return self.system.format(system=system) if system else ""

    def format_instruction(self, text: str) -> str:
        return self.instruction.format(input=text)


PHI3_CHAT = PromptTemplate(
    name="phi3_chat",
    system="<|system|>\n{system}<|end|>\n",
    instruction="<|user|>\n{input}<|end|>\n<|assistant|>\n",
    suffix="<|end|>",
    suffix_as_eos=True,
    sep="\n",
    stop_words=("<|end|>",),
)

TEMPLATES = {t.name: t for t in (PHI3_CHAT,)}


def get_template(name: str) -> PromptTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown prompt template {name!r}; known: {sorted(TEMPLATES)}") from None
