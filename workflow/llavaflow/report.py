"""The run's summary tables, from the evaluations' summary.json files."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd


def mmbench_table(summaries: list[str | Path]) -> pd.DataFrame:
    rows = []
    for path in summaries:
        s = json.loads(Path(path).read_text())
        row = {"dataset": s["dataset"], "rows": s["rows"], "policy": s["policy"], "template": s.get("template")}
        for mode in ("circular", "vanilla_0", "vanilla_all"):
            row[mode] = round(s[mode]["Overall"], 4) if mode in s else None
        row["unparsed"] = s["extraction"][s["policy"]]["unparsed"]
        row["note"] = s.get("note", "")
        rows.append(row)
    return pd.DataFrame(rows)


def write_mmbench_table(summaries: list[str | Path], out: str | Path) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    mmbench_table(summaries).to_csv(out, sep="\t", index=False)
