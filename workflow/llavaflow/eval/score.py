"""Scoring: circular and vanilla accuracy, per L2 and L3 category, in VLMEvalKit's and xtuner's layouts."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pandas as pd

L2_ABBREVIATIONS = {
    "attribute_reasoning": "AR", "coarse_perception": "CP",
    "finegrained_perception (cross-instance)": "FP-C", "finegrained_perception (instance-level)": "FP-S",
    "logic_reasoning": "LR", "relation_reasoning": "RR",
}
CCBENCH_PRETTY = {
    "calligraphy_painting": "Calligraphy Painting", "cultural_relic": "Cultural Relic",
    "food_clothes": "Food & Clothes", "historical_figure": "Historical Figure",
    "scenery_building": "Scenery & Building", "sketch_reasoning": "Sketch Reasoning",
    "traditional_show": "Traditional Show",
}


def scorable(df: pd.DataFrame) -> bool:
    return "answer" in df.columns and not df["answer"].isna().any()


def circular_hits(table: pd.DataFrame) -> pd.DataFrame:
    """One row per main question (index < 1e6) present: hit = every present rotation answered right."""
    t = table.assign(g_index=table["index"] % 1_000_000, ok=table["extracted"] == table["answer"])
    mains = t[t["index"] == t["g_index"]].set_index("g_index")
    hits = t.groupby("g_index")["ok"].all()
    return mains.assign(hit=hits.reindex(mains.index).astype(int)).reset_index()


def _mean(hits: pd.Series) -> float | None:
    # None where there is nothing to average: VLMEvalKit's np.mean of nothing is NaN, which its csv writes
    # as an empty cell (and which is not valid JSON in summary.json).
    return float(hits.mean()) if len(hits) else None


def breakdown(rows: pd.DataFrame, split: str, l2_names=None, categories=None) -> dict:
    """{split, Overall, <L2 abbreviations>, <categories>} as VLMEvalKit's _acc.csv row.

    The column set comes from the whole file (l2_names, categories), so every split's row has the same
    columns; a category absent from this split is None (NaN in VLMEvalKit's report_acc).
    """
    if l2_names is None and "l2-category" in rows.columns:
        l2_names = sorted(rows["l2-category"].dropna().unique())
    if categories is None:
        categories = sorted(rows["category"].dropna().unique())
    out = {"split": split, "Overall": _mean(rows["hit"])}
    for name in l2_names or []:
        out[L2_ABBREVIATIONS.get(name, name)] = _mean(rows.loc[rows["l2-category"] == name, "hit"])
    for name in categories:
        out[name] = _mean(rows.loc[rows["category"] == name, "hit"])
    return out


def splits_of(table: pd.DataFrame) -> pd.Series:
    """Each row's split; 'none' without a split column (CCBench) or for an empty cell, as VLMEvalKit."""
    if "split" not in table.columns:
        return pd.Series("none", index=table.index)
    return table["split"].fillna("none").astype(str)


def per_split(rows: pd.DataFrame) -> list[dict]:
    """One breakdown per distinct split value, sorted (VLMEvalKit's order comes from a set: not stable)."""
    split = splits_of(rows)
    l2 = sorted(rows["l2-category"].dropna().unique()) if "l2-category" in rows.columns else None
    cats = sorted(rows["category"].dropna().unique())
    return [breakdown(rows[split == s], s, l2, cats) for s in sorted(split.unique())]


def score(table: pd.DataFrame) -> dict:
    """table: every predicted row with index, answer, category[, l2-category, split], extracted.

    `circular`, `vanilla_0` and `vanilla_all` pool every split (their `split` names it, or is 'all'
    when there are several); `acc_rows` holds the circular breakdown of each split, as in `_acc.csv`.
    """
    circ = circular_hits(table)
    names = sorted(splits_of(table).unique())
    split = names[0] if len(names) == 1 else "all"
    vanilla_all = table.assign(hit=(table["extracted"] == table["answer"]).astype(int))
    vanilla_0 = vanilla_all[vanilla_all["index"] < 1_000_000]
    scores = {
        "circular": breakdown(circ, split), "vanilla_0": breakdown(vanilla_0, split),
        "vanilla_all": breakdown(vanilla_all, split), "questions": int(len(circ)), "rows": int(len(table)),
        "acc_rows": per_split(circ),
    }
    # Beyond VLMEvalKit (mmbench.md §11.5): how much circular evaluation costs and how sure the figure is.
    overall = scores["vanilla_all"]["Overall"], scores["circular"]["Overall"]
    scores["consistency_gap"] = overall[0] - overall[1] if None not in overall else None
    rotation = vanilla_all["index"] // 1_000_000  # 0: the main rows, k: the k-th shift of the options
    scores["per_rotation"] = {str(int(k)): float(v) for k, v in vanilla_all.groupby(rotation)["hit"].mean().items()}
    scores["circular_ci95"] = bootstrap_ci(circ["hit"].to_numpy())
    if "source" in circ.columns:
        scores["circular_by_source"] = {str(k): float(v) for k, v in circ.groupby("source")["hit"].mean().items()}
    return scores


def bootstrap_ci(hits: np.ndarray, samples: int = 1000, level: float = 0.95, seed: int = 0) -> list[float] | None:
    """Percentile bootstrap interval of the mean over questions (resampled with replacement, a fixed seed so
    that a rerun reports the same interval); None without questions."""
    if not len(hits):
        return None
    rng = np.random.default_rng(seed)
    means = np.asarray(hits, dtype=float)[rng.integers(0, len(hits), size=(samples, len(hits)))].mean(axis=1)
    return [float(q) for q in np.quantile(means, [(1 - level) / 2, (1 + level) / 2])]


def write_acc_csv(path: Path, rows: list[dict]) -> None:
    """VLMEvalKit `_acc.csv` as its pandas to_csv writes it: QUOTE_ALL, LF line ends, NaN (None) as "", fractions."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, quoting=csv.QUOTE_ALL, lineterminator="\n")
        w.writerow(list(rows[0]))
        for row in rows:
            w.writerow(["" if v is None else v for v in row.values()])


def xtuner_result(circular: dict, has_l2: bool) -> dict:
    """xtuner mmbench_result.json: Average, then L2 abbreviations (or prettified CCBench categories)."""
    out = {"Average": circular["Overall"]}
    for k, v in circular.items():
        if k in ("split", "Overall"):
            continue
        if has_l2 and k in L2_ABBREVIATIONS.values():
            out[k] = v
        elif not has_l2:
            out[CCBENCH_PRETTY.get(k, k)] = v
    return out
