"""Downloads against a real HTTP server on 127.0.0.1: resume, errors, checksums, safe extraction."""

import hashlib
import http.server
import io
import json
import os
import tarfile
import threading
import time
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from llavaflow.data.check import check_data
from llavaflow.data.dataset import DataError
from conftest import run
from llavaflow.download import DownloadError, Entry, auth_headers, download, safe_extract

PAYLOAD = os.urandom(3 * 1024 * 1024 + 17)


class Server(http.server.ThreadingHTTPServer):
    files: dict
    log: list
    cut_once: set  # paths whose first GET dies halfway
    ignore_range: set
    chunk_delay: float = 0.0  # seconds between 64 KiB writes: a slow link, for killing clients mid-file

    def handle_error(self, request, client_address):
        pass  # a client that went away mid-file (killed by a test) is expected here


def etag(data: bytes) -> str:
    return f'"{hashlib.md5(data).hexdigest()}"'


class Handler(http.server.BaseHTTPRequestHandler):
    """Plain files with strong ETags, Range and If-Range (RFC 9110); under /<kind>s/<repo>/resolve/<rev>/ the
    headers huggingface_hub reads from the hub (X-Repo-Commit, ETag, size)."""

    def log_message(self, *a):
        pass

    def do_HEAD(self):
        self.server.log.append((self.path, "HEAD"))
        data = self.server.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        self.send_response(200)
        self._file_headers(data)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()

    def _file_headers(self, data: bytes):
        self.send_header("ETag", etag(data))
        if "/resolve/" in self.path:
            self.send_header("X-Repo-Commit", "0123456789abcdef0123456789abcdef01234567")

    def do_GET(self):
        srv = self.server
        srv.log.append((self.path, self.headers.get("Range")))
        data = srv.files.get(self.path)
        if data is None:
            self.send_error(404)
            return
        start = 0
        rng = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        if rng and self.path not in srv.ignore_range and if_range in (None, etag(data)):
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        self._file_headers(data)
        body = data[start:]
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path in srv.cut_once:
            srv.cut_once.discard(self.path)
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.connection.shutdown(2)  # the connection breaks mid-file
            return
        if srv.chunk_delay:
            for i in range(0, len(body), 1 << 16):
                self.wfile.write(body[i:i + (1 << 16)])
                time.sleep(srv.chunk_delay)
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    srv = Server(("127.0.0.1", 0), Handler)
    srv.files, srv.log, srv.cut_once, srv.ignore_range = {}, [], set(), set()
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    yield srv
    srv.shutdown()


def md5(b):
    return hashlib.md5(b).hexdigest()


def test_cut_download_resumes_byte_identical(server, tmp_path):
    server.files["/a.bin"] = PAYLOAD
    server.cut_once.add("/a.bin")
    download([Entry(dest="a.bin", url=server.url + "/a.bin", md5=md5(PAYLOAD))], tmp_path)
    assert (tmp_path / "a.bin").read_bytes() == PAYLOAD
    ranges = [r for p, r in server.log if p == "/a.bin"]
    assert ranges[0] is None and ranges[1].startswith("bytes=") and int(ranges[1][6:-1]) > 0  # resumed, not restarted
    assert not (tmp_path / "a.bin.part").exists()


def test_server_that_ignores_range_restarts_cleanly(server, tmp_path):
    server.files["/b.bin"] = PAYLOAD
    server.cut_once.add("/b.bin")
    server.ignore_range.add("/b.bin")
    download([Entry(dest="b.bin", url=server.url + "/b.bin", sha256=hashlib.sha256(PAYLOAD).hexdigest())], tmp_path)
    assert (tmp_path / "b.bin").read_bytes() == PAYLOAD


