"""Streaming tensor I/O: read safetensors folders tensor by tensor, write shards as they fill, publish atomically."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

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


def meta_shapes(build) -> dict[str, tuple]:
    """{name: shape} of every tensor of the model `build()` makes, built on the meta device (no memory): what a
    config asks of the weights."""
    with torch.device("meta"):
        model = build()
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def tensor_shapes(folder: Path) -> Iterator[tuple[str, tuple]]:
    """(name, shape) of every tensor of a safetensors folder, from the headers alone (no tensor is read)."""
    for path in safetensors_files(folder):
        try:
            with safe_open(str(path), framework="pt") as f:
                shapes = [(name, tuple(f.get_slice(name).get_shape())) for name in f.keys()]
        except Exception as e:  # safetensors raises its own error type for a corrupt header
            raise ConversionError(f"{path}: cannot read safetensors file ({e})") from e
        yield from shapes


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


SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


def _release_pages(tensor: torch.Tensor) -> None:
    """Drop the resident pages of a tensor read from a memory-mapped checkpoint (they re-read on access)."""
    import ctypes
    import mmap

    storage = tensor.untyped_storage()
    start, size = storage.data_ptr(), storage.nbytes()
    page = mmap.PAGESIZE
    first = -(-start // page) * page  # only whole pages inside this storage
    length = (start + size) // page * page - first
    if length > 0:
        ctypes.CDLL(None, use_errno=True).madvise(ctypes.c_void_p(first), ctypes.c_size_t(length), 4)  # DONTNEED


class ShardWriter:
    """Writes tensors into safetensors shards of at most max_shard_bytes, streaming one tensor at a time.

    Tensors are kept as references until their shard is written; each is then cast, written straight to
    the file and let go, so memory stays near one tensor. With `release_sources` (for sources read from a
    read-only memory-mapped checkpoint) the source's pages are dropped once written.
    """

    def __init__(self, folder: Path, max_shard_bytes: int = 2 * 1024**3, metadata: dict | None = None,
                 release_sources: bool = False):
        self.folder, self.max_bytes, self.release = folder, max_shard_bytes, release_sources
        self.metadata = {"format": "pt", **(metadata or {})}
        self.pending: list[tuple[str, torch.Tensor, torch.dtype]] = []
        self.pending_bytes = 0
        self.names: set[str] = set()
        self.shards: list[list[str]] = []
        self.total = 0

    def add(self, name: str, tensor: torch.Tensor, dtype: torch.dtype | None = None) -> None:
        if name in self.names:
            raise ConversionError(f"tensor {name} written twice")
        # the export dtype is for weights: an integer buffer (an old CLIP's position_ids) keeps its values
        dtype = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        size = tensor.numel() * dtype.itemsize
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.names.add(name)
        self.pending.append((name, tensor, dtype))
        self.pending_bytes += size
        self.total += size

    def _flush(self) -> None:
        header, offset = {}, 0
        for name, t, dtype in self.pending:
            n = t.numel() * dtype.itemsize
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
            offset += n
        header["__metadata__"] = self.metadata
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(self.folder / f"shard-{len(self.shards):05d}.part", "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for _, src, dtype in self.pending:
                t = src.to(dtype).contiguous()
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else b"")  # 0-dim too
                del t
                if self.release:
                    _release_pages(src)
        self.shards.append([name for name, _, _ in self.pending])
        self.pending, self.pending_bytes = [], 0

    def close(self) -> None:
        if self.pending or not self.shards:
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
