"""LLaVA JSON / JSONL datasets: read, tokenise, and load images in __getitem__ (worker processes)."""

from __future__ import annotations

import json
import logging
import zlib
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from ..atomic import atomic_output
from ..constants import IGNORE_INDEX
from ..template import PromptTemplate
from .conversation import ConversationError, encode_turns, sample_turns
from .images import ImageError, ImageTransform, open_image

log = logging.getLogger(__name__)


class DataError(ValueError):
    pass


_COUNTER_SLOTS = 1024  # slot 0: the main process; slot 1 + worker id: a DataLoader worker


@dataclass(frozen=True)
class Record:
    """One annotation entry, with where it came from so errors can name it."""

    source: str
    line: int  # 1-based line in a JSONL file, or 1-based position in a JSON list
    id: str
    image: str | None
    conversations: list

    @property
    def where(self) -> str:
        unit = "line" if self.source.endswith(".jsonl") else "entry"
        return f"{self.source} {unit} {self.line} (id {self.id})"


def _record(obj, source: str, line: int) -> Record:
    ident = f" (id {obj['id']})" if isinstance(obj, dict) and "id" in obj else ""
    # file:line for a JSONL line; a JSON list's position is no line number, so it is called an entry
    where = (f"{source}:{line}" if source.endswith(".jsonl") else f"{source} entry {line}") + ident
    if not isinstance(obj, dict) or not isinstance(obj.get("conversations"), list):
        raise DataError(f"{where}: expected an object with a 'conversations' list")
    image = obj.get("image")
    if image is not None and not isinstance(image, str):
        raise DataError(f"{where}: 'image' must be a relative path string, got {image!r}")
    return Record(source, line, str(obj.get("id", line)), image, obj["conversations"])


