"""Read iter_N.pth checkpoints: ours and xtuner's, single file or DeepSpeed directory."""

from __future__ import annotations

from pathlib import Path

import torch

MODEL_STATES = "mp_rank_00_model_states.pt"


class CheckpointError(ValueError):
    pass


def _torch_load(path: Path) -> dict:
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive ("PK\x03\x04"); its legacy format is a pickle (protocol byte 0x80).
    if head != b"PK\x03\x04" and head[:1] != b"\x80":
        raise CheckpointError(f"{path}: not a checkpoint (not a file written by torch.save: it starts with {head!r})")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # truncated files, pickles with foreign classes, not a torch file at all
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from e


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The prefixed state dict (llm.*, visual_encoder.*, projector.*) of a training checkpoint.

    Accepts a file holding {"state_dict": ...} or a bare state dict, and a DeepSpeed tag directory
    (iter_N.pth/ with mp_rank_00_model_states.pt, whose "module" holds the weights).
    """
    path = Path(path)
    if path.is_dir():
        if (path / "config.json").exists() and not (path / MODEL_STATES).exists():
            raise CheckpointError(f"{path}: this is a HF-format folder, not a training checkpoint (iter_N.pth)")
        if not (path / MODEL_STATES).exists():
            raise CheckpointError(f"{path}: no {MODEL_STATES}; not a DeepSpeed checkpoint directory")
        blob = _torch_load(path / MODEL_STATES)
        state = blob.get("module") if isinstance(blob, dict) else None
    elif path.is_file():
        blob = _torch_load(path)
        if path.name == MODEL_STATES:
            state = blob.get("module")
        else:
            state = blob.get("state_dict", blob) if isinstance(blob, dict) else None
    else:
        raise CheckpointError(f"{path}: checkpoint not found")
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: holds no state dict of tensors")
    return state
