"""llavaflow chat: one-shot greedy output equals HF generate; an interactive session on a real pty."""

import json
import os
import pty
import random
import re
import select
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from llavaflow.constants import IMAGE_TOKEN_INDEX
from llavaflow.data.conversation import Turn, encode_prompt
from llavaflow.data.images import ImageError, open_image
from llavaflow.template import PHI3_CHAT
from llavaflow.tiny import Scene, draw

CLI = [sys.executable, "-m", "llavaflow.cli", "chat"]


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "shapes.png"
    draw(Scene("blue", "square", 2, "right", (60, 40)), random.Random(3)).save(path)
    return path


def chat(args, **kw):
    return subprocess.run(CLI + args, cwd=ROOT, capture_output=True, text=True, timeout=300, **kw)


def test_one_shot_greedy_equals_hf_generate(converted, tokenizer, image):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    question = "What colour are the shapes?"
    args = ["--image", str(image), "--prompt", question, "--temperature", "0", "--max-new-tokens", "12"]
    xt = chat([str(converted["out"] / "iter_xtuner"), *args])
    assert xt.returncode == 0, xt.stderr
    hfc = chat([str(converted["out"] / "iter_hf"), *args])
    assert hfc.returncode == 0, hfc.stderr

    hf = AutoModelForImageTextToText.from_pretrained(converted["out"] / "iter_hf").eval()
    proc = AutoProcessor.from_pretrained(converted["out"] / "iter_hf")
    ids = encode_prompt(tokenizer, PHI3_CHAT.format_instruction("<image>\n" + question), with_bos=True)
    expanded = sum(([hf.config.image_token_index] * hf.config.image_seq_length if i == IMAGE_TOKEN_INDEX else [i]
                    for i in ids), [])
    x = torch.tensor([expanded])
    with torch.no_grad():
        out = hf.generate(input_ids=x, pixel_values=proc.image_processor(Image.open(image), return_tensors="pt")["pixel_values"],
                          max_new_tokens=12, do_sample=False)
    expected = tokenizer.decode(out[0, x.shape[1]:], skip_special_tokens=True)
    assert xt.stdout.strip() == hfc.stdout.strip() == expected.strip()
    assert xt.stdout.strip()  # a random model still says something


