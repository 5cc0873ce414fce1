"""MMBench reading, prompts and scoring on synthetic TSVs covering the edge cases of real MMBench files."""

import base64
import csv
import io
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from PIL import Image

from llavaflow.eval.extract import get_policy
from llavaflow.eval.mmbench import build_prompts, write_results
from llavaflow.eval.mmbench_data import BenchmarkError, image_bytes, option_letters, options, read_benchmark
from llavaflow.eval.prompt import mcq_text


def b64(mode="RGB", fmt="JPEG"):
    buf = io.BytesIO()
    Image.new(mode, (8, 8), (200, 10, 10, 128) if mode == "RGBA" else (200, 10, 10)).save(buf, format=fmt)
    return base64.b64encode(buf.getvalue()).decode()


def rows():
    jpg = b64()
    out = []
    opts = ["a cat", "a dog", "a bird", "a fish"]
    for k in range(4):  # Q1: 4 options, a hint with a newline and a quote, pointers from its copies
        shifted = opts[k:] + opts[:k]
        out.append(dict(index=k * 1_000_000 + 241, question="What animal is it?", hint='Look "closely".\nThen answer.',
                        A=shifted[0], B=shifted[1], C=shifted[2], D=shifted[3], answer="ABCD"[shifted.index("a dog")],
                        category="image_scene", image=jpg if k == 0 else "241", source="scienceqa",
                        **{"l2-category": "coarse_perception"}, comment=None, split="dev"))
    for k in range(2):  # Q2: 2 options, no hint
        o = ["yes", "no"][k:] + ["yes", "no"][:k]
        out.append(dict(index=k * 1_000_000 + 250, question="Is it red?", hint=None, A=o[0], B=o[1], C=None, D=None,
                        answer="AB"[o.index("yes")], category="attribute_recognition", image=b64() if k == 0 else "250",
                        source="x", **{"l2-category": "finegrained_perception (instance-level)"}, comment=None, split="dev"))
    for k in range(3):  # Q3: 3 options, an RGBA PNG
        o = ["one", "two", "three"][k:] + ["one", "two", "three"][:k]
        out.append(dict(index=k * 1_000_000 + 260, question="How many?", hint=None, A=o[0], B=o[1], C=o[2], D=None,
                        answer="ABC"[o.index("one")], category="image_quality", image=b64("RGBA", "PNG") if k == 0 else "260",
                        source="x", **{"l2-category": "coarse_perception"}, comment=None, split="dev"))
    out.append(dict(index=270, question="图中是什么颜色？", hint=None, A="红色", B="蓝色", C=None, D=None, answer="A",
                    category="attribute_recognition", image=b64(), source="x",
                    **{"l2-category": "finegrained_perception (instance-level)"}, comment=None, split="dev"))
    out.append(dict(index=280, question="Which is missing?", hint=None, A="N/A", B="cat", C="category", D=None, answer="C",
                    category="ocr", image=b64(), source="x", **{"l2-category": "finegrained_perception (cross-instance)"},
                    comment=None, split="dev"))
    return out


@pytest.fixture
def tsv(tmp_path):
    path = tmp_path / "MMBench_DEV_EN.tsv"
    df = pd.DataFrame(rows()).sample(frac=1, random_state=0)  # shuffled, non-contiguous indices
    df.to_csv(path, sep="\t", index=False)
    return path


def test_reading_quotes_pointers_options_and_na(tsv, caplog):
    df = read_benchmark(tsv)
    assert len(df) == 11
    assert df.loc[241, "hint"] == 'Look "closely".\nThen answer.'
    letters = option_letters(df)
    assert options(df.loc[250], letters) == {"A": "yes", "B": "no"}
    assert options(df.loc[280], letters) == {"B": "cat", "C": "category"}  # "N/A" reads as NaN, as in both tools
    assert "option A 'N/A' reads as missing" in caplog.text
    assert image_bytes(df, 3000241 if 3000241 in df.index else 1000241) == image_bytes(df, 241)
    img = Image.open(io.BytesIO(image_bytes(df, 2000260)))
    assert img.mode == "RGBA"


