"""MMBench reading, prompts and scoring on synthetic TSVs covering the edge cases of real MMBench files."""

import base64
import csv
import io
import json

import pandas as pd
import pytest
from PIL import Image

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
    with open(tmp_path / "MMBench_DEV_EN_acc.csv", newline="") as f:
        header, values = list(csv.reader(f))
    assert header == ["split", "Overall", "CP", "FP-C", "FP-S", "attribute_recognition", "image_quality", "image_scene", "ocr"]
    assert (tmp_path / "MMBench_DEV_EN_acc.csv").read_text().startswith('"split","Overall",')
    assert values[0] == "dev" and float(values[1]) == pytest.approx(0.4)
    xt = json.loads((tmp_path / "mmbench_result.json").read_text())
    assert set(xt) == {"Average", "CP", "FP-C", "FP-S"}
    table = pd.read_excel(tmp_path / "predictions.xlsx")
    assert len(table) == 11 and "image" not in table.columns and {"prediction", "extracted", "hit"} <= set(table.columns)


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
