"""Image decoding and the evaluation transform (resize shorter side, centre crop, normalise), as torchvision/timm.

Every pretrained weight names the `Preprocessing` it was trained with; feeding its model anything else costs
accuracy. Images of any mode become 8-bit RGB: grayscale, RGBA, palette, CMYK and GIF frames as PIL converts
them; 16-bit and 32-bit integer images over their type's range and floating-point images over [0, 1], so a
16-bit scan keeps its gradations instead of saturating to white. An image with more pixels than the limit
(a decompression bomb, or a scan too large to be meant) is refused with an error naming it.
"""

from __future__ import annotations

import dataclasses
import io
import math
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, UnidentifiedImageError

from jaxtl.errors import ConfigError, ImageReadError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_INTERPOLATIONS = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}
DEFAULT_MAX_PIXELS = 178_956_970  # PIL's own decompression-bomb limit
_PIL_LIMIT_LOCK = threading.Lock()

# Full-range divisors (after shifting signed types to start at 0) of the high-bit-depth modes.
_HIGH_DEPTH_RANGES = {"I;16": (0, 65535), "I;16L": (0, 65535), "I;16B": (0, 65535), "I;16N": (0, 65535),
                      "I;16S": (-32768, 32767), "I": (-(2**31), 2**31 - 1), "F": (0.0, 1.0)}


def open_image(source: str | Path | BinaryIO, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None
               ) -> Image.Image:
    """Opens an image lazily (the header only) and refuses one with more than `max_pixels` pixels.

    PIL refuses images above about 179 megapixels by itself; such a file is reopened with PIL's check lifted (the
    header only), so that `max_pixels` decides, in both directions.
    """
    name = name or str(source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            try:
                image = Image.open(source)
            except Image.DecompressionBombError:
                if hasattr(source, "seek"):
                    source.seek(0)
                with _PIL_LIMIT_LOCK:
                    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
                    try:
                        image = Image.open(source)
                    finally:
                        Image.MAX_IMAGE_PIXELS = limit
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ImageReadError(f"cannot read image '{name}': {e}") from e
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise ImageReadError(f"image '{name}' is {width}x{height} = {width * height:,} pixels, more than "
                             f"data.max_image_pixels={max_pixels:,} (a decompression bomb?); if it is genuine, raise "
                             "the limit, or set data.skip_bad_images=True to skip such images")
    return image


def verify_image(path: str | Path, max_pixels: int = DEFAULT_MAX_PIXELS, data: bytes | None = None) -> None:
    """Raises `ImageReadError` unless `path` (or its content `data`, already read) is an image within the pixel
    limit that decodes to the end.

    PNG's `verify` checks every chunk's CRC without decoding; a JPEG is decoded at 1/8 scale (PIL's draft mode
    still reads every byte, so a truncated file is caught); other formats are decoded.
    """
    with open_image(io.BytesIO(data) if data is not None else path, max_pixels, str(path)) as image:
        try:
            if image.format == "PNG":
                image.verify()
            else:
                if image.format == "JPEG":
                    image.draft("RGB", (1, 1))
                image.load()
        except Exception as e:  # PIL raises many types from a damaged file
            raise ImageReadError(f"cannot read image '{path}': {type(e).__name__}: {e}") from e


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: high bit depths scaled over their type's range (floats over [0, 1]), never clipped at 255."""
    mode = image.mode
    if mode == "I" and image.format == "PNG":
        mode = "I;16"  # a 16-bit PNG decoded by a PIL that reports it as 32-bit
    if mode in _HIGH_DEPTH_RANGES:
        low, high = _HIGH_DEPTH_RANGES[mode]
        values = np.asarray(image, np.float64)
        pixels = np.clip(np.round((values - low) * (255.0 / (high - low))), 0, 255).astype(np.uint8)
        return Image.fromarray(pixels, "L").convert("RGB")
    if mode == "P":
        image = image.convert("RGBA")
    return image if image.mode == "RGB" else image.convert("RGB")


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
            raise ConfigError(f"interpolation must be one of {list(_INTERPOLATIONS)}, got '{self.interpolation}'")
        if not 0 < self.crop_fraction <= 1:
            raise ConfigError(f"crop_fraction must be in (0, 1], got {self.crop_fraction}")

    @property
    def resize_size(self) -> int:
        """Shorter side before the centre crop (timm's `floor(input_size / crop_pct)`)."""
        return int(math.floor(self.input_size / self.crop_fraction))

    def with_input_size(self, input_size: int) -> "Preprocessing":
        """The same recipe at another resolution (the crop fraction is kept)."""
        return dataclasses.replace(self, input_size=input_size)


def load_image(source: str | Path | Image.Image | bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
               name: str | None = None) -> Image.Image:
    """An 8-bit RGB PIL image (the first frame of an animation) from a path, encoded bytes or a PIL image;
    an unreadable or over-large file is an `ImageReadError` naming it."""
    if isinstance(source, Image.Image):
        return to_rgb(source)
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    with open_image(source, max_pixels, name) as opened:
        try:
            opened.seek(0)
            opened.load()
            return to_rgb(opened)
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageReadError(f"cannot read image '{name or source}': {e}") from e


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


def normalize(pixels, prep: Preprocessing, xp=np):
    """uint8 HWC (or NHWC) pixels -> float32 normalised as the weights expect. With `xp=jax.numpy` it runs inside
    a jitted step, on uint8 batches moved to the device."""
    mean = np.asarray(prep.mean, np.float32) * 255.0
    std = np.asarray(prep.std, np.float32) * 255.0
    return (pixels.astype(xp.float32) - mean) / std


def eval_pixels(source: str | Path | Image.Image, prep: Preprocessing, max_pixels: int = DEFAULT_MAX_PIXELS
                ) -> np.ndarray:
    """The evaluation crop as uint8 HWC of side `prep.input_size`: resize the shorter side, centre crop."""
    image = load_image(source, max_pixels)
    image = center_crop(resize_shorter_side(image, prep.resize_size, prep.interpolation), prep.input_size)
    return np.ascontiguousarray(np.asarray(image))


def eval_transform(source: str | Path | Image.Image, prep: Preprocessing,
                   max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The evaluation transform: HWC float32 array of side `prep.input_size`, ready for `model.apply`."""
    return normalize(eval_pixels(source, prep, max_pixels), prep)
