"""Experiment trackers (`report_to`): TensorBoard, MLflow, Weights & Biases, each through its own library.

Each gets the recipe once (hyperparameters / params / config) and every metrics.jsonl row as scalars at
step = iteration. Rank 0 only. Where they write follows each tool's own convention:
  tensorboard  event files in <work dir>/tensorboard (steps after a resume point are purged on resume)
  mlflow       MLFLOW_TRACKING_URI, else a file store in <work dir>/mlruns (MLFLOW_ALLOW_FILE_STORE=true set
               for it); experiment MLFLOW_EXPERIMENT_NAME or "llavaflow"
  wandb        WANDB_PROJECT (default "llavaflow"), WANDB_MODE (e.g. offline), run files under <work dir>/wandb
The libraries are the optional `tracking` extra; naming a tracker whose library is missing fails up front.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

TRACKERS = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb"}  # name -> module it needs


def check_trackers(names) -> None:
    """Fail before training starts if a tracker is unknown or its library is not installed."""
    for name in names:
        if name not in TRACKERS:
            raise ValueError(f"report_to: unknown tracker {name!r}; known: {sorted(TRACKERS)}")
        if importlib.util.find_spec(TRACKERS[name]) is None:
            raise ValueError(f"report_to: {name} needs the {TRACKERS[name]!r} package "
                             "(pip install 'llavaflow[tracking]')")


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
        self.run = mlflow.start_run(run_name=run_name)
        mlflow.log_params(flat_params(params))

    def log(self, scalars: dict, step: int) -> None:
        self.mlflow.log_metrics(scalars, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


class WandbTracker:
    def __init__(self, work_dir: Path, params: dict, run_name: str, resume_at: int):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "llavaflow"), name=run_name, config=params,
                              dir=str(work_dir))

    def log(self, scalars: dict, step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()


_CLASSES = {"tensorboard": TensorBoardTracker, "mlflow": MLflowTracker, "wandb": WandbTracker}


def open_trackers(names, *, work_dir: Path, params: dict, run_name: str, resume_at: int) -> list:
    check_trackers(names)
    return [_CLASSES[name](work_dir, params, run_name, resume_at) for name in names]
