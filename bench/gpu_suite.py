"""Every GPU measurement of issue 15 in one command, as JSON lines, within a time budget (--budget-s).

The whole plan takes longer than one device call allows (each real-size fine-tune run loads 8 GB of weights
and compiles: 3 minutes on an H200; train_e2e.py stops each run before its ~57 GB final checkpoint), so no
measurement starts after the budget (gpu_suite.sh gives the whole command 510 s, its install included), none
starts with less than half its timeout left, and `--only NAME ...` picks the ones a call is for. The plan runs
the issue's goals first (fine-tune and pretrain with the speed settings, MMBench), so a bare
`bash bench/gpu_suite.sh` is the call to make when one is all there is.

Each measurement runs in a process of its own with a timeout, so one failure or hang costs only itself. A
compiled training run that fails with one of torch.compile's own errors is run once more without compile, as
`<name>_eager` (a compile failure would otherwise leave the goal unmeasured); without DeepSpeed the training
measurements are skipped, saying so. The lines go to stdout and, when $OUT (or --out) is set, to
<out>/gpu_suite.jsonl as they come, with every measurement's log appended to <out>/gpu_suite.log (two files:
the device tool brings back at most 8, and an extra one could crowd out the JSON lines). Measurements run in
order of importance and are skipped (said so in a line) once the time budget is spent, so the file always
holds what finished.

  env            torch / CUDA / GPU / transformers / DeepSpeed versions, whether varlen_attn is usable
  packed_loss    the varlen_attn packed path's loss and gradient against the padded path and an fp32 reference
  e2e_*          `llavaflow train` end to end at the real size (DeepSpeed ZeRO-2, JPEG loading, loop):
                 fine-tune plain (the recipe: full checkpointing), each speed setting alone, all together;
                 pretrain plain and all together; the fine-tune with offload_optimizer=cpu.
                 tokens/s, model TFLOP/s, MFU (performance.md: 989.4 TFLOP/s), peak memory.
  memory_finetune  the recipe's one training step: peak memory per phase and what is alive at the peak
  mmbench        MMBench_DEV_EN-sized evaluation (4329 rows): the fast stage at batch 64, and samples of
                 batched generation and of batch 1

  bash bench/gpu_suite.sh                  # on the GPU machine (installs bench/wheels/ first if needed)
  python3 bench/gpu_suite.py --small       # CPU smoke run: width-64 stand-ins, seconds
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
TRAINING_SCRIPTS = {str(BENCH / "train_e2e.py"), str(BENCH / "memory_phases.py")}  # through DeepSpeed
FAST = {"packing": True, "fused_loss": True, "gradient_checkpointing": "selective", "compile": True}


def env_line() -> dict:
    import importlib.metadata as md

    import torch

    from llavaflow.model import packing

    line = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
            "varlen_attn_usable": packing.varlen_attn is not None}
    for dist in ("transformers", "deepspeed", "llavaflow"):
        try:
            line[dist] = md.version(dist)
        except md.PackageNotFoundError:
            line[dist] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        line.update(device=props.name, gpus=torch.cuda.device_count(), memory_gib=round(props.total_memory / 2**30, 1),
                    capability=f"{props.major}.{props.minor}", bf16=torch.cuda.is_bf16_supported())
    else:
        line.update(device="cpu", cpus=os.cpu_count())
    return line


def deepspeed_installed() -> bool:
    return importlib.util.find_spec("deepspeed") is not None


def plan(small: bool, work: Path) -> list[tuple[str, list[str], int, list[str] | None]]:
    """(name, command, timeout in s, the command to run instead if it fails with a torch.compile error), most
    important first."""
    py = [sys.executable]
    size = ["--tiny"] if small else []
    if small:
        e2e = ["--samples", "8", "--micro-batch", "2", "--skip", "2", "--num-workers", "0", "--log-interval", "2"]
    else:  # 18 iterations of micro-batch 8; rates over the last 12 (warm-up and compilation left out)
        e2e = ["--samples", "144", "--micro-batch", "8", "--skip", "6", "--num-workers", "8", "--log-interval", "6"]

    def train(name, stage, settings, timeout):
        def cmd(settings):
            sets = [f"{k}={json.dumps(v)}" for k, v in settings.items()]
            return py + [str(BENCH / "train_e2e.py"), "--work", str(work), "--stage", stage, "--run-name", name,
                         *e2e, *size] + (["--set", *sets] if sets else [])
        eager = cmd({**settings, "compile": False}) if settings.get("compile") else None
        return (name, cmd(settings), timeout, eager)

    # compile is left out of the CPU smoke run: inductor's C++ build takes minutes there
    fast = {k: v for k, v in FAST.items() if not (small and k == "compile")}
    # Most important first, as one call (15 minutes of device time in all) may be all a session gets: the issue's
    # goals (fine-tune and pretrain MFU with the speed settings, MMBench time), then the checks behind them.
    mmbench = py + [str(BENCH / "mmbench_speed.py")] + (["--tiny", "--rows", "16", "--batch", "8", "--subset", "4"]
                                                         if small else ["--subset", "64"])
    steps = [train("e2e_finetune_all", "finetune", fast, 300),  # H200 2026-11-30: 229 s (assets, compile, save)
             ("mmbench", mmbench, 180, None),
             train("e2e_pretrain_all", "pretrain", {k: v for k, v in fast.items() if k != "gradient_checkpointing"}, 240),
             ("packed_loss", py + [str(BENCH / "packed_loss.py"), *size] + (["--micro-batch", "2"] if small else []), 120,
              None),
             train("e2e_finetune_plain", "finetune", {}, 300),  # H200 2026-11-30: 167 s, its final save included
             # the recipe's peak per phase, against llavaflow.train.memory's figures
             ("memory_finetune", py + [str(BENCH / "memory_phases.py"), "--work", str(work), *size]
              + (["--micro-batch", "2"] if small else []), 180, None),
             train("e2e_pretrain_plain", "pretrain", {}, 180)]
    if small:  # the smoke run: each stage once, with every setting, is all the plumbing there is
        steps = [step for step in steps if not step[0].endswith("_plain")]
    if not small:
        steps += [train(f"e2e_finetune_{k}", "finetune", {k: v}, 300) for k, v in FAST.items()]
        steps.append(train("e2e_finetune_offload", "finetune", {"offload_optimizer": "cpu"}, 300))
    return steps


def kill_tree(pid: int) -> None:
    """Kill a measurement and everything under it: torchrun starts its ranks in sessions of their own,
    so its process group alone would leave them running on the GPU."""
    try:
        import psutil  # a DeepSpeed dependency
    except ImportError:  # the wheels not carried: no training ran, the group is all there is
        psutil, family = None, []
    else:
        try:
            family = psutil.Process(pid).children(recursive=True)
        except psutil.NoSuchProcess:
            family = []
        for child in family:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass

    def running(process) -> bool:  # a zombie holds no GPU memory; its reaping is not ours to wait for
        try:
            return process.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + 15  # their GPU memory is free before the next measurement starts
    while any(running(process) for process in family) and time.monotonic() < deadline:
        time.sleep(0.2)


# torch.compile's own exceptions (an OOM inside a compiled block is not one: its traceback only passes through
# torch/_dynamo's frames)
COMPILE_ERROR = re.compile(r"torch\._(dynamo|inductor)\.exc\.\w+")
LOG_TAIL_CHARS = 1_000_000  # of each measurement's output, in the log file: 12 stay far under 16 MiB


def run_one(name: str, cmd: list[str], timeout: int, log: Path | None) -> list[dict]:
    """Its JSON lines, each tagged with the measurement and its wall time (`wall_s`: a line's own fields,
    a rate window's `seconds` say, are kept); or one line saying how it failed."""
    t0 = time.perf_counter()
    # its own process group: a timeout kills torchrun's ranks too
    proc = subprocess.Popen(cmd, cwd=BENCH, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
        error = None if proc.returncode == 0 else f"exit status {proc.returncode}"
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        try:
            output, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:  # something outside its tree still holds the pipe
            proc.stdout.close()
            output = ""
        error = f"timed out after {timeout} s"
    seconds = round(time.perf_counter() - t0, 1)
    if log:
        with open(log, "a") as f:
            f.write(f"==== {name} ({seconds} s, {error or 'ok'}): {' '.join(cmd)}\n{output[-LOG_TAIL_CHARS:]}\n")
    lines = []
    for text in output.splitlines():
        if text.startswith("{"):
            try:
                lines.append({"measurement": name, **json.loads(text), "wall_s": seconds})
            except json.JSONDecodeError:
                pass
    if error or not lines:
        tail = "\n".join(output.splitlines()[-15:])
        lines.append({"measurement": name, "error": error or "no JSON line printed", "wall_s": seconds, "log_tail": tail,
                      "compile_error": COMPILE_ERROR.search(output) is not None})
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small", action="store_true", help="CPU smoke run with width-64 stand-ins")
    p.add_argument("--out", type=Path, default=Path(os.environ["OUT"]) if os.environ.get("OUT") else None,
                   help="folder for gpu_suite.jsonl and gpu_suite.log (default: $OUT)")
    p.add_argument("--work", type=Path, default=Path("/tmp/llavaflow-gpu-suite"), help="assets and runs")
    p.add_argument("--budget-s", type=float, default=450, help="start no measurement after this many seconds")
    p.add_argument("--only", nargs="*", help="run only these measurements")
    p.add_argument("--timeout-scale", type=float, default=1.0, help="multiply every measurement's timeout (slow hosts)")
    args = p.parse_args()

    log = None
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        log = args.out / "gpu_suite.log"
    sink = open(args.out / "gpu_suite.jsonl", "a") if args.out else None

    def emit(line: dict) -> None:
        text = json.dumps(line)
        print(text, flush=True)
        if sink:
            sink.write(text + "\n")
            sink.flush()

    t0 = time.perf_counter()
    try:
        emit({"measurement": "env", **env_line()})
    except Exception as e:  # the rest still runs
        emit({"measurement": "env", "error": f"{type(e).__name__}: {e}"})
    failed = 0
    steps = plan(args.small, args.work)
    unknown = sorted(set(args.only or ()) - {step[0] for step in steps})
    if unknown:  # a typo would spend a device call on nothing
        p.error(f"--only: no measurement named {', '.join(unknown)} (there are: {', '.join(s[0] for s in steps)})")
    has_deepspeed = deepspeed_installed()
    for name, cmd, timeout, eager in steps:
        if args.only and name not in args.only:
            continue
        if not has_deepspeed and cmd[1] in TRAINING_SCRIPTS:
            emit({"measurement": name, "skipped": "deepspeed is not installed (bench/wheels not carried?)"})
            continue
        timeout = timeout * args.timeout_scale
        for attempt, command in ((name, cmd), (f"{name}_eager", eager)):
            left = args.budget_s - (time.perf_counter() - t0)
            if left < timeout / 2:  # it would most likely be cut off: leave the time to a shorter one
                emit({"measurement": attempt, "skipped": f"{left:.0f} s of the {args.budget_s:.0f} s budget left, "
                                                         f"it may take {timeout:.0f} s"})
                break
            lines = run_one(attempt, command, int(min(timeout, left)), log)
            for line in lines:
                failed += "error" in line
                emit(line)
            # a run killed by its timeout leaves its folder (a fine-tune's ~57 GB checkpoint) to fill the disk
            shutil.rmtree(args.work / name, ignore_errors=True)
            if eager is None or not any(line.get("compile_error") for line in lines):
                break
    emit({"measurement": "total", "seconds": round(time.perf_counter() - t0, 1), "failed": failed})
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
