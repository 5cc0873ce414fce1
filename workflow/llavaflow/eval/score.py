"""Scoring: circular and vanilla accuracy, per L2 and L3 category, in VLMEvalKit's and xtuner's layouts."""

from __future__ import annotations

import csv
from pathlib import Path

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


def breakdown(rows: pd.DataFrame, split: str) -> dict:
    """{split, Overall, <L2 abbreviations>, <categories>} as VLMEvalKit's _acc.csv row."""
    out = {"split": split, "Overall": rows["hit"].mean()}
    if "l2-category" in rows.columns:
        for name in sorted(rows["l2-category"].dropna().unique()):
            out[L2_ABBREVIATIONS.get(name, name)] = rows.loc[rows["l2-category"] == name, "hit"].mean()
    for name in sorted(rows["category"].dropna().unique()):
        out[name] = rows.loc[rows["category"] == name, "hit"].mean()
    return out


def score(table: pd.DataFrame) -> dict:
    """table: every predicted row with index, answer, category[, l2-category, split], extracted."""
    circ = circular_hits(table)
    split = str(table["split"].iloc[0]) if "split" in table.columns and table["split"].notna().all() else "none"
    vanilla_all = table.assign(hit=(table["extracted"] == table["answer"]).astype(int))
    vanilla_0 = vanilla_all[vanilla_all["index"] < 1_000_000]
    return {
        "circular": breakdown(circ, split), "vanilla_0": breakdown(vanilla_0, split),
        "vanilla_all": breakdown(vanilla_all, split), "questions": int(len(circ)), "rows": int(len(table)),
    }


def write_acc_csv(path: Path, row: dict) -> None:
    """VLMEvalKit `_acc.csv`: QUOTE_ALL, split, Overall, L2 abbreviations, categories; fractions."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, quoting=csv.QUOTE_ALL)
        w.writerow(list(row))
        w.writerow(list(row.values()))


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
