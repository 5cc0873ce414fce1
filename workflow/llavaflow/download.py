"""Downloads: manifest entries fetched from plain URLs (resumable, verified) or the Hugging Face hub.

A plain URL streams to <dest>.part, resumes with an HTTP Range request after a broken connection (an
If-Range with the first response's ETag, so a file that changed upstream restarts instead of being glued
onto old bytes), retries with backoff, and only a complete file whose checksum matches is renamed into
place (a mismatching one is kept aside as <dest>.bad and never used). A file already in place with the
right checksum is not fetched again. Hub files go through huggingface_hub, which honours HF_ENDPOINT
mirrors and HF_TOKEN; they are checked and extracted like the others. An archive that does not extract
is moved aside as <dest>.bad, so the next attempt fetches it again (unless it matches its checksum: fetching
again would bring the same bytes).
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import lzma
import os
import tarfile
import time
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import requests
from tqdm import tqdm

log = logging.getLogger(__name__)
CHUNK = 1 << 20


class DownloadError(RuntimeError):
    pass


class NotAnArchive(DownloadError):
    pass


@dataclass
class Entry:
    """One manifest entry: where a file comes from, where it goes, how to check it."""

    dest: str | None = None  # relative to the manifest's root; None for hub snapshots kept in the HF cache
    url: str | None = None
    mirrors: list = field(default_factory=list)
    hub: dict | None = None  # {repo, path?, repo_type: dataset|model, revision?}; no path = whole snapshot
    md5: str | None = None
    sha256: str | None = None
    extract: bool = False
    extract_to: str | None = None  # folder (relative to the root) to extract into; default: the archive's folder
    manual: str | None = None  # sources no program can fetch: the steps for a person; presence is checked

    @classmethod
    def from_dict(cls, d: dict) -> "Entry":
        """An entry with its keys and paths checked: dest and extract_to stay inside the download root."""
        if not isinstance(d, dict):
            raise DownloadError(f"a download entry is a mapping of keys, got {d!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise DownloadError(f"download entry {d.get('dest')!r}: unknown key(s) {unknown}; known: {sorted(known)}")
        for key in ("dest", "extract_to"):
            value = d.get(key)
            if value is not None and (PurePosixPath(value).is_absolute() or ".." in PurePosixPath(value).parts):
                raise DownloadError(f"download entry {d.get('dest')!r}: {key} {value!r} must be a path inside the "
                                    "download root (relative, no '..')")
        return cls(**d)


def file_digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _checksum(entry: Entry) -> tuple[str, str] | None:
    if entry.sha256:
        return "sha256", entry.sha256.lower()
    if entry.md5:
        return "md5", entry.md5.lower()
    return None


def verified(path: Path, entry: Entry) -> bool:
    check = _checksum(entry)
    return path.is_file() and (check is None or file_digest(path, check[0]) == check[1])


def _hub_host() -> str:
    return urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).netloc


def auth_headers(url: str) -> dict:
    """HF_TOKEN goes to the hub (or its HF_ENDPOINT mirror) only, never to other hosts."""
    token = os.environ.get("HF_TOKEN")
    host = urlparse(url).netloc
    return {"Authorization": f"Bearer {token}"} if token and host in (_hub_host(), "huggingface.co") else {}


def fetch_url(url: str, dest: Path, entry: Entry, session: requests.Session, retries: int = 4,
              backoff: float = 1.0, bar_position: int = 0) -> None:
    """Stream url to dest through dest.part, resuming with Range; verify, then rename into place."""
    part = dest.with_name(dest.name + ".part")
    validator = dest.with_name(dest.name + ".part.etag")  # the ETag the part's bytes came with
    dest.parent.mkdir(parents=True, exist_ok=True)
    attempt = 0
    while True:
        have = part.stat().st_size if part.exists() else 0
        headers = auth_headers(url)
        if have:
            headers["Range"] = f"bytes={have}-"
            if validator.is_file():
                headers["If-Range"] = validator.read_text()
        try:
            with session.get(url, headers=headers, stream=True, timeout=(10, 60)) as r:
                if r.status_code == 416:
                    size = _full_size(r)
                    # the part file holds every byte when the server says so, or (no size given) its checksum does
                    if size == have or (size is None and have and _checksum(entry) and verified(part, entry)):
                        break
                    log.info("%s: the part file holds %d bytes, the server has %s; starting %s again",
                             url, have, size, dest.name)
                    part.unlink(missing_ok=True)
                    validator.unlink(missing_ok=True)
                    continue
                if r.status_code >= 400:
                    if r.status_code < 500 or attempt >= retries:
                        raise DownloadError(f"HTTP {r.status_code} for {url}")
                    raise requests.ConnectionError(f"HTTP {r.status_code}")
                resumed = r.status_code == 206
                if have and not resumed:
                    log.info("%s ignored the Range request or the file changed; starting %s again", url, dest.name)
                if not resumed:
                    etag = r.headers.get("ETag")
                    if etag and not etag.startswith("W/"):  # If-Range takes strong validators only
                        validator.write_text(etag)
                    else:
                        validator.unlink(missing_ok=True)
                total = int(r.headers.get("Content-Length", 0)) + (have if resumed else 0)
                with open(part, "ab" if resumed else "wb") as f, tqdm(
                        total=total or None, initial=have if resumed else 0, unit="B", unit_scale=True,
                        desc=dest.name, position=bar_position, leave=False, disable=None) as bar:
                    for chunk in r.iter_content(CHUNK):
                        f.write(chunk)
                        bar.update(len(chunk))
                if total and part.stat().st_size < total:
                    raise requests.ConnectionError(f"connection closed at {part.stat().st_size} of {total} bytes")
            break
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
            attempt += 1
            if attempt > retries:
                raise DownloadError(f"{url}: giving up after {retries} retries ({e})") from None
            log.warning("%s: %s; retry %d of %d", url, e, attempt, retries)
            time.sleep(backoff * 2 ** (attempt - 1))
    validator.unlink(missing_ok=True)
    keep_aside_unless_verified(part, dest, entry, url)
    os.replace(part, dest)


def keep_aside_unless_verified(path: Path, dest: Path, entry: Entry, source: str) -> None:
    """Where the entry's checksum does not match, move `path` aside as <dest>.bad (never used) and say so."""
    check = _checksum(entry)
    if check is None:
        return
    got = file_digest(path, check[0])
    if got != check[1]:
        bad = dest.with_name(dest.name + ".bad")
        os.replace(path, bad)
        raise DownloadError(f"{source}: {check[0]} mismatch for {dest}: expected {check[1]}, got {got} "
                            f"(the file is kept aside as {bad} and not used)")


