"""Answer extraction: named, selectable policies (xtuner's and VLMEvalKit's). Each returns a letter, "Z", or "" (unparsed)."""

from __future__ import annotations

import re

REFUSALS = (
    "Sorry, I can't help with images of people yet.",
    "I can't process this file.",
    "I'm sorry, but without the image provided",
    "Cannot determine the answer",
)
_PUNCT = re.compile(r"[.()\[\],:;!*#{}]")
# VLMEvalKit head's rule, verbatim: "answer is" needs whitespace before the letter (no colon, no
# parenthesis); the match is case-insensitive and the letter is upper-cased ("answer is a blue ..." -> A).
_ANSWER_IS = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")


def _option_inference(pred: str, choices: dict[str, str], version: str, verbose_quirk: bool) -> str:
    if "Failed to obtain answer via API" in pred:
        return ""
    if any(r in pred for r in REFUSALS):
        return "Z"
    tokens = _PUNCT.sub(" ", pred).split()
    if verbose_quirk and "A" in tokens and len(tokens) > 3:
        return ""
    found = [L for L in choices if L in tokens]
    if len(found) == 1:
        letter = found[0]
        if version == "2024" or tokens.index(letter) > len(tokens) - 5:
            return letter
    elif not found and "Z" in tokens:
        return "Z"
    if version == "head":  # its "(correct) answer is X" rule, tried when the token rule gave nothing
        m = _ANSWER_IS.search(pred)
        if m and m.group(1).upper() in choices:
            return m.group(1).upper()
    return ""


def _text_inference(pred: str, choices: dict[str, str], version: str) -> str:
    pred = pred.lower()
    options = {k: str(v).lower() for k, v in choices.items()}  # never mutate the caller's dict
    if version != "2024" and len(pred) > 2 * sum(len(v) for v in options.values()):
        return ""
    hits = [k for k, v in options.items() if v in pred]
    return hits[0] if len(hits) == 1 else ""


def vlmevalkit(version: str, verbose_quirk: bool = False):
    def can_infer(pred: str, choices: dict[str, str]) -> str:
        pred = str(pred)
        return _option_inference(pred, choices, version, verbose_quirk) or _text_inference(pred, choices, version)

    return can_infer


def xtuner_regex(pred: str, choices: dict[str, str]) -> str:
    m = re.search(r"([A-D]+)", str(pred).strip())
    return m.group(1) if m else ""


VERSIONS = {"vlmevalkit-2024": "2024", "vlmevalkit-2025-08": "2025-08", "vlmevalkit-head": "head"}


def policies(verbose_quirk: bool = False) -> dict:
    """Every extraction policy by name. verbose_quirk: VLMEvalKit's behaviour with its VERBOSE environment
    variable set (a prediction of more than 3 words containing the word "A" is unparsed), off by default
    as in VLMEvalKit; the xtuner policy has no such switch."""
    return {**{name: vlmevalkit(version, verbose_quirk) for name, version in VERSIONS.items()},
            "xtuner-regex": xtuner_regex}


POLICIES = policies()
ALIASES = {"vlmeval": "vlmevalkit-head", "xtuner": "xtuner-regex"}
DEFAULT_POLICY = "vlmeval"


def get_policy(name: str, verbose_quirk: bool = False):
    canonical = ALIASES.get(name, name)
    if canonical not in POLICIES:
        raise ValueError(f"unknown extraction policy {name!r}; known: {sorted(POLICIES) + sorted(ALIASES)}")
    return canonical, policies(verbose_quirk)[canonical]