def test_a_stop_word_of_several_tokens_ends_the_reply_where_it_appears(converted, image):
    """--stop-words text that is no token of its own (xtuner matches the decoded text): the reply ends before
    it. Looked up as a token, it was <unk> and never stopped anything."""
    args = [str(converted["out"] / "iter_xtuner"), "--image", str(image), "--prompt", "Describe it.",
            "--temperature", "0", "--max-new-tokens", "16"]
    full = chat(args)
    assert full.returncode == 0, full.stderr
    text = full.stdout.strip()
    word = text[len(text) // 2:len(text) // 2 + 3]
    assert len(text) >= 6 and word.strip(), text
    cut = chat(args + ["--stop-words", word])
    assert cut.returncode == 0, cut.stderr
    assert cut.stdout.strip() == text[:text.find(word)].strip()

    # in a conversation, the reply a stop word ended stays in the history (it was dropped)
    from llavaflow.chat import Session, fetch_image, generation_kwargs, load_backend

    backend = load_backend(str(converted["out"] / "iter_xtuner"), torch.float32, "cpu")
    session = Session(backend, replace(PHI3_CHAT, stop_words=PHI3_CHAT.stop_words + (word,)), "",
                      generation_kwargs(0, 0.75, 40, 16, 1.0))
    session.set_image(fetch_image(str(image)))
    answer = session.ask("Describe it.")
    assert answer.strip() == cut.stdout.strip() and session.turns == [Turn("<image>\nDescribe it.", answer)]


def test_bad_image_in_one_shot_mode(converted, tmp_path):
    (tmp_path / "not.png").write_text("text, not an image")
    r = chat([str(converted["out"] / "iter_xtuner"), "--image", str(tmp_path / "not.png"), "--prompt", "hi"])
    assert r.returncode == 2 and f"{tmp_path / 'not.png'}: not a readable image" in r.stderr


@pytest.mark.parametrize("mode", ["CMYK", "I;16", "RGBA", "P", "LA"])
def test_image_modes_are_converted(tmp_path, mode):
    arr = (np.arange(64 * 48) % 256).reshape(48, 64).astype(np.uint8)
    if mode == "I;16":
        img = Image.fromarray(arr.astype(np.uint16) * 257)
    else:
        img = Image.fromarray(arr).convert(mode)
    path = tmp_path / f"x.{'tif' if mode in ('CMYK', 'I;16') else 'png'}"
    img.save(path)
    rgb = open_image(path)
    assert rgb.mode == "RGB" and rgb.size == (64, 48)
    if mode == "I;16":  # scaled down, not clipped to white
        assert np.asarray(rgb)[0, :10, 0].tolist() == arr[0, :10].tolist()
    with pytest.raises(ImageError, match="image file not found"):
        open_image(tmp_path / "missing.png")


class Pty:
    """A program on a real pseudo-terminal, read until a marker appears."""

    def __init__(self, argv):
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdin=slave, stdout=slave, stderr=slave, close_fds=True,
                                     env={**os.environ, "TERM": "dumb"})
        os.close(slave)
        self.buf = ""

    def expect(self, marker, timeout=120):
        end = time.time() + timeout
        while marker not in self.buf:
            assert time.time() < end, f"no {marker!r} in:\n{self.buf[-2000:]}"
            ready, _, _ = select.select([self.master], [], [], 0.5)
            if ready:
                try:
                    self.buf += os.read(self.master, 4096).decode(errors="replace")
                except OSError:
                    break
        before, _, self.buf = self.buf.partition(marker)
        return before

    def send(self, line):
        os.write(self.master, (line + "\n").encode())


def test_interactive_session_on_a_pty(converted, image):
    # 12 tokens as in the one-shot test: this random model's first 8 greedy tokens are unused embedding rows
    # (ids past the tokenizer), which decode to nothing.
    s = Pty(CLI + [str(converted["out"] / "iter_xtuner"), "--image", str(image), "--temperature", "0",
                   "--max-new-tokens", "12"])
    s.expect(">>> ")
    s.send("What colour are the shapes?")
    s.send("")  # as in xtuner chat, an empty line ends the message
    first = s.expect(">>> ")
    assert "BOT: " in first and first.split("BOT: ", 1)[1].strip()
    s.send("And how many are there?")
    s.send("A. one")
    s.send("B. two")
    s.send("")
    assert s.expect(">>> ").count("BOT: ") == 1  # three lines, one question
    s.send("/reset\n")
    assert "(conversation reset)" in s.expect(">>> ")
    s.send("What colour are the shapes?\n")
    again = s.expect(">>> ")
    # after a reset the same question gets the same (greedy) answer as at the start
    assert again.split("BOT: ", 1)[1].strip() == first.split("BOT: ", 1)[1].strip()
    s.send("/image /no/such/picture.png\n")
    assert "error: /no/such/picture.png: image file not found" in s.expect(">>> ")
    s.send("still there?\n")
    assert "BOT: " in s.expect(">>> ")  # the session goes on
    bomb = bomb_png(image.parent / "bomb.png")
    s.send(f"/image {bomb}\n")
    assert f"error: {bomb}: refused as a possible decompression bomb (Image size (900000000 pixels)" in s.expect(">>> ")
    s.send("What colour are the shapes?\n")
    assert "BOT: " in s.expect(">>> ")  # ... after a decompression bomb too, with the last good image
    s.send(f"/image {image}\n")
    assert "(new image loaded; new conversation)" in s.expect(">>> ")
    s.send("What colour are the shapes?\n")
    assert s.expect(">>> ").split("BOT: ", 1)[1].strip() == first.split("BOT: ", 1)[1].strip()  # the same image, anew
    s.send("RESET\n")  # xtuner chat's spellings
    assert "(conversation reset)" in s.expect(">>> ")
    s.send("EXIT\n")
    assert s.proc.wait(timeout=60) == 0
    s = Pty(CLI + [str(converted["out"] / "iter_xtuner"), "--image", str(image)])
    s.expect(">>> ")
    s.send("/exit\n")
    assert s.proc.wait(timeout=60) == 0


