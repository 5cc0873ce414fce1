"""Read iter_N.pth checkpoints: ours and xtuner's, single file or DeepSpeed directory.

Only tensors and plain containers are ever built: every load is `torch.load(weights_only=True)`.
xtuner's checkpoints also pickle objects of other libraries next to the weights (mmengine's
`HistoryBuffer` in `message_hub`, numpy arrays and scalars in the logs, and in DeepSpeed client
state the same): those globals are listed statically first (`get_unsafe_globals_in_checkpoint`), and
each is mapped, through torch's public `safe_globals` (callable, name) form, to an inert placeholder
class of ours that only records its arguments, so no foreign code runs. A weight that comes out as
such a placeholder (it needs foreign code to exist) is refused with its key and the class.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import torch

log = logging.getLogger(__name__)

MODEL_STATES = "mp_rank_00_model_states.pt"


class CheckpointError(ValueError):
    pass


class Inert:
    """Stands in for a class or function of another library: calling, constructing and BUILD only store data."""

    pickled_name = "?"

    def __new__(cls, *args, **kwargs):  # pickle's NEWOBJ calls __new__ only; REDUCE calls the class
        self = object.__new__(cls)
        self.args, self.kwargs, self.state = args, kwargs, None
        return self

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"<not loaded: {self.pickled_name}>"


def _placeholder(full_name: str) -> type:
    return type(f"Inert[{full_name}]", (Inert,), {"pickled_name": full_name})


def _torch_load(path: Path) -> tuple[object, list[str]]:
    """(object, names of the foreign globals replaced by placeholders)."""
    with open(path, "rb") as f:
        head = f.read(4)
    # torch.save writes a zip archive ("PK\x03\x04"); anything else is not one of ours or xtuner's.
    if head != b"PK\x03\x04":
        raise CheckpointError(f"{path}: not a checkpoint (not a file written by torch.save: it starts with {head!r})")
    try:
        foreign = sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        stand_ins = [(_placeholder(name), name) for name in foreign]
        with torch.serialization.safe_globals(stand_ins):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True), foreign
    except Exception as e:  # truncated files, not a torch zip file at all, blocked modules (os, sys)
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(e).__name__}: {e})") from e


def _placeholders_in(obj, seen=None) -> Counter:
    """Count the placeholder objects anywhere inside a loaded object (for the log line)."""
    seen = set() if seen is None else seen
    found: Counter = Counter()
    if id(obj) in seen:
        return found
    seen.add(id(obj))
    if isinstance(obj, Inert):
        found[obj.pickled_name] += 1
        children = [*obj.args, *obj.kwargs.values(), obj.state]
    elif isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple, set)):
        children = list(obj)
    else:
        children = []
    for child in children:
        found += _placeholders_in(child, seen)
    return found


def _weights(blob, path: Path, key: str | None) -> dict[str, torch.Tensor]:
    state = blob.get(key, blob) if isinstance(blob, dict) and key else blob
    if key == "module" and (not isinstance(blob, dict) or "module" not in blob):
        raise CheckpointError(f"{path}: no 'module' entry; not a DeepSpeed model-states file")
    if isinstance(state, Inert):
        raise CheckpointError(f"{path}: the weights are a {state.pickled_name} object; refusing to run foreign code to build them")
    if not isinstance(state, dict) or not state:
        raise CheckpointError(f"{path}: holds no state dict of tensors")
    for name, value in state.items():
        if isinstance(value, Inert):
            raise CheckpointError(f"{path}: weight {name!r} needs class {value.pickled_name} to be built; "
                                  "refusing to run foreign code (only tensors are read)")
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: weight {name!r} is a {type(value).__name__}, not a tensor")
        if type(value) not in (torch.Tensor, torch.nn.Parameter):
            raise CheckpointError(f"{path}: weight {name!r} is a tensor subclass {type(value).__qualname__}")
    if blob is not state and isinstance(blob, dict):
        skipped = _placeholders_in({k: v for k, v in blob.items() if k != key})
        if skipped:
            log.info("%s: not loaded (not needed for the weights): %s", path,
                     ", ".join(f"{n} x{c}" for n, c in sorted(skipped.items())))
    return state


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The prefixed state dict (llm.*, visual_encoder.*, projector.*) of a training checkpoint.

    Accepts a file holding {"state_dict": ...} (ours and mmengine's) or a bare state dict, and a
    DeepSpeed tag directory (iter_N.pth/ with mp_rank_00_model_states.pt, whose "module" holds the weights).
    """
    path = Path(path)
    if path.is_dir():
        if (path / "config.json").exists() and not (path / MODEL_STATES).exists():
            raise CheckpointError(f"{path}: this is a HF-format folder, not a training checkpoint (iter_N.pth)")
        if not (path / MODEL_STATES).exists():
            raise CheckpointError(f"{path}: no {MODEL_STATES}; not a DeepSpeed checkpoint directory")
        file, key = path / MODEL_STATES, "module"
    elif path.is_file():
        file, key = path, ("module" if path.name == MODEL_STATES else "state_dict")
    else:
        raise CheckpointError(f"{path}: checkpoint not found")
    blob, _ = _torch_load(file)
    if key == "state_dict" and isinstance(blob, dict) and "state_dict" not in blob:
        key = None  # a bare state dict
    state = _weights(blob, file, key)
    if key == "module" and all(t.numel() == 0 for t in state.values()):
        raise CheckpointError(f"{file}: 'module' holds only empty tensors (a ZeRO-3 checkpoint); "
                              "gather it first with DeepSpeed's zero_to_fp32.py")
    return state
