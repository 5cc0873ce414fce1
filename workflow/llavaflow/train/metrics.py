"""Rank 0's record of a training run: metrics.jsonl, plus the experiment trackers of `report_to`.

One JSON row per log interval (and at each checkpoint): the loss averaged over the micro-iterations since
the previous row and over ranks, the lr and gradient norm at its last iteration, cumulative throughput.
The file is append-only and flushed per row; on resume, rows after the checkpoint (and a torn last line
left by a kill mid-write) are cut off, so those iterations are logged once, when they run again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .tracking import open_trackers


def cut_rows_after(path: Path, iteration: int) -> None:
    """Keep the rows of metrics.jsonl up to `iteration`; a torn last line is dropped with a note.

    A malformed row anywhere else is not ours to repair: a one-line error names it.
    """
    if not path.exists():
        return
    lines = path.read_text().splitlines()
    kept = []
    for n, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):
                print(f"{path}:{n}: torn last row (the run was killed while writing it) cut off", flush=True)
                break
            raise ValueError(f"{path}:{n}: malformed metrics row (not JSON): {line[:80]!r}") from None
        if row["iter"] <= iteration:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(ln + "\n" for ln in kept))
    os.replace(tmp, path)


class MetricLogger:
    """metrics.jsonl in the work dir and the trackers named by the recipe; a context manager."""

    def __init__(self, work_dir: Path, *, resume_at: int, report_to=(), params: dict | None = None,
                 run_name: str = "llavaflow"):
        self.path = work_dir / "metrics.jsonl"
        cut_rows_after(self.path, resume_at)
        self._file = open(self.path, "a")
        self._trackers = open_trackers(report_to, work_dir=work_dir, params=params or {}, run_name=run_name,
                                       resume_at=resume_at)

    def log(self, row: dict) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        step = row["iter"]
        scalars = {k: v for k, v in row.items() if k != "iter" and isinstance(v, (int, float))}
        for tracker in self._trackers:
            tracker.log(scalars, step)

    def close(self) -> None:
        self._file.close()
        for tracker in self._trackers:
            tracker.close()

    def __enter__(self) -> "MetricLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