def test_404_names_status_and_url_and_mirror_is_used(server, tmp_path):
    with pytest.raises(DownloadError, match=rf"HTTP 404 for {server.url}/missing.tsv"):
        download([Entry(dest="x.tsv", url=server.url + "/missing.tsv")], tmp_path)
    server.files["/old/x.tsv"] = b"index\tquestion\n"
    download([Entry(dest="x.tsv", url=server.url + "/new/x.tsv", mirrors=[server.url + "/old/x.tsv"])], tmp_path)
    assert (tmp_path / "x.tsv").read_bytes() == b"index\tquestion\n"


def test_a_file_changed_upstream_restarts_instead_of_resuming(server, tmp_path):
    """The part file's bytes came with one ETag; the server now has other bytes: If-Range makes it send the
    whole new file, which replaces the part instead of being glued onto it."""
    old, new = PAYLOAD[:1000], os.urandom(5000)
    part = tmp_path / "e.bin.part"
    part.write_bytes(old[:600])
    (tmp_path / "e.bin.part.etag").write_text(etag(old))
    server.files["/e.bin"] = new
    download([Entry(dest="e.bin", url=server.url + "/e.bin")], tmp_path)
    assert (tmp_path / "e.bin").read_bytes() == new
    assert not part.exists() and not (tmp_path / "e.bin.part.etag").exists()


def test_a_stale_part_longer_than_the_file_is_not_taken_as_complete(server, tmp_path):
    """416 means the Range starts past the end: only a part of exactly the server's size is complete."""
    server.files["/f.bin"] = PAYLOAD[:1000]
    (tmp_path / "f.bin.part").write_bytes(os.urandom(3000))  # no ETag recorded: If-Range cannot help here
    download([Entry(dest="f.bin", url=server.url + "/f.bin")], tmp_path)
    assert (tmp_path / "f.bin").read_bytes() == PAYLOAD[:1000]
    (tmp_path / "g.bin.part").write_bytes(PAYLOAD[:1000])  # a complete part (the rename was interrupted)
    server.files["/g.bin"] = PAYLOAD[:1000]
    n = len(server.log)
    download([Entry(dest="g.bin", url=server.url + "/g.bin")], tmp_path)
    assert (tmp_path / "g.bin").read_bytes() == PAYLOAD[:1000] and server.log[n:] == [("/g.bin", "bytes=1000-")]