def test_prompts_are_xtuner_style(tsv):
    df = read_benchmark(tsv)
    prompts = {p.key: p.text for p in build_prompts(df)}
    assert prompts[241] == ('<image>\nLook "closely".\nThen answer.\nWhat animal is it?\nA. a cat\nB. a dog\nC. a bird\n'
                            "D. a fish\nAnswer with the option's letter from the given choices directly.")
    assert prompts[250] == "<image>\nIs it red?\nA. yes\nB. no\nAnswer with the option's letter from the given choices directly."
    assert prompts[270].endswith("B. 蓝色\n请直接回答选项字母。")
    assert mcq_text("q", {"A": "x"}, None) == "q\nA. x\nAnswer with the option's letter from the given choices directly."


def test_bad_rows_are_named(tmp_path):
    base = pd.DataFrame(rows())
    broken = base.copy()
    broken.loc[broken["index"] == 250, "image"] = "!!not base64!!" * 10
    broken.to_csv(tmp_path / "a.tsv", sep="\t", index=False)
    with pytest.raises(BenchmarkError, match="index 250: image is not valid base64"):
        build_prompts(read_benchmark(tmp_path / "a.tsv"))
    dangling = base.copy()
    dangling.loc[dangling["index"] == 1000241, "image"] = "999"
    dangling.to_csv(tmp_path / "b.tsv", sep="\t", index=False)
    with pytest.raises(BenchmarkError, match="index 1000241: image points at index 999, which is not in the file"):
        build_prompts(read_benchmark(tmp_path / "b.tsv"))
    base.drop(columns=["question"]).to_csv(tmp_path / "c.tsv", sep="\t", index=False)
    with pytest.raises(BenchmarkError, match=r"missing column\(s\) \['question'\]"):
        read_benchmark(tmp_path / "c.tsv")


def answers(df):
    return {int(i): df.loc[i, "answer"] for i in df.index}


def test_circular_and_vanilla_scores_with_acc_csv(tsv, tmp_path):
    df = read_benchmark(tsv)
    pred = answers(df)
    pred[2000241] = "A" if df.loc[2000241, "answer"] != "A" else "B"  # Q1: one rotation wrong
    pred[1000250] = "I cannot tell"  # Q2: one rotation unparsed, the other right -> 0 without a judge
    pred[280] = "category"  # text inference: both "cat" and "category" occur -> unparsed -> wrong
    summary = write_results(df, pred, tmp_path, "MMBench_DEV_EN", "vlmevalkit-head", {"template": "phi3_chat"})
    # groups: Q1 0, Q2 0, Q3 1, Q4 1, Q5 0 -> 2 of 5
    assert summary["circular"]["Overall"] == pytest.approx(2 / 5)
    assert summary["vanilla_0"]["Overall"] == pytest.approx(4 / 5)  # main rows: only 280 wrong
    assert summary["vanilla_all"]["Overall"] == pytest.approx(8 / 11)
    assert summary["extraction"]["vlmevalkit-head"]["unparsed"] == 2
    # beyond VLMEvalKit: rotation k's rows are the k-th shift (Q1 has 4, Q3 3, Q2 2; Q4 and Q5 only main rows)
    assert summary["per_rotation"] == pytest.approx({"0": 4 / 5, "1": 2 / 3, "2": 1 / 2, "3": 1.0})
    assert summary["consistency_gap"] == pytest.approx(8 / 11 - 2 / 5)
    assert summary["circular_by_source"] == {"scienceqa": 0.0, "x": 0.5}  # Q1 | Q2..Q5
    low, high = summary["circular_ci95"]
    assert 0 <= low < 0.4 < high <= 1 and summary["circular_ci95"] == score_of(df, pred)["circular_ci95"]  # seeded
    with open(tmp_path / "MMBench_DEV_EN_acc.csv", newline="") as f:
        header, values = list(csv.reader(f))
    assert header == ["split", "Overall", "CP", "FP-C", "FP-S", "attribute_recognition", "image_quality", "image_scene", "ocr"]
    assert (tmp_path / "MMBench_DEV_EN_acc.csv").read_text().startswith('"split","Overall",')
    assert values[0] == "dev" and float(values[1]) == pytest.approx(0.4)
    xt = json.loads((tmp_path / "mmbench_result.json").read_text())
    assert set(xt) == {"Average", "CP", "FP-C", "FP-S"}
    table = pd.read_excel(tmp_path / "predictions.xlsx")
    assert len(table) == 11 and "image" not in table.columns and {"prediction", "extracted", "hit"} <= set(table.columns)


