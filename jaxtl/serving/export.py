"""A run's kept model for serving outside JAX: ONNX (jax2onnx), a TensorFlow SavedModel (jax2tf) or a TensorFlow
Lite flatbuffer (the TFLite converter over that SavedModel), as Keras' `Model.export` and scenic's jax2tf export do.

The exported program is the whole classifier after the host's part of the eval transform: it takes a uint8 RGB
batch `(B, S, S, 3)` at the run's input size (B dynamic; the shorter side resized to `resize_size` and centre
cropped to `S` on the host, as `jaxtl.data.preprocess.eval_pixels` does), normalises it, applies the model (the
run's flip TTA included) and returns softmax probabilities `(B, C)` float32 (a multi-label run's: each label's
sigmoid probability, with the thresholds the run fixed in the metadata). Class names and the preprocessing
travel with it (`METADATA_KEY`): in the ONNX file's metadata, in a SavedModel's `assets.extra/jaxtl.json`, and
beside a `.tflite` file as `<file>.json`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import jax
import jax.numpy as jnp

from jaxtl.config import load_resolved
from jaxtl.core.atomic import atomic_path, json_text, temporary_beside, writes_into
from jaxtl.core.errors import ConfigError, JaxtlError
from jaxtl.core.preprocessing import Preprocessing
from jaxtl.data.preprocess import normalize
from jaxtl.features.predict import class_probabilities
from jaxtl.models.layers import portable_ops
from jaxtl.train.restore import load_trained, recorded_thresholds

FORMATS = ("onnx", "savedmodel", "tflite")
METADATA_KEY = "jaxtl"  # the ONNX metadata key, and the name of the JSON file beside the other formats
INPUT_NAME, OUTPUT_NAME = "images", "probabilities"


class ExportError(JaxtlError, ValueError):
    """The kept model cannot be written in the format asked for (an operation the format lacks)."""


@dataclass(frozen=True)
class Servable:
    """The kept model as `probabilities(variables, uint8 images)` with what a server needs to know about it."""

    probabilities: Callable[[dict, jax.Array], jax.Array]
    variables: dict
    prep: Preprocessing
    metadata: dict

    def __call__(self, images) -> jax.Array:
        return self.probabilities(self.variables, images)


def servable(workdir: str | Path) -> Servable:
    """The kept model of the run in `workdir` (EMA and LoRA resolved as `predict --workdir` has them)."""
    workdir = Path(workdir)
    module, variables, prep, classes = load_trained(workdir)
    config = load_resolved(workdir)
    tta = config.eval.tta
    thresholds = recorded_thresholds(workdir, config, len(classes))
    multi_label = thresholds is not None

    def probabilities(variables: dict, images: jax.Array) -> jax.Array:
        return class_probabilities(module, variables, normalize(images, prep, jnp), tta, multi_label)

    size = prep.input_size
    metadata = {
        "model": config.model.name, "classes": list(classes), "tta": tta,
        "input": {"name": INPUT_NAME, "shape": ["batch", size, size, 3], "dtype": "uint8", "channels": "RGB",
                  "host": f"resize the shorter side to {prep.resize_size} ({prep.interpolation}), centre crop "
                          f"{size}x{size}"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", len(classes)], "dtype": "float32",
                   "meaning": ("sigmoid probability of each label (an image has those at or above their thresholds)"
                               if multi_label else "softmax probabilities") + ", in the order of classes"},
        "preprocessing": dataclasses.asdict(prep) | {"resize_size": prep.resize_size},
        "data": {"exif_orientation": bool(config.data.exif_orientation),
                 "max_image_pixels": int(config.data.max_image_pixels)},
    }
    if multi_label:
        metadata |= {"multi_label": True, "thresholds": thresholds}
    return Servable(probabilities, variables, prep, metadata)


def preprocessing_from(metadata: dict) -> Preprocessing:
    """The `Preprocessing` an export's metadata records."""
    fields = {f.name for f in dataclasses.fields(Preprocessing)}
    return Preprocessing(**{k: tuple(v) if isinstance(v, list) else v
                            for k, v in metadata["preprocessing"].items() if k in fields})


