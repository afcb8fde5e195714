"""Decoding images: any mode to 8-bit RGB, refusing decompression bombs, checking that a file decodes to its end.

Images are turned upright by their EXIF orientation tag unless asked not to (`data.exif_orientation`), in training,
evaluation, prediction and extraction alike: a phone photo stored sideways is seen as its viewer shows it. Images
of any mode become 8-bit RGB: grayscale, RGBA, palette, CMYK and GIF frames as PIL converts them; 16-bit
and 32-bit integer images over their type's range and floating-point images over [0, 1], so a 16-bit scan keeps
its gradations instead of saturating to white. An image with more pixels than the limit (a decompression bomb,
or a scan too large to be meant) is refused with an error naming it.
"""

from __future__ import annotations

import io
import threading
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from jaxtl.core.errors import ImageReadError

DEFAULT_MAX_PIXELS = 178_956_970  # PIL's own decompression-bomb limit
_ORIENTATION = 0x0112  # the EXIF orientation tag
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
    try:
        check_pixels(*image.size, max_pixels, name)
    except ImageReadError:
        image.close()
        raise
    return image


def check_pixels(width: int, height: int, max_pixels: int, name: str) -> None:
    """Refuses an image of more than `max_pixels` pixels (`ImageReadError` naming it)."""
    if width * height > max_pixels:
        raise ImageReadError(f"image '{name}' is {width}x{height} = {width * height:,} pixels, more than "
                             f"data.max_image_pixels={max_pixels:,} (a decompression bomb?); if it is genuine, raise "
                             "the limit, or set data.skip_bad_images=True to skip such images")


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



def upright_size(image: Image.Image) -> tuple[int, int]:
    """`(width, height)` of `image` once turned upright by its EXIF orientation (read from the header alone)."""
    try:
        turned = image.getexif().get(_ORIENTATION, 1) in (5, 6, 7, 8)  # a quarter turn swaps the sides
    except Exception:
        turned = False
    return image.size[::-1] if turned else image.size


_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}  # what `ImageOps.exif_transpose` does for each orientation


def orientation(image: Image.Image) -> int:
    """The EXIF orientation tag of an opened image (1: upright, also when the EXIF block is damaged)."""
    try:
        return int(image.getexif().get(_ORIENTATION, 1))
    except Exception:
        return 1


def jpeg_header(raw: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS, exif: bool = True
                ) -> tuple[int, int, int] | None:
    """`(width, height, turn)` of a JPEG that `decode_jpeg_fast` decodes (colour or greyscale; not CMYK), read from
    its bytes without PIL: the size upright and the EXIF orientation (1 unless `exif`). PIL reads the orientation
    only where the file has an APP1 segment (EXIF or XMP, where PIL finds the tag). None where it does not apply
    (no simplejpeg, not such a JPEG); an image over `max_pixels` is refused (`ImageReadError`)."""
    try:
        import simplejpeg

        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(raw)
    except (ImportError, ValueError, RuntimeError):
        return None
    if colorspace not in ("YCbCr", "Gray", "RGB"):
        return None
    check_pixels(width, height, max_pixels, name)
    turn = 1
    if exif and _has_app1(raw):
        with open_image(io.BytesIO(raw), max_pixels, name) as image:
            turn = orientation(image)
    return (height, width, turn) if turn in (5, 6, 7, 8) else (width, height, turn)


def _has_app1(raw: bytes) -> bool:
    """Whether a JPEG's markers before its scan data hold an APP1 segment (EXIF, XMP); True where they cannot be
    walked (PIL then reads them)."""
    at = 2
    while at + 4 <= len(raw):
        if raw[at] != 0xFF:
            return True
        marker = raw[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
        elif marker == 0xE1:
            return True
        elif marker == 0xDA:  # start of scan: no more headers
            return False
        elif 0xD0 <= marker <= 0xD8 or marker == 0x01:  # markers without a length
            at += 2
        else:
            at += 2 + int.from_bytes(raw[at + 2 : at + 4], "big")
    return True


def decode_jpeg_fast(raw: bytes, factor: int, turn: int = 1) -> Image.Image | None:
    """A baseline or progressive RGB or greyscale JPEG decoded by libjpeg-turbo straight from its bytes
    (simplejpeg), scaled down in the DCT domain by `factor` (1, 2, 4 or 8), turned as EXIF orientation `turn` says:
    the same pixels as PIL's decode (the same library and settings; tests/test_preprocess.py) in about a quarter
    less time, for training crops. libjpeg-turbo's fast DCT and upsampling would save 3% more and change the pixels
    that evaluation sees: not used. For RGB and greyscale JPEGs (`Split.load` leaves CMYK to PIL); None where it
    does not apply (no simplejpeg, a damaged file): the caller decodes with PIL, which names what is wrong."""
    try:
        import simplejpeg
    except ImportError:
        return None
    try:
        height, width, _, _ = simplejpeg.decode_jpeg_header(raw)
        pixels = simplejpeg.decode_jpeg(raw, colorspace="RGBX", min_height=-(-height // factor),
                                        min_width=-(-width // factor))
    except (ValueError, RuntimeError):
        return None
    image = _rgb_over(pixels)
    return image.transpose(_TRANSPOSE[turn]) if turn in _TRANSPOSE else image


def _rgb_over(pixels: np.ndarray) -> Image.Image:
    """An RGB PIL image over `pixels`, (H, W, 4) uint8 RGBX, without copying them. PIL keeps an RGB image as 4 bytes
    a pixel, so the buffer mapping that `Image.frombuffer` does for RGBX serves RGB too, whose resampling computes
    3 channels, not RGBX's 4; where a PIL does not map so, a copy (`Image.fromarray`)."""
    height, width = pixels.shape[:2]
    try:
        image = Image.new("RGB", (0, 0))._new(Image.core.map_buffer(pixels, (width, height), "raw", 0, ("RGB", 0, 1)))
    except (AttributeError, TypeError, ValueError):
        return Image.fromarray(np.ascontiguousarray(pixels[..., :3]), "RGB")
    image.readonly = 1
    return image


def upright(image: Image.Image) -> Image.Image:
    """`image` turned as its EXIF orientation tag says (how a camera that stored a photo sideways wants it shown,
    as photo viewers and Keras show it); unchanged without the tag."""
    try:
        orientation = image.getexif().get(_ORIENTATION, 1)
    except Exception:  # a damaged EXIF block: the pixels are still the image
        return image
    return ImageOps.exif_transpose(image) if orientation != 1 else image


def load_image(source: str | Path | Image.Image | bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
               name: str | None = None, exif: bool = True) -> Image.Image:
    """An 8-bit RGB PIL image (the first frame of an animation) from a path, encoded bytes or a PIL image, turned
    upright by its EXIF orientation (`exif`); an unreadable or over-large file is an `ImageReadError` naming it."""
    if isinstance(source, Image.Image):
        return to_rgb(upright(source) if exif else source)
    if isinstance(source, bytes):
        source = io.BytesIO(source)
    with open_image(source, max_pixels, name) as opened:
        try:
            opened.seek(0)
            opened.load()
            return to_rgb(upright(opened) if exif else opened)
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageReadError(f"cannot read image '{name or source}': {e}") from e

