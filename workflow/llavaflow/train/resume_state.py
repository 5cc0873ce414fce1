"""Resume state in an undeclared work dir: fingerprint, lock, iter_N.pth rotation, atomic publish."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import sys
import time
from pathlib import Path

from filelock import FileLock, SoftFileLease, Timeout

from ..atomic import atomic_output, check_output

ITER_RE = re.compile(r"^iter_(\d+)\.pth$")
# What publish() puts in an output folder: DeepSpeed's state files and the metrics. A folder holding only
# these is a result of ours that a rerun replaces; anything else there is refused (--overwrite to replace).
PUBLISHED_FILE_RE = re.compile(r"^(metrics\.jsonl|\w+_(model|optim)_states\.pt)$")


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


def check_work_dir_is_ours(work_dir: Path) -> None:
    """A work dir of ours has fingerprint.json, written first: any other non-empty folder is someone's."""
    if work_dir.is_dir() and not (work_dir / "fingerprint.json").exists() and any(work_dir.iterdir()):
        raise ValueError(f"{work_dir}: not empty and not a work dir of ours (no fingerprint.json); "
                         "choose another --work-dir")


def prepare_work_dir(work_dir: Path, fingerprint: dict, *, stale_because: str | None = None) -> None:
    """Keep a work dir whose fingerprint matches; move any other aside, so a config change starts fresh.
    `stale_because` says why a matching one is stale all the same (its inputs changed in a way that the
    fingerprint cannot see)."""
    fp_file = work_dir / "fingerprint.json"
    if work_dir.exists():
        check_work_dir_is_ours(work_dir)
        try:
            old = json.loads(fp_file.read_text()) if fp_file.exists() else None
        except json.JSONDecodeError:  # torn by a kill while it was written: ours, set aside below
            old = None
        if old == fingerprint and not stale_because:
            return
        if any(work_dir.iterdir()):
            aside = work_dir.with_name(f"{work_dir.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(work_dir, aside)
            why = stale_because or "belonged to another configuration"
            print(f"work dir {work_dir} {why}; moved to {aside}", flush=True)
    work_dir.mkdir(parents=True, exist_ok=True)
    fp_file.write_text(json.dumps(fingerprint, indent=1, sort_keys=True))


def _has_flock(folder: Path) -> bool:
    """Whether flock works on `folder`'s file system (Lustre mounted without `-o flock` says ENOSYS), asked of the
    folder itself so that no lock file is created by the asking."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
    except OSError as e:
        return e.errno != errno.ENOSYS  # EWOULDBLOCK: someone holds the folder: flock works
    finally:
        os.close(fd)
    return True


class WorkDirLock:
    """An exclusive lock beside the work dir, so two jobs never train into it at once.

    Where the file system has flock (local disks, NFS, Lustre mounted with `-o flock`): the kernel's lock, which
    goes with the process that held it. Where flock fails with ENOSYS (Lustre mounted without it): a lease, a
    marker file that its holder renews every `lease_s / 3` seconds. A holder that died on another node (a SLURM
    TIMEOUT's SIGKILL, a node failure) renews it no more, and the next attempt takes it over once it has stayed
    unchanged for `lease_s`: filelock's plain marker names a pid and a host, and one from another host never
    counts as stale, so a retry that SLURM put on another node found the work dir locked for ever.
    """

    def __init__(self, work_dir: Path, *, lease_s: float = 120.0):
        self.path = work_dir.with_name(work_dir.name + ".lock")
        self.lease_path = work_dir.with_name(work_dir.name + ".lease")  # apart: a flock file is not a marker
        self.lease_s = lease_s
        self._lock = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if _has_flock(self.path.parent):
            self._lock = FileLock(self.path, timeout=0, fallback_to_soft=False)
            try:
                self._lock.acquire()
            except Timeout:
                raise RuntimeError(f"{self.path} is locked: another job is training into this work dir") from None
        else:
            self._lock = SoftFileLease(self.lease_path, lease_duration=self.lease_s, on_compromise=self._lost)
            self._acquire_lease()
        return self

    def _acquire_lease(self) -> None:
        try:
            self._lock.acquire(timeout=0)
            return
        except Timeout:
            pass
        wait = 1.5 * self.lease_s
        print(f"{self.lease_path} is held (a lease: no flock on this file system); waiting up to {wait:.0f} s, as a "
              f"holder that died stops renewing it and it is taken over once unchanged for {self.lease_s:.0f} s",
              flush=True)
        try:
            self._lock.acquire(timeout=wait)
        except Timeout:
            raise RuntimeError(f"{self.lease_path} is locked: another job is training into this work dir (its lease "
                               f"was renewed for {wait:.0f} s)") from None

    def _lost(self, compromise) -> None:
        print(f"WARNING: lost the lease on {self.lease_path} ({compromise}): another job may now train into this work "
              "dir", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        self._lock.release()


def check_publish_target(output: Path, inputs=(), overwrite: bool = False) -> None:
    """Refuse an output that is or holds an input (the work dir, a base model, the data), or an existing
    one that is not an earlier publish of ours, unless `overwrite`. Called before training and again
    before publishing, so nothing is trained for an output that would be refused at the end."""
    ours = (output.is_dir() and not output.is_symlink()
            and all(p.is_file() and not p.is_symlink() and PUBLISHED_FILE_RE.match(p.name) for p in output.iterdir()))
    check_output(output, inputs, overwrite=overwrite or ours)


def publish(checkpoint: Path, output: Path, extra_files: list[Path] = (), *, inputs=(), overwrite: bool = False) -> None:
    """Hard-link (or copy) a finished checkpoint to `output`, atomically."""
    check_publish_target(output, inputs, overwrite)
    with atomic_output(output, inputs=inputs, overwrite=True) as tmp:
        for f in list(checkpoint.iterdir()) + list(extra_files):
            if f.name == "complete":
                continue
            try:
                os.link(f, tmp / f.name)
            except OSError:
                shutil.copy2(f, tmp / f.name)
