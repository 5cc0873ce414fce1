"""Experiment tracking (`report_to`): each tracker's files, read back with that tool's own reader (wandb: its
protobuf records from the offline run file), hold the recipe and every metrics.jsonl row. No network:
TensorBoard event files, a local MLflow file store, wandb offline. The libraries are in the `test` extra, so a
missing one fails here, not skips."""

import json

import pytest

from test_train import metrics, recipe, torchrun


def test_tensorboard_mlflow_and_wandb_receive_the_recipe_and_every_row(tiny, subset, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rec = recipe(tiny, datasets=subset, micro_batch_size=4, accumulative_counts=1, save_steps=1000, log_interval=2,
                 report_to=["tensorboard", "mlflow", "wandb"])
    work = tmp_path / "work"
    torchrun(1, rec, work, tmp_path / "out", env_extra={"WANDB_MODE": "offline", "WANDB_SILENT": "true"})
    rows = metrics(tmp_path / "out" / "metrics.jsonl")
    assert [r["iter"] for r in rows] == [2, 4, 6, 8, 10, 12]
    losses = [r["loss"] for r in rows]

    events = EventAccumulator(str(work / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("train/loss")
    assert [s.step for s in scalars] == [2, 4, 6, 8, 10, 12]
    assert [s.value for s in scalars] == pytest.approx(losses, rel=1e-6)  # stored as float32
    assert [s.value for s in events.Scalars("train/lr")] == pytest.approx([r["lr"] for r in rows], rel=1e-6)
    assert '"lr": 0.001' in events.Tensors("recipe/text_summary")[0].tensor_proto.string_val[0].decode()

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 serves file stores on this opt-in only
    client = MlflowClient(tracking_uri=(work / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("llavaflow").experiment_id])
    assert run.data.params["lr"] == "0.001" and run.data.params["stage"] == "finetune"
    assert json.loads(run.data.params["train"]) == ["llm", "visual_encoder", "projector"]
    history = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in history] == [2, 4, 6, 8, 10, 12]
    assert [m.value for m in history] == pytest.approx(losses, rel=1e-12)
    assert run.info.status == "FINISHED"

    (offline,) = (work / "wandb").glob("offline-run-*")
    (history_file,) = offline.glob("run-*.wandb")  # what `wandb sync` uploads
    records = list(wandb_records(history_file))
    config = {i.key: json.loads(i.value_json) for r in records if r.WhichOneof("record_type") in ("run", "config")
              for i in (r.run.config if r.WhichOneof("record_type") == "run" else r.config).update}
    assert config["lr"] == 0.001 and config["train"] == ["llm", "visual_encoder", "projector"]
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert [h["_step"] for h in history] == [2, 4, 6, 8, 10, 12]
    assert [h["loss"] for h in history] == pytest.approx(losses, rel=1e-12)
    assert records[-1].WhichOneof("record_type") == "exit"



def test_a_resumed_stage_continues_its_mlflow_and_wandb_runs(tiny, subset, tmp_path, monkeypatch):
    import shutil

    from mlflow.tracking import MlflowClient

    rec = recipe(tiny, datasets=subset, micro_batch_size=4, accumulative_counts=1, save_steps=6, log_interval=2,
                 report_to=["mlflow", "wandb"])
    work, env = tmp_path / "work", {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    torchrun(1, rec, work, tmp_path / "out", env_extra=env)
    ids = json.loads((work / "tracker_runs.json").read_text())
    shutil.rmtree(work / "iter_12.pth")  # as if the attempt died after logging iteration 12, before its checkpoint
    torchrun(1, rec, work, tmp_path / "out2", env_extra=env)
    rows = metrics(tmp_path / "out2" / "metrics.jsonl")
    assert [r["iter"] for r in rows] == [2, 4, 6, 8, 10, 12]
    assert json.loads((work / "tracker_runs.json").read_text()) == ids

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(work / "mlruns").resolve().as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("llavaflow").experiment_id])
    assert run.info.run_id == ids["mlflow"] and run.info.status == "FINISHED"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted({m.step for m in history}) == [2, 4, 6, 8, 10, 12]
    last = {m.step: m.value for m in sorted(history, key=lambda m: m.timestamp)}  # the resumed attempt's rows win
    assert [last[r["iter"]] for r in rows] == pytest.approx([r["loss"] for r in rows], rel=1e-12)

    attempts = sorted((work / "wandb").glob("offline-run-*"))
    assert len(attempts) == 2
    runs = []
    for attempt in attempts:
        (history_file,) = attempt.glob("run-*.wandb")
        records = list(wandb_records(history_file))
        (run_record,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        steps = [json.loads(i.value_json) for r in records if r.WhichOneof("record_type") == "history"
                 for i in r.history.item if (i.key or "/".join(i.nested_key)) == "_step"]
        runs.append((run_record.run_id, steps))
    assert runs == [(ids["wandb"], [2, 4, 6, 8, 10, 12]), (ids["wandb"], [8, 10, 12])]

def wandb_records(path):
    """The protobuf Records (wandb's own classes) of an offline run file. wandb 0.31 ships no Python reader
    (its core is Go), so the container is read here: a 7-byte ":W&B" header, then LevelDB-log chunks in
    32 KiB blocks (4-byte checksum, 2-byte length, 1-byte type: 1 full, 2 first, 3 middle, 4 last)."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    pos, block, pending = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack_from("<HB", data, pos + 4)
        pending, pos = pending + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record

def test_an_unknown_tracker_is_rejected_before_training(tiny, tmp_path):
    rec = recipe(tiny, report_to=["tensorboard", "neptune"])
    proc = torchrun(1, rec, tmp_path / "w", tmp_path / "o", check=False)
    assert proc.returncode != 0 and "report_to: unknown tracker 'neptune'" in proc.stdout + proc.stderr
    assert not (tmp_path / "w").exists()  # nothing started
