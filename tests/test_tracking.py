"""Experiment tracking (`report_to`): each tracker's files, read back with that tool's own reader (wandb: its
protobuf records from the offline run file), hold the recipe and every metrics.jsonl row. No network:
TensorBoard event files, a local MLflow file store, wandb offline. The libraries are in the `test` extra, so a
missing one fails here, not skips."""

import json

import pytest

from test_train import metrics, recipe, subset, torchrun  # noqa: F401 (subset: a fixture)


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
    (run_record,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {i.key: json.loads(i.value_json) for i in run_record.config.update}
    assert config["lr"] == 0.001 and config["train"] == ["llm", "visual_encoder", "projector"]
    history = [{i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert [h["_step"] for h in history] == [2, 4, 6, 8, 10, 12]
    assert [h["loss"] for h in history] == pytest.approx(losses, rel=1e-12)
    assert records[-1].WhichOneof("record_type") == "exit"


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