def score_of(df, pred):
    from llavaflow.eval.score import score

    table = df.drop(columns=["image"]).reset_index(drop=True)
    choose = get_policy("vlmevalkit-head")[1]
    return score(table.assign(extracted=[choose(pred[int(r["index"])], options(r, option_letters(df)))
                                         for _, r in table.iterrows()]))


def test_verbose_quirk_is_a_flag_and_policy_differences_are_listed(tsv, tmp_path):
    """VLMEvalKit's VERBOSE quirk (more than 3 words with the word "A": unparsed) is off unless asked for, and
    recorded; each policy's rows that differ from the chosen one are counted and named."""
    df = read_benchmark(tsv)
    pred = {**answers(df), 270: "A is right here"}  # index 270's answer is A
    plain = write_results(df, pred, tmp_path / "plain", "MMBench_DEV_EN", "vlmevalkit-head", {})
    assert plain["verbose_quirk"] is False and plain["circular"]["Overall"] == 1.0
    assert plain["extraction"]["xtuner-regex"]["differs_from_vlmevalkit-head"] == 0
    quirk = write_results(df, pred, tmp_path / "quirk", "MMBench_DEV_EN", "vlmevalkit-head", {}, verbose_quirk=True)
    assert quirk["verbose_quirk"] is True and quirk["circular"]["Overall"] == pytest.approx(4 / 5)
    assert quirk["extraction"]["xtuner-regex"] == {"unparsed": 0, "Z": 0, "differs_from_vlmevalkit-head": 1,
                                                   "differs_at": [270]}


def test_missing_rotation_shrinks_the_group_and_unknown_rows_are_dropped(tsv, tmp_path):
    from llavaflow.eval.score import score

    df = read_benchmark(tsv)
    table = df.drop(columns=["image"]).reset_index(drop=True)
    table = table[table["index"] != 3000241].assign(extracted=lambda t: t["answer"])
    s = score(table)
    assert s["circular"]["Overall"] == 1.0 and s["questions"] == 5 and s["rows"] == 10

    # A prediction for an index the TSV does not have is not scored, nor written out.
    summary = write_results(df, {**answers(df), 4242: "A"}, tmp_path, "MMBench_DEV_EN", "vlmevalkit-head", {})
    written = pd.read_csv(tmp_path / "predictions.csv")
    assert summary["rows"] == len(written) == len(df) == 11 and 4242 not in set(written["index"])
    assert summary["circular"]["Overall"] == 1.0


def test_test_split_is_not_scored(tsv, tmp_path):
    df = read_benchmark(tsv).drop(columns=["answer"])
    summary = write_results(df, {int(i): "A" for i in df.index}, tmp_path, "MMBench_TEST_EN", "vlmevalkit-head", {})
    assert summary["scorable"] is False and "circular" not in summary
    sub = pd.read_excel(tmp_path / "predictions.xlsx")
    assert len(sub) == len(df) and "prediction" in sub.columns
    assert not (tmp_path / "MMBench_TEST_EN_acc.csv").exists()


