"""`measure`: a dataset's size and its similarity signals for one pretrained backbone.

The probe's features go through the feature cache with the same key a linear-probe run on this data uses, so
advice followed by `train` with `strategy=linear_probe` (or `auto`) extracts the features once.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxtl.advice.signals import batchnorm_shift, head_confidence, layer_probe
from jaxtl.core.errors import ConfigError, DataError
from jaxtl.core.preprocessing import Preprocessing
from jaxtl.core.sharding import make_mesh
from jaxtl.data.split import ImageDataset, label_counts
from jaxtl.features.cache import cache_entry, cached_features, describe_backbone
from jaxtl.models.backbone import PRE_LOGITS
from jaxtl.weights.create import Weights, create_backbone, create_model, headless, resolve_weights

log = logging.getLogger(__name__)

PROBE_LAYERS = ("stage2", "stage3", PRE_LOGITS)
# Candidate heads of the probe: each layer alone, and the pre-logits with earlier layers.
PROBE_CANDIDATES = (("stage2",), ("stage3",), (PRE_LOGITS,), ("stage3", PRE_LOGITS), ("stage2", "stage3", PRE_LOGITS))


def dataset_size(dataset: ImageDataset) -> dict:
    """Classes and images, and the train images per class (multi-label: per label, an image counted under each
    of its labels)."""
    train = dataset.splits["train"]
    counts = label_counts(train.labels, dataset.num_classes)
    size = {"classes": dataset.num_classes, "train_images": len(train),
            "val_images": len(dataset.splits["val"]) if "val" in dataset.splits else 0,
            "median_train_per_class": float(np.median(counts)), "min_train_per_class": int(counts.min())}
    if dataset.multi_label:
        size["train_per_label"] = {name: int(n) for name, n in zip(dataset.class_names, counts)}
    return size


def measure(
    dataset: ImageDataset,
    model_name: str,
    weights: str | Path | Weights,
    prep: Preprocessing,
    *,
    backbone_kwargs: dict | None = None,
    dtype=jnp.float32,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    batch_size: int = 32,
    progress: bool = False,
    l2_grid: tuple[float, ...] | None = None,
) -> dict:
    """Size and the similarity signals (`jaxtl.advice.signals`) of `dataset` for the pretrained model: head
    confidence (None when the weights have no classifier), BatchNorm shift (None without BatchNorm), layer probe."""
    resolved = resolve_weights(model_name, weights)
    if resolved is None:
        raise ConfigError("advice measures similarity with the pretrained model; give pretrained weights, not None")
    if "val" not in dataset.splits:
        raise DataError("advice needs a val split to score the layer probe; use a folder with a val/ folder or "
                         "data.val_fraction > 0")
    start = time.perf_counter()
    kwargs = dict(backbone_kwargs or {})
    head = None
    if resolved.num_classes:  # the pretrained 1000-class head, for its confidence
        model, variables = create_model(model_name, resolved, dtype=dtype, **kwargs)
        (backbone, backbone_variables), head = headless(model, variables), variables["params"]["head"]
    else:  # a headless file (MobileNetV2's packaged weights): no head-confidence signal
        backbone, backbone_variables = create_backbone(model_name, resolved, dtype=dtype, **kwargs)
    description = describe_backbone(model_name, resolved, kwargs, jnp.dtype(dtype).name, seed)
    mesh = make_mesh()
    features = {}
    for split in ("train", "val"):
        entry = cache_entry(description, prep, dataset.splits[split], cache_dir)
        arrays, labels = cached_features(entry, backbone, backbone_variables, dataset.splits[split], prep,
                                         PROBE_LAYERS, batch_size=batch_size, mesh=mesh, progress=progress,
                                         desc=f"features {split}")
        features[split] = ({name: np.asarray(a) for name, a in arrays.items()}, labels)
    pre_logits = np.concatenate([features[s][0][PRE_LOGITS] for s in ("train", "val")])
    confidence = head_confidence(pre_logits, head) if head is not None else None
    shift = batchnorm_shift(backbone, backbone_variables, dataset.splits["train"], prep, mesh, batch_size) if (
        backbone_variables.get("batch_stats")) else None  # a ViT has no BatchNorm
    probe = layer_probe(*features["train"], *features["val"], dataset.num_classes, PROBE_CANDIDATES,
                        **({"l2_grid": l2_grid} if l2_grid else {}))
    return {"model": model_name, "weights": resolved.name, "input_size": prep.input_size,
            "size": dataset_size(dataset), "head_confidence": confidence, "batchnorm_shift": shift,
            "layer_probe": probe, "seconds": round(time.perf_counter() - start, 1)}
