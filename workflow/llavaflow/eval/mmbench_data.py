"""Reading MMBench / CCBench TSVs: quote-aware parsing, option columns, image pointers (VLMEvalKit's layout)."""

from __future__ import annotations

import base64
import binascii
import csv
import io
import logging
import re
import string
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
from PIL import Image

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("index", "question", "A", "B", "image")
POINTER_MAX_LEN = 64  # VLMEvalKit: a non-empty image value of at most 64 characters is a row index


class BenchmarkError(ValueError):
    pass


def read_benchmark(path: str | Path) -> pd.DataFrame:
    """Read a benchmark TSV with pandas' defaults (as VLMEvalKit and xtuner do), checked and indexed.

    Refused, with the file and row named: a file that cannot be parsed, missing columns, a non-integer or
    duplicate index, a record with fewer fields than the header (a file cut short, e.g. after the image
    column), a row without any option. Used with a warning and counted in `df.attrs["input_issues"]`
    (reported in summary.json): an answer that is not one of the row's options, rows without an answer,
    and a file with no answer column whose name or split does not say TEST.
    """
    path = Path(path)
    if not path.is_file():
        raise BenchmarkError(f"{path}: no such file")
    try:
        df = pd.read_csv(path, sep="\t")
    except pd.errors.EmptyDataError:
        raise BenchmarkError(f"{path}: the file is empty") from None
    except UnicodeDecodeError as e:
        raise BenchmarkError(f"{path}: not UTF-8 text at byte {e.start} ({e.reason}): is it a TSV (not xlsx, not "
                             "UTF-16)?") from None
    except (OSError, pd.errors.ParserError) as e:
        raise BenchmarkError(f"{path}: cannot parse as a tab-separated file ({e}); a file cut inside a quoted "
                             "field reads this way: fetch it again") from None
    # Column names: l2-category is matched case-insensitively; option letters stay upper case.
    df = df.rename(columns={c: c.lower() for c in df.columns if len(c) > 1})
    # A file with answers is scored per category: without the column it would fail after the whole run.
    missing = [c for c in REQUIRED_COLUMNS + (("category",) if "answer" in df.columns else ()) if c not in df.columns]
    if missing:
        raise BenchmarkError(f"{path}: missing column(s) {missing}; found {list(df.columns)}")
    raw = _raw_records(path)
    numeric = pd.to_numeric(df["index"], errors="coerce")
    bad = numeric.isna() | (numeric % 1 != 0)  # 241.7 would be cut to 241 and taken for another row
    if bad.any():
        value = df["index"][bad].iloc[0]
        shown = repr(value) if isinstance(value, str) else value
        raise BenchmarkError(f"{path}: row {int(bad.idxmax()) + 2}: index {shown} is not an integer")
    df["index"] = df["index"].astype(int)
    dupes = df["index"][df["index"].duplicated()]
    if len(dupes):
        raise BenchmarkError(f"{path}: duplicate index {int(dupes.iloc[0])}")
    _check_complete_records(path, raw, df)
    _log_na_options(path, raw, df)
    df = df.set_index("index", drop=False)
    df.attrs["path"] = str(path)
    df.attrs["input_issues"] = _input_issues(path, df)
    return df


@contextmanager
def _csv_field_limit(limit: int):
    """csv's default field limit (128 KiB) is below a base64 image; raised for this read only."""
    old = csv.field_size_limit()
    csv.field_size_limit(max(old, limit))
    try:
        yield
    finally:
        csv.field_size_limit(old)


def _raw_records(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, fields) of every record, as text, parsed with the quoting pandas uses: the field
    count and the literal cell text that pandas' NaN handling hides."""
    with _csv_field_limit(path.stat().st_size + 1), open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f, delimiter="\t")
        records, line = [], 1
        for fields in reader:
            if fields and not (len(fields) == 1 and not fields[0].strip()):  # pandas skips blank lines too
                records.append((line, fields))
            line = reader.line_num + 1
    return records


def _check_complete_records(path: Path, raw: list, df: pd.DataFrame) -> None:
    """pandas fills a record with too few fields with NaN, silently: a file cut short (a killed download,
    a copy cut after the image column) would be scored. Refuse it, naming the record."""
    header = raw[0][1]
    for (line, fields), index in zip(raw[1:], df["index"]):
        if len(fields) < len(header):
            last = header[len(fields) - 1] if fields else "nothing"
            raise BenchmarkError(
                f"{path}: line {line} (index {index}) has {len(fields)} of {len(header)} fields and ends after the "
                f"{last!r} column: the file is cut short (an interrupted download or copy?); fetch it again")