def read_annotations(path: str | Path, on_bad_sample: str = "error") -> tuple[list[Record], int]:
    """Read a LLaVA .json list or a .jsonl file; returns (records, number of malformed entries skipped)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: annotation file not found")
    records, skipped = [], 0
    if path.suffix == ".jsonl":
        with open(path, "rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                    if not line.strip():
                        continue
                    obj = json.loads(line)
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    error = DataError(f"{path}:{n}: malformed JSON line: {e}")
                else:
                    try:
                        records.append(_record(obj, str(path), n))
                        continue
                    except DataError as e:
                        error = e
                if on_bad_sample != "skip":
                    raise error
                skipped += 1
                log.warning("skipping %s", error)
        return records, skipped
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 at byte {e.start}: {e.reason}") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: a LLaVA .json annotation file must hold a list of samples")
    for n, obj in enumerate(data, 1):
        try:
            records.append(_record(obj, str(path), n))
        except DataError as e:
            if on_bad_sample != "skip":
                raise
            skipped += 1
            log.warning("skipping %s", e)
    return records, skipped


@dataclass
class Sample:
    """One tokenised sample while the dataset is built."""

    record: Record
    image_path: Path | None
    input_ids: list[int]
    labels: list[int]


class LlavaDataset(Dataset):
    """Samples from one or more (annotation, image_folder) sources, tokenised up front.

    The tokens of every sample live in two flat int32 arrays with offsets, and each sample keeps only its image
    path and where it came from: 9 bytes per token, where Python lists and the conversations' dicts kept 44
    (~14 GB on every rank for ShareGPT4V-PT's 1.25M samples), and DataLoader workers copy the pages of such
    objects as they touch their reference counts.
    """

    def __init__(
        self,
        sources: list[dict],
        tokenizer,
        template: PromptTemplate,
        transform: ImageTransform,
        max_length: int,
        on_bad_sample: str = "error",
    ):
        self._setup(transform, on_bad_sample)
        ids, labels, offsets = array("i"), array("i"), array("q", [0])
        self._images: list[str | None] = []  # image path per sample
        self._where: list[str] = []  # what errors call each sample
        self._missing: list[str] = []  # images skipped as not found (on_bad_sample: skip)
        for src in sources:
            records, bad = read_annotations(src["annotation"], on_bad_sample)
            self.skipped["malformed"] += bad
            folder = Path(src.get("image_folder") or ".")
            for rec in records:
                sample = self._prepare(rec, folder, tokenizer, template, max_length)
                if sample is not None:
                    ids.extend(sample.input_ids)
                    labels.extend(sample.labels)
                    offsets.append(len(ids))
                    self._images.append(None if sample.image_path is None else str(sample.image_path))
                    self._where.append(rec.where)
            del records  # the conversations' text: not needed once tokenised
        if not self._images:
            raise DataError(f"no usable samples in {[s['annotation'] for s in sources]}")
        self._ids, self._labels = np.frombuffer(ids, dtype=np.int32), np.frombuffer(labels, dtype=np.int32)
        self._offsets = np.frombuffer(offsets, dtype=np.int64)
        if any(self.skipped.values()):
            log.warning("skipped samples: %s", self.skipped)

    def _setup(self, transform: ImageTransform, on_bad_sample: str) -> None:
        if on_bad_sample not in ("error", "skip"):
            raise ValueError(f"on_bad_sample must be 'error' or 'skip', got {on_bad_sample!r}")
        self.transform = transform
        self.on_bad_sample = on_bad_sample
        self.skipped = {"malformed": 0, "missing_image": 0, "no_label": 0}
        # Images found unreadable only when loaded (in DataLoader worker processes) are replaced by the next
        # sample; each worker counts into its own slot of a shared-memory tensor, so the main process sees
        # the total without any extra channel through the batches.
        self._replaced = torch.zeros(_COUNTER_SLOTS, dtype=torch.long).share_memory_()

    ARRAYS = ("_ids", "_labels", "_offsets")

    def save(self, folder: str | Path, *, overwrite: bool = False) -> None:
        """The tokenised samples as .npy arrays and a JSON list, published atomically: `load` memory-maps them, so
        the ranks of a node share one copy and a resumed run skips tokenising (minutes for a million samples)."""
        with atomic_output(folder, overwrite=overwrite) as tmp:
            for name in self.ARRAYS:
                np.save(tmp / f"{name[1:]}.npy", getattr(self, name))
            (tmp / "samples.json").write_text(json.dumps({"images": self._images, "where": self._where,
                                                          "skipped": self.skipped, "missing_images": self._missing}))

    @staticmethod
    def images_found_since_saved(folder: str | Path) -> list[str]:
        """Images that were missing when `save` wrote `folder` (their samples skipped) and exist now: the saved
        samples, and whatever was trained on them, no longer stand for the data. Empty where nothing is saved."""
        try:
            missing = json.loads((Path(folder) / "samples.json").read_text()).get("missing_images", [])
        except (OSError, ValueError):  # nothing saved, or torn: tokenised afresh anyway
            return []
        return [image for image in missing if Path(image).is_file()]

    @classmethod
    def load(cls, folder: str | Path, transform: ImageTransform, on_bad_sample: str = "error") -> "LlavaDataset":
        """The samples `save` wrote (plain arrays and JSON: nothing is unpickled)."""
        folder = Path(folder)
        self = cls.__new__(cls)
        self._setup(transform, on_bad_sample)
        for name in self.ARRAYS:
            setattr(self, name, np.load(folder / f"{name[1:]}.npy", mmap_mode="r", allow_pickle=False))
        samples = json.loads((folder / "samples.json").read_text())
        self._images, self._where, self.skipped = samples["images"], samples["where"], samples["skipped"]
        self._missing = samples.get("missing_images", [])
        if len(self._offsets) != len(self._images) + 1 or self._offsets[-1] != len(self._ids):
            raise DataError(f"{folder}: the saved samples do not match their arrays; remove the folder to tokenise again")
        return self

    def _prepare(self, rec: Record, folder: Path, tokenizer, template, max_length) -> Sample | None:
        image_path = None
        if rec.image is not None:
            image_path = folder / rec.image
            if not image_path.is_file():
                skipped = self._bad(rec, "missing_image", f"image {image_path} not found")
                self._missing.append(str(image_path))
                return skipped
        try:
            turns = sample_turns(rec.conversations, has_image=image_path is not None)
            input_ids, labels = encode_turns(turns, tokenizer, template, max_length)
        except ConversationError as e:
            return self._bad(rec, "malformed", str(e))
        if all(label == IGNORE_INDEX for label in labels):
            self.skipped["no_label"] += 1  # xtuner drops these silently too
            return None
        return Sample(rec, image_path, input_ids, labels)

    def _bad(self, rec: Record, kind: str, why: str) -> None:
        if self.on_bad_sample != "skip":
            raise DataError(f"{rec.where}: {why}")
        self.skipped[kind] += 1
        log.warning("skipping %s: %s", rec.where, why)
        return None

    def __len__(self) -> int:
        return len(self._images)

    def fingerprint(self) -> tuple[int, int]:
        """(samples, CRC of every sample's length and image presence): equal on every rank that read the same data."""
        has_image = np.array([image is not None for image in self._images], dtype=np.uint8)
        return len(self), zlib.crc32(has_image.tobytes(), zlib.crc32(self._offsets.tobytes()))

    def check_same_on_every_rank(self) -> None:
        """Ranks that hold different samples would run other iteration counts and hang in the last collective.
        Training's ranks map the one copy rank 0 saved, so this guards against a work dir that is not the same
        folder on every node (a copy, a stale mount); any caller whose ranks build their own datasets gets the
        same guard. Fail at the start instead, naming what each rank holds."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        seen = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(seen, self.fingerprint())
        if len(set(seen)) > 1:
            raise DataError("the ranks built different datasets (samples, fingerprint per rank: "
                            f"{seen}): the work dir is not the same folder on every node, or a data file changed "
                            "while the ranks read it")

    @property
    def modality_lengths(self) -> list[int]:
        """xtuner's length per sample: len(input_ids), negated for text-only samples."""
        lengths = np.diff(self._offsets)
        return [int(n) if image is not None else -int(n) for n, image in zip(lengths, self._images)]

    @property
    def replaced_images(self) -> int:
        """Samples replaced (on_bad_sample: skip) because their image could not be loaded, in this process
        and its DataLoader workers."""
        return int(self._replaced.sum())

    def bad_sample_counts(self) -> dict:
        """Every kind of bad sample skipped or replaced so far (this rank's view; replaced images are the
        ones this rank's loaders met)."""
        return {**self.skipped, "replaced_image": self.replaced_images}

    def _count_replacement(self) -> None:
        info = get_worker_info()
        self._replaced[0 if info is None else 1 + info.id % (_COUNTER_SLOTS - 1)] += 1

    def __getitem__(self, idx: int) -> dict:
        for attempt in range(len(self)):
            at = (idx + attempt) % len(self)
            image = self._images[at]
            if image is None:
                pixel_values = self.transform.blank()
                break
            try:
                pixel_values = self.transform(open_image(image))
                break
            except ImageError as e:
                if self.on_bad_sample != "skip":
                    raise DataError(f"{self._where[at]}: {e}") from None
                # A corrupt file found only now: use the next sample so batch shapes stay fixed.
                self._count_replacement()
                log.warning("replacing %s with the next sample (unreadable image: %s); %d replaced so far",
                            self._where[at], e, self.replaced_images)
        else:
            raise DataError(f"no sample with a readable image in {len(self)} samples")
        start, end = self._offsets[at], self._offsets[at + 1]
        return {
            "input_ids": torch.from_numpy(self._ids[start:end].astype(np.int64)),
            "labels": torch.from_numpy(self._labels[start:end].astype(np.int64)),
            "pixel_values": pixel_values,
        }
