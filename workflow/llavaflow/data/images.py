"""Image loading and preprocessing, identical for training, chat and evaluation (recipe §5).

Every image, in training, chat and evaluation, goes through `open_image`: decoded, turned upright by
its EXIF orientation tag (as transformers' `load_image` does with `ImageOps.exif_transpose`; xtuner's
loaders ignore the tag, so a phone photo is seen sideways there), then converted to RGB.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps


class ImageError(ValueError):
    pass


def to_rgb(img: Image.Image, source: str) -> Image.Image:
    """Convert any PIL mode to RGB; 16-bit and alpha modes need care that convert() alone lacks."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16") or img.mode == "I":
        # 16-bit greyscale: scale to 8 bits; convert("L") would clip nearly every pixel to white.
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr / 257.0, 0, 255).astype(np.uint8))
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite on white, as a viewer would show it; convert("RGB") would expose hidden colours.
        img = img.convert("RGBA")
        canvas = Image.new("RGB", img.size, (255, 255, 255))
        canvas.paste(img, mask=img.getchannel("A"))
        return canvas
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as e:
        raise ImageError(f"{source}: cannot convert image mode {img.mode} to RGB: {e}") from e


def open_image(source: str | Path | bytes, name: str | None = None) -> Image.Image:
    """Open a path or raw bytes as an upright RGB image, with an error that names the file.

    name: what to call the image in errors (e.g. "MMBench_DEV_EN.tsv index 241" or a URL) when
    source is raw bytes.
    """
    name = name or ("<bytes>" if isinstance(source, bytes) else str(source))
    try:
        fp = io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")
    except FileNotFoundError:
        raise ImageError(f"{name}: image file not found") from None
    except OSError as e:
        raise ImageError(f"{name}: cannot read image: {e}") from e
    with fp:
        try:
            img = Image.open(fp)
            img.load()
        except Image.DecompressionBombError as e:
            # PIL's guard against images that decompress to GBs (> 2 x MAX_IMAGE_PIXELS): never load them.
            size = str(e).split(", could")[0]
            raise ImageError(f"{name}: refused as a possible decompression bomb ({size}); "
                             "resize the image or leave it out") from None
        except Exception as e:  # PIL's decoders raise many types (struct.error, IndexError, ...) on bad bytes
            raise ImageError(f"{name}: not a readable image ({e or type(e).__name__})") from e
        img = upright(img, name)
    return to_rgb(img, name)


def upright(img: Image.Image, name: str) -> Image.Image:
    """Apply the EXIF orientation tag (rotate/flip as a viewer shows it), as transformers' load_image does."""
    try:
        return ImageOps.exif_transpose(img)
    except Exception as e:  # a malformed EXIF block (ValueError, struct.error, KeyError, ...)
        raise ImageError(f"{name}: unreadable EXIF orientation ({e})") from e


def expand2square(img: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """Centre the image on a square canvas of side max(w, h) (LLaVA/xtuner expand2square)."""
    w, h = img.size
    if w == h:
        return img
    side = max(w, h)
    canvas = Image.new(img.mode, (side, side), background)
    canvas.paste(img, ((side - w) // 2, (side - h) // 2))
    return canvas


def background_colour(image_processor) -> tuple[int, int, int]:
    return tuple(int(x * 255) for x in image_processor.image_mean)


class ImageTransform:
    """RGB image -> CLIP pixel_values, optionally padded to a square with the mean colour first."""

    def __init__(self, image_processor, pad_to_square: bool):
        self.image_processor = image_processor
        self.pad_to_square = pad_to_square
        self.background = background_colour(image_processor)

    @classmethod
    def from_folder(cls, vit: str | Path, pad_to_square: bool) -> "ImageTransform":
        """The ViT folder's CLIP preprocessing on PIL, as xtuner's: transformers' CLIPImageProcessor resizes
        with torchvision wherever torchvision is installed, which gives other pixels."""
        from transformers import CLIPImageProcessorPil

        return cls(CLIPImageProcessorPil.from_pretrained(vit), pad_to_square)

    @property
    def crop_size(self) -> tuple[int, int]:
        size = self.image_processor.crop_size
        return size["height"], size["width"]

    def __call__(self, img: Image.Image) -> torch.Tensor:
        if self.pad_to_square:
            img = expand2square(img, self.background)
        return self.image_processor.preprocess(img, return_tensors="pt")["pixel_values"][0]

    def blank(self) -> torch.Tensor:
        """The zero image that text-only samples carry, so every sample has one image slot."""
        return torch.zeros(3, *self.crop_size)
