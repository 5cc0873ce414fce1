"""Answer extraction policies against a golden table of what each policy extracts from typical answers."""

from pathlib import Path

import pandas as pd
import pytest

from llavaflow.eval.extract import get_policy

CHOICES = {"A": "a cat", "B": "a dog", "C": "a bird", "D": "a fish"}
LONG = "The picture shows many things, and after looking closely at everything it is clear that it shows a dog in the end."
POLICIES = ["vlmevalkit-2024", "vlmevalkit-2025-08", "vlmevalkit-head", "xtuner-regex"]
GOLDEN = [  # prediction, expected per policy in POLICIES order ("" = unparsed)
    ("A", "A", "A", "A", "A"), ("B.", "B", "B", "B", "B"), ("(C)", "C", "C", "C", "C"), ("D. a fish", "D", "D", "D", "D"),
    ("**B**", "B", "B", "B", "B"), ("B) a dog", "B", "B", "B", "B"), ("Option B", "B", "B", "B", "B"),
    ("Answer: C", "C", "C", "C", "A"),
    ("Based on the image, C", "C", "C", "C", "B"),
    ("The correct answer is **B**. Here's why: the animal barks and it has four legs.", "B", "", "B", "B"),
    ("B. The dog is running in the park near the river.", "B", "", "", "B"),
    (LONG, "B", "", "", ""),
    ("a dog", "B", "B", "B", ""), ("It is a dog.", "B", "B", "B", ""),
    ("A dog", "A", "A", "A", "A"),
    ("AB", "", "", "", "AB"), ("A or B", "", "", "", "A"), ("C D", "", "", "", "C"),
    ("b", "", "", "", ""),
    ("答案：B", "", "", "", "B"), ("选项C", "", "", "", "C"), ("B。", "", "", "", "B"),
    ("Z", "Z", "Z", "Z", ""), ("Sorry, I can't help with images of people yet.", "Z", "Z", "Z", ""),
]


@pytest.mark.parametrize("row", GOLDEN, ids=[g[0][:20] for g in GOLDEN])
def test_golden_table(row):
    pred, *expected = row
    got = [get_policy(p)[1](pred, CHOICES) for p in POLICIES]
    assert got == expected


def test_two_option_question_and_aliases():
    two = {"A": "yes", "B": "no"}
    assert get_policy("vlmeval")[1]("C", two) == ""
    assert get_policy("xtuner")[1]("C", two) == "C"
    assert get_policy("vlmeval")[0] == "vlmevalkit-head" and get_policy("xtuner")[0] == "xtuner-regex"
    with pytest.raises(ValueError, match="unknown extraction policy"):
        get_policy("gpt")


def test_choices_are_not_mutated():
    choices = {"A": "Cat", "B": "Dog"}
    get_policy("vlmevalkit-head")[1]("it is a dog", choices)
    assert choices == {"A": "Cat", "B": "Dog"}


SHARED = Path(__file__).resolve().parents[2] / "shared"
VLMEVAL_GOLDEN = SHARED / "fixtures" / "vlmevalkit" / "extraction_golden.tsv"


def vlmevalkit_golden_rows():
    # Options are read with pandas' defaults, as VLMEvalKit reads a benchmark TSV (an option 'None' is
    # NaN and dropped); predictions are kept verbatim, as they come out of the model.
    options = pd.read_csv(VLMEVAL_GOLDEN, sep="\t")
    raw = pd.read_csv(VLMEVAL_GOLDEN, sep="\t", keep_default_na=False, dtype=str)
    for (_, o), (_, r) in zip(options.iterrows(), raw.iterrows()):
        choices = {L: str(o[L]) for L in "ABCDE" if not pd.isna(o[L])}
        yield pytest.param(r["prediction"], choices, r["vlmevalkit"], id=f"case{r['case']}-{r['note']}")


@pytest.mark.parametrize(("prediction", "choices", "expected"), list(vlmevalkit_golden_rows()))
def test_vlmeval_policy_matches_vlmevalkit_golden_table(prediction, choices, expected):
    """Every row of VLMEvalKit's own extraction results (can_infer at e8e78f05, run on its code)."""
    assert get_policy("vlmeval")[1](prediction, choices) == expected


def test_golden_table_is_complete():
    assert len(list(vlmevalkit_golden_rows())) == 60  # the file's rows (two hold newlines)


@pytest.mark.parametrize("pred,choices", [
    ("blue C", {"A": "red", "B": "green", "C": "blue", "D": "black"}),
    ("蓝色 C", {"A": "红色", "B": "绿色", "C": "蓝色"}),
    ("red A", {"A": "red", "B": "black"})])
def test_the_tiny_presets_answer_style_reads_as_its_letter(pred, choices):
    """The tiny fine-tune answers "<option> <letter>" (llavaflow.tiny.mc_answer): every policy reads the letter."""
    assert [get_policy(p)[1](pred, choices) for p in POLICIES] == [pred[-1]] * len(POLICIES)
