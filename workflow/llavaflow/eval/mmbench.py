"""MMBench / CCBench evaluation: read, prompt, predict (sharded over ranks, resumable), extract, score."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import pandas as pd
import torch
from openpyxl.cell.cell import ILLEGAL_CHARACTERS_RE
from tqdm import tqdm

from ..atomic import atomic_output
from ..constants import DEFAULT_IMAGE_TOKEN
from ..identity import EVAL_CODE, code_hash
from ..template import get_template
from .extract import DEFAULT_POLICY, get_policy, policies
from .mmbench_data import (BenchmarkError, check_image_header, image_bytes, image_row, option_letters, options,
                           read_benchmark)
from .predict import Predictor, Prompt
from .prompt import mcq_text
from .score import scorable, score, write_acc_csv, xtuner_result

log = logging.getLogger(__name__)


def md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _stamped(stamp: Path) -> dict | None:
    """The settings the cache was made with; None when absent or unreadable (then nothing cached is reused)."""
    try:
        return json.loads(stamp.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def build_prompts(df: pd.DataFrame) -> list[Prompt]:
    """One prompt per row; every image is decoded from base64 and its header checked up front, once per
    row that holds one (its circular copies point at it and share the bytes), so a bad row fails before
    any prediction."""
    letters = option_letters(df)
    path = df.attrs.get("path", "benchmark")
    images: dict[int, bytes] = {}
    prompts = []
    for idx, row in df.iterrows():
        hint = row["hint"] if "hint" in df.columns and not pd.isna(row["hint"]) else None
        text = DEFAULT_IMAGE_TOKEN + "\n" + mcq_text(str(row["question"]), options(row, letters), hint)
        if text.count(DEFAULT_IMAGE_TOKEN) > 1:  # the prompt's own image goes there: xtuner refuses this row too
            raise BenchmarkError(f"{path}: index {idx}: the question, hint or an option contains {DEFAULT_IMAGE_TOKEN}")
        source = image_row(df, idx)
        if source not in images:
            images[source] = image_bytes(df, source)
            check_image_header(images[source], f"{path} index {source}")
        prompts.append(Prompt(int(idx), text, images[source], f"{path} index {idx}"))
    return prompts


def _load_cache(path: Path, repair: bool = False) -> dict[int, str]:
    """The predictions in a cache file. A line that does not parse (what a crash mid-write leaves, at the
    end) is dropped and its row is predicted again; with repair, the file is rewritten without it, so that
    new lines are not appended after a torn one."""
    if not path.exists():
        return {}
    text = path.read_text(encoding="utf-8")
    done, good, torn = {}, [], 0
    for line in text.splitlines():
        try:
            rec = json.loads(line)
            done[int(rec["index"])] = rec["prediction"]
            good.append(line)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            torn += 1
    complete = not text or text.endswith("\n")
    if (torn or not complete) and repair:
        log.warning("%s: %d unreadable line(s) dropped (an interrupted write); their rows are predicted again",
                    path, torn)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(ln + "\n" for ln in good), encoding="utf-8")
        os.replace(tmp, path)
    return done


def predict_all(predictor: Predictor, prompts: list[Prompt], cache: Path, batch_size: int, fast: bool,
                rank: int = 0, world: int = 1) -> None:
    """Predict this rank's share of the rows, appending to its cache file; rows already there are skipped."""
    done = _load_cache(cache, repair=True)
    mine = [p for i, p in enumerate(prompts) if i % world == rank and p.key not in done]
    with open(cache, "a", encoding="utf-8") as f, tqdm(total=len(mine), disable=rank != 0, desc="mmbench") as bar:
        for start in range(0, len(mine), batch_size):
            batch = mine[start : start + batch_size]
            for key, text in predictor.predict_batch(batch, fast=fast).items():
                f.write(json.dumps({"index": key, "prediction": text}, ensure_ascii=False) + "\n")
            f.flush()
            bar.update(len(batch))