def _full_size(response: requests.Response) -> int | None:
    """The resource's size from a 416's Content-Range ("bytes */<size>"), if the server gave it."""
    total = response.headers.get("Content-Range", "").rpartition("/")[2]
    return int(total) if total.isdigit() else None


def fetch_hub(entry: Entry, root: Path) -> Path | None:
    from huggingface_hub import hf_hub_download, snapshot_download

    hub = entry.hub
    kwargs = {"repo_id": hub["repo"], "repo_type": hub.get("repo_type", "model"), "revision": hub.get("revision")}
    try:
        if "path" not in hub:
            return Path(snapshot_download(**kwargs, local_dir=root / entry.dest if entry.dest else None))
        dest = root / entry.dest
        path = Path(hf_hub_download(**kwargs, filename=hub["path"], local_dir=dest.parent))
        if path != dest:
            os.replace(path, dest)
        return dest
    except Exception as e:  # huggingface_hub's errors carry the status and the URL
        raise DownloadError(f"hub {hub['repo']}/{hub.get('path', '')}: {e}") from None


def _inside(target: Path, name: str) -> bool:
    p = PurePosixPath(name)
    return not p.is_absolute() and ".." not in p.parts and (target / name).resolve().is_relative_to(target.resolve())


def safe_extract(archive: Path, target: Path) -> None:
    """Extract zip or tar.* into target, refusing absolute paths, '..' and links that leave the target.

    Idempotent: a marker records which archive (size, mtime) was extracted, and a rerun skips it.
    """
    target.mkdir(parents=True, exist_ok=True)
    st = archive.stat()
    marker = target / f".extracted-{archive.name}"
    stamp = f"{st.st_size}:{st.st_mtime_ns}"
    if marker.exists() and marker.read_text() == stamp:
        return
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                if not _inside(target, info.filename):
                    raise DownloadError(f"{archive}: refusing member {info.filename!r}, it leaves {target}")
                if (info.external_attr >> 16) & 0o170000 == 0o120000:
                    raise DownloadError(f"{archive}: refusing symlink member {info.filename!r}")
            z.extractall(target)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as t:
            for m in t.getmembers():
                if not _inside(target, m.name):
                    raise DownloadError(f"{archive}: refusing member {m.name!r}, it leaves {target}")
                if (m.issym() or m.islnk()) and not _inside(target, str(PurePosixPath(m.name).parent / m.linkname)):
                    raise DownloadError(f"{archive}: refusing link {m.name!r} -> {m.linkname!r}, it leaves {target}")
                if not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
                    raise DownloadError(f"{archive}: refusing special member {m.name!r}")
            t.extractall(target, filter="data")
    else:
        raise NotAnArchive(f"{archive}: not a zip or tar archive")
    marker.write_text(stamp)


