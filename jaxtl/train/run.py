"""A run of `train`: the config checked, resolved into a `Plan`, trained by its trainer, finished.

Trainers share one signature, `train(plan, mesh) -> Trained`, and are picked by name (`TRAINERS`); each declares
what it reads of the config in its `settings(config, groups)`. `keys_read` runs the plan's readers on a recording
view of the config, so the set of keys a run reads is derived from the code that reads them, and a key that is set
but never read is an error before any work (`check_config`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import ml_collections
from jax.sharding import Mesh

from jaxtl.config import (CONFIG_FILE, KEYS, apply_overrides, check_values, differences, leaves, load_resolved,
                          save_resolved, set_keys)
from jaxtl.core import locations
from jaxtl.core.errors import ConfigError
from jaxtl.core.paths import cache_dir
from jaxtl.core.processes import is_main
from jaxtl.core.sharding import make_mesh
from jaxtl.core.store import sha256_file
from jaxtl.data.decoded import decoded_dataset
from jaxtl.data.listing import SUFFIXES as LISTING_SUFFIXES
from jaxtl.data.split import ImageDataset, split_fingerprint
from jaxtl.train import on_features, on_images
from jaxtl.train import plan as plans
from jaxtl.train.finish import Trained, finish
from jaxtl.train.plan import Plan
from jaxtl.train.workdir import owned
from jaxtl.weights.create import weights_read_once

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Trainer:
    """A trainer: what it reads (`settings(config, groups)`), and how it trains (`train(plan, mesh)`)."""

    name: str
    settings: Callable[[ml_collections.ConfigDict, tuple[str, ...]], Any]
    train: Callable[[Plan, Mesh], Trained]
    description: str
    head_dropout: bool = True  # trains in train mode (reads head.dropout)


TRAINERS = {
    "images": Trainer("images", on_images.settings, on_images.train, "the classifier on augmented images"),
    "features_mlp": Trainer("features_mlp", on_features.mlp_settings, on_features.train_mlp,
                            "an MLP head on cached features"),
    "features_logistic": Trainer("features_logistic", on_features.logistic_settings, on_features.train_logistic,
                                 "a logistic-regression head on cached features", head_dropout=False),
    "features_knn": Trainer("features_knn", on_features.knn_settings, on_features.train_knn,
                            "a cosine k-nearest-neighbour vote over cached train features", head_dropout=False),
    "maps": Trainer("maps", on_features.maps_settings, on_features.train_maps,
                    "the top stages and the head on cached maps of the frozen part"),
}


def choose_trainer(config: ml_collections.ConfigDict) -> Trainer:
    """A linear probe with the feature cache on (and the frozen backbone's BatchNorm statistics fixed) trains its
    head on cached features (with `head.knn`, fills a kNN head with them); `finetune_top` and `gradual` with
    `transfer.cached_maps` train their top on cached maps; everything else trains on images."""
    t = config.transfer
    probe = t.strategy == "linear_probe" and config.features.cache and not t.train_frozen_bn
    if config.head.knn:
        if not probe or config.head.hidden:
            raise ConfigError(f"head.knn={config.head.knn} votes with the train split's cached features: it needs "
                              "transfer.strategy=linear_probe, features.cache=True, head.hidden=0 and "
                              "transfer.train_frozen_bn=False; set head.knn=0 for a trained head")
        return TRAINERS["features_knn"]
    if probe:
        return TRAINERS["features_mlp" if config.head.hidden else "features_logistic"]
    if t.strategy in on_features.MAPS_STRATEGIES and t.cached_maps:
        if t.train_frozen_bn:
            raise ConfigError("transfer.cached_maps=True computes the frozen groups once, which frozen BatchNorm "
                              "layers that train (transfer.train_frozen_bn=True) would change; set one False")
        return TRAINERS["maps"]
    return TRAINERS["images"]


@dataclass(frozen=True)
class Resolved:
    """Everything `read` takes from a config: the plan, less the dataset and the workdir."""

    trainer: Trainer
    strategy: str
    model: plans.ModelPlan
    data: plans.DataSource
    prep: Any
    batch_size: int
    workers: int
    decoded_cache: int | None  # the train split's stored side (0: the resize size); None: no decoded cache
    resume_on_changed_data: bool
    seed: int
    progress: bool
    settings: Any
    threshold: float | None = None  # multi-label: `eval.threshold`


def read(config: ml_collections.ConfigDict) -> Resolved:
    """Every read of a run's config (no dataset is loaded; the weights are resolved, not read)."""
    trainer = choose_trainer(config)
    model = plans.model_plan(config, head_dropout=trainer.head_dropout)
    d = config.data
    return Resolved(trainer, config.transfer.strategy, model, plans.data_source(config),
                    plans.preprocessing(config, model), config.train.batch_size, d.workers,
                    d.decoded_cache_side if d.decoded_cache else None,
                    config.train.resume_on_changed_data, config.seed, config.progress,
                    trainer.settings(config, model.groups),
                    config.eval.threshold if plans.multi_label_data(config) else None)


class _Recording:
    """A read-only view of a config that records the dotted keys read from it (`model.kwargs` is one key)."""

    def __init__(self, node: ml_collections.ConfigDict, seen: set[str], prefix: str = ""):
        object.__setattr__(self, "_node", node)
        object.__setattr__(self, "_seen", seen)
        object.__setattr__(self, "_prefix", prefix)

    def __getattr__(self, name: str):
        value = getattr(self._node, name)
        key = f"{self._prefix}{name}"
        if isinstance(value, ml_collections.ConfigDict) and key != "model.kwargs":
            return _Recording(value, self._seen, f"{key}.")
        self._seen.add(key)
        return value

    __getitem__ = __getattr__

    def __setattr__(self, name, value):
        raise TypeError("a recorded config is read-only")


def keys_read(config: ml_collections.ConfigDict) -> set[str]:
    """The keys the run `config` describes reads: what `read` reads of it. A key its declaration (`KEYS`) says the
    run's strategy never reads is a bug here, not the user's: the declaration is what the unread-key check and the
    reference go by."""
    seen: set[str] = set()
    read(_Recording(config, seen))
    strategy = config.transfer.strategy
    undeclared = sorted(key for key in seen if key in KEYS and not KEYS[key].read_by_strategy(strategy))
    if undeclared:
        raise RuntimeError(f"transfer.strategy={strategy!r} reads {', '.join(undeclared)}, which jaxtl.config.KEYS "
                           "declares it does not: add the strategy to the key's read_by")
    return seen


def unread_keys(config: ml_collections.ConfigDict, also_read: set[str] = frozenset()) -> list[str]:
    """Keys set to something other than their default that the run never reads (nor `also_read`): those whose
    declaration (`KEYS[key].read_by`) leaves out the run's strategy, and those the run's settings leave unread
    (an MLP head's width without an MLP head)."""
    read_ = keys_read(config) | set(also_read)
    return [key for key in set_keys(config) if key not in read_]


def unread_message(config: ml_collections.ConfigDict, unread: list[str]) -> str:
    values = ", ".join(f"{key}={leaves(config)[key]!r}" for key in unread)
    path = choose_trainer(config)
    it = "it" if len(unread) == 1 else "them"
    return (f"{values}: set, but transfer.strategy='{config.transfer.strategy}' ({path.description}) never reads "
            f"{it}; remove {it} or choose the strategy that uses {it}")


def dropped_with_maps(config: ml_collections.ConfigDict, unread: list[str]) -> list[str]:
    """The keys of `unread` that the same strategy on images reads and `transfer.cached_maps=True` drops (crop
    scale, augmentation policies, Mixup, ...): the switch names what it loses, so a config that sets them (the
    `:finetune_top` variants set a crop scale) trains on the maps with a warning instead of an error."""
    if not unread or choose_trainer(config).name != "maps":
        return []
    on_images = keys_read(apply_overrides(config.copy_and_resolve_references(), ["transfer.cached_maps=False"]))
    return [key for key in unread if key in on_images]


def check_config(config: ml_collections.ConfigDict, unread_is_error: bool = True) -> None:
    """Before any work: every value, the model-dependent settings (layers, rules against the parameter paths) and
    (unless `unread_is_error=False`: `auto`, whose user could not know the path) that no key is set where the run
    never reads it."""
    check_values(config)
    unread = unread_keys(config) if unread_is_error else []
    dropped = dropped_with_maps(config, unread)
    if dropped:
        values = leaves(config)
        log.warning("%s: transfer.cached_maps=True drops %s (the frozen groups' maps are computed once, before any "
                    "augmentation; %s); set transfer.cached_maps=False to train with %s",
                    ", ".join(f"{key}={values[key]!r}" for key in dropped),
                    "it" if len(dropped) == 1 else "them", "; ".join(on_features.LOST_WITH_MAPS),
                    "it" if len(dropped) == 1 else "them")
        unread = [key for key in unread if key not in dropped]
    if unread:
        raise ConfigError(unread_message(config, unread))
    resolved = read(config)
    fit = getattr(resolved.settings, "fit", None)
    plans.check_model(resolved.model, resolved.prep, fit, resolved.strategy)


def make_plan(config: ml_collections.ConfigDict, workdir: str | Path, dataset: ImageDataset | None = None) -> Plan:
    """The plan of a checked config: the dataset loaded (or the one given, already loaded for `auto`) and, with
    `data.decoded_cache`, read from the decoded-image cache."""
    resolved = read(config)
    record = plans.read_record(Path(workdir))  # a resumed run's: what it started with, read once
    prep = plans.recorded_preprocessing(Path(workdir), record) or resolved.prep
    if prep != resolved.prep:
        log.warning("the run in %s started with %s (%s); it goes on with it, not with %s that its weights call for "
                    "now", workdir, prep, plans.RECORD_FILE, resolved.prep)
    if dataset is None:
        dataset = resolved.data.load()
        log.info("dataset %s: %d classes, %s%s", dataset.source, dataset.num_classes,
                 {k: len(v) for k, v in dataset.splits.items()},
                 "".join(f"; {k} carved from train ({v:g})" for k, v in (dataset.carved or {}).items()))
        if dataset.skipped:
            log.warning("skipped %d unreadable images (data.skip_bad_images=True)", len(dataset.skipped))
    if dataset.multi_label and config.data.sampler == "balanced":
        raise ConfigError("data.sampler='balanced' draws each class as often as the others, which multi-label data "
                          "(several labels an image) does not define; use train.class_weights='balanced' (each "
                          "label's positives weighted as its negatives)")
    if resolved.decoded_cache is not None and not getattr(next(iter(dataset.splits.values())), "decoded", False):
        dataset = decoded_dataset(dataset, prep, cache_dir() / "decoded", resolved.decoded_cache)
    return Plan(config=ml_collections.FrozenConfigDict(config), workdir=Path(workdir),
                trainer=resolved.trainer.name, strategy=resolved.strategy, model=resolved.model,
                data=resolved.data, dataset=dataset, prep=prep, batch_size=resolved.batch_size,
                workers=resolved.workers, seed=resolved.seed, progress=resolved.progress, settings=resolved.settings,
                resume_on_changed_data=resolved.resume_on_changed_data, record=record, threshold=resolved.threshold)


def unread_fractions(config: ml_collections.ConfigDict) -> list[str]:
    """`data.val_fraction`/`test_fraction` set for a folder that has that split's own folder (never read)."""
    folders, set_ = plans.data_source(config).split_folders(), set_keys(config)
    return [f"data.{split}_fraction={config.data[f'{split}_fraction']!r}" for split in ("val", "test")
            if split in folders and f"data.{split}_fraction" in set_]


def prepare_workdir(config: ml_collections.ConfigDict, workdir: Path) -> None:
    """Writes `config.json`; a workdir that already has one (a resumed run) must have been started with the same
    config, else its checkpoints belong to another run."""
    if (workdir / CONFIG_FILE).is_file():
        changed = differences(load_resolved(workdir), config)
        if changed:
            raise ConfigError(f"{workdir} holds a run with another config ({'; '.join(changed)}); use a new "
                              "--workdir, or the original config to resume it")
    elif is_main():
        save_resolved(config, workdir)


def data_fingerprint(dataset: ImageDataset) -> dict:
    """What the run was trained on: the classes, and per split its size and the sha256 of its contents and labels;
    for a manifest source, the manifest file's sha256 too."""
    found = {"classes": list(dataset.class_names),
             "splits": {name: {"count": len(split), "sha256": split_fingerprint(split)}
                        for name, split in dataset.splits.items()}}
    listing = locations.location(dataset.source)
    if dataset.source.endswith(LISTING_SUFFIXES) and locations.is_file(listing):
        found["manifest"] = {"path": dataset.source, "sha256": hashlib.sha256(locations.read_bytes(listing)).hexdigest()
                             if locations.is_url(listing) else sha256_file(listing)}
    return found


def check_data(plan: Plan) -> Plan:
    """The plan with the fingerprint of the data it starts on, which its record holds (`plan.json`); a resumed
    run's data must be the one recorded (else an error, or a warning with `train.resume_on_changed_data`)."""
    now = data_fingerprint(plan.dataset)
    planned = dataclasses.replace(plan, data_fingerprint=now)
    recorded, in_record = plans.recorded_data(plan.workdir, plan.record)
    if recorded is None or recorded == now:  # a new run's record is written whole as it starts; a run from
        if not in_record:                    # before the record held the data gets it now
            plans.record_data(planned)
        return planned
    changes = []
    if recorded.get("classes") != now["classes"]:
        changes.append(f"classes {recorded.get('classes')} -> {now['classes']}")
    for name in sorted(set(recorded.get("splits", {})) | set(now["splits"])):
        before, after = recorded.get("splits", {}).get(name), now["splits"].get(name)
        if before != after:
            counts = f"{(before or {}).get('count', 0)} -> {(after or {}).get('count', 0)} images"
            same_count = before and after and before["count"] == after["count"]
            changes.append(f"{name}: {counts}" + (" (contents or labels differ)" if same_count else ""))
    message = f"the data changed since the run in {plan.workdir} started ({'; '.join(changes)})"
    if not plan.resume_on_changed_data:
        raise ConfigError(f"{message}: resuming would train on other data than its checkpoints saw; use a new "
                          "--workdir for the new data, or set train.resume_on_changed_data=True to go on with it")
    log.warning("%s; going on with it (train.resume_on_changed_data=True)", message)
    plans.record_data(planned)
    return planned


def train(plan: Plan, mesh: Mesh | None = None, extra_summary: dict | None = None) -> dict:
    """Trains the plan with its trainer and finishes the run; returns the summary."""
    mesh = mesh or make_mesh()
    if plan.batch_size % mesh.size:
        raise ConfigError(f"train.batch_size={plan.batch_size} must be divisible by the number of devices "
                          f"({mesh.size})")
    plans.write_record(plan)
    trained = TRAINERS[plan.trainer].train(plan, mesh)
    return finish(plan, trained, mesh, extra_summary)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """A whole run of a config that names its strategy (for `auto`, `jaxtl.advice.auto`, which ends here)."""
    config = config.copy_and_resolve_references()
    if config.transfer.strategy == "auto":
        raise ConfigError("transfer.strategy='auto' chooses the strategy above training: use "
                          "`jaxtl.commands.train` (or `run.py train`)")
    with weights_read_once():  # checked, planned and trained: the weights resolved (hashed) and read once
        check_config(config)
        unread = unread_fractions(config)
        if unread:
            given = {"manifest": "lists that split", "hf": "has that split"}.get(config.data.source,
                                                                                "has that split's own folder")
            where = config.data.name if config.data.source == "hf" else config.data.path
            raise ConfigError(f"{', '.join(unread)}: set, but {where} {given}, so it is never read; remove it")
        with owned(workdir) as workdir:
            prepare_workdir(config, workdir)
            plan = check_data(make_plan(config, workdir))
            return train(plan)
