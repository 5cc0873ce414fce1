"""Resume state in an undeclared work dir: fingerprint, lock, iter_N.pth rotation, atomic publish."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

from filelock import FileLock, Timeout

from ..atomic import atomic_output

ITER_RE = re.compile(r"^iter_(\d+)\.pth$")


def list_checkpoints(work_dir: Path) -> list[tuple[int, Path]]:
    found = [(int(m.group(1)), p) for p in work_dir.glob("iter_*.pth") if (m := ITER_RE.match(p.name))]
    return sorted(found)


def newest_checkpoint(work_dir: Path) -> tuple[int, Path] | None:
    done = [(n, p) for n, p in list_checkpoints(work_dir) if (p / "complete").exists()]
    return done[-1] if done else None


def prune_checkpoints(work_dir: Path, keep: int) -> None:
    done = [p for _, p in list_checkpoints(work_dir) if (p / "complete").exists()]
    for p in done[:-keep] if keep > 0 else []:
        shutil.rmtree(p, ignore_errors=True)


def prepare_work_dir(work_dir: Path, fingerprint: dict) -> None:
    """Keep a work dir whose fingerprint matches; move any other aside, so a config change starts fresh."""
    fp_file = work_dir / "fingerprint.json"
    if work_dir.exists():
        old = json.loads(fp_file.read_text()) if fp_file.exists() else None
        if old == fingerprint:
            return
        if any(work_dir.iterdir()):
            aside = work_dir.with_name(f"{work_dir.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(work_dir, aside)
            print(f"work dir {work_dir} belonged to another configuration; moved to {aside}", flush=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    fp_file.write_text(json.dumps(fingerprint, indent=1, sort_keys=True))


class WorkDirLock:
    """An exclusive lock beside the work dir, so two jobs never train into it at once.

    filelock's FileLock takes an flock where the filesystem has one and falls back to a marker file
    holding pid and host (stale once that process is gone) where flock fails with ENOSYS, as on Lustre
    mounted without `-o flock`.
    """

    def __init__(self, work_dir: Path):
        self.path = work_dir.with_name(work_dir.name + ".lock")
        self._lock = FileLock(self.path, timeout=0)

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire()
        except Timeout:
            raise RuntimeError(f"{self.path} is locked: another job is training into this work dir") from None
        return self

    def __exit__(self, *exc):
        self._lock.release()


def publish(checkpoint: Path, output: Path, extra_files: list[Path] = ()) -> None:
    """Hard-link (or copy) a finished checkpoint to `output`, atomically."""
    with atomic_output(output, overwrite=True) as tmp:
        for f in list(checkpoint.iterdir()) + list(extra_files):
            if f.name == "complete":
                continue
            try:
                os.link(f, tmp / f.name)
            except OSError:
                shutil.copy2(f, tmp / f.name)
