"""Image decoding and the evaluation transform (resize shorter side, centre crop, normalise), as torchvision/timm.

Every pretrained weight names the `Preprocessing` it was trained with; feeding its model anything else costs
accuracy. Images of any mode (grayscale, RGBA, palette, GIF) become RGB.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_INTERPOLATIONS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


class ImageReadError(ValueError):
    """An image file cannot be decoded."""


@dataclass(frozen=True)
class Preprocessing:
    """How images were prepared when the weights were trained.

    input_size: side of the square crop fed to the model.
    crop_fraction: crop side over the resized shorter side (0.875 resizes to 256 for a 224 crop).
    mean, std: per-channel normalisation of pixels scaled to [0, 1].
    interpolation: "bilinear" or "bicubic".
    """

    input_size: int = 224
    crop_fraction: float = 0.875
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    def __post_init__(self):
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {list(_INTERPOLATIONS)}, got '{self.interpolation}'")
        if not 0 < self.crop_fraction <= 1:
            raise ValueError(f"crop_fraction must be in (0, 1], got {self.crop_fraction}")

    @property
    def resize_size(self) -> int:
        """Shorter side before the centre crop (timm's `floor(input_size / crop_pct)`)."""
        return int(math.floor(self.input_size / self.crop_fraction))

    def with_input_size(self, input_size: int) -> "Preprocessing":
        """The same recipe at another resolution (the crop fraction is kept)."""
        return dataclasses.replace(self, input_size=input_size)


def load_image(source: str | Path | Image.Image) -> Image.Image:
    """An RGB PIL image from a path or a PIL image of any mode; an unreadable file is an `ImageReadError`."""
    if isinstance(source, Image.Image):
        image = source
    else:
        try:
            with Image.open(source) as opened:
                opened.seek(0)  # first frame of animated GIFs
                image = opened.copy() if opened.mode != "P" else opened.convert("RGBA")
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise ImageReadError(f"cannot read image '{source}': {e}") from e
    if image.mode == "P":
        image = image.convert("RGBA")
    return image if image.mode == "RGB" else image.convert("RGB")


def resize_shorter_side(image: Image.Image, size: int, interpolation: str) -> Image.Image:
    """Resizes so the shorter side is `size`, the longer side truncated as torchvision does."""
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return image.resize((new_w, new_h), _INTERPOLATIONS[interpolation])


def center_crop(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return image.crop((left, top, left + size, top + size))


def normalize(pixels: np.ndarray, prep: Preprocessing) -> np.ndarray:
    """uint8 HWC (or NHWC) pixels -> float32 normalised as the weights expect."""
    mean = np.asarray(prep.mean, np.float32) * 255.0
    std = np.asarray(prep.std, np.float32) * 255.0
    return (pixels.astype(np.float32) - mean) / std


def eval_transform(source: str | Path | Image.Image, prep: Preprocessing) -> np.ndarray:
    """The evaluation transform: HWC float32 array of side `prep.input_size`, ready for `model.apply`."""
    image = load_image(source)
    image = center_crop(resize_shorter_side(image, prep.resize_size, prep.interpolation), prep.input_size)
    return normalize(np.asarray(image), prep)
