"""What makes a result: the code that computes it and the inputs it reads.

The workflow's rules carry these as params (a real edit reruns the stage), and the stages that keep state
across attempts (a training work dir, an evaluation's prediction cache) keep it only while both are unchanged,
so a rerun for new code or new inputs never continues from what the old ones produced.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent  # the installed llavaflow that the jobs run

# The package's modules each stage's result depends on. Training leaves out its experiment-tracker adapters and the
# extension-build lock: editing them must not rerun (and so restart) a days-long training.
TRAIN_CODE = ("train/loop.py", "train/recipe.py", "train/schedule.py", "train/resume_state.py", "train/memory.py",
              "train/metrics.py", "train/flops.py", "model", "data", "template.py", "constants.py", "distributed.py")
CONVERT_CODE = ("convert", "model", "template.py", "constants.py")
EVAL_CODE = ("eval", "model", "data", "template.py", "constants.py", "distributed.py")
CHECK_CODE = ("data", "template.py", "constants.py")  # the data check reads and decodes as training does
ASSETS_CODE = ("tiny.py", "eval/prompt.py", "constants.py")
REPORT_CODE = ("report.py", "eval/score.py")


def code_hash(*parts: str) -> str:
    """First 12 hex digits of the sha256 of the named llavaflow modules/packages (their sources, so touching a
    file changes nothing)."""
    h = hashlib.sha256()
    for part in parts:
        path = PACKAGE / part
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for f in files:
            h.update(str(f.relative_to(PACKAGE.parent)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


def path_fingerprint(path: str | Path) -> str:
    """Identity of a file or folder from the names, sizes and mtimes of its files (no reading: model folders
    hold gigabytes): rewritten, re-downloaded or re-converted, it is a new one."""
    path = Path(path)
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if f.is_file() and f.name != ".snakemake_timestamp":  # rewritten by `snakemake --touch`
            st = f.stat()
            h.update(f"{f.relative_to(path) if f != path else f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]