def _log_na_options(path: Path, raw: list, df: pd.DataFrame) -> None:
    """pandas turns option cells such as 'None' or 'N/A' into NaN and the option is dropped: say so."""
    header = [c if len(c) == 1 else c.lower() for c in raw[0][1]]
    for letter in option_letters(df):
        col = header.index(letter)
        for (_, fields), index, value in zip(raw[1:], df["index"], df[letter]):
            if pd.isna(value) and col < len(fields) and fields[col] != "":
                log.warning("%s: index %s: option %s %r reads as missing (pandas NA) and is dropped",
                            path, index, letter, fields[col])


def looks_like_test(path: Path, df: pd.DataFrame) -> bool:
    """A TEST split by its name (MMBench_TEST_EN, ..._test.tsv) or by a split column saying only 'test'."""
    by_name = re.search(r"(^|[^a-z])test([^a-z]|$)", path.stem.lower()) is not None
    by_split = "split" in df.columns and set(df["split"].dropna().astype(str).str.lower()) == {"test"}
    return by_name or by_split


def _input_issues(path: Path, df: pd.DataFrame) -> dict:
    """Rows used as they are, with a warning; the counts go into summary.json."""
    letters = option_letters(df)
    no_options = [int(i) for i, row in df.iterrows() if not options(row, letters)]
    if no_options:
        raise BenchmarkError(f"{path}: index {no_options[0]}: no options (columns {', '.join(letters)} are all "
                             f"empty; {len(no_options)} such row(s)): nothing to choose from, the file is damaged")
    issues: dict = {}
    if "answer" not in df.columns:
        if not looks_like_test(path, df):
            log.warning("%s has no 'answer' column, but neither its name nor its split column says TEST: it is "
                        "treated as a TEST file (predictions only, no accuracy). A DEV file without answers is "
                        "damaged: fetch it again", path)
            issues["no_answer_column_not_named_test"] = True
        return issues
    unanswered = [int(i) for i in df.index[df["answer"].isna()]]
    if unanswered:
        log.warning("%s: %d row(s) without an answer (e.g. index %d): the file cannot be scored, predictions only",
                    path, len(unanswered), unanswered[0])
        issues["rows_without_answer"] = unanswered
    outside = [int(i) for i, row in df.iterrows()
               if not pd.isna(row["answer"]) and str(row["answer"]) not in options(row, letters)]
    if outside:
        log.warning("%s: %d row(s) whose answer is not one of their options (e.g. index %d, answer %r): "
                    "they can never be answered right and are scored as misses, as VLMEvalKit does",
                    path, len(outside), outside[0], df.at[outside[0], "answer"])
        issues["answer_not_in_options"] = outside
    return issues


def option_letters(df: pd.DataFrame) -> list[str]:
    return [c for c in string.ascii_uppercase if c in df.columns]


def options(row: pd.Series, letters: list[str]) -> dict[str, str]:
    """{letter: text} for every option column present and non-NaN in this row."""
    return {L: str(row[L]) for L in letters if not pd.isna(row[L])}


def image_row(df: pd.DataFrame, index: int) -> int:
    """The index of the row holding this row's image, following pointers (an index of another row) transitively."""
    where = f"{df.attrs['path']}: " if "path" in df.attrs else ""
    seen = [index]
    value = df.at[index, "image"]
    while isinstance(value, (int, float, str)) and not pd.isna(value) and len(str(value)) <= POINTER_MAX_LEN:
        try:
            target = int(float(value))
        except ValueError:
            raise BenchmarkError(f"{where}index {index}: image value {value!r} is neither base64 nor a row index") from None
        if target in seen:
            raise BenchmarkError(f"{where}index {index}: image pointers form a cycle {seen + [target]}")
        if target not in df.index:
            raise BenchmarkError(f"{where}index {index}: image points at index {target}, which is not in the file")
        seen.append(target)
        value = df.at[target, "image"]
    if not isinstance(value, str):
        raise BenchmarkError(f"{where}index {index}: no image (image cell is empty)")
    return seen[-1]


def image_bytes(df: pd.DataFrame, index: int) -> bytes:
    """Decode a row's image, following pointers. Whitespace in the base64 (a value wrapped across lines) is
    skipped, as base64.b64decode does in VLMEvalKit and xtuner; any other non-base64 character is an error."""
    source = image_row(df, index)
    try:
        return base64.b64decode("".join(df.at[source, "image"].split()), validate=True)
    except (binascii.Error, ValueError) as e:
        where = f"{df.attrs['path']}: " if "path" in df.attrs else ""
        raise BenchmarkError(f"{where}index {source}: image is not valid base64 ({e})") from None


def check_image_header(data: bytes, where: str) -> None:
    """Refuse bytes that are no image format PIL knows, from the header alone (cheap: nothing is decoded);
    a truncated image is still found when its batch decodes it, with the row named."""
    try:
        Image.open(io.BytesIO(data)).close()
    except Exception as e:  # UnidentifiedImageError, DecompressionBombError, plugin errors on a bad header
        raise BenchmarkError(f"{where}: not a readable image ({e or type(e).__name__})") from None
