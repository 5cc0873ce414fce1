"""Experiment trackers (`report_to`): TensorBoard, MLflow, Weights & Biases, each through its own library.

Each gets the recipe once (hyperparameters / params / config) and every metrics.jsonl row as scalars at
step = iteration. Rank 0 only. Where they write follows each tool's own convention:
  tensorboard  event files in <work dir>/tensorboard (steps after a resume point are purged on resume)
  mlflow       MLFLOW_TRACKING_URI, else a file store in <work dir>/mlruns (MLFLOW_ALLOW_FILE_STORE=true set
               for it); experiment MLFLOW_EXPERIMENT_NAME or "llavaflow"
  wandb        WANDB_PROJECT (default "llavaflow"), WANDB_MODE (e.g. offline), run files under <work dir>/wandb
A resumed stage continues its MLflow and wandb runs: their ids are kept in <work dir>/tracker_runs.json (a new
configuration gets a new work dir, hence new runs). Rows logged after the checkpoint by the attempt that died
are logged again: MLflow keeps both values of such a step, wandb keeps the first.
The libraries are the optional `tracking` extra; naming a tracker whose library is missing fails up front.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from ..atomic import atomic_output

TRACKERS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}  # name -> module it needs


def check_trackers(names) -> None:
    """Fail before training starts if a tracker is unknown or its library is not installed."""
    for name in names:
        if name not in TRACKERS:
            raise ValueError(f"report_to: unknown tracker {name!r}; known: {sorted(TRACKERS)}")
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise ValueError(f"report_to: {name} needs the {TRACKERS[name]!r} package "
                             "(pip install 'llavaflow[tracking]')")


RUN_IDS = "tracker_runs.json"


def saved_run_id(work_dir: Path, tracker: str) -> str | None:
    path = work_dir / RUN_IDS
    return json.loads(path.read_text()).get(tracker) if path.exists() else None


def save_run_id(work_dir: Path, tracker: str, run_id: str) -> None:
    path = work_dir / RUN_IDS
    ids = json.loads(path.read_text()) if path.exists() else {}
    with atomic_output(path, folder=False, overwrite=True) as tmp:
        tmp.write_text(json.dumps({**ids, tracker: run_id}, indent=1, sort_keys=True))


def flat_params(recipe: dict) -> dict:
    """Recipe values as scalars or strings (lists and dicts as JSON), as every tracker accepts them."""
    return {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in recipe.items()}


class TensorBoardTracker:
    def __init__(self, work_dir: Path, params: dict, run_name: str, resume_at: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events of iterations after the checkpoint are hidden, as metrics.jsonl cuts its rows.
        self.writer = SummaryWriter(log_dir=str(work_dir / "tensorboard"), purge_step=resume_at + 1 if resume_at else None)
        self.writer.add_text("recipe", "```\n" + json.dumps(params, indent=1) + "\n```", global_step=resume_at)

    def log(self, scalars: dict, step: int) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(f"train/{key}", value, global_step=step)

    def close(self) -> None:
        self.writer.close()


class MLflowTracker:
    def __init__(self, work_dir: Path, params: dict, run_name: str, resume_at: int):
        import mlflow

        self.mlflow = mlflow
        if "MLFLOW_TRACKING_URI" not in os.environ:
            # A file store beside the run needs no database packages (mlflow-skinny); MLflow 3 asks for
            # this opt-in before it serves one.
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            mlflow.set_tracking_uri((work_dir / "mlruns").resolve().as_uri())
        mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", "llavaflow"))
        run_id = saved_run_id(work_dir, "mlflow")
        if run_id is not None and self._stored(run_id):
            # The params stay those of the first attempt: MLflow refuses to change a logged param, and a
            # resume may change only the settings that are not part of the result (packing, num_workers, ...).
            self.run = mlflow.start_run(run_id=run_id)
        else:  # a first attempt, or a tracking store that does not hold the saved run (another URI)
            self.run = mlflow.start_run(run_name=run_name)
            mlflow.log_params(flat_params(params))
            save_run_id(work_dir, "mlflow", self.run.info.run_id)

    def _stored(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.mlflow.MlflowClient().get_run(run_id)
            return True
        except MlflowException:
            return False

    def log(self, scalars: dict, step: int) -> None:
        self.mlflow.log_metrics(scalars, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class WandbTracker:
    def __init__(self, work_dir: Path, params: dict, run_name: str, resume_at: int):
        import wandb

        run_id = saved_run_id(work_dir, "wandb")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "llavaflow"), name=run_name,
                              dir=str(work_dir), id=run_id, resume="allow" if run_id else None)
        # A resume may change the settings that are not part of the result (packing, num_workers, ...).
        self.run.config.update(params, allow_val_change=True)
        save_run_id(work_dir, "wandb", self.run.id)

    def log(self, scalars: dict, step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


_CLASSES = {"tensorboard": TensorBoardTracker, "mlflow": MLflowTracker, "wandb": WandbTracker}


def open_trackers(names, *, work_dir: Path, params: dict, run_name: str, resume_at: int) -> list:
    check_trackers(names)
    return [_CLASSES[name](work_dir, params, run_name, resume_at) for name in names]
