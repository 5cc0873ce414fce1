"""Streaming tensor I/O: read safetensors folders tensor by tensor, write shards as they fill, publish atomically."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class ConversionError(ValueError):
    pass


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / f for f in sorted(set(weight_map.values()))]
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    raise ConversionError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def iter_tensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs of a safetensors folder, one tensor in memory at a time."""
    for path in safetensors_files(folder):
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():
                    yield name, f.get_tensor(name)
        except ConversionError:
            raise
        except Exception as e:  # safetensors raises its own error type for a corrupt header
            raise ConversionError(f"{path}: cannot read safetensors file ({e})") from e


class ShardWriter:
    """Writes tensors into safetensors shards of at most max_shard_bytes, holding one shard in memory."""

    def __init__(self, folder: Path, max_shard_bytes: int = 2 * 1024**3, metadata: dict | None = None):
        self.folder, self.max_bytes = folder, max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffered = 0
        self.shards: list[list[str]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.buffer or any(name in s for s in self.shards):
            raise ConversionError(f"tensor {name} written twice")
        size = tensor.numel() * tensor.element_size()
        if self.buffer and self.buffered + size > self.max_bytes:
            self._flush()
        self.buffer[name] = tensor.contiguous()
        self.buffered += size
        self.total += size

    def _flush(self) -> None:
        save_file(self.buffer, str(self.folder / f"shard-{len(self.shards):05d}.part"), metadata=self.metadata)
        self.shards.append(list(self.buffer))
        self.buffer, self.buffered = {}, 0

    def close(self) -> None:
        if self.buffer or not self.shards:
            self._flush()
        n = len(self.shards)
        if n == 1:
            os.replace(self.folder / "shard-00000.part", self.folder / "model.safetensors")
            return
        weight_map = {}
        for i, names in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.folder / f"shard-{i:05d}.part", self.folder / final)
            weight_map.update({name: final for name in names})
        index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


@contextlib.contextmanager
def atomic_folder(out: Path):
    """Yield a temporary sibling folder; it becomes `out` only when the block completes."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConversionError(f"{path}: not found") from None
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja")


def copy_files(src: Path, dst: Path, names) -> list[str]:
    copied = []
    for name in names:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


def local_folder(name_or_path: str, patterns: list[str]) -> Path:
    """A local folder, or the hub snapshot of those files (honours HF_ENDPOINT and HF_TOKEN)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name_or_path, allow_patterns=patterns))
