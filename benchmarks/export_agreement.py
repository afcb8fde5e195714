"""How closely each export format reproduces a run's kept model: every image of the run's test split (else val)
through jaxtl's host transform, probabilities from JAX and from each format's own runtime (onnxruntime,
TensorFlow for the SavedModel, the TFLite interpreter), compared; and each export's size on disk.

    python benchmarks/export_agreement.py --workdir runs/sl_top [--out /tmp/exports]

Prints a JSON line with `images`, `model`, `input_size` and, per format, `max_abs_diff`, `same_top1` (the
fraction of images whose top class agrees) and `mb`.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import jax
import numpy as np

from jaxtl.config import load_resolved
from jaxtl.data.preprocess import eval_pixels
from jaxtl.serving.export import export, servable
from jaxtl.serving.onnx_runtime import OnnxModel
from jaxtl.train import plan as plans


def _batched(fn, images: np.ndarray, size: int = 64) -> np.ndarray:
    return np.concatenate([np.asarray(fn(images[i : i + size])) for i in range(0, len(images), size)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", default="", help="where the exports go (default: a temporary folder)")
    args = parser.parse_args()
    import tensorflow as tf

    workdir, out = Path(args.workdir), Path(args.out or tempfile.mkdtemp(prefix="jaxtl-exports-"))
    out.mkdir(parents=True, exist_ok=True)
    model = servable(workdir)
    dataset = plans.data_source(load_resolved(workdir)).load()
    split = dataset.splits["test" if "test" in dataset.splits else "val"]
    images = np.stack([eval_pixels(split.load(i, model.prep.resize_size), model.prep, exif=False)
                       for i in range(len(split))])
    reference = _batched(jax.jit(lambda x: model.probabilities(model.variables, x)), images)

    def onnx(path):
        return OnnxModel(path).probabilities

    def savedmodel(path):
        serve = tf.saved_model.load(str(path)).signatures["serving_default"]
        return lambda x: serve(images=tf.constant(x))["probabilities"].numpy()

    def tflite(path):
        runner = tf.lite.Interpreter(model_path=str(path)).get_signature_runner("serving_default")
        return lambda x: runner(images=x)["probabilities"]

    result = {"images": len(images), "model": model.metadata["model"], "input_size": model.prep.input_size}
    for fmt, name, runtime in (("onnx", "model.onnx", onnx), ("savedmodel", "savedmodel", savedmodel),
                               ("tflite", "model.tflite", tflite)):
        export(workdir, fmt, out / name)
        probs = _batched(runtime(out / name), images)
        files = [out / name] if (out / name).is_file() else [f for f in (out / name).rglob("*") if f.is_file()]
        result[fmt] = {"max_abs_diff": float(np.abs(probs - reference).max()),
                       "same_top1": float((probs.argmax(1) == reference.argmax(1)).mean()),
                       "mb": round(sum(os.path.getsize(f) for f in files) / 1e6, 1)}
        print(f"{fmt:10} max |p - p_jax| {result[fmt]['max_abs_diff']:.2e}  same top-1 {result[fmt]['same_top1']:.3f}"
              f"  {result[fmt]['mb']} MB", flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
