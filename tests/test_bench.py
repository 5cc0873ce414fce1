"""The CPU-cheap benchmark scripts run and measure what they claim (the GPU ones are smoke-run by hand)."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, run


def test_padding_bench_shows_length_grouping_cutting_padding():
    proc = run([sys.executable, "padding.py", "--samples", "20000", "--world", "2"], cwd=ROOT / "bench")
    rows = {r["sampler"]: r for r in map(json.loads, proc.stdout.splitlines())}
    assert rows.keys() == {"shuffle", "length_grouped"}
    # Synthetic mix, micro-batch 8: a random batch pads ~26 % of its rows; xtuner's megabatch grouping ~1 %.
    assert 0.2 < rows["shuffle"]["padding_fraction"] < 0.3
    assert rows["length_grouped"]["padding_fraction"] < 0.03



def test_tiny_mcq_bench_trains_and_scores_each_answer_style(tmp_path):
    """bench/tiny_mcq.py (README: the tiny preset's answer style), a few steps: a JSON row per evaluation."""
    for answer in ("letter", "option_letter"):
        proc = run([sys.executable, "tiny_mcq.py", "--answer", answer, "--micro-batch", "8", "--steps", "4",
                    "--eval-every", "2", "--out", str(tmp_path / answer)], cwd=ROOT / "bench")
        rows = [json.loads(line) for line in proc.stdout.splitlines()]
        assert [r["step"] for r in rows] == [2, 4] and rows[-1]["samples_seen"] == 32
        assert {r["answer"] for r in rows} == {answer}
        for name in ("MMBench_DEV_EN", "MMBench_DEV_CN", "CCBench"):
            assert 0 <= rows[-1][name]["circular"] <= rows[-1][name]["vanilla_0"] <= 1
        first = (tmp_path / answer / "assets" / "data" / "finetune" / "conversations.jsonl").read_text().splitlines()
        mc = [json.loads(line)["conversations"][1]["value"] for line in first
              if "\nA. " in json.loads(line)["conversations"][0]["value"]]
        assert mc and all((len(a) == 1) == (answer == "letter") for a in mc), mc[:5]

def test_gpu_suite_smoke_runs_every_measurement_on_cpu(tmp_path):
    """bench/gpu_suite.py --small: the GPU suite's plumbing end to end on width-64 stand-ins (seconds on an
    idle 2-core machine), so a lent GPU never meets a broken script."""
    out = tmp_path / "out"
    # Generous limits: the point is the plumbing, and a shared CI machine may be slow.
    proc = run([sys.executable, "gpu_suite.py", "--small", "--out", str(out), "--work", str(tmp_path / "work"),
                "--budget-s", "780", "--timeout-scale", "4"],
               cwd=ROOT / "bench", env={"OMP_NUM_THREADS": "1"})
    lines = [json.loads(line) for line in (out / "gpu_suite.jsonl").read_text().splitlines()]
    assert lines == [json.loads(line) for line in proc.stdout.splitlines()]
    by_name = {line["measurement"]: line for line in lines}
    # the goals first: one call may be all a session gets
    assert list(by_name) == ["env", "e2e_finetune_all", "mmbench", "e2e_pretrain_all", "packed_loss", "memory_finetune",
                             "total"]
    assert not [line for line in lines if "error" in line] and by_name["total"]["failed"] == 0
    assert by_name["env"]["torch"] and by_name["env"]["deepspeed"] and by_name["env"]["device"] == "cpu"
    packed = by_name["packed_loss"]
    assert packed["equal"] and packed["varlen_attn"] is False and packed["loss_rel_diff"] < 1e-4  # exact path on CPU
    # the fp32 reference on a CPU is the padded path itself, checkpointed: the same numbers
    assert packed["padded_grad_rel_err_vs_fp32"] < 1e-6 and packed["packed_grad_rel_err_vs_fp32"] < 1e-4, packed
    for name in ("e2e_finetune_all", "e2e_pretrain_all"):
        assert by_name[name]["tokens_per_s"] > 0 and by_name[name]["model_tflops_per_s"] > 0, by_name[name]
        assert by_name[name]["packing"] is True and by_name[name]["fused_loss"] is True, by_name[name]
        # compile is off in the CPU smoke run: no counts to report (test_train checks the reported line)
        assert by_name[name]["compile"] is False and by_name[name]["compile_counts"] is None, by_name[name]
        # packed micro-batches of 2 samples, each with an image of 576 rows (336 px, 14 px patches) and text
        assert 2 * 576 < by_name[name]["max_micro_batch_rows"] < 2 * (576 + 2048), by_name[name]
    # the memory model's peaks for these width-64 stand-ins (fp32): the fine-tune adds every optimizer state
    assert 1 > by_name["e2e_finetune_all"]["predicted_peak_gib"] > by_name["e2e_pretrain_all"]["predicted_peak_gib"] > 0
    assert by_name["e2e_finetune_all"]["gradient_checkpointing"] == "selective"
    # every block of the 2-layer LLM and ViT checkpoints in the fine-tune; the pretrain runs without
    assert by_name["e2e_finetune_all"]["checkpointed_blocks"] == "4/4"
    assert by_name["e2e_pretrain_all"]["checkpointed_blocks"] == "0/4"
    assert by_name["mmbench"]["fast_stage_rows_per_s"] > 0
    memory = by_name["memory_finetune"]  # the recipe's settings, through DeepSpeed; CUDA's figures are absent
    assert memory["gradient_checkpointing"] is True and memory["packing"] is False and 0 < memory["loss"] < 20
    assert memory["rows"] == 2 * (511 + 576) and memory["phase_peak_gib"] == {"forward": None, "backward": None, "step": None}
    assert 1 > memory["predicted_peak_gib"] > 0
    assert sorted(p.name for p in out.iterdir()) == ["gpu_suite.jsonl", "gpu_suite.log"]  # the device tool returns 8 files
    assert "==== e2e_finetune_all (" in (out / "gpu_suite.log").read_text()
    # each run's folder (a real fine-tune's final checkpoint is ~57 GB) is gone once measured: the assets stay
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["data", "llm", "vit"]


def test_memory_phases_finds_what_is_alive_at_the_peak():
    """memory_phases.py's reading of torch's allocation trace (only a GPU records one): the peak is where the
    running total is highest, and the allocations alive then are grouped by the first frame outside torch."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("memory_phases", ROOT / "bench" / "memory_phases.py")
    phases = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(phases)
    torch_frame = {"filename": "/x/site-packages/torch/nn/functional.py", "line": 3, "name": "linear"}

    def ours(line):
        return [torch_frame, {"filename": "/r/workflow/llavaflow/model/llava.py", "line": line, "name": "forward"}]

    gib = 2**30
    trace = [{"action": "alloc", "addr": 1, "size": 2 * gib, "frames": ours(10)},
             {"action": "alloc", "addr": 2, "size": 3 * gib, "frames": ours(20)},
             {"action": "free_requested", "addr": 1, "size": 2 * gib},  # not yet freed: still counted
             {"action": "alloc", "addr": 3, "size": 1 * gib, "frames": ours(20)},
             {"action": "free_completed", "addr": 1, "size": 2 * gib},
             {"action": "free_completed", "addr": 99, "size": 4 * gib},  # allocated before the trace began
             {"action": "alloc", "addr": 4, "size": 1 * gib, "frames": [torch_frame]}]
    peak, live = phases.live_at_peak(trace, baseline=10 * gib)
    assert peak == 16 * gib and sorted(a["addr"] for a in live) == [1, 2, 3]
    assert phases.by_place(live) == [("/r/workflow/llavaflow/model/llava.py:20 forward", 4.0),
                                     ("/r/workflow/llavaflow/model/llava.py:10 forward", 2.0)]
    assert phases.where([torch_frame]) == "torch/nn/functional.py:3 linear"  # nothing of ours: the top frame


def _bench_module(name):
    import importlib.util

    sys.path.insert(0, str(ROOT / "bench"))  # the bench scripts import each other, as when run from bench/
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "bench"))
    return module


def test_gpu_suite_keeps_going_past_a_failure_and_a_hang(tmp_path):
    suite = _bench_module("gpu_suite")
    failed = suite.run_one("broken", [sys.executable, "-c", "import sys; print('{\"a\": 1, \"seconds\": 6.5}'); sys.exit(3)"], 30,
                            tmp_path / "log")
    # the line's own "seconds" (train_e2e.py's rate window) is kept; the measurement's wall time is wall_s
    assert failed[0] == {"measurement": "broken", "a": 1, "seconds": 6.5, "wall_s": failed[0]["wall_s"]}
    assert failed[0]["wall_s"] < 30
    assert failed[1]["error"] == "exit status 3"
    # A hang, with a grandchild in a session of its own (as torchrun's ranks are): both are killed.
    hang = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
            "start_new_session=True); print(p.pid, flush=True); time.sleep(60)")
    hung = suite.run_one("hung", [sys.executable, "-c", hang], 2, tmp_path / "log")
    assert hung[0]["error"] == "timed out after 2 s" and hung[0]["wall_s"] < 10
    grandchild = int(hung[0]["log_tail"].split()[0])
    time.sleep(0.5)
    assert not Path(f"/proc/{grandchild}").exists() or "Z" in Path(f"/proc/{grandchild}/stat").read_text().split()[2]
    ok = suite.run_one("ok", [sys.executable, "-c", "print('{\"b\": 2}')"], 30, tmp_path / "log")
    assert ok == [{"measurement": "ok", "b": 2, "wall_s": ok[0]["wall_s"]}]
    log = (tmp_path / "log").read_text()
    assert [line.split(" (")[0] for line in log.splitlines() if line.startswith("==== ")] == ["==== broken", "==== hung", "==== ok"]


def test_a_measured_run_is_stopped_once_its_last_iteration_is_logged(tmp_path):
    """train_e2e.py ends the training run before its final checkpoint (~57 GB and a minute at the real size): a
    stand-in logs its iterations, then 'saves' for a minute from a child in a session of its own (as torchrun's
    ranks are)."""
    train_e2e = _bench_module("train_e2e")
    metrics = tmp_path / "metrics.jsonl"
    script = (
        "import json, subprocess, sys, time\n"
        "print('finetune: 6 samples, 1 rank(s), fp32, 3 iterations (3/epoch), starting fresh', flush=True)\n"
        "saver = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], start_new_session=True)\n"
        "print('saver', saver.pid, flush=True)\n"
        f"with open({str(metrics)!r}, 'a') as f:\n"
        "    for it in (1, 2, 3):\n"
        "        f.write(json.dumps({'iter': it}) + '\\n'); f.flush(); time.sleep(0.5)\n"
        "time.sleep(60)\n")
    t0 = time.monotonic()
    output, rows = train_e2e.train_until_last_row([sys.executable, "-c", script], metrics, wait_for_compile=False)
    assert time.monotonic() - t0 < 20 and [r["iter"] for r in rows] == [1, 2, 3]
    saver = int(output.split("saver ")[1].split()[0])
    assert not Path(f"/proc/{saver}").exists() or "Z" in Path(f"/proc/{saver}/stat").read_text().split()[2]
    # a run that fails before its last row is an error, as before
    failing = "import sys; print(' 3 iterations (', flush=True); sys.exit(4)"
    with pytest.raises(subprocess.CalledProcessError):
        train_e2e.train_until_last_row([sys.executable, "-c", failing], tmp_path / "none.jsonl", wait_for_compile=False)


def test_gpu_suite_reruns_a_compile_failure_eagerly_and_skips_training_without_deepspeed(tmp_path, capsys, monkeypatch):
    suite = _bench_module("gpu_suite")
    compile_fails = [sys.executable, "-c", "import sys; print('torch._dynamo.exc.BackendCompilerFailed: backend'); sys.exit(3)"]
    oom = [sys.executable, "-c", "import sys; print('torch.OutOfMemoryError: CUDA out of memory'); sys.exit(1)"]
    hangs = [sys.executable, "-c", "import time; time.sleep(30)"]
    works = [sys.executable, "-c", "print('{\"tokens_per_s\": 1.0}')"]
    training = [sys.executable, str(ROOT / "bench" / "train_e2e.py")]  # without its arguments: exits 2
    monkeypatch.setattr(suite, "plan", lambda small, work: [
        ("e2e_x", compile_fails, 30, works), ("e2e_oom", oom, 30, works), ("e2e_hang", hangs, 2, works),
        ("mmbench", works, 30, None), ("e2e_y", training, 30, None)])
    monkeypatch.setattr(suite, "deepspeed_installed", lambda: True)
    monkeypatch.setattr(sys, "argv", ["gpu_suite.py", "--work", str(tmp_path / "work"), "--budget-s", "200"])
    monkeypatch.delenv("OUT", raising=False)
    assert suite.main() == 1
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    # only torch.compile's own error is retried eagerly: an OOM or a timeout would fail again, or take longer
    assert [(line["measurement"], "error" in line) for line in lines[1:-1]] == [
        ("e2e_x", True), ("e2e_x_eager", False), ("e2e_oom", True), ("e2e_hang", True), ("mmbench", False), ("e2e_y", True)]
    assert lines[1]["compile_error"] and not lines[3]["compile_error"] and lines[4]["error"] == "timed out after 2 s"
    assert lines[-1] == {"measurement": "total", "seconds": lines[-1]["seconds"], "failed": 4}
    monkeypatch.setattr(suite, "deepspeed_installed", lambda: False)
    assert suite.main() == 1
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[-2] == {"measurement": "e2e_y", "skipped": "deepspeed is not installed (bench/wheels not carried?)"}
    assert lines[-3]["measurement"] == "mmbench" and "error" not in lines[-3]


def test_gpu_suite_refuses_an_unknown_name_and_skips_what_cannot_finish(tmp_path):
    """A typo in --only would spend a device call on nothing; a measurement with less than half its timeout
    left is skipped, saying so."""
    cmd = [sys.executable, "gpu_suite.py", "--small", "--work", str(tmp_path / "work")]
    typo = run(cmd + ["--only", "e2e_finetune_al"], cwd=ROOT / "bench", check=False)
    assert typo.returncode == 2 and "--only: no measurement named e2e_finetune_al (there are: e2e_finetune_all" in typo.stderr
    short = run(cmd + ["--only", "mmbench", "--budget-s", "60"], cwd=ROOT / "bench")
    lines = [json.loads(line) for line in short.stdout.splitlines()]
    assert lines[1]["measurement"] == "mmbench" and lines[1]["skipped"].endswith("s of the 60 s budget left, it may take 180 s")
    assert not (tmp_path / "work").exists()
