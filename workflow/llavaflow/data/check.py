"""The data check after a download: count samples, verify every referenced image exists and opens."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from ..atomic import atomic_output
from .dataset import DataError, read_annotations

log = logging.getLogger(__name__)


def _problem(path: Path) -> str | None:
    if not path.is_file():
        return "missing"
    try:
        with Image.open(path) as img:
            img.verify()
    except Exception as e:  # PIL raises many types for broken files
        return f"unreadable ({type(e).__name__}: {e})"
    return None


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
        counts[src["annotation"]] = {"samples": len(records), "with_image": len(with_image), "bad_images": len(bad),
                                     "malformed": malformed}
        log.info("%s: %d samples, %d with an image, %d bad images", src["annotation"], len(records), len(with_image), len(bad))
    with atomic_output(report, folder=False, overwrite=True) as tmp:
        tmp.write_text("file\tline\tid\timage\tproblem\n" + "".join(r + "\n" for r in rows))
    if rows and on_bad_sample != "skip":
        raise DataError(f"{len(rows)} referenced images are missing or unreadable, e.g. {rows[0].split(chr(9))[3]} "
                        f"({rows[0].split(chr(9))[4]}); the list is in {report}. Fix the data or set "
                        "data.on_bad_sample: skip to train without them")
    return counts
