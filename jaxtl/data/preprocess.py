"""The evaluation transform (resize the shorter side, centre crop, normalise), as torchvision and timm do it, following
the `Preprocessing` the weights were trained with."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from jaxtl.core.preprocessing import Preprocessing
from jaxtl.data.images import DEFAULT_MAX_PIXELS, load_image

PIL_FILTERS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


def resize_shorter_side(image: Image.Image, size: int, interpolation: str) -> Image.Image:
    """Resizes so the shorter side is `size`, the longer side truncated as torchvision does."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return image.resize((new_w, new_h), PIL_FILTERS[interpolation])


def center_crop(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def normalize(pixels, prep: Preprocessing, xp=np):
    """uint8 HWC (or NHWC) pixels -> float32 normalised as the weights expect. With `xp=jax.numpy` it runs inside
    a jitted step, on uint8 batches moved to the device."""
    mean = np.asarray(prep.mean, np.float32) * 255.0
    std = np.asarray(prep.std, np.float32) * 255.0
    return (pixels.astype(xp.float32) - mean) / std


def eval_pixels(source: str | Path | Image.Image, prep: Preprocessing, max_pixels: int = DEFAULT_MAX_PIXELS,
                exif: bool = True) -> np.ndarray:
    """The evaluation crop as uint8 HWC of side `prep.input_size`: resize the shorter side, centre crop (an image
    from a file turned upright by its EXIF orientation, unless `exif=False`)."""
    image = load_image(source, max_pixels, exif=exif)
    image = center_crop(resize_shorter_side(image, prep.resize_size, prep.interpolation), prep.input_size)
    return np.ascontiguousarray(np.asarray(image))


def eval_transform(source: str | Path | Image.Image, prep: Preprocessing,
                   max_pixels: int = DEFAULT_MAX_PIXELS, exif: bool = True) -> np.ndarray:
    """The evaluation transform: HWC float32 array of side `prep.input_size`, ready for `model.apply`."""
    return normalize(eval_pixels(source, prep, max_pixels, exif), prep)