def bomb_png(path):
    """A 30000x30000 PNG header (a few bytes on disk): PIL's decompression-bomb guard refuses it at open."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


def test_decompression_bomb_is_one_clear_error(tmp_path):
    bomb = bomb_png(tmp_path / "huge.png")
    for source, name in ((bomb, str(bomb)), (bomb.read_bytes(), "MMBench_DEV_EN.tsv index 7")):
        with pytest.raises(ImageError, match=rf"^{re.escape(name)}: refused as a possible decompression bomb "
                                             r"\(Image size \(900000000 pixels\) exceeds limit of \d+ pixels\)"):
            open_image(source, name if isinstance(source, bytes) else None)


def exif_rotated_jpeg(path, orientation=6):
    """A 40x20 JPEG, left half red and right half blue, whose EXIF tag says: turn me (6 = 90 deg clockwise)."""
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, exif=exif, quality=95)
    return path


def test_exif_orientation_is_applied_as_transformers_load_image_does(tmp_path, tiny, tokenizer):
    """One function for training, chat and evaluation; compared with transformers' own load_image."""
    from transformers import CLIPImageProcessor
    from transformers.image_utils import load_image

    from llavaflow.chat import fetch_image
    from llavaflow.data.dataset import LlavaDataset
    from llavaflow.data.images import ImageTransform

    path = exif_rotated_jpeg(tmp_path / "phone.jpg")
    assert Image.open(path).size == (40, 20)  # as stored
    reference = np.asarray(load_image(str(path)))
    assert reference.shape == (40, 20, 3)  # upright: 20 wide, 40 high, red on top after a clockwise turn
    for img in (open_image(path), open_image(path.read_bytes(), "row 1"), fetch_image(str(path))):  # train, eval, chat
        assert img.size == (20, 40) and np.array_equal(np.asarray(img), reference)
    transform = ImageTransform(CLIPImageProcessor.from_pretrained(tiny["vit"]), pad_to_square=True)
    ann = tmp_path / "data.json"
    ann.write_text(json.dumps([{"id": "p", "image": "phone.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "Colours."}]}]))
    ds = LlavaDataset([{"annotation": str(ann), "image_folder": str(tmp_path)}], tokenizer, PHI3_CHAT, transform, 64)
    torch.testing.assert_close(ds[0]["pixel_values"], transform(Image.fromarray(reference)), rtol=0, atol=0)


def test_pixels_are_pils_bicubic_resize_and_crop_as_in_xtuner(tiny):
    """ImageTransform.from_folder (training, evaluation, chat) preprocesses on PIL, as xtuner's CLIPImageProcessor
    did: transformers' CLIPImageProcessor now resizes with torchvision wherever it is installed (other pixels)."""
    from llavaflow.data.images import ImageTransform

    transform = ImageTransform.from_folder(tiny["vit"], pad_to_square=False)
    proc = transform.image_processor
    side = proc.crop_size["height"]
    assert proc.size["shortest_edge"] == side
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, 2 * side, 3), dtype=np.uint8))
    img = img.resize((4 * side, 2 * side), Image.NEAREST)  # 2:1, so the resize to the short side is exact
    by_hand = np.asarray(img.resize((2 * side, side), Image.BICUBIC), dtype=np.float32)[:, side // 2:side // 2 + side]
    by_hand = (by_hand / 255 - np.array(proc.image_mean)) / np.array(proc.image_std)
    torch.testing.assert_close(transform(img), torch.tensor(by_hand, dtype=torch.float32).permute(2, 0, 1),
                               rtol=0, atol=1e-5)
