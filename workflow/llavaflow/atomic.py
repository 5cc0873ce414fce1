"""Atomic publication: an output appears under its final name complete, or not at all.

Every writer of a finished artefact (converted folders, published training checkpoints, data-check
reports) goes through `atomic_output`, so a killed job never leaves a half-written output that a rerun
would take for done, and never replaces data it did not create unless told to.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import shutil
from pathlib import Path

TMP_NAME = ".{name}.tmp-{pid}"
_TMP_RE = r"^\.{name}\.tmp-(\d+)$"


class OutputError(ValueError):
    """An output location that would destroy data we did not create."""


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Remove `.NAME.tmp-PID` siblings of `out` that a killed run of ours left: exactly our naming, and
    only when that PID is no longer running (nothing else is touched)."""
    out = Path(out)
    pattern = re.compile(_TMP_RE.format(name=re.escape(out.name)))
    removed = []
    for p in out.parent.glob(f".{glob.escape(out.name)}.tmp-*") if out.parent.is_dir() else []:
        m = pattern.match(p.name)
        if m and not p.is_symlink() and (int(m.group(1)) == os.getpid() or not _pid_alive(int(m.group(1)))):
            _remove(p)
            removed.append(p)
    return removed


def held_input(folder: Path, inputs):
    """The first of `inputs` that `folder` is or contains (replacing or moving the folder would take it along)."""
    target = Path(folder).resolve()
    for given in inputs:
        if given is not None:
            inp = Path(given).expanduser().resolve()
            if inp == target or target in inp.parents:
                return given
    return None


def check_output(out: Path, inputs=(), overwrite: bool = False) -> None:
    """Refuse, before anything is written, an output that would destroy data we did not create: an
    existing non-empty folder or a file (unless `overwrite`), and always one that is or holds an input."""
    out = Path(out)
    given = held_input(out, inputs)
    if given is not None:
        raise OutputError(f"{out}: the output is or contains the input {given}; "
                          "choose another output (replacing it would delete the input)")
    if overwrite:
        return
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise OutputError(f"{out}: exists; pass --overwrite to replace it")
    if out.is_dir() and any(out.iterdir()):
        raise OutputError(f"{out}: exists and is not empty; pass --overwrite to replace it")


@contextlib.contextmanager
def atomic_output(out: str | Path, *, folder: bool = True, inputs=(), overwrite: bool = False):
    """Yield a temporary sibling of `out` (a new folder, or a file path to write); it is renamed to `out`
    when the block completes and removed when it raises.

    Checked first (check_output): an `out` that is or holds an input is refused; an existing `out` is
    replaced only with `overwrite`. Temporaries of killed earlier runs are removed.
    """
    out = Path(out)
    check_output(out, inputs, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tmp = out.with_name(TMP_NAME.format(name=out.name, pid=os.getpid()))
    if folder:
        tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    try:
        check_output(out, inputs, overwrite)  # something may have appeared there meanwhile
        if out.is_dir() and not out.is_symlink():
            # os.replace cannot replace a non-empty folder. Should we die between the two renames, the old
            # folder stays as .NAME.old-PID (never removed automatically: it may hold the user's data).
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            try:
                os.replace(tmp, out)
            except BaseException:
                os.replace(old, out)  # the previous result stays where it was
                raise
            shutil.rmtree(old)
            return
        if folder and (out.is_symlink() or out.exists()):
            out.unlink()  # a file or link replaced by a folder (overwrite was given: check_output passed)
        os.replace(tmp, out)
    except BaseException:
        _remove(tmp)
        raise


def fsync_tree(folder: str | Path) -> None:
    """Flush every file under `folder`, then the folders themselves, to stable storage: a marker written
    after this (a checkpoint's `complete`) cannot survive a machine crash that the data it vouches for did
    not (the page cache writes an empty marker back long before gigabytes of tensors)."""
    folder = Path(folder)
    paths = sorted(folder.rglob("*"))
    for path in [p for p in paths if p.is_file() and not p.is_symlink()] + [p for p in paths if p.is_dir()] + [folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