def fetch(entry: Entry, root: Path, session: requests.Session, position: int = 0) -> str:
    """Bring one entry into place; returns what happened (for the log)."""
    if entry.manual:
        dest = root / entry.dest
        if not dest.exists():
            raise DownloadError(f"{dest} is missing and cannot be fetched by program. Manual step: {entry.manual}")
        return f"present (manual): {entry.dest}"
    if entry.hub:
        dest = fetch_hub(entry, root)
        how = f"hub: {entry.hub['repo']} {entry.hub.get('path', '(snapshot)')}"
        if dest is not None:
            keep_aside_unless_verified(dest, dest, entry, f"hub {entry.hub['repo']}/{entry.hub.get('path', '')}")
        if entry.extract and dest is not None:
            _extract(dest, root, entry)
            how += ", extracted"
        return how
    dest = root / entry.dest
    if verified(dest, entry):
        how = "already in place"
    else:
        if dest.is_dir():
            raise DownloadError(f"{dest}: is a folder; the entry fetches a file there (move the folder or fix dest)")
        if dest.exists():  # not what the checksum says: an older version, or someone's file; kept, never replaced
            aside = dest.with_name(f"{dest.name}.unverified-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(dest, aside)
            log.warning("%s does not match its checksum: moved aside as %s before fetching it", dest, aside)
        errors = []
        for url in [entry.url, *entry.mirrors]:
            try:
                fetch_url(url, dest, entry, session, bar_position=position)
                break
            except DownloadError as e:
                errors.append(str(e))
                if "mismatch" in str(e):
                    raise
        else:
            raise DownloadError("; ".join(errors))
        how = "downloaded"
    if entry.extract:
        _extract(dest, root, entry)
        how += ", extracted"
    return f"{how}: {entry.dest}"


def _extract(archive: Path, root: Path, entry: Entry) -> None:
    """Extract into extract_to (or beside the archive). A file that is no readable archive is moved aside, so
    a retry fetches it again instead of failing on the same bytes for ever; unless it matches its checksum,
    when fetching it again would bring the same bytes."""
    target = root / entry.extract_to if entry.extract_to else archive.parent
    try:
        safe_extract(archive, target)
    # corrupt-data errors only: a full disk (OSError) must not throw away a good 19 GB archive
    except (NotAnArchive, zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile,
            lzma.LZMAError) as e:
        if _checksum(entry):
            raise DownloadError(f"{archive}: cannot extract ({e}), though it matches its {_checksum(entry)[0]}: "
                                "the published file itself is broken or not a zip/tar archive; kept in place") from None
        bad = archive.with_name(archive.name + ".bad")
        os.replace(archive, bad)
        raise DownloadError(f"{archive}: cannot extract ({e}); moved aside as {bad}, so the next run fetches "
                            "it again") from None


def download(entries: list[Entry], root: str | Path, jobs: int = 4) -> list[str]:
    """Fetch every entry (in parallel); all errors are collected and raised together at the end."""
    root = Path(root)
    session = requests.Session()
    session.headers["User-Agent"] = "llavaflow"
    results, errors = [], []
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(fetch, e, root, session, i % jobs) for i, e in enumerate(entries)]
        for f in futures:
            try:
                results.append(f.result())
                log.info(results[-1])
            except DownloadError as e:
                errors.append(str(e))
    if errors:
        raise DownloadError("\n".join(errors))
    return results
