"""The linear-probe fast path: the frozen backbone runs once per image (features cached on disk), the head trains
on the cached features.

With every backbone parameter frozen and its BatchNorm statistics fixed, the backbone is a fixed function of the
image; what training adds is augmentation (and stochastic depth), which a cache of features cannot have. In
exchange a head epoch costs a pass over a few MB of features instead of decoding and running the backbone on
every image. A linear head (`head.hidden=0`) is logistic regression fitted by L-BFGS with the L2 strength chosen
on val (`probe.*`); an MLP head trains by epochs in the same loop and steps as any run (`jaxtl.train.loop.fit`),
on batches of features. Either way the state is the full model's, so the checkpoints, `eval` and
`predict --workdir` are those of any other run.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxtl.create import headless
from jaxtl.data.folder import ImageDataset
from jaxtl.distributed import is_main
from jaxtl.features.cache import cache_entry, cached_features, describe_backbone
from jaxtl.features.featureset import FeatureSet
from jaxtl.features.logistic import DEFAULT_L2_GRID, fit_logistic
from jaxtl.sharding import replicated
from jaxtl.train import build
from jaxtl.train.checkpoints import Checkpoints
from jaxtl.train.inputs import FeatureSource
from jaxtl.train.loop import evaluate, fit, run_summary
from jaxtl.train.report import MetricsLog, write_report
from jaxtl.train.steps import TrainState, make_eval_step

log = logging.getLogger(__name__)


def split_features(config: ml_collections.ConfigDict, dataset: ImageDataset, backbone, backbone_variables, mesh,
                   layers) -> tuple[dict[str, FeatureSet], dict[str, str], float]:
    """Each split's pooled `layers` from the feature cache (extracted on a miss): `(feature sets, entry paths,
    seconds)`."""
    description = describe_backbone(config.model.name, config.model.weights, build.backbone_kwargs(config),
                                    jnp.dtype(build.compute_dtype(config)).name, config.seed)
    prep = build.preprocessing(config)
    start = time.perf_counter()
    features, entries = {}, {}
    for name, split in dataset.splits.items():
        entry = cache_entry(description, prep, split, config.features.cache_dir or None)
        arrays, labels = cached_features(entry, backbone, backbone_variables, split, prep, layers,
                                         batch_size=config.train.batch_size, mesh=mesh, workers=config.data.workers,
                                         progress=config.progress and is_main(),
                                         desc=f"features {name}")
        features[name], entries[name] = FeatureSet([arrays[layer] for layer in layers], labels), str(entry.path)
    return features, entries, time.perf_counter() - start


def train_on_features(config: ml_collections.ConfigDict, workdir: Path, dataset: ImageDataset, mesh,
                      extra_summary: dict | None = None) -> dict:
    """`train_and_evaluate` for a linear probe on cached features (`extra_summary` goes into the summary)."""
    model, variables = build.create(config, dataset.num_classes)
    layers = tuple(config.head.layers)
    head_kind = f"MLP ({config.head.hidden} hidden units)" if config.head.hidden else "logistic regression"
    log.info("linear_probe on cached features (%s, pooled): augmentation and stochastic depth are off (features "
             "are computed once, with the eval transform); head: %s", ", ".join(layers), head_kind)
    features, entries, extract_seconds = split_features(config, dataset, *headless(model, variables), mesh, layers)
    cache_summary = (extra_summary or {}) | {"feature_cache": {
        "layers": list(layers), "head": head_kind, "entries": entries, "extract_seconds": round(extract_seconds, 2),
        "augmentation": False}}
    source = FeatureSource(features, config.train.batch_size, config.seed)
    if config.head.hidden:
        return fit(config, workdir, dataset, model, variables, source, mesh, cache_summary)
    return _fit_logistic(config, workdir, dataset, model, variables, source, mesh, cache_summary)


def _fit_logistic(config, workdir: Path, dataset: ImageDataset, model, variables: dict, source: FeatureSource, mesh,
                  cache_summary: dict) -> dict:
    """Logistic regression by L-BFGS over `probe.l2_grid`, the best val accuracy kept; it does not resume, it
    redoes the fit, which on a warm cache takes seconds."""
    features = source.features
    empty = FeatureSet([np.zeros((0, features["train"].dim), np.float32)], np.zeros(0))
    fit_ = fit_logistic(features["train"], features.get("val", empty), dataset.num_classes,
                        tuple(config.probe.l2_grid) or DEFAULT_L2_GRID, config.probe.max_iter)
    metrics_log = MetricsLog(workdir, [], enabled=is_main())
    for i, record in enumerate(fit_.history):
        metrics_log.write({"step": i, **record})
    log.info("L2 %.3g chosen from %d values (val accuracy %s) in %.1f s", fit_.chosen["l2"], len(fit_.history),
             fit_.chosen.get("val_accuracy", "-: no val split"), fit_.seconds)

    params = dict(variables["params"], head=jax.tree_util.tree_map(jnp.asarray, fit_.params))
    state = TrainState(step=jnp.asarray(len(fit_.history), jnp.int32), params=params,
                       batch_stats=variables.get("batch_stats", {}), opt_state=None,
                       rng=jax.random.key_data(jax.random.key(config.seed)))
    state = jax.device_put(state, replicated(mesh))  # global arrays, as every process saves its part
    best = {"val_accuracy": fit_.chosen.get("val_accuracy", -1.0), "epoch": 1}
    checkpoints = Checkpoints(workdir)
    meta = {"classes": list(dataset.class_names), "step": len(fit_.history), "history": fit_.history, "best": best,
            "totals": None, "epoch_seconds": 0.0}
    for manager in (checkpoints.latest, checkpoints.best):
        checkpoints.save(manager, len(fit_.history), state, meta)
    checkpoints.close()

    eval_step = make_eval_step(model, dataset.num_classes, mesh, source.inputs)
    evaluations = {split: evaluate(eval_step, state, source, split, mesh, config.progress)
                   for split in ("val", "test") if split in source.splits}
    summary = run_summary(config, dataset, mesh) | cache_summary | {
        "epochs": 0, "steps": len(fit_.history), "train_seconds": round(fit_.seconds, 2),
        "l2_chosen": fit_.chosen, "best_val_accuracy": fit_.chosen.get("val_accuracy"), "best_epoch": 1,
        "final_val_accuracy": evaluations.get("val", {}).get("accuracy"),
    }
    if "val" in evaluations:
        summary["final_val"] = evaluations["val"]
    if "test" in evaluations:
        summary["best_checkpoint_test"] = evaluations["test"]
        summary["test_accuracy"] = evaluations["test"]["accuracy"]
    if is_main():
        write_report(workdir, summary, fit_.history, dataset.class_names)
    metrics_log.close()
    return summary
