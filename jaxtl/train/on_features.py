"""The cached-feature trainers: the frozen backbone runs once per image (features cached on disk,
`jaxtl.features.cache`), the head trains on the cached features.

With every backbone parameter frozen and its BatchNorm statistics fixed, the backbone is a fixed function of the
image; what training adds is augmentation (and stochastic depth), which a cache of features cannot have. In
exchange a head epoch costs a pass over a few MB of features instead of decoding and running the backbone on
every image. Two trainers: `features_logistic`, logistic regression fitted by L-BFGS with the L2 strength chosen
on val (`probe.*`), and `features_mlp`, an MLP head (`head.hidden`) trained by epochs in the same loop and steps
as any run (`jaxtl.train.loop.fit`), on batches of features. Either way the state is the full model's, so the
checkpoints, `eval` and `predict --workdir` are those of any other run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh

from jaxtl.core.errors import ConfigError
from jaxtl.core.locations import Location
from jaxtl.core.processes import is_main
from jaxtl.core.sharding import replicated
from jaxtl.features.cache import cache_entry, cached_features, describe_backbone
from jaxtl.data.split import stratified_split
from jaxtl.features.featureset import FeatureSet
from jaxtl.features.fewshot import knn_predict
from jaxtl.features.logistic import DEFAULT_L2_GRID, fit_logistic
from jaxtl.train import plan as plans
from jaxtl.train.checkpoints import Checkpoints
from jaxtl.train.evaluate import evaluate_split
from jaxtl.train.finish import Trained
from jaxtl.train.inputs import FeatureSource
from jaxtl.train.loop import fit
from jaxtl.train.plan import FitSettings, Plan
from jaxtl.train.report import MetricsLog
from jaxtl.train.steps import MAPS, TrainState, make_eval_step
from jaxtl.models.classifier import knn_bank
from jaxtl.models.registry import get_model_spec
from jaxtl.weights.create import headless

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MLPSettings:
    fit: FitSettings
    cache_root: Location


@dataclass(frozen=True)
class MapsSettings:
    fit: FitSettings
    cache_root: Location
    entry: str  # the feature whose maps are cached: the output of the last frozen group
    flip: bool
    cap_gb: float  # the train split's maps past this many GB: a seeded stratified subset of it


@dataclass(frozen=True)
class KNNSettings:
    cache_root: Location
    k: int


@dataclass(frozen=True)
class LogisticSettings:
    cache_root: Location
    l2_grid: tuple[float, ...]
    max_iter: int


def mlp_settings(config: ml_collections.ConfigDict, groups: tuple[str, ...]) -> MLPSettings:
    return MLPSettings(plans.fit_settings(config, groups), plans.feature_cache_root(config))


MAPS_STRATEGIES = ("finetune_top", "gradual")


def maps_settings(config: ml_collections.ConfigDict, groups: tuple[str, ...]) -> MapsSettings:
    t = config.transfer
    if t.strategy == "gradual":  # phase i trains the top i groups: the last phase, the most
        stages, key = len(t.phase_epochs) - 1, f"{len(t.phase_epochs)} transfer.phase_epochs"
    else:
        stages, key = t.num_stages, f"transfer.num_stages={t.num_stages}"
    if get_model_spec(config.model.name).family == "vit" or stages >= len(groups):
        raise ConfigError(f"transfer.cached_maps=True trains the top stages on cached maps of the stage below them: "
                          f"it needs a CNN whose lowest group stays frozen (model {config.model.name}, {key}, "
                          f"{len(groups)} groups); set it False")
    return MapsSettings(plans.fit_settings(config, groups), plans.feature_cache_root(config),
                        groups[len(groups) - stages - 1], config.data.augment.enabled and config.data.augment.flip,
                        config.transfer.cached_maps_gb)


def logistic_settings(config: ml_collections.ConfigDict, groups: tuple[str, ...]) -> LogisticSettings:
    return LogisticSettings(plans.feature_cache_root(config), tuple(config.probe.l2_grid) or DEFAULT_L2_GRID,
                            config.probe.max_iter)


def split_features(plan: Plan, backbone, backbone_variables, mesh: Mesh, root: Location
                   ) -> tuple[dict[str, FeatureSet], dict[str, str], float]:
    """Each split's pooled head layers from the feature cache (extracted on a miss): `(feature sets, entry
    paths, seconds)`."""
    m = plan.model
    description = describe_backbone(m.name, m.weights, m.backbone_kwargs, m.dtype, m.seed)
    start = time.perf_counter()
    features, entries = {}, {}
    for name, split in plan.dataset.splits.items():
        entry = cache_entry(description, plan.prep, split, root)
        arrays, labels = cached_features(entry, backbone, backbone_variables, split, plan.prep, m.head_layers,
                                         batch_size=plan.batch_size, mesh=mesh, workers=plan.workers,
                                         progress=plan.progress and is_main(), desc=f"features {name}")
        features[name], entries[name] = FeatureSet([arrays[layer] for layer in m.head_layers], labels), str(entry.path)
    return features, entries, time.perf_counter() - start


def _features(plan: Plan, mesh: Mesh, root: Location, head_kind: str):
    model, variables = plan.model.create(plan.num_classes)
    layers = plan.model.head_layers
    log.info("linear_probe on cached features (%s, pooled): augmentation and stochastic depth are off (features "
             "are computed once, with the eval transform); head: %s", ", ".join(layers), head_kind)
    features, entries, extract_seconds = split_features(plan, *headless(model, variables), mesh, root)
    summary = {"feature_cache": {"layers": list(layers), "head": head_kind, "entries": entries,
                                 "extract_seconds": round(extract_seconds, 2), "augmentation": False}}
    return model, variables, FeatureSource(features, plan.batch_size, plan.seed), summary


def train_mlp(plan: Plan, mesh: Mesh) -> Trained:
    """An MLP head (`head.hidden` units) by epochs on batches of cached features."""
    model, variables, source, summary = _features(plan, mesh, plan.settings.cache_root,
                                                  f"MLP ({plan.model.head_hidden} hidden units)")
    source = replace(source, balanced=plan.settings.fit.recipe.sampler == "balanced")
    trained = fit(plan, plan.settings.fit, model, variables, source, mesh)
    trained.summary |= summary
    return trained


LOST_WITH_MAPS = ("random resized crops", "augmentation policies and colour jitter", "random erasing", "Mixup/CutMix",
                  "stochastic depth below the trained stages")


def train_maps(plan: Plan, mesh: Mesh) -> Trained:
    """`finetune_top` (or `gradual`, whose phases unfreeze top groups one by one) on cached maps: the groups no
    phase trains run once per image (their output, the entry of the lowest trained stage, memory-mapped in the
    feature cache at the run's input size), the top stages and the head train on those maps by epochs, phase by
    phase, in the same loop and steps as any run (`Classifier.classify_maps`). The one augmentation that commutes
    with the frozen part is kept: mirroring the maps (`data.augment.flip`); `LOST_WITH_MAPS` are not."""
    s, m = plan.settings, plan.model
    model, variables = m.create(plan.num_classes)
    description = describe_backbone(m.name, m.weights, m.backbone_kwargs, m.dtype, m.seed)
    backbone, backbone_variables = headless(model, variables)
    log.info("%s on cached %s maps: the frozen groups run once per image; kept augmentation: %s; lost: %s",
             plan.strategy, s.entry, "flip of the maps" if s.flip else "none", ", ".join(LOST_WITH_MAPS))
    splits, size = dict(plan.dataset.splits), plan.prep.input_size
    shape = jax.eval_shape(lambda x: backbone.apply(backbone_variables, x), jnp.zeros((1, size, size, 3)))[s.entry]
    per_image = int(np.prod(shape.shape[1:])) * 4
    estimate = {name: round(len(split) * per_image / 1e9, 3) for name, split in splits.items()}
    limit = max(int(s.cap_gb * 1e9 // per_image), 1)
    if len(splits["train"]) > limit:
        kept = stratified_split(splits["train"].labels, {"kept": limit / len(splits["train"])}, plan.seed)["kept"]
        log.warning("the train split's %s maps would take %.1f GB, past transfer.cached_maps_gb=%g: training on a "
                    "seeded stratified %d of its %d images", s.entry, estimate["train"], s.cap_gb, len(kept),
                    len(splits["train"]))
        splits["train"] = splits["train"].subset(kept)
    start, maps, entries = time.perf_counter(), {}, {}
    for name, split in splits.items():
        entry = cache_entry(description, plan.prep, split, s.cache_root)
        arrays, labels = cached_features(entry, backbone, backbone_variables, split, plan.prep, (s.entry,), pool=False,
                                         batch_size=plan.batch_size, mesh=mesh, workers=plan.workers,
                                         progress=plan.progress and is_main(), desc=f"{s.entry} maps {name}")
        maps[name], entries[name] = FeatureSet([arrays[s.entry]], labels), str(entry.path)
    extract_seconds = time.perf_counter() - start
    source = FeatureSource(maps, plan.batch_size, plan.seed, MAPS, flip=s.flip,
                           balanced=s.fit.recipe.sampler == "balanced")
    if source.steps_per_epoch() == 0:
        raise ConfigError(f"train.batch_size={plan.batch_size} is larger than the train split "
                          f"({len(plan.dataset.splits['train'])} images)")
    top = model.clone(maps_from=s.entry, maps_input_size=plan.prep.input_size)
    trained = fit(plan, s.fit, top, variables, source, mesh)
    trained.summary |= {"map_cache": {
        "layer": s.entry, "entries": entries, "extract_seconds": round(extract_seconds, 2), "estimate_gb": estimate,
        "train_images": len(splits["train"]),
        "augmentation": ["flip"] if s.flip else [], "lost": list(LOST_WITH_MAPS)}}
    return trained


def train_logistic(plan: Plan, mesh: Mesh) -> Trained:
    """Logistic regression by L-BFGS over `probe.l2_grid`, the best val accuracy kept; it does not resume, it
    redoes the fit, which on a warm cache takes seconds."""
    s = plan.settings
    model, variables, source, summary = _features(plan, mesh, s.cache_root, "logistic regression")
    features = source.features
    empty = FeatureSet([np.zeros((0, features["train"].dim), np.float32)],
                       np.zeros((0, *features["train"].labels.shape[1:])))
    fitted = fit_logistic(features["train"], features.get("val", empty), plan.num_classes, s.l2_grid, s.max_iter)
    log.info("L2 %.3g chosen from %d values (%s %s) in %.1f s", fitted.chosen["l2"], len(fitted.history),
             plan.score, fitted.chosen.get(plan.score, "-: no val split"), fitted.seconds)

    best = {plan.score: fitted.chosen.get(plan.score, -1.0), "epoch": 1 if "val" in source.splits else -1}
    summary |= {"epochs": 0, "steps": len(fitted.history), "train_seconds": round(fitted.seconds, 2),
                "l2_chosen": fitted.chosen,
                "trainable_params": int(sum(np.size(p) for p in jax.tree_util.tree_leaves(fitted.params)))}
    return _closed_form(plan, mesh, model, variables, source, fitted.params, fitted.history, best, summary)


def knn_settings(config: ml_collections.ConfigDict, groups: tuple[str, ...]) -> KNNSettings:
    return KNNSettings(plans.feature_cache_root(config), config.head.knn)


def train_knn(plan: Plan, mesh: Mesh) -> Trained:
    """A kNN probe: nothing is fitted; the head holds the train split's cached features (unit rows) and one-hot
    labels, and classifies by the cosine vote of the `head.knn` most similar (`jaxtl.models.classifier.knn_vote`).
    Its checkpoints, `eval`, `predict --workdir` and export are those of any run (the bank is a parameter)."""
    s = plan.settings
    if plan.dataset.multi_label:
        raise ConfigError("head.knn: a kNN vote picks one class an image; multi-label data (data.multi_label) needs "
                          "a fitted head: set head.knn=0 (the logistic probe fits one per label)")
    model, variables, source, summary = _features(plan, mesh, s.cache_root, f"cosine kNN vote (k={s.k})")
    train = source.features["train"]
    start = time.perf_counter()
    rows = train.rows()  # one read of the memory-mapped features, for the bank and the val vote
    head = knn_bank(rows, train.labels, plan.num_classes)
    record = {"k": s.k, "bank": len(train)}
    if "val" in source.features:
        val = source.features["val"]
        predicted = knn_predict(rows, train.labels, val.rows(), plan.num_classes, s.k)
        record["val_accuracy"] = float(np.mean(predicted == val.labels))
    log.info("kNN head: %d train features, k=%d%s", len(train), s.k,
             f", val accuracy {record['val_accuracy']:.4f}" if "val_accuracy" in record else "")
    best = {"val_accuracy": record.get("val_accuracy", -1.0), "epoch": 1 if "val" in source.splits else -1}
    summary |= {"epochs": 0, "steps": 1, "train_seconds": round(time.perf_counter() - start, 2), "knn": record,
                "trainable_params": 0, "bank_bytes": int(sum(np.asarray(v).nbytes for v in head.values()))}
    return _closed_form(plan, mesh, model, variables, source, head, [record], best, summary)


def _closed_form(plan: Plan, mesh: Mesh, model, variables: dict, source: FeatureSource, head: dict,
                 history: list[dict], best: dict, summary: dict) -> Trained:
    """A head that was fitted (or filled) outside the epoch loop: its history logged, the model's state with that
    head checkpointed as latest and best (so `eval`, `predict --workdir` and resume see a finished run)."""
    metrics_log = MetricsLog(plan.workdir, [], enabled=is_main())
    for i, record in enumerate(history):
        metrics_log.write({"step": i, **record})
    metrics_log.close()
    params = dict(variables["params"], head=jax.tree_util.tree_map(jnp.asarray, head))
    state = TrainState(step=jnp.asarray(len(history), jnp.int32), params=params,
                       batch_stats=variables.get("batch_stats", {}), opt_state=None,
                       rng=jax.random.key_data(jax.random.key(plan.seed)))
    # global arrays, as every process saves its part; from host values: a committed one-device array put on a mesh
    # of several processes of one device each gave arrays whose one shard spans the mesh (orbax then fails)
    state = jax.device_put(jax.device_get(state), replicated(mesh))
    checkpoints = Checkpoints(plan.workdir)
    meta = {"classes": list(plan.dataset.class_names), "step": len(history), "history": history,
            "best": best, "totals": None, "epoch_seconds": 0.0}
    for manager in (checkpoints.latest, checkpoints.best):
        checkpoints.save(manager, len(history), state, meta)
    checkpoints.close()
    eval_step = make_eval_step(model, plan.num_classes, mesh, source.inputs)
    return Trained(state, lambda: state, history, best,
                   lambda st, split, thresholds=None: evaluate_split(eval_step, st, source, split, mesh,
                                                                     plan.progress, thresholds),
                   tuple(source.splits), summary)