def evaluate(model, tokenizer, transform, tsv: str | Path, work_dir: str | Path, dataset: str | None = None,
             template: str = "phi3_chat", policy: str = DEFAULT_POLICY, batch_size: int = 8,
             max_new_tokens: int = 100, fast: bool = True, model_id: str = "", verbose_quirk: bool = False,
             overwrite: bool = False) -> dict | None:
    """Evaluate one benchmark file; writes predictions, scores and a summary to work_dir (rank 0).

    work_dir holds one dataset's results: one holding another dataset's, or result files that no
    evaluation of ours wrote, is refused unless `overwrite`."""
    tsv, work_dir = Path(tsv), Path(work_dir)
    dataset = dataset or tsv.stem
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    policy_name, _ = get_policy(policy)
    prompt_template = get_template(template)
    for name, value in (("batch_size", batch_size), ("max_new_tokens", max_new_tokens)):
        if value < 1:
            raise ValueError(f"{name} must be at least 1, got {value}")
    df = read_benchmark(tsv)
    prompts = build_prompts(df)
    _check_work_dir(work_dir, dataset, overwrite)  # all of the above before the cache could be cleared
    work_dir.mkdir(parents=True, exist_ok=True)
    # Everything a cached prediction depends on: new code, another dtype or batching predicts afresh.
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    settings = {"template": template, "max_new_tokens": max_new_tokens, "prompt_style": "xtuner", "tsv_md5": md5(tsv),
                "model": model_id, "dtype": dtype, "batch_size": batch_size, "fast": fast, "code": code_hash(*EVAL_CODE)}
    cache_dir = work_dir / "cache"
    cache_dir.mkdir(exist_ok=True)
    stamp = cache_dir / "settings.json"
    if rank == 0 and _stamped(stamp) != settings:
        for old in cache_dir.glob("predictions.rank*.jsonl"):
            old.unlink()  # cached predictions of other settings are not reused
        with atomic_output(stamp, folder=False, overwrite=True) as tmp:  # a torn stamp would block every rerun
            tmp.write_text(json.dumps(settings, sort_keys=True))
    if world > 1:
        torch.distributed.barrier()
    predictor = Predictor(model, tokenizer, transform, prompt_template, max_new_tokens)
    predict_all(predictor, prompts, cache_dir / f"predictions.rank{rank}.jsonl", batch_size, fast, rank, world)
    if world > 1:
        torch.distributed.barrier()
    if rank != 0:
        return None
    predictions = {}
    for f in sorted(cache_dir.glob("predictions.rank*.jsonl")):
        predictions.update(_load_cache(f))
    missing = [p.key for p in prompts if p.key not in predictions]
    if missing:
        raise RuntimeError(f"{len(missing)} rows have no prediction (e.g. index {missing[0]})")
    return write_results(df, predictions, work_dir, dataset, policy_name, settings, verbose_quirk)


RESULT_FILES = ("summary.json", "predictions.csv", "predictions.xlsx", "mmbench_result.json")


def _check_work_dir(work_dir: Path, dataset: str, overwrite: bool) -> None:
    if overwrite or not work_dir.is_dir():
        return
    summary = work_dir / "summary.json"
    if summary.exists():
        try:
            theirs = json.loads(summary.read_text()).get("dataset")
        except (json.JSONDecodeError, AttributeError):
            theirs = None
        if theirs != dataset:
            raise ValueError(f"{work_dir}: holds the results of {theirs or 'an unreadable summary.json'}, not {dataset}; "
                             "give each dataset its own --work-dir (or pass --overwrite)")
        return
    present = [name for name in RESULT_FILES if (work_dir / name).exists()]
    if present and not (work_dir / "cache" / "settings.json").exists():
        raise ValueError(f"{work_dir}: holds {', '.join(present)}, which no evaluation of ours wrote (no summary.json "
                         "or cache); choose another --work-dir (or pass --overwrite)")