def test_upper_case_l2_header_is_read(tsv, tmp_path):
    df = pd.read_csv(tsv, sep="\t").rename(columns={"l2-category": "L2-category"})
    df.to_csv(tmp_path / "x.tsv", sep="\t", index=False)
    assert "l2-category" in read_benchmark(tmp_path / "x.tsv").columns


def test_two_ranks_shard_the_rows_and_merge_like_one_process(converted, tiny, tmp_path):
    """torchrun with 2 CPU ranks: the merged predictions equal a single process's, row for row."""
    import sys

    from conftest import run

    tsv = tiny["mmbench"] / "MMBench_DEV_EN.tsv"
    args = [str(converted["out"] / "iter_xtuner"), "--data-path", str(tsv), "--max-new-tokens", "6", "--batch-size", "4"]
    run([sys.executable, "-m", "llavaflow.cli", "mmbench", *args, "--work-dir", str(tmp_path / "one")])
    run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "llavaflow.cli", "mmbench", *args, "--work-dir", str(tmp_path / "two")],
        env={"OMP_NUM_THREADS": "1"})
    one = pd.read_csv(tmp_path / "one" / "predictions.csv")
    two = pd.read_csv(tmp_path / "two" / "predictions.csv")
    assert len(list((tmp_path / "two" / "cache").glob("predictions.rank*.jsonl"))) == 2
    assert one["index"].tolist() == two["index"].tolist()
    assert one["prediction"].astype(str).tolist() == two["prediction"].astype(str).tolist()
    # a rerun reuses every cached row: nothing is predicted again
    before = (tmp_path / "one" / "cache" / "predictions.rank0.jsonl").read_text()
    run([sys.executable, "-m", "llavaflow.cli", "mmbench", *args, "--work-dir", str(tmp_path / "one")])
    assert (tmp_path / "one" / "cache" / "predictions.rank0.jsonl").read_text() == before


def test_cached_predictions_are_reused_only_for_the_same_code_dtype_and_batching(converted, tiny, tmp_path):
    """The prediction cache outlives a run (undeclared, so a killed job resumes); a rerun reuses it only while
    everything a prediction depends on is unchanged. The rule reruns when llavaflow's eval code changes, and
    then predicted nothing until 2026-12-01: every row was cached."""
    import sys

    from conftest import run

    from llavaflow.identity import EVAL_CODE, code_hash

    df = pd.read_csv(tiny["mmbench"] / "MMBench_DEV_EN.tsv", sep="\t")
    df[df["index"] < 1_000_000].head(6).to_csv(tmp_path / "d.tsv", sep="\t", index=False)  # main rows hold the images
    work = tmp_path / "work"
    cmd = [sys.executable, "-m", "llavaflow.cli", "mmbench", str(converted["out"] / "iter_xtuner"), "--data-path",
           str(tmp_path / "d.tsv"), "--max-new-tokens", "4", "--batch-size", "4", "--work-dir", str(work)]
    run(cmd)
    cache, stamp = work / "cache" / "predictions.rank0.jsonl", work / "cache" / "settings.json"
    marked = "".join(json.dumps({**json.loads(line), "prediction": "cached"}) + "\n" for line in cache.read_text().splitlines())

    def reused(*extra) -> bool:
        cache.write_text(marked)
        run(cmd + list(extra))
        return set(pd.read_csv(work / "predictions.csv")["prediction"]) == {"cached"}

    assert reused()
    settings = json.loads(stamp.read_text())
    assert settings["code"] == code_hash(*EVAL_CODE) and settings["dtype"] == "float32"
    assert json.loads((work / "summary.json").read_text())["dtype"] == "float32"  # the scores say what made them
    stamp.write_text(json.dumps({**settings, "code": "0" * 12}))  # as an older llavaflow stamped it
    assert not reused()
    assert not reused("--torch-dtype", "bf16")
    assert not reused("--torch-dtype", "bf16", "--batch-size", "2")
    stamp.write_text('{"templ')  # torn by a kill mid-write: predicted afresh, not a JSONDecodeError
    assert not reused()


