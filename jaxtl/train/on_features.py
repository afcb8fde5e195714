"""The linear-probe fast path: the frozen backbone runs once per image (features cached on disk), the head trains
on the cached features.

With every backbone group frozen and its BatchNorm statistics fixed, the backbone is a fixed function of the
image; what training adds is augmentation (and stochastic depth), which a cache of features cannot have. In
exchange a head epoch costs a pass over a few MB of features instead of decoding and running the backbone on
every image. The fitted head is put into the full model, so the checkpoints, `eval` and `predict --workdir`
are those of any other run.
"""

from __future__ import annotations

import logging
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxtl.create import create_model, headless
from jaxtl.data.folder import ImageDataset
from jaxtl.features.cache import cache_entry, cached_features, describe_backbone
from jaxtl.features.heads import DEFAULT_L2_GRID, FeatureSet, fit_logistic, fit_mlp
from jaxtl.models.common import Classifier
from jaxtl.sharding import global_batch
from jaxtl.train.build import compute_dtype, model_kwargs, preprocessing
from jaxtl.train.steps import TrainState, eval_metrics, make_eval_step

log = logging.getLogger(__name__)


def uses_feature_cache(config: ml_collections.ConfigDict) -> bool:
    """Whether a run takes the cached-features path (and why not, in the log, when the cache is asked for)."""
    if config.transfer.strategy != "linear_probe" or not config.features.cache:
        return False
    if config.transfer.train_frozen_bn:
        log.info("features.cache not used: transfer.train_frozen_bn=True changes the backbone as it trains")
        return False
    return True


def evaluate_features(eval_step, params: dict, features: FeatureSet, mesh, batch_size: int = 1024) -> dict:
    """The metrics `loop.evaluate` gives, computed from cached features by `make_eval_step` of the head alone."""
    batch_size = -(-batch_size // mesh.size) * mesh.size
    totals = None
    for start in range(0, len(features), batch_size):
        index = np.arange(start, min(start + batch_size, len(features)))
        pad = batch_size - len(index)
        batch = {"images": np.pad(features.rows(index), ((0, pad), (0, 0))),
                 "labels": np.pad(features.labels[index], (0, pad)).astype(np.int32),
                 "mask": np.pad(np.ones(len(index), np.float32), (0, pad))}
        sums = jax.device_get(eval_step(params, {}, global_batch(batch, mesh)))
        totals = sums if totals is None else jax.tree_util.tree_map(np.add, totals, sums)
    return eval_metrics(totals)


def fit_head_on_features(config: ml_collections.ConfigDict, dataset: ImageDataset, mesh, metrics_log) -> dict:
    """Extracts (or reads) the cached features of every split and fits the head. Returns the full model's `state`
    with the fitted head, the `fit`, the head's val/test `evaluations` and `summary` fields, for the loop to
    checkpoint and report."""
    kwargs = model_kwargs(config)
    num_classes = dataset.num_classes
    model, variables = create_model(config.model.name, config.model.weights, num_classes=num_classes,
                                    rng=config.seed, dtype=compute_dtype(config), **kwargs)
    backbone, backbone_variables = headless(model, variables)
    description = describe_backbone(config.model.name, config.model.weights, kwargs,
                                    jnp.dtype(compute_dtype(config)).name, config.seed)
    prep, layers = preprocessing(config), tuple(model.head_layers)
    head_kind = f"MLP ({config.head.hidden} hidden units)" if config.head.hidden else "logistic regression"
    log.info("linear_probe on cached features (%s, pooled): augmentation and stochastic depth are off (features "
             "are computed once, with the eval transform); head: %s", ", ".join(config.head.layers), head_kind)

    start = time.perf_counter()
    features, entries = {}, {}
    for name, split in dataset.splits.items():
        entry = cache_entry(description, prep, split, config.features.cache_dir or None)
        arrays, labels = cached_features(entry, backbone, backbone_variables, split, prep, layers,
                                         batch_size=config.train.batch_size, mesh=mesh, progress=config.progress,
                                         desc=f"features {name}")
        features[name], entries[name] = FeatureSet([arrays[layer] for layer in layers], labels), str(entry.path)
    extract_seconds = time.perf_counter() - start

    empty = FeatureSet([np.zeros((0, f.shape[1]), np.float32) for f in features["train"].arrays], np.zeros(0))
    val = features.get("val", empty)
    if config.head.hidden:
        fit = fit_mlp(features["train"], val, num_classes, hidden=config.head.hidden, epochs=config.train.epochs,
                      batch_size=config.train.batch_size, lr=config.optimizer.lr, optimizer=config.optimizer.name,
                      weight_decay=config.optimizer.weight_decay, momentum=config.optimizer.momentum,
                      warmup_epochs=config.optimizer.warmup_epochs, dropout_rate=model.dropout_rate,
                      label_smoothing=config.optimizer.label_smoothing, seed=config.seed, on_epoch=metrics_log.write)
    else:
        fit = fit_logistic(features["train"], val, num_classes, tuple(config.features.l2_grid) or DEFAULT_L2_GRID,
                           config.features.max_iter)
        for i, record in enumerate(fit.history):
            metrics_log.write({"step": i, **record})
        log.info("L2 %.3g chosen from %d values (val accuracy %s) in %.1f s", fit.chosen["l2"], len(fit.history),
                 fit.chosen.get("val_accuracy", "-: no val split"), fit.seconds)

    params = dict(variables["params"], head=jax.tree_util.tree_map(jnp.asarray, fit.params))
    state = TrainState(step=jnp.asarray(len(fit.history), jnp.int32), params=params,
                       batch_stats=variables.get("batch_stats", {}), opt_state=None,
                       rng=jax.random.key_data(jax.random.key(config.seed)))
    eval_step = make_eval_step(Classifier(num_classes=num_classes, hidden=config.head.hidden), num_classes, mesh)
    evaluations = {name: evaluate_features(eval_step, fit.params, features[name], mesh)
                   for name in ("val", "test") if name in features}
    return {"state": state, "fit": fit, "evaluations": evaluations,
            "summary": {"feature_cache": {"layers": list(layers), "head": head_kind, "entries": entries,
                                          "extract_seconds": round(extract_seconds, 2), "chosen": fit.chosen,
                                          "augmentation": False},
                        "train_seconds": round(fit.seconds, 2)}}
