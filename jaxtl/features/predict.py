"""Batched top-k prediction over image files: decode in threads, one jitted forward per fixed-size batch."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxtl.core.compiler import jit
from jaxtl.core.errors import MissingFileError
from jaxtl.core.preprocessing import Preprocessing
from jaxtl.data.folder import list_images
from jaxtl.data.images import DEFAULT_MAX_PIXELS
from jaxtl.data.preprocess import eval_transform


def expand_image_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given, folders expanded to the image files inside them (sorted); a missing path is an error."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files.extend(list_images(path))
        elif path.is_file():
            files.append(path)
        else:
            raise MissingFileError(f"image path '{path}' does not exist")
    return files


def class_probabilities(model: nn.Module, variables: dict, images: jax.Array, tta: str = "none",
                        multi_label: bool = False) -> jax.Array:
    """A classifier's softmax probabilities (float32) for preprocessed images (`multi_label`: each label's sigmoid
    probability); `tta="flip"` averages each image's logits with its mirror image's first. What `predict` and an
    exported model compute."""
    logits = model.apply(variables, images, train=False)[0].astype(jnp.float32)
    if tta == "flip":
        logits = (logits + model.apply(variables, images[:, :, ::-1], train=False)[0].astype(jnp.float32)) / 2
    return jax.nn.sigmoid(logits) if multi_label else jax.nn.softmax(logits, axis=-1)


def predict_top_k(
    model: nn.Module,
    variables: dict,
    prep: Preprocessing,
    files: Sequence[Path],
    top_k: int = 5,
    batch_size: int = 32,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    exif: bool = True,
    tta: str = "none",
    multi_label: bool = False,
) -> Iterator[tuple[Path, np.ndarray, np.ndarray]]:
    """Yields `(file, class_indices, probabilities)` of the top-k classes for each file, in order, for a
    `Classifier`; an unreadable image is an `ImageReadError` naming it; photos turned upright by their EXIF
    orientation unless `exif=False`; `tta="flip"` averages each image's logits with its mirror image's;
    `multi_label`: the labels' sigmoid probabilities, highest first.

    The last batch is padded to `batch_size` so the forward pass compiles once.
    """

    @jit
    def forward(variables, images):
        values, indices = jax.lax.top_k(class_probabilities(model, variables, images, tta, multi_label), top_k)
        return indices, values

    with ThreadPoolExecutor() as pool:
        for start in range(0, len(files), batch_size):
            chunk = list(files[start : start + batch_size])
            images = np.stack(list(pool.map(lambda f: eval_transform(f, prep, max_pixels, exif), chunk)))
            padded = np.zeros((batch_size, *images.shape[1:]), np.float32)
            padded[: len(chunk)] = images
            indices, values = jax.device_get(forward(variables, jnp.asarray(padded)))
            yield from zip(chunk, indices[: len(chunk)], values[: len(chunk)])