# ---- VLMEvalKit's _acc.csv layout, control characters, torn caches, bad input (issues 13 §5, 14) ----

SHARED = Path(__file__).resolve().parents[2] / "shared"
XTUNER = SHARED / "fixtures" / "xtuner-0.2.0"


def vlmevalkit_report_acc(df: pd.DataFrame) -> pd.DataFrame:
    """VLMEvalKit's report_acc (vlmeval/dataset/utils/multiple_choice.py) restated: one row per split, columns
    Overall, L2 abbreviations, categories; np.mean per split (NaN where a split has none of a category)."""
    from llavaflow.eval.score import L2_ABBREVIATIONS

    res = {"split": sorted(set(df["split"]))}
    res["Overall"] = [df[df["split"] == sp]["hit"].mean() for sp in res["split"]]
    for group in ("l2-category", "category"):
        for ab in sorted(set(df[group])):
            sub = df[df[group] == ab]
            res[L2_ABBREVIATIONS.get(ab, ab)] = [sub[sub["split"] == sp]["hit"].mean() for sp in res["split"]]
    return pd.DataFrame(res)


def test_acc_csv_has_one_row_per_split_in_vlmevalkits_bytes(tsv, tmp_path):
    from llavaflow.eval.score import circular_hits

    df = pd.read_csv(tsv, sep="\t")
    df.loc[df["index"] % 1_000_000 == 250, "split"] = "test"  # Q2 (both rotations) in another split
    df.loc[df["index"] % 1_000_000 == 241, "split"] = "test"
    df.to_csv(tmp_path / "mixed.tsv", sep="\t", index=False)
    data = read_benchmark(tmp_path / "mixed.tsv")
    pred = answers(data)
    pred[2000241] = "I cannot tell"
    summary = write_results(data, pred, tmp_path, "mixed", "vlmevalkit-head", {})
    got = (tmp_path / "mixed_acc.csv").read_bytes()
    assert b"\r" not in got and got.count(b"\n") == 3  # header + dev + test, LF only
    table = data.drop(columns=["image"]).reset_index(drop=True).assign(prediction=lambda t: t["index"].map(pred))
    table["extracted"] = [get_policy("vlmevalkit-head")[1](p, options(r, option_letters(data)))
                          for p, (_, r) in zip(table["prediction"], data.iterrows())]
    expected = vlmevalkit_report_acc(circular_hits(table)).to_csv(index=False, quoting=csv.QUOTE_ALL)
    assert got == expected.encode()  # what pandas.to_csv writes for VLMEvalKit: same bytes, NaN as ""
    assert [r["split"] for r in summary["acc_rows"]] == ["dev", "test"]
    assert None in summary["acc_rows"][1].values()  # a category with no question in the test split
    json.loads((tmp_path / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert summary["circular"]["split"] == "all"


def test_control_character_in_xtuner_predictions_does_not_break_the_xlsx(tmp_path):
    """xtuner 0.2.0's real 32-token predictions hold \\x07, on which its own xlsx writer crashes."""
    data = read_benchmark(XTUNER / "data" / "mmbench" / "tiny_mmbench_dev.tsv")
    rows = json.loads((XTUNER / "mmbench" / "xtuner_32tok_fp32_predictions.json").read_text())
    pred = {int(r["index"]): r["prediction"] for r in rows}
    assert any("\x07" in p for p in pred.values())
    summary = write_results(data, pred, tmp_path, "tiny_mmbench_dev", "vlmevalkit-head", {})
    assert json.loads((tmp_path / "summary.json").read_text())["rows"] == 4
    assert summary["xlsx_replaced_characters"] == {i: pred[i].count("\x07") for i in pred}
    xlsx = pd.read_excel(tmp_path / "predictions.xlsx")
    assert xlsx["prediction"].tolist() == [pred[i].replace("\x07", "\ufffd") for i in xlsx["index"]]
    raw = pd.read_csv(tmp_path / "predictions.csv")
    assert raw["prediction"].tolist() == [pred[i] for i in raw["index"]]  # the raw text, kept


class ScriptedPredictor:
    """Stands in for the model: answers a fixed text per row and records which rows it was asked."""

    def __init__(self):
        self.asked = []

    def predict_batch(self, batch, fast=True):
        self.asked += [p.key for p in batch]
        return {p.key: f"answer {p.key}" for p in batch}


def test_torn_last_cache_line_is_cut_off_and_its_row_redone(tsv, tmp_path):
    from llavaflow.eval.mmbench import _load_cache, predict_all

    prompts = build_prompts(read_benchmark(tsv))
    keys = [p.key for p in prompts]
    cache = tmp_path / "predictions.rank0.jsonl"
    good = "".join(json.dumps({"index": k, "prediction": f"answer {k}"}) + "\n" for k in keys[:4])
    cache.write_text(good + '{"index": %d, "predic' % keys[4])  # a crash in the middle of a write
    predictor = ScriptedPredictor()
    predict_all(predictor, prompts, cache, batch_size=3, fast=True)
    assert predictor.asked == keys[4:]  # the torn row and every later one; the four complete ones are kept
    assert _load_cache(cache) == {k: f"answer {k}" for k in keys}
    assert cache.read_text().endswith("\n") and len(cache.read_text().splitlines()) == len(keys)
    predict_all(predictor, prompts, cache, batch_size=3, fast=True)  # a rerun asks nothing
    assert predictor.asked == keys[4:]


def write_tsv(df, path):
    df.to_csv(path, sep="\t", index=False)
    return path


def test_file_cut_after_the_image_column_is_refused(tmp_path):
    text = write_tsv(pd.DataFrame(rows()), tmp_path / "full.tsv").read_text()
    last = text.rstrip("\n").split("\n")[-1]
    cut = text[: len(text) - len(last) - 1] + "\t".join(last.split("\t")[:10])  # up to and including image
    (tmp_path / "MMBench_DEV_EN.tsv").write_text(cut)
    with pytest.raises(BenchmarkError, match=r"MMBench_DEV_EN.tsv: line \d+ \(index 280\) has 10 of 14 fields and "
                                             r"ends after the 'image' column: the file is cut short"):
        read_benchmark(tmp_path / "MMBench_DEV_EN.tsv")
    (tmp_path / "mid.tsv").write_text(text[: text.index("Then answer.")])  # inside the quoted hint
    with pytest.raises(BenchmarkError, match=r"mid.tsv: cannot parse .*fetch it again"):
        read_benchmark(tmp_path / "mid.tsv")
    (tmp_path / "empty.tsv").write_text("")
    with pytest.raises(BenchmarkError, match="empty.tsv: the file is empty"):
        read_benchmark(tmp_path / "empty.tsv")


def test_row_without_options_is_refused(tmp_path):
    df = pd.DataFrame(rows())
    df.loc[df["index"] == 270, ["A", "B"]] = None
    with pytest.raises(BenchmarkError, match=r"x.tsv: index 270: no options"):
        read_benchmark(write_tsv(df, tmp_path / "x.tsv"))


def test_answer_outside_the_options_is_warned_counted_and_scored_as_a_miss(tmp_path, caplog):
    df = pd.DataFrame(rows())
    df.loc[df["index"] == 250, "answer"] = "C"  # a 2-option question
    df.loc[df["index"] == 280, "answer"] = "A"  # its option A is 'N/A', which pandas reads as missing
    data = read_benchmark(write_tsv(df, tmp_path / "MMBench_DEV_EN.tsv"))
    assert "2 row(s) whose answer is not one of their options (e.g. index 250, answer 'C')" in caplog.text
    summary = write_results(data, answers(data), tmp_path, "MMBench_DEV_EN", "vlmevalkit-head", {})
    assert summary["input_issues"] == {"answer_not_in_options": [250, 280]}
    assert summary["circular"]["Overall"] == pytest.approx(3 / 5)  # Q2 and Q5 can never be right


def test_dev_file_without_answers_is_treated_as_test_with_a_warning(tmp_path, caplog):
    df = pd.DataFrame(rows()).drop(columns=["answer"])
    data = read_benchmark(write_tsv(df, tmp_path / "MMBench_DEV_EN.tsv"))
    assert "MMBench_DEV_EN.tsv has no 'answer' column, but neither its name nor its split column says TEST" in caplog.text
    summary = write_results(data, answers_none(data), tmp_path, "MMBench_DEV_EN", "vlmevalkit-head", {})
    assert summary["scorable"] is False and summary["input_issues"] == {"no_answer_column_not_named_test": True}
    caplog.clear()
    test = read_benchmark(write_tsv(df.assign(split="test"), tmp_path / "MMBench_TEST_EN.tsv"))
    assert "no 'answer' column" not in caplog.text and test.attrs["input_issues"] == {}
    partial = pd.DataFrame(rows())
    partial.loc[partial["index"] == 260, "answer"] = None
    data = read_benchmark(write_tsv(partial, tmp_path / "p.tsv"))
    summary = write_results(data, answers_none(data), tmp_path, "p", "vlmevalkit-head", {})
    assert summary["scorable"] is False and summary["input_issues"] == {"rows_without_answer": [260]}


def answers_none(df):
    return {int(i): "A" for i in df.index}


def test_image_errors_name_the_file_and_row(tsv, tmp_path):
    from llavaflow.data.images import ImageError
    from llavaflow.eval.predict import prompt_pixels

    df = pd.DataFrame(rows())
    df.loc[df["index"] == 270, "image"] = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 80).decode()
    with pytest.raises(BenchmarkError, match=r"bad.tsv index 270: not a readable image"):  # before any prediction
        build_prompts(read_benchmark(write_tsv(df, tmp_path / "bad.tsv")))
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 64).convert("RGB").save(buf, format="JPEG")
    jpeg = buf.getvalue()
    df.loc[df["index"] == 270, "image"] = base64.b64encode(jpeg[: len(jpeg) * 3 // 4]).decode()  # a valid header, cut
    prompts = {p.key: p for p in build_prompts(read_benchmark(write_tsv(df, tmp_path / "cut.tsv")))}
    with pytest.raises(ImageError, match=r"cut.tsv index 270: not a readable image"):
        prompt_pixels([prompts[241], prompts[270]], lambda img: torch.zeros(3))


def test_rows_that_would_fail_mid_run_are_refused_before_it(tmp_path):
    """What used to pass the reading and fail after the predictions (or mid-run) is refused up front."""
    base = pd.DataFrame(rows())
    with pytest.raises(BenchmarkError, match=r"nocat.tsv: missing column\(s\) \['category'\]"):
        read_benchmark(write_tsv(base.drop(columns=["category"]), tmp_path / "nocat.tsv"))
    read_benchmark(write_tsv(base.drop(columns=["category", "answer"]), tmp_path / "MMBench_TEST_EN.tsv"))
    tagged = base.copy()
    tagged.loc[tagged["index"] == 270, "question"] = "What does <image> show?"
    with pytest.raises(BenchmarkError, match=r"tag.tsv: index 270: the question, hint or an option contains <image>"):
        build_prompts(read_benchmark(write_tsv(tagged, tmp_path / "tag.tsv")))
    fractional = base.astype({"index": float})
    fractional.loc[fractional["index"] == 270, "index"] = 270.5
    with pytest.raises(BenchmarkError, match=r"frac.tsv: row \d+: index 270.5 is not an integer"):
        read_benchmark(write_tsv(fractional, tmp_path / "frac.tsv"))


def test_wrapped_base64_and_blank_lines_read_as_in_vlmevalkit(tmp_path):
    df = pd.DataFrame(rows())
    plain = df.loc[df["index"] == 270, "image"].item()
    df.loc[df["index"] == 270, "image"] = "\n".join(plain[i : i + 76] for i in range(0, len(plain), 76))
    text = write_tsv(df, tmp_path / "w.tsv").read_text()
    (tmp_path / "w.tsv").write_text(text.replace("\n", "\n   \n", 1))  # a whitespace-only line after the header
    data = read_benchmark(tmp_path / "w.tsv")
    assert len(data) == len(df) and image_bytes(data, 270) == base64.b64decode(plain)
    prompts = {p.key: p for p in build_prompts(data)}
    assert prompts[1000241].image is prompts[241].image  # circular copies share their main row's bytes


def test_results_are_replaced_whole_and_formula_like_text_stays_text(tsv, tmp_path):
    from llavaflow.report import ReportError, mmbench_table

    data, out = read_benchmark(tsv), tmp_path / "out"
    out.mkdir()
    write_results(data, {**answers(data), 241: "=B"}, out, "MMBench_DEV_EN", "vlmevalkit-head", {})
    xlsx = pd.read_excel(out / "predictions.xlsx").set_index("index")
    assert xlsx.loc[241, "prediction"] == "=B"
    assert sorted(p.name for p in out.iterdir()) == ["MMBench_DEV_EN_acc.csv", "mmbench_result.json",
                                                          "predictions.csv", "predictions.xlsx", "summary.json"]
    (out / "summary.json").write_text('{"dataset": "MMBench_DEV_EN", "ro')  # a torn file
    with pytest.raises(ReportError, match=r"summary.json: not a readable evaluation summary"):
        mmbench_table([out / "summary.json"])


def test_a_bad_setting_or_another_datasets_work_dir_is_refused_before_the_cache_is_touched(tsv, tmp_path):
    """A template typo or a zero batch size used to clear the prediction cache and then fail; a work dir holding
    another dataset's results, or result files of someone else's, used to be written over."""
    from llavaflow.eval.mmbench import evaluate

    work = tmp_path / "work"
    (work / "cache").mkdir(parents=True)
    cached = '{"index": 241, "prediction": "B"}\n'
    (work / "cache" / "predictions.rank0.jsonl").write_text(cached)
    (work / "cache" / "settings.json").write_text("{}")
    for kwargs, expected in (({"template": "phi3_chatt"}, "unknown prompt template 'phi3_chatt'"),
                             ({"batch_size": 0}, "batch_size must be at least 1")):
        with pytest.raises(ValueError, match=expected):
            evaluate(None, None, None, tsv, work, **kwargs)
    (work / "summary.json").write_text(json.dumps({"dataset": "CCBench"}))
    with pytest.raises(ValueError, match=r"work: holds the results of CCBench, not MMBench_DEV_EN; give each dataset"):
        evaluate(None, None, None, tsv, work)
    assert (work / "cache" / "predictions.rank0.jsonl").read_text() == cached
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "predictions.csv").write_text("my results")
    with pytest.raises(ValueError, match=r"theirs: holds predictions.csv, which no evaluation of ours wrote"):
        evaluate(None, None, None, tsv, theirs)
    assert (theirs / "predictions.csv").read_text() == "my results"


def test_a_folder_or_another_encoding_as_the_benchmark_is_named(tsv, tmp_path):
    import argparse

    from llavaflow.cli import _existing_file

    with pytest.raises(argparse.ArgumentTypeError, match="is a folder, not a file"):  # --data-path's type
        _existing_file(str(tmp_path))
    utf16 = tmp_path / "MMBench_DEV_EN.tsv"
    utf16.write_text(tsv.read_text(), encoding="utf-16")
    with pytest.raises(BenchmarkError, match=r"MMBench_DEV_EN.tsv: not UTF-8 text at byte 0 .*is it a TSV"):
        read_benchmark(utf16)