def test_an_archive_that_does_not_extract_is_fetched_again(server, tmp_path):
    good = _zip({"a.txt": b"A" * 5000})
    server.files["/h.zip"] = good[: len(good) // 2]  # truncated upstream (no checksum to catch it)
    entry = Entry(dest="h.zip", url=server.url + "/h.zip", extract=True)
    with pytest.raises(DownloadError, match=r"h.zip: cannot extract .*moved aside as .*h.zip.bad"):
        download([entry], tmp_path)
    assert not (tmp_path / "h.zip").exists() and (tmp_path / "h.zip.bad").is_file()
    server.files["/h.zip"] = good
    assert download([entry], tmp_path) == ["downloaded, extracted: h.zip"]
    assert (tmp_path / "a.txt").read_bytes() == b"A" * 5000
    # the same broken bytes under a checksum they match: fetching again would not help, so the file stays
    server.files["/i.zip"] = good[: len(good) // 2]
    with pytest.raises(DownloadError, match=r"i.zip: cannot extract .*though it matches its md5.*kept in place"):
        download([Entry(dest="i.zip", url=server.url + "/i.zip", extract=True, md5=md5(good[: len(good) // 2]))], tmp_path)
    assert (tmp_path / "i.zip").is_file() and not (tmp_path / "i.zip.bad").exists()


def test_hub_files_are_checked_and_extracted_where_the_entry_says(server, tmp_path):
    """`llavaflow download` against a hub on 127.0.0.1 (HF_ENDPOINT): the hub entry's zip is verified and
    extracted into extract_to, as LLaVA-Pretrain's images.zip must be."""
    zipped = _zip({"00000/000000012.jpg": b"jpeg bytes"})
    server.files["/datasets/liuhaotian/LLaVA-Pretrain/resolve/main/images.zip"] = zipped
    entries = [{"dest": "llava/llava_pretrain/images.zip", "extract": True, "md5": md5(zipped),
                "extract_to": "llava/llava_pretrain/images",
                "hub": {"repo": "liuhaotian/LLaVA-Pretrain", "path": "images.zip", "repo_type": "dataset"}}]
    env = {"HF_ENDPOINT": server.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"}
    cmd = ["llavaflow", "download", "--root", str(tmp_path / "root"), "--entries", json.dumps(entries)]
    run(cmd, env=env, timeout=300)
    images = tmp_path / "root" / "llava" / "llava_pretrain" / "images"
    assert (images / "00000" / "000000012.jpg").read_bytes() == b"jpeg bytes"
    assert any(p.endswith("/resolve/main/images.zip") for p, _ in server.log)
    entries[0]["md5"] = "0" * 32
    proc = run(cmd[:-1] + [json.dumps(entries)], env=env, timeout=300, check=False)
    assert proc.returncode != 0 and "md5 mismatch" in proc.stderr and "images.zip.bad" in proc.stderr, proc.stderr


def test_checksum_mismatch_keeps_the_file_aside(server, tmp_path):
    server.files["/c.tsv"] = b"tampered"
    with pytest.raises(DownloadError, match=r"md5 mismatch .*expected 0+, got " + md5(b"tampered")):
        download([Entry(dest="c.tsv", url=server.url + "/c.tsv", md5="0" * 32)], tmp_path)
    assert not (tmp_path / "c.tsv").exists() and (tmp_path / "c.tsv.bad").read_bytes() == b"tampered"


def test_entries_stay_inside_the_root_and_a_file_already_there_is_kept(server, tmp_path):
    """A dest or extract_to outside --root is refused by name; a file at dest that fails the checksum (an old
    version, someone's file) is moved aside, not replaced."""
    for bad in ({"dest": "../escaped.txt", "url": "u"}, {"dest": "/abs.txt", "url": "u"},
                {"dest": "a.zip", "url": "u", "extract": True, "extract_to": "../out"}):
        with pytest.raises(DownloadError, match=r"must be a path inside the download root"):
            Entry.from_dict(bad)
    with pytest.raises(DownloadError, match=r"download entry 'a.txt': unknown key\(s\) \['foo'\]"):
        Entry.from_dict({"dest": "a.txt", "url": "u", "foo": 1})
    server.files["/u.txt"] = b"served"
    (tmp_path / "u.txt").write_bytes(b"user content")
    download([Entry(dest="u.txt", url=server.url + "/u.txt", md5=md5(b"served"))], tmp_path)
    assert (tmp_path / "u.txt").read_bytes() == b"served"
    [aside] = tmp_path.glob("u.txt.unverified-*")
    assert aside.read_bytes() == b"user content"
    (tmp_path / "d.zip").mkdir()
    with pytest.raises(DownloadError, match=r"d.zip: is a folder; the entry fetches a file there"):
        download([Entry(dest="d.zip", url=server.url + "/u.txt")], tmp_path)
    assert (tmp_path / "d.zip").is_dir()


def test_unchanged_rerun_transfers_nothing(server, tmp_path):
    server.files["/d.bin"] = PAYLOAD
    entry = Entry(dest="d.bin", url=server.url + "/d.bin", md5=md5(PAYLOAD))
    download([entry], tmp_path)
    n = len(server.log)
    assert download([entry], tmp_path) == ["already in place: d.bin"]
    assert len(server.log) == n


def _zip(members: dict, symlink=None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink[0])
            info.external_attr = (0o120777 << 16)
            z.writestr(info, symlink[1])
    return buf.getvalue()


def test_archives_extract_safely_and_idempotently(server, tmp_path):
    server.files["/ok.zip"] = _zip({"data/a.txt": b"A", "b.txt": b"B"})
    download([Entry(dest="ok.zip", url=server.url + "/ok.zip", extract=True)], tmp_path)
    assert (tmp_path / "data" / "a.txt").read_bytes() == b"A"
    (tmp_path / "data" / "a.txt").write_bytes(b"edited")
    download([Entry(dest="ok.zip", url=server.url + "/ok.zip", extract=True)], tmp_path)
    assert (tmp_path / "data" / "a.txt").read_bytes() == b"edited"  # not extracted twice

    server.files["/slip.zip"] = _zip({"../../evil.txt": b"x"})
    with pytest.raises(DownloadError, match=r"refusing member '../../evil.txt'"):
        download([Entry(dest="slip.zip", url=server.url + "/slip.zip", extract=True)], tmp_path / "t")
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path.parent / "evil.txt").exists()
    server.files["/abs.zip"] = _zip({"/etc/evil": b"x"})
    with pytest.raises(DownloadError, match="refusing member '/etc/evil'"):
        download([Entry(dest="abs.zip", url=server.url + "/abs.zip", extract=True)], tmp_path / "t")
    server.files["/link.zip"] = _zip({}, symlink=("ln", "/etc/passwd"))
    with pytest.raises(DownloadError, match="refusing symlink member 'ln'"):
        download([Entry(dest="link.zip", url=server.url + "/link.zip", extract=True)], tmp_path / "t")

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        info = tarfile.TarInfo("escape")
        info.type, info.linkname = tarfile.SYMTYPE, "../../outside"
        t.addfile(info)
    (tmp_path / "bad.tar.gz").write_bytes(buf.getvalue())
    with pytest.raises(DownloadError, match="refusing link 'escape'"):
        safe_extract(tmp_path / "bad.tar.gz", tmp_path / "tt")


def test_manual_sources_are_checked_not_skipped(tmp_path):
    entry = Entry(dest="ai2d/images", manual="download AI2D images from Google Drive into ai2d/images")
    with pytest.raises(DownloadError, match="ai2d/images is missing and cannot be fetched by program. Manual step"):
        download([entry], tmp_path)
    (tmp_path / "ai2d" / "images").mkdir(parents=True)
    assert download([entry], tmp_path) == ["present (manual): ai2d/images"]


def test_token_only_goes_to_the_hub(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "secret")
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    assert auth_headers("https://huggingface.co/x/resolve/main/y") == {"Authorization": "Bearer secret"}
    assert auth_headers("http://images.cocodataset.org/zips/train2017.zip") == {}


def test_data_check_reports_missing_broken_and_truncated_images(tmp_path):
    """The list of a failed check is kept beside the declared report (which Snakemake deletes on failure); a
    JPEG cut short, which PIL's verify() passes, is found by decoding it as training does."""
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "imgs" / "ok.png")
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG broken")
    jpeg = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(jpeg, format="JPEG")
    (tmp_path / "imgs" / "cut.jpg").write_bytes(jpeg.getvalue()[:len(jpeg.getvalue()) // 2])
    with Image.open(tmp_path / "imgs" / "cut.jpg") as img:
        img.verify()  # what the check used before: no error
    ann = tmp_path / "a.jsonl"
    conv = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]
    two_images = conv + [{"from": "human", "value": "<image>\nAgain?"}, {"from": "gpt", "value": "y"}]
    ann.write_text("\n".join(json.dumps({"id": i, "image": f"imgs/{n}", "conversations": conv})
                             for i, n in enumerate(["ok.png", "broken.png", "gone.png", "cut.jpg"]))
                   + "\n" + json.dumps({"id": 4, "image": "imgs/ok.png", "conversations": two_images}) + "\n")
    src = [{"annotation": str(ann), "image_folder": str(tmp_path)}]
    report, kept = tmp_path / "report.tsv", tmp_path / "report.failed.tsv"
    with pytest.raises(DataError, match=f"4 problems \\(a missing or unreadable image, a malformed conversation\\), "
                                        f"e.g. {ann}:2 .*broken.png .*the list is in {kept}"):
        check_data(src, report)
    lines = kept.read_text().splitlines()
    assert not report.exists() and len(lines) == 5
    assert "broken.png\tunreadable" in lines[1] and "gone.png\tmissing" in lines[2]
    assert "cut.jpg\tunreadable (not a readable image (image file is truncated" in lines[3]
    assert lines[4].endswith("ok.png\tmalformed conversation (2 <image> placeholders in one conversation; a sample "
                             "holds one image)")  # what training's dataset refuses, found before it starts
    counts = check_data(src, report, on_bad_sample="skip")
    assert counts[str(ann)] == {"samples": 5, "with_image": 5, "bad_images": 3, "malformed": 1}
    assert report.read_text().splitlines() == lines and not kept.exists()


def test_data_check_never_writes_over_its_inputs(tmp_path):
    from llavaflow.atomic import OutputError
    from llavaflow.cli import main

    ann = tmp_path / "a.jsonl"
    ann.write_text(json.dumps({"id": 1, "conversations": [{"from": "human", "value": "hi"},
                                                          {"from": "gpt", "value": "yo"}]}) + "\n")
    before = ann.read_bytes()
    sources = [{"annotation": str(ann), "image_folder": str(tmp_path)}]
    with pytest.raises(OutputError, match=r"a.jsonl: the output is or contains the input"):
        check_data(sources, ann)
    assert main(["check-data", "--sources", json.dumps(sources), "--report", str(tmp_path / "r.tsv"),
                 "--out", str(ann)]) == 1
    assert main(["check-data", "--sources", json.dumps(sources), "--report", str(ann), "--out",
                 str(tmp_path / "o.json")]) == 1
    assert main(["check-data", "--sources", '{"annotation": 1}', "--report", str(tmp_path / "r.tsv"),
                 "--out", str(tmp_path / "o.json")]) == 1
    assert ann.read_bytes() == before and not (tmp_path / "o.json").exists()


def test_the_real_presets_data_rules_rerun_for_new_bytes_only(server, tmp_path):
    """download_data and check_data of the real preset, against a server on 127.0.0.1: the worker count, mirrors
    and manual notes are untracked (a rerun of the download would retrain both stages); a checksum is tracked."""
    import sys

    import yaml

    from conftest import ROOT

    png = io.BytesIO()
    Image.new("RGB", (4, 4), (9, 99, 199)).save(png, format="PNG")
    images = _zip({"00000/a.png": png.getvalue(), "00000/b.png": png.getvalue()})
    conv = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A square."}]
    annotation = json.dumps([{"id": i, "image": f"00000/{n}.png", "conversations": conv} for i, n in enumerate("ab")])
    server.files.update({"/caps.json": annotation.encode(), "/images.zip": images})
    cfg = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    cfg["downloads"]["pretrain"] = [
        {"dest": "caps.json", "url": server.url + "/caps.json"},
        {"dest": "llava/images.zip", "url": server.url + "/images.zip", "extract": True,
         "extract_to": "llava/images", "md5": md5(images)}]
    cfg["data"]["pretrain"]["datasets"] = [{"annotation": "caps.json", "image_folder": "llava/images"}]

    def snakemake(config, *extra):
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        return run([sys.executable, "-m", "snakemake", "results/data/pretrain.check.json", "--cores", "2",
                    "--snakefile", str(ROOT / "Snakefile"), "--directory", str(tmp_path), "--configfile", str(path),
                    *extra], cwd=tmp_path, timeout=600).stdout

    snakemake(cfg)
    counts = json.loads((tmp_path / "results" / "data" / "pretrain.check.json").read_text())
    assert counts[str(Path("results/data/pretrain/caps.json"))]["with_image"] == 2
    cfg["downloads"]["jobs"] = 8
    cfg["downloads"]["pretrain"][0]["mirrors"] = [server.url + "/mirror/caps.json"]
    assert "Nothing to be done" in snakemake(cfg, "-n")
    cfg["downloads"]["pretrain"][1]["md5"] = "0" * 32
    plan = snakemake(cfg, "-n")
    assert "rule download_data:" in plan and "rule check_data:" in plan, plan
