"""A stale lock of a DeepSpeed op build, caught before it stalls a run.

On a CPU, `deepspeed.initialize` loads its shared-memory all-reduce op through torch's JIT extension
loader (building it on first use, about a minute). That loader takes a lock file in the op's build folder
on every load, built or not, and a process killed while holding it leaves the file behind: every later run
then waits on it forever, silently. On a GPU DeepSpeed loads no such op, and nothing here applies.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)

OP_BUILDER = "ShareMemCommBuilder"  # the op TorchBackend loads on a CPU accelerator (deepspeed.comm.torch)
STALE_AFTER_S = 600  # a build holds the lock about a minute on 2 cores


def build_lock(op_builder: str = OP_BUILDER) -> Path | None:
    """The lock file torch takes to load `op_builder`'s op, or None where this accelerator has no such op."""
    from deepspeed.accelerator import get_accelerator
    from torch.utils.cpp_extension import _get_build_directory  # the very folder torch's loader locks

    builder = get_accelerator().create_op_builder(op_builder)
    if builder is None:
        return None
    return Path(_get_build_directory(builder.name, verbose=False)) / "lock"


def check_build_lock(lock: Path | None, *, stale_after_s: float = STALE_AFTER_S) -> None:
    """Fail on a lock older than any build takes; say so in the log when a younger one will be waited for."""
    if lock is None:
        return
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > stale_after_s:
        raise RuntimeError(f"{lock}: left by a DeepSpeed op build that was killed {age / 60:.0f} min ago; torch "
                           "would wait on it forever. Delete it if no other llavaflow/DeepSpeed run is starting")
    log.warning("%s exists: waiting for the DeepSpeed op build that holds it (delete it if none is running)", lock)