def write_results(df: pd.DataFrame, predictions: dict[int, str], work_dir: Path, dataset: str, policy: str,
                  settings: dict, verbose_quirk: bool = False) -> dict:
    """Extract, score and write every result file, each atomically, summary.json last: a run killed while
    writing leaves the old summary (or none), never a torn one beside new tables."""
    letters = option_letters(df)
    table = df.drop(columns=["image"]).reset_index(drop=True)
    table["prediction"] = [predictions[int(i)] for i in table["index"]]
    by_policy = {name: [fn(p, options(row, letters)) for p, (_, row) in zip(table["prediction"], df.iterrows())]
                 for name, fn in policies(verbose_quirk).items()}
    table["extracted"] = by_policy[policy]
    counts = {}
    for name, extracted in by_policy.items():
        differs = [int(i) for i, e, chosen in zip(table["index"], extracted, by_policy[policy]) if e != chosen]
        counts[name] = {"unparsed": sum(e == "" for e in extracted), "Z": sum(e == "Z" for e in extracted),
                        f"differs_from_{policy}": len(differs), "differs_at": differs[:20]}  # the first 20 rows
    summary = {"dataset": dataset, "policy": policy, "verbose_quirk": verbose_quirk, **settings, "rows": len(table),
               "extraction": counts, "input_issues": df.attrs.get("input_issues", {})}
    if scorable(df):
        scores = score(table)
        summary.update(scores)
        with _replacing(work_dir / f"{dataset}_acc.csv") as tmp:
            write_acc_csv(tmp, scores["acc_rows"])
        has_l2 = "l2-category" in df.columns
        with _replacing(work_dir / "mmbench_result.json") as tmp:
            tmp.write_text(json.dumps(xtuner_result(scores["circular"], has_l2), indent=2))
        table["hit"] = (table["extracted"] == table["answer"]).astype(int)
    else:
        summary["scorable"] = False
        summary["note"] = ("no answers (TEST split, or rows without an answer: see input_issues): predictions "
                           "written for submission, no accuracy claimed")
    with _replacing(work_dir / "predictions.csv") as tmp:
        table.to_csv(tmp, index=False)  # the raw text, control characters included
    with _replacing(work_dir / "predictions.xlsx") as tmp:
        summary["xlsx_replaced_characters"] = write_xlsx(table, tmp)
    with _replacing(work_dir / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2, ensure_ascii=False, default=float))
    log.info("%s: %s", dataset, {k: summary[k]["Overall"] for k in ("circular", "vanilla_0", "vanilla_all") if k in summary})
    return summary


def _replacing(path: Path):
    """A result file of ours, replaced whole by a rerun."""
    return atomic_output(path, folder=False, overwrite=True)


def write_xlsx(table: pd.DataFrame, path: Path) -> dict:
    """The xlsx, with each control character the format cannot hold (\\x00-\\x08, \\x0b, \\x0c, \\x0e-\\x1f, e.g.
    the \\x07 in real xtuner output, on which xtuner's own writer crashes) replaced by U+FFFD; the csv keeps
    the raw text. Text starting with "=" is stored as text, not as a formula (which readers load as empty).
    Returns {index: count} of the rows changed."""
    changed = {}

    def clean(value, index):
        if isinstance(value, str) and ILLEGAL_CHARACTERS_RE.search(value):
            value, n = ILLEGAL_CHARACTERS_RE.subn("\ufffd", value)
            changed[int(index)] = changed.get(int(index), 0) + n
        return value

    safe = table.copy()
    for col in safe.columns:
        if not pd.api.types.is_numeric_dtype(safe[col]):
            safe[col] = [clean(v, i) for v, i in zip(safe[col], safe["index"])]
    if changed:
        log.warning("%s: %d control character(s) in %d row(s) (e.g. index %d) written as U+FFFD; predictions.csv "
                    "keeps the raw text", path, sum(changed.values()), len(changed), next(iter(changed)))
    with pd.ExcelWriter(path, engine="openpyxl") as writer:
        safe.to_excel(writer, index=False)
        for row in next(iter(writer.sheets.values())).iter_rows():
            for cell in row:
                if cell.data_type == "f":  # openpyxl takes any string starting with "=" for a formula
                    cell.data_type = "s"
    return changed
