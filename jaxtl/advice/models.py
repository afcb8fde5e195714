"""Backbone choice for `auto` (`transfer.auto_models`): the candidate backbones, each with its registered or given
weights, ranked by a cheap score on the run's own data before anything is trained, and the strategy trials run on
the best one.

The score is the cosine k-nearest-neighbour accuracy on val of each backbone's pooled pre-logits features (one
forward pass over train and val, kept in the feature cache): Renggli et al. (2022, "Which model to transfer?
Finding the needle in the growing haystack") found kNN accuracy on the target data the cheap proxy that ranks
pretrained models closest to their fine-tuned accuracy, with no training at all. Ties go to the earlier-listed
backbone, so a user lists the cheaper one first.
"""

from __future__ import annotations

import logging
import time
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from jaxtl.core.errors import ConfigError
from jaxtl.core.locations import Location
from jaxtl.core.preprocessing import Preprocessing
from jaxtl.core.sharding import make_mesh
from jaxtl.data.split import ImageDataset
from jaxtl.features.cache import cache_entry, cached_features, describe_backbone
from jaxtl.features.fewshot import knn_predict
from jaxtl.models.registry import parse_models
from jaxtl.weights.create import create_backbone, get_preprocessing, resolve_weights

log = logging.getLogger(__name__)

KNN_K = 10  # neighbours that vote (by cosine similarity), as the kNN probe head's default
LAYER = "pre_logits"


def _override(value: str | None) -> str:
    return "None" if value is None else repr(value)


def rank_models(
    specs: Sequence[str],
    dataset: ImageDataset,
    *,
    input_size: int = 0,
    dtype=jnp.float32,
    seed: int = 0,
    cache_dir: Location | None = None,
    batch_size: int = 32,
    progress: bool = False,
) -> dict:
    """Each backbone of `specs` scored by its kNN val accuracy (module docstring), best first; returns the table
    (`rows`: model, weights, input size, kNN val accuracy, seconds), the chosen backbone, why, and the config
    overrides that select it (`model.name`, `model.weights`)."""
    if "val" not in dataset.splits:
        raise ConfigError("transfer.auto_models ranks backbones on val; use data with a val split or "
                          "data.val_fraction > 0")
    mesh, rows = make_mesh(), []
    for order, (name, weights) in enumerate(parse_models(specs)):
        start = time.perf_counter()
        resolved = resolve_weights(name, weights) if weights is not None else None
        prep: Preprocessing = get_preprocessing(name, resolved)
        prep = prep.with_input_size(input_size) if input_size else prep
        backbone, variables = create_backbone(name, resolved, rng=seed, dtype=dtype)
        description = describe_backbone(name, resolved, {}, jnp.dtype(dtype).name, seed)
        features = {}
        for split in ("train", "val"):
            entry = cache_entry(description, prep, dataset.splits[split], cache_dir)
            arrays, labels = cached_features(entry, backbone, variables, dataset.splits[split], prep, (LAYER,),
                                             batch_size=batch_size, mesh=mesh, progress=progress,
                                             desc=f"{name} features {split}")
            features[split] = (np.asarray(arrays[LAYER]), labels)
        predicted = knn_predict(*features["train"], features["val"][0], dataset.num_classes, KNN_K)
        accuracy = float(np.mean(predicted == features["val"][1]))
        rows.append({"model": name, "weights": None if resolved is None else resolved.name, "given": weights,
                     "input_size": prep.input_size, "knn_val_accuracy": round(accuracy, 4),
                     "seconds": round(time.perf_counter() - start, 1), "order": order})
        log.info("auto_models: %s (%s) kNN val accuracy %.4f", name, rows[-1]["weights"], accuracy)
    rows.sort(key=lambda r: (-r["knn_val_accuracy"], r["order"]))
    best, runner_up = rows[0], rows[1] if len(rows) > 1 else None
    why = (f"{best['model']} ({best['weights']}) has the best {KNN_K}-nearest-neighbour accuracy on val of its "
           f"pooled {LAYER} features: {best['knn_val_accuracy']:.4f}")
    if runner_up is not None:
        tie = runner_up["knn_val_accuracy"] == best["knn_val_accuracy"]
        why += (f", tied with {runner_up['model']} ({runner_up['weights']}) and listed first" if tie else
                f", against {runner_up['knn_val_accuracy']:.4f} for the next, {runner_up['model']} "
                f"({runner_up['weights']})")
    for row in rows:
        del row["order"]
    return {"rows": rows, "chosen": best["model"], "why": why, "k": KNN_K, "layer": LAYER,
            "overrides": [f"model.name={best['model']!r}", f"model.weights={_override(best['given'])}"]}
