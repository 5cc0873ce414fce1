"""Atomic publication: an output appears under its final name complete, or not at all.

Every writer of a finished artefact (converted folders, published training checkpoints, data-check
reports) goes through `atomic_output`, so a killed job never leaves a half-written output that a rerun
would take for done.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_output(out: str | Path, *, folder: bool = True):
    """Yield a temporary sibling of `out` (a new folder, or a file path to write); it is renamed to `out`
    when the block completes and removed when it raises."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    _remove(tmp)
    if folder:
        tmp.mkdir(parents=True)
    else:
        tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if out.is_dir() and not out.is_symlink():  # os.replace cannot replace a non-empty folder
        shutil.rmtree(out)
    os.replace(tmp, out)
