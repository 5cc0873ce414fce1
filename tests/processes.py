"""Ending the processes a test started, and only those: its child and every descendant.

A process group is not enough for launchers that put their workers in sessions of their own (torchrun
does, with start_new_session), so the tree is walked through /proc: each process is stopped before its
children are listed, so none can start another one or escape by being re-parented, then all are killed.
Never a name pattern: a real job with the same command line on the same machine is left alone.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # ended meanwhile
            out.setdefault(ppid, []).append(int(entry))
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except OSError:
        return False


def kill_tree(proc: subprocess.Popen, timeout: float = 60) -> list[int]:
    """SIGKILL proc (started with start_new_session=True) with its process group and all its descendants;
    returns once every one of them has ended. Returns their pids."""
    stopped: set[int] = set()
    frontier = [proc.pid]
    while frontier:  # stop top-down: a stopped process cannot fork, so the listing below is complete
        for pid in frontier:
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                pass
        stopped.update(frontier)
        children = _children()
        frontier = [c for pid in frontier for c in children.get(pid, []) if c not in stopped]
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for pid in stopped:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=timeout)
    deadline = time.time() + timeout
    while any(_alive(pid) for pid in stopped):
        assert time.time() < deadline, f"processes {[p for p in stopped if _alive(p)]} survived SIGKILL"
        time.sleep(0.05)
    return sorted(stopped)


def run_in_group(cmd: list[str], *, env: dict | None = None, timeout: float | None = None) -> tuple[str, str]:
    """Run cmd in a session of its own and return (stdout, stderr). Its whole group is killed on timeout and
    at the end (pip with cmake and compilers, a browser with the helpers it leaves behind), nothing else.
    Fails on a non-zero exit."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, f"{cmd[:3]}… failed ({proc.returncode}):\n{out[-3000:]}\n{err[-5000:]}"
    return out, err