def export(workdir: str | Path, fmt: str, out: str | Path) -> dict:
    """Writes the kept model of `workdir` to `out` in `fmt` (`FORMATS`); returns the metadata written with it.
    `out` is replaced only once the new export is complete."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    out = Path(out)
    check_out(fmt, out)
    model = servable(workdir)
    with writes_into(out.parent):
        out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with portable_ops():
            {"onnx": _write_onnx, "savedmodel": _write_savedmodel, "tflite": _write_tflite}[fmt](model, out)
    except (JaxtlError, OSError):
        raise
    except Exception as e:  # a converter's refusal: the operation it lacks is in its message
        reason = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise ExportError(f"{model.metadata['model']} from {workdir} cannot be written as {fmt}: {reason[:300]}"
                          ) from e
    return model.metadata


def check_out(fmt: str, out: Path) -> None:
    """`out` can take the export, checked before any work: in a folder (or where one can be made), one file for
    ONNX and TFLite; for a SavedModel a new path, an empty folder or a SavedModel jaxtl wrote (replaced once the new
    one is complete), never a folder of someone's files."""
    above = next((p for p in out.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise ConfigError(f"--out {out}: {above} is a file, not a folder; give a path in a folder")
    if fmt != "savedmodel":
        if out.is_dir():
            raise ConfigError(f"--out {out} is a folder; {fmt} is one file: give a file path, e.g. "
                              f"{out / ('model.' + fmt)}")
        return
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; a SavedModel is a folder: give a new path")
    ours = (out / "saved_model.pb").is_file() and (out / "assets.extra" / f"{METADATA_KEY}.json").is_file()
    if out.is_dir() and not ours and any(out.iterdir()):
        raise ConfigError(f"--out {out} is a folder of other files, not a SavedModel jaxtl wrote; the export would "
                          "replace it: give a new path or an empty folder")


@contextlib.contextmanager
def _quiet(name: str) -> Iterator[None]:
    """Only errors from logger `name` inside the block: a converter's notices would bury jaxtl's own lines."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _onnx_proto(model: Servable):
    from jax2onnx import to_onnx

    size = model.prep.input_size
    spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape(f"batch, {size}, {size}, 3"), jnp.uint8)
    with _quiet("onnx_ir"):  # a notice per intermediate value whose type it leaves out (dozens a model)
        proto = to_onnx(lambda images: model.probabilities(model.variables, images), [spec], model_name="jaxtl",
                        input_names=[INPUT_NAME], output_names=[OUTPUT_NAME])
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json_text(model.metadata, indent=None)
    return proto


def _write_onnx(model: Servable, out: Path) -> None:
    proto = _onnx_proto(model)
    with atomic_path(out) as tmp:
        tmp.write_bytes(proto.SerializeToString())


def _save_tf(model: Servable, directory: Path) -> None:
    """A SavedModel of `model` in `directory`: the parameters as TF variables, the program as jax2tf's StableHLO
    (one `XlaCallModule`), a `serving_default` signature `images -> {"probabilities"}` with a dynamic batch."""
    import tensorflow as tf
    from jax.experimental import jax2tf

    size = model.prep.input_size
    module = tf.Module()
    module.params = tf.nest.map_structure(lambda a: tf.Variable(a, trainable=False), jax.device_get(model.variables))
    program = jax2tf.convert(model.probabilities, polymorphic_shapes=[None, f"(b, {size}, {size}, 3)"],
                             with_gradient=False)
    module.serve = tf.function(lambda images: {OUTPUT_NAME: program(module.params, images)}, autograph=False,
                               input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8, name=INPUT_NAME)])
    tf.saved_model.save(module, str(directory), signatures={"serving_default": module.serve})
    (directory / "assets.extra").mkdir(exist_ok=True)
    (directory / "assets.extra" / f"{METADATA_KEY}.json").write_text(json_text(model.metadata) + "\n")


def _write_savedmodel(model: Servable, out: Path) -> None:
    tmp = temporary_beside(out)
    try:
        with writes_into(out.parent):
            _save_tf(model, tmp)
            _replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _replace_folder(new: Path, out: Path) -> None:
    """`new` renamed to `out`; a folder already at `out` is moved aside first and removed after."""
    old = None
    if out.exists():  # an empty folder or an earlier export (`check_out`)
        old = temporary_beside(out)
        os.replace(out, old)
    os.replace(new, out)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def _write_tflite(model: Servable, out: Path) -> None:
    import tensorflow as tf

    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        _save_tf(model, Path(tmp) / "savedmodel")
        converter = tf.lite.TFLiteConverter.from_saved_model(str(Path(tmp) / "savedmodel"))
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        flatbuffer = converter.convert()
    with atomic_path(out.with_name(out.name + ".json")) as tmp:
        tmp.write_text(json_text(model.metadata) + "\n")
    with atomic_path(out) as tmp:
        tmp.write_bytes(flatbuffer)
