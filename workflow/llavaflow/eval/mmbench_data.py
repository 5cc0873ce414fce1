"""Reading MMBench / CCBench TSVs: quote-aware parsing, option columns, image pointers (VLMEvalKit's layout)."""

from __future__ import annotations

import base64
import binascii
import logging
import string
from pathlib import Path

import pandas as pd

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("index", "question", "A", "B", "image")
POINTER_MAX_LEN = 64  # VLMEvalKit: a non-empty image value of at most 64 characters is a row index


class BenchmarkError(ValueError):
    pass


def read_benchmark(path: str | Path) -> pd.DataFrame:
    """Read a benchmark TSV with pandas' defaults (as VLMEvalKit and xtuner do), checked and indexed."""
    path = Path(path)
    try:
        df = pd.read_csv(path, sep="\t")
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise BenchmarkError(f"{path}: cannot parse as a tab-separated file: {e}") from None
    # Column names: l2-category is matched case-insensitively; option letters stay upper case.
    df = df.rename(columns={c: c.lower() for c in df.columns if len(c) > 1})
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise BenchmarkError(f"{path}: missing column(s) {missing}; found {list(df.columns)}")
    bad = pd.to_numeric(df["index"], errors="coerce").isna()
    if bad.any():
        raise BenchmarkError(f"{path}: row {int(bad.idxmax()) + 2}: index {df['index'][bad].iloc[0]!r} is not an integer")
    df["index"] = df["index"].astype(int)
    dupes = df["index"][df["index"].duplicated()]
    if len(dupes):
        raise BenchmarkError(f"{path}: duplicate index {int(dupes.iloc[0])}")
    _log_na_options(path, df)
    return df.set_index("index", drop=False)


def _log_na_options(path: Path, df: pd.DataFrame) -> None:
    """pandas turns option cells such as 'None' or 'N/A' into NaN and the option is dropped: say so."""
    raw = pd.read_csv(path, sep="\t", keep_default_na=False, dtype=str)
    for letter in option_letters(df):
        lost = (raw[letter] != "") & df[letter].isna().to_numpy()
        for i in lost[lost].index:
            log.warning("%s: index %s: option %s %r reads as missing (pandas NA) and is dropped",
                        path, raw["index"][i], letter, raw[letter][i])


def option_letters(df: pd.DataFrame) -> list[str]:
    return [c for c in string.ascii_uppercase if c in df.columns]


def options(row: pd.Series, letters: list[str]) -> dict[str, str]:
    """{letter: text} for every option column present and non-NaN in this row."""
    return {L: str(row[L]) for L in letters if not pd.isna(row[L])}


def image_bytes(df: pd.DataFrame, index: int) -> bytes:
    """Decode a row's image, following pointers (an index of another row) transitively."""
    seen = [index]
    value = df.at[index, "image"]
    while isinstance(value, (int, float, str)) and not pd.isna(value) and len(str(value)) <= POINTER_MAX_LEN:
        try:
            target = int(float(value))
        except ValueError:
            raise BenchmarkError(f"index {index}: image value {value!r} is neither base64 nor a row index") from None
        if target in seen:
            raise BenchmarkError(f"index {index}: image pointers form a cycle {seen + [target]}")
        if target not in df.index:
            raise BenchmarkError(f"index {index}: image points at index {target}, which is not in the file")
        seen.append(target)
        value = df.at[target, "image"]
    if not isinstance(value, str):
        raise BenchmarkError(f"index {index}: no image (image cell is empty)")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise BenchmarkError(f"index {seen[-1]}: image is not valid base64 ({e})") from None
