"""The data check after a download: count samples, verify every referenced image exists and decodes and every
conversation is one training can use."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..atomic import atomic_output
from .conversation import ConversationError, sample_turns
from .dataset import DataError, read_annotations
from .images import ImageError, open_image

log = logging.getLogger(__name__)


def _problem(path: Path) -> str | None:
    """Training's own loading (decode every pixel, then RGB): PIL's verify() reads no JPEG data, so a truncated
    JPEG passed it and failed hours into training."""
    if not path.is_file():
        return "missing"
    try:
        open_image(path)
    except ImageError as e:
        return f"unreadable ({str(e).removeprefix(f'{path}: ')})"
    except Exception as e:  # whatever else one bad file raises: listed, never the end of the whole check
        return f"unreadable ({type(e).__name__}: {e})"
    return None


def _conversation_problem(record) -> str | None:
    """What training's dataset would refuse in the conversation itself (it needs no tokenizer to tell)."""
    try:
        sample_turns(record.conversations, has_image=record.image is not None)
    except ConversationError as e:
        return f"malformed conversation ({e})"
    return None


def failed_report(report: Path) -> Path:
    """Where the list goes when the check fails: Snakemake deletes a failed job's declared outputs."""
    return report.with_name(report.name.removesuffix(".tsv") + ".failed.tsv")


def check_data(sources: list[dict], report: str | Path, on_bad_sample: str = "error", threads: int = 8) -> dict:
    """Write a TSV of every bad image reference (file, line, id, image, problem); raise unless told to drop."""
    report = Path(report)
    rows, counts = [], {}
    for src in sources:
        records, malformed = read_annotations(src["annotation"], on_bad_sample)
        folder = Path(src.get("image_folder") or ".")
        with_image = [r for r in records if r.image is not None]
        with ThreadPoolExecutor(threads) as pool:
            problems = list(pool.map(lambda r: _problem(folder / r.image), with_image))
        bad = [(r, p) for r, p in zip(with_image, problems) if p]
        rows += [f"{r.source}\t{r.line}\t{r.id}\t{folder / r.image}\t{p}" for r, p in bad]
        conversations = [(r, p) for r in records if (p := _conversation_problem(r))]
        rows += [f"{r.source}\t{r.line}\t{r.id}\t{folder / r.image if r.image else ''}\t{p}" for r, p in conversations]
        counts[src["annotation"]] = {"samples": len(records), "with_image": len(with_image), "bad_images": len(bad),
                                     "malformed": malformed + len(conversations)}
        log.info("%s: %d samples, %d with an image, %d bad images", src["annotation"], len(records), len(with_image), len(bad))
    failing = bool(rows) and on_bad_sample != "skip"
    inputs = [src[k] for src in sources for k in ("annotation", "image_folder") if src.get(k)]
    with atomic_output(failed_report(report) if failing else report, folder=False, inputs=inputs, overwrite=True) as tmp:
        tmp.write_text("file\tline\tid\timage\tproblem\n" + "".join(r + "\n" for r in rows))
    if failing:
        where, image, problem = rows[0].split("\t")[0:2], rows[0].split("\t")[3], rows[0].split("\t")[4]
        raise DataError(f"{len(rows)} problems (a missing or unreadable image, a malformed conversation), e.g. "
                        f"{':'.join(where)} {image} ({problem}); the list is in {failed_report(report)}. Fix the data "
                        "or set data.on_bad_sample: skip to train without them")
    failed_report(report).unlink(missing_ok=True)  # ours, from an earlier failed check
    return counts
