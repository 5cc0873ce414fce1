"""The multiple-choice prompt of xtuner mmbench / VLMEvalKit's LLaVA wrappers."""

from __future__ import annotations

import re

INSTRUCTION_EN = "Answer with the option's letter from the given choices directly."
INSTRUCTION_CN = "请直接回答选项字母。"
_CJK = re.compile(r"[\u4e00-\u9fff]")


def mcq_text(question: str, options: dict[str, str], hint: str | None = None) -> str:
    """`[{hint}\\n]{question}\\nA. {A}\\n...` + instruction; Chinese instruction when any CJK appears."""
    text = f"{hint}\n{question}" if hint else question
    for letter, option in options.items():
        text += f"\n{letter}. {option}"
    instruction = INSTRUCTION_CN if _CJK.search(text) else INSTRUCTION_EN
    return f"{text}\n{instruction}"
