"""Running an exported ONNX model with onnxruntime through jaxtl's own host preprocessing (the eval transform's
resize and centre crop), so an export can be checked against `predict --workdir` image by image."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from jaxtl.core.atomic import damage_reason
from jaxtl.core.errors import MissingFileError
from jaxtl.data.preprocess import eval_pixels
from jaxtl.serving.export import INPUT_NAME, METADATA_KEY, ExportError, preprocessing_from


class OnnxModel:
    """An ONNX file `jaxtl export` wrote: its onnxruntime session and the metadata stored in it."""

    def __init__(self, path: str | Path):
        import onnxruntime

        path = Path(path)
        if not path.is_file():
            raise MissingFileError(f"ONNX model '{path}' does not exist; write one with `run.py export --format onnx`")
        try:
            self.session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for a damaged or foreign file
            raise ExportError(f"{path}: not a readable ONNX model ({str(e).splitlines()[0][:200]})") from e
        stored = self.session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
        if stored is None:
            raise ExportError(f"{path}: no '{METADATA_KEY}' metadata (class names, preprocessing); predict with ONNX "
                              "files that `run.py export --format onnx` wrote")
        try:
            self.metadata = json.loads(stored)
            self.prep = preprocessing_from(self.metadata)
            self.classes = tuple(str(name) for name in self.metadata["classes"])
        except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSONDecodeError is a ValueError
            raise ExportError(f"{path}: its '{METADATA_KEY}' metadata (class names, preprocessing) is damaged "
                              f"({damage_reason(e)}); export the model again with `run.py export --format onnx`"
                              ) from None

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """`(B, C)` probabilities of a uint8 `(B, S, S, 3)` batch."""
        return self.session.run(None, {INPUT_NAME: images})[0]


def onnx_top_k(model: OnnxModel, files: Sequence[Path], top_k: int = 5, batch_size: int = 32,
               max_pixels: int | None = None, exif: bool | None = None
               ) -> Iterator[tuple[Path, np.ndarray, np.ndarray]]:
    """Yields `(file, class_indices, probabilities)` of the top-k classes of each file, in order (as
    `jaxtl.features.predict.predict_top_k`); EXIF and the pixel limit as the exported run had them unless given."""
    data = model.metadata["data"]
    max_pixels = max_pixels or data["max_image_pixels"]
    exif = data["exif_orientation"] if exif is None else exif
    with ThreadPoolExecutor() as pool:
        for start in range(0, len(files), batch_size):
            chunk = list(files[start : start + batch_size])
            images = np.stack(list(pool.map(lambda f: eval_pixels(f, model.prep, max_pixels, exif), chunk)))
            probs = model.probabilities(images)
            indices = np.argsort(-probs, axis=1, kind="stable")[:, :top_k]
            yield from zip(chunk, indices, np.take_along_axis(probs, indices, axis=1))
