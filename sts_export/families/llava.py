"""Image loading and preprocessing equal to the model's HF image processor, with PIL + numpy only.

convert to RGB (alpha composited on white) -> [pad to square with the mean colour] ->
resize shortest edge (bicubic) -> center crop -> /255 -> normalize.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from sts_export.errors import StsError
from sts_export.recipe import ImageProcessorConfig


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as transformers' convert_to_rgb: transparency composited onto white, others converted."""
    if image.mode == "RGB":
        return image
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):  # high bit depth grayscale: scale to 8 bit
        arr = np.asarray(image, dtype=np.float64)
        hi = 65535.0 if image.mode.startswith("I;16") or arr.max() > 255 else 255.0
        image = Image.fromarray(np.clip(arr * 255.0 / hi, 0, 255).astype(np.uint8))  # mode L
    return image.convert("RGB")


def load_image(image: str | os.PathLike | Image.Image) -> Image.Image:
    """Open an image file (or take a PIL image) and return it as RGB; clear errors for non-images."""
    if isinstance(image, Image.Image):
        return to_rgb(image)
    path = Path(image)
    if not path.is_file():
        raise StsError(f"image '{path}' does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            img = to_rgb(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise StsError(f"'{path}' is not a readable image ({type(e).__name__}); pass a PNG/JPEG/WebP file") from None
    if min(img.size) < 1:
        raise StsError(f"image '{path}' is empty ({img.size[0]}x{img.size[1]})")
    return img


def pad_to_square(img: Image.Image, mean: tuple[float, float, float]) -> Image.Image:
    """Pad to a square with the mean colour, the original centred (LlavaImageProcessor.pad_to_square)."""
    w, h = img.size
    if w == h:
        return img
    s = max(w, h)
    out = Image.new("RGB", (s, s), tuple(int(m * 255) for m in mean))
    out.paste(img, ((s - w) // 2, (s - h) // 2))
    return out


def resized_size(w: int, h: int, shortest_edge: int) -> tuple[int, int]:
    """(width, height) after scaling the shorter side to shortest_edge (HF rounding: int())."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = shortest_edge, int(shortest_edge * long / short)
    return (new_short, new_long) if w <= h else (new_long, new_short)


def preprocess_image(image: Image.Image, cfg: ImageProcessorConfig) -> np.ndarray:
    """RGB PIL image -> pixel_values [3, crop, crop] float32."""
    img = to_rgb(image)
    if cfg.do_pad:
        img = pad_to_square(img, cfg.image_mean)
    img = img.resize(resized_size(*img.size, cfg.shortest_edge), resample=Image.BICUBIC)
    w, h = img.size
    c = cfg.crop_size
    if w < c or h < c:
        raise StsError(f"image resized to {w}x{h} is smaller than the crop {c}x{c}")
    top, left = (h - c) // 2, (w - c) // 2
    arr = np.asarray(img, dtype=np.uint8)[top:top + c, left:left + c]  # [c, c, 3]
    x = (arr.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.asarray(cfg.image_mean, dtype=np.float32)) / np.asarray(cfg.image_std, dtype=np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))  # [3, c, c]


def check_pixel_values(pixel_values: np.ndarray, image_size: int) -> None:
    """Wrong sizes or modes are one-line errors before any graph runs."""
    shape = tuple(pixel_values.shape)
    if len(shape) != 4 or shape[1] != 3 or shape[2:] != (image_size, image_size):
        raise StsError(f"pixel_values must be [B, 3, {image_size}, {image_size}], got {list(shape)}")
