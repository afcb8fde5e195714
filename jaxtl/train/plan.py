"""A run, resolved once: the config becomes an immutable `Plan` (the dataset, the weights' identity, the
preprocessing, the phases and their rules, which trainer runs and its settings, the workdir), and everything below
receives the parts it needs; nothing below resolves the config again.

Every read of the config happens in the readers here and in each trainer's `settings(config)`:
`jaxtl.train.run.keys_read` records those reads (each must be one that the key's declaration, `jaxtl.config.KEYS`,
names the run's strategy for), and a key that is set but never read is an error (`check_config`). The readers are
cheap and pure (no dataset loading), so the check runs before any work.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxtl.core.atomic import damage_reason, read_json, write_json_atomic, writes_into
from jaxtl.core.errors import ConfigError, JaxtlError, RunFileError, WriteError
from jaxtl.core.locations import Location, location
from jaxtl.core.multilabel import score_name
from jaxtl.core.processes import is_main
from jaxtl.core.preprocessing import Preprocessing
from jaxtl.data.sources import DataSource
from jaxtl.data.split import ImageDataset
from jaxtl.features.cache import default_root
from jaxtl.models.classifier import Classifier, check_features, knn_bank
from jaxtl.models.lora import add_lora, default_targets
from jaxtl.models.registry import build_backbone, get_model_spec
from jaxtl.models.vit import prompt_params
from jaxtl.rules import Rule, match_patterns, match_rules
from jaxtl.transfer.optimizer import make_schedule
from jaxtl.transfer.recipe import Mixing
from jaxtl.transfer.strategies import Phase, make_phases
from jaxtl.weights.create import (DEFAULT_WEIGHTS, Weights, create_model, default_preprocessing, get_preprocessing,
                                  resolve_weights)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelPlan:
    """The classifier of a run: backbone variant and build arguments, weights (None: random init), compute dtype,
    and the head."""

    name: str
    weights: Weights | None
    kwargs: tuple[tuple[str, Any], ...]
    dtype: str
    head_layers: tuple[str, ...]
    head_hidden: int
    head_dropout: float
    reinit: tuple[str, ...]
    seed: int
    lora_rank: int = 0  # > 0: LoRA factors beside the `lora_targets` kernels (empty: the family's default)
    lora_alpha: float = 0.0
    lora_targets: tuple[str, ...] = ()
    vpt_prompts: int = 0  # > 0: a ViT with that many learnt prompt tokens (VPT), per block with `vpt_deep`
    vpt_deep: bool = False
    head_knn: int = 0  # > 0: the head is a cosine kNN vote over the train split's features (`Head.knn`)

    @property
    def lora_scale(self) -> float:
        return self.lora_alpha / self.lora_rank if self.lora_rank else 0.0

    def adapt(self, params: dict) -> dict:
        """`params` with the run's LoRA factors added (unchanged without LoRA)."""
        if not self.lora_rank:
            return params
        targets = self.lora_targets or default_targets(params)
        return add_lora(params, targets, self.lora_rank, jax.random.fold_in(jax.random.key(self.seed), 2))

    @property
    def backbone_kwargs(self) -> dict[str, Any]:
        return dict(self.kwargs)

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def groups(self) -> tuple[str, ...]:
        return tuple(build_backbone(self.name, **self.backbone_kwargs).groups)

    def _backbone(self):
        prompts = {"prompts": self.vpt_prompts, "deep_prompts": self.vpt_deep} if self.vpt_prompts else {}
        return build_backbone(self.name, dtype=self.compute_dtype, **self.backbone_kwargs, **prompts)

    def classifier(self, num_classes: int) -> Classifier:
        """The module alone (to restore a checkpoint into)."""
        backbone = self._backbone()
        return Classifier(backbone, num_classes, self.head_layers, self.head_hidden, self.head_dropout,
                          self.compute_dtype, self.lora_scale, head_knn=self.head_knn)

    def create(self, num_classes: int) -> tuple[Classifier, dict]:
        """The module and its initial variables (pretrained backbone, new head, LoRA factors if any)."""
        model, variables = create_model(self.name, self.weights, num_classes, rng=self.seed, dtype=self.compute_dtype,
                                        head_layers=self.head_layers, head_hidden=self.head_hidden,
                                        head_dropout=self.head_dropout, reinit=self.reinit, **self.backbone_kwargs)
        if self.head_knn:  # an empty bank, filled by the kNN trainer
            model = model.clone(head_knn=self.head_knn)
            variables = dict(variables, params=dict(variables["params"], head=knn_bank(
                np.zeros((0, model.head_features), np.float32), np.zeros(0, np.int32), num_classes)))
        if self.lora_rank:
            model = model.clone(lora_scale=self.lora_scale)
            variables = dict(variables, params=self.adapt(variables["params"]))
        if self.vpt_prompts:  # the weights have no prompts: fresh ones beside them
            backbone = self._backbone()
            model = model.clone(backbone=backbone)
            params = jax.tree_util.tree_map(lambda x: x, variables["params"])
            for name, prompts in prompt_params(backbone, jax.random.fold_in(jax.random.key(self.seed), 3)).items():
                params["backbone"][name].update(prompts)
            variables = dict(variables, params=params)
        return model, variables


@dataclass(frozen=True)
class OptimizerPlan:
    """The optimizer and schedule of the epoch loop: `name` at `lr` (warmup, then cosine, per phase)."""

    name: str
    lr: float
    momentum: float
    weight_decay: float
    decay_rules: tuple[Rule, ...]
    warmup_epochs: float
    label_smoothing: float
    layer_decay: float = 1.0

    def schedule(self, steps: int, steps_per_epoch: int):
        return make_schedule(self.lr, steps, int(self.warmup_epochs * steps_per_epoch))


@dataclass(frozen=True)
class Recipe:
    """The fine-tuning recipe beyond the optimizer (`jaxtl.transfer.recipe`): Mixup/CutMix (images only), class
    weights, gradient accumulation, the EMA of the weights, early stopping, test-time augmentation."""

    mixing: Mixing = Mixing()
    class_weights: str = "none"
    accumulate_steps: int = 1
    ema_decay: float = 0.0
    ema_warmup: bool = True
    early_stopping_patience: int = 0
    tta: str = "none"
    sampler: str = "uniform"


@dataclass(frozen=True)
class FitSettings:
    """What the epoch loop (`jaxtl.train.loop.fit`) needs: the phases, the optimizer, when to checkpoint, whether
    frozen BatchNorm layers keep their statistics, whether to skip steps with a non-finite loss (else stop), and the
    recipe."""

    phases: tuple[Phase, ...]
    optimizer: OptimizerPlan
    checkpoint_every_steps: int
    checkpoint_every_minutes: float
    train_frozen_bn: bool = False
    skip_nonfinite: bool = False
    recipe: Recipe = Recipe()

    @property
    def epochs(self) -> int:
        return sum(phase.epochs for phase in self.phases)


@dataclass(frozen=True)
class Plan:
    """Everything a run does, resolved (see the module docstring). `config` is the resolved config the run writes
    to `config.json`; `settings` are the trainer's own (each trainer module's `Settings`)."""

    config: ml_collections.FrozenConfigDict
    workdir: Path
    trainer: str
    strategy: str
    model: ModelPlan
    data: DataSource
    dataset: ImageDataset
    prep: Preprocessing
    batch_size: int
    workers: int
    seed: int
    progress: bool
    settings: Any = field(default=None)
    resume_on_changed_data: bool = False
    data_fingerprint: dict = field(default_factory=dict)  # the classes and each split's sha256 (`check_data`)
    record: dict | None = None  # the workdir's `RECORD_FILE` as the run found it (a resumed run's), read once
    # Stop (`jaxtl.train.loop.Paused`) once this many epochs are trained and saved (the last too: then the run is
    # trained but not finished), 0: never: `auto` trains its candidates' runs rung by rung, each continued from its
    # own checkpoint as an interrupted run resumes, and the winner's finished by the run itself.
    pause_after_epochs: int = 0
    threshold: float | None = None  # multi-label: one probability threshold for every label (None: chosen on val)

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    @property
    def score(self) -> str:
        """The val metric that picks the kept model: accuracy, or for multi-label data the mean AP."""
        return score_name(self.dataset.multi_label)


# ---- the readers: every read of a config is in one of these (and in the trainers' `settings`) ----

def multi_label_data(config: ml_collections.ConfigDict) -> bool:
    """Whether a run's data has several labels an image (`data.multi_label`, which manifests and Hugging Face
    datasets read)."""
    return config.data.source in ("manifest", "hf") and bool(config.data.multi_label)


def data_source(config: ml_collections.ConfigDict) -> DataSource:
    d = config.data
    labels = {}
    if multi_label_data(config):
        labels = dict(multi_label=True, **({"label_delimiter": d.label_delimiter} if d.source == "manifest" else {}))
    where = {"folder": lambda: dict(path=d.path, download_url=d.download_url),
             "manifest": lambda: dict(path=d.path, **labels),
             "tfds": lambda: dict(name=d.name, tfds_data_dir=d.tfds_data_dir, tfds_download=d.tfds_download),
             "hf": lambda: dict(name=d.name, hf_image_column=d.hf_image_column, hf_label_column=d.hf_label_column,
                                **labels)
             }.get(d.source, dict)()
    return DataSource(source=d.source, val_fraction=d.val_fraction, test_fraction=d.test_fraction,
                      skip_bad_images=d.skip_bad_images, max_image_pixels=d.max_image_pixels,
                      exif_orientation=d.exif_orientation, seed=config.seed, **where)


def weights(config: ml_collections.ConfigDict) -> Weights | None:
    """The weights the run loads, resolved once; none for `scratch`, where naming weights is an error."""
    if config.transfer.strategy == "scratch":
        if config.model.weights not in (None, DEFAULT_WEIGHTS):
            raise ConfigError(f"model.weights={config.model.weights!r}: transfer.strategy=scratch trains from random "
                              "init and loads no weights; remove it, or choose another strategy")
        return None
    return resolve_weights(config.model.name, config.model.weights)


def model_plan(config: ml_collections.ConfigDict, head_dropout: bool = True, resolve: bool = True) -> ModelPlan:
    """The classifier; `head_dropout=False` for a trainer that never trains in train mode (the logistic fit),
    which leaves `head.dropout` unread; `resolve=False` for the module alone (no weights)."""
    m, t = config.model, config.transfer
    loaded = weights(config) if resolve else None
    dropout = config.head.dropout if head_dropout else None
    adapters = {}
    if t.strategy == "lora":
        adapters = {"lora_rank": t.lora_rank, "lora_alpha": float(t.lora_alpha),
                    "lora_targets": tuple(str(p) for p in t.lora_targets)}
    if t.strategy == "vpt":
        if get_model_spec(m.name).family != "vit":
            raise ConfigError(f"transfer.strategy='vpt' learns prompt tokens of a Vision Transformer; "
                              f"model.name='{m.name}' is a {get_model_spec(m.name).family} model: choose a ViT "
                              "(vit_ti16, vit_s16, vit_b16, vit_b32) or another strategy (lora, bitfit)")
        adapters = {"vpt_prompts": t.vpt_prompts, "vpt_deep": bool(t.vpt_deep)}
    return ModelPlan(
        name=m.name, weights=loaded, kwargs=tuple(sorted(_kwargs(m.kwargs).items())),
        dtype="bfloat16" if config.train.bf16 else "float32", head_layers=tuple(config.head.layers),
        head_hidden=config.head.hidden, seed=config.seed, head_knn=config.head.knn,
        head_dropout=get_model_spec(m.name).head_dropout if dropout is None else float(dropout),
        reinit=tuple(m.reinit) if loaded is not None else (), **adapters)


RECORD_FILE = "plan.json"


def record(plan: Plan) -> dict:
    """What a run resolved at its start, as `RECORD_FILE` holds it: the model and its build arguments, the weights'
    identity (registered id, file or Hub repository and commit, sha256), the preprocessing they call for, the
    strategy, its phases (epochs and rules: parameter-path regex, LR multiplier) for the trainers that train by
    epochs, the trainer, and the data's fingerprint (its classes, each split's size and sha256)."""
    weights, fit = plan.model.weights, getattr(plan.settings, "fit", None)
    return {"model": plan.model.name, "build_arguments": dict(plan.model.kwargs),
            "weights": None if weights is None else {"name": weights.name, **weights.identity},
            "preprocessing": dataclasses.asdict(plan.prep), "strategy": plan.strategy,
            "phases": None if fit is None else [{"epochs": phase.epochs, "rules": [list(rule) for rule in phase.rules]}
                                                for phase in fit.phases],
            "trainer": plan.trainer, "data": plan.data_fingerprint}


def write_record(plan: Plan) -> None:
    """Writes the plan's record once, when the run starts (a resumed run keeps the one its start wrote)."""
    path = plan.workdir / RECORD_FILE
    if is_main() and not path.is_file():
        with writes_into(plan.workdir.parent):
            plan.workdir.mkdir(parents=True, exist_ok=True)  # an `auto` trial's run directory is made here
        write_json_atomic(path, record(plan))


LEGACY_DATA_FILE = "data.json"  # where runs before the record's "data" kept the data's fingerprint
RECORD_FIX = ("it records the weights, preprocessing and data the run started with: restore it from a copy, or "
              "delete it to derive it again from config.json")


def read_record(workdir: Path) -> dict | None:
    """`RECORD_FILE` in `workdir` (None when there is none; damaged: `RunFileError` naming it and what to do)."""
    path = workdir / RECORD_FILE
    return read_json(path, RECORD_FIX) if path.is_file() else None


def recorded_data(workdir: Path, found: dict | None) -> tuple[dict | None, bool]:
    """The data fingerprint the run in `workdir` started on, and whether its record (`found`, as `read_record` read
    it) holds it: the record's `data`, or, for a run from before the record held one, its `data.json` (damaged:
    None, with a warning; the data is then recorded again)."""
    if isinstance(found, dict) and found.get("data"):
        return found["data"], True
    legacy = workdir / LEGACY_DATA_FILE
    if not legacy.is_file():
        return None, False
    try:
        found = read_json(legacy, "")
    except RunFileError:
        log.warning("%s is damaged; the data is recorded again, in %s", legacy, RECORD_FILE)
        return None, False
    log.info("%s: the data fingerprint in %s (a run from before %s held it) is recorded in %s now", workdir,
             LEGACY_DATA_FILE, RECORD_FILE, RECORD_FILE)
    return found, False


def record_data(plan: Plan) -> None:
    """Writes the plan's data fingerprint into an existing record (a run from before the record held it, or one
    resumed on changed data with `train.resume_on_changed_data`); a new run's record is written whole by
    `write_record`."""
    if is_main() and plan.record is not None:
        write_json_atomic(plan.workdir / RECORD_FILE, plan.record | {"data": plan.data_fingerprint})


def recorded_preprocessing(workdir: Path, record: dict | None) -> Preprocessing | None:
    """The preprocessing that `record`, the `RECORD_FILE` of `workdir` as `read_record` read it, holds (None when
    there is no record)."""
    if record is None:
        return None
    try:
        return Preprocessing(**{k: tuple(v) if isinstance(v, list) else v for k, v in record["preprocessing"].items()})
    except (KeyError, TypeError, ValueError, AttributeError) as e:  # JSON, but not a record's
        raise RunFileError(f"{workdir / RECORD_FILE} is damaged (no preprocessing: {damage_reason(e)}); "
                           f"{RECORD_FIX}") from None


def _derived_preprocessing(config: ml_collections.ConfigDict, workdir: Path) -> Preprocessing:
    """A run from before `RECORD_FILE`: the preprocessing its weights call for (a Hub repository's from its
    config, read from the Hub cache), derived once and recorded."""
    m = config.model
    prep, weights = default_preprocessing(m.name), None
    if config.transfer.strategy != "scratch" and m.weights is not None:
        weights = {"name": str(m.weights)}
        try:
            resolved = resolve_weights(m.name, m.weights)
            prep, weights = resolved.preprocessing, {"name": resolved.name, **resolved.identity}
        except JaxtlError as e:
            log.warning("%s: the weights the run started from cannot be read (%s); the variant's default "
                        "preprocessing is used", workdir, str(e).splitlines()[0][:200])
    prep = prep.with_input_size(config.data.input_size) if config.data.input_size else prep
    log.info("%s has no %s (a run from before jaxtl recorded it): its preprocessing, derived from config.json once, "
             "is recorded now: %s", workdir, RECORD_FILE, prep)
    if is_main():
        try:  # as a run's start records it, less the trainer (the weights as they are now, when still readable)
            write_json_atomic(workdir / RECORD_FILE, {
                "model": m.name, "build_arguments": _kwargs(m.kwargs), "weights": weights,
                "preprocessing": dataclasses.asdict(prep), "strategy": config.transfer.strategy, "derived": True})
        except WriteError as e:  # a read-only workdir still evaluates and predicts
            log.warning("%s; it is derived again next time", e)
    return prep


def kept_model(config: ml_collections.ConfigDict, workdir: str | Path) -> tuple[ModelPlan, Preprocessing]:
    """The classifier of a run and the preprocessing it trained with (read from `RECORD_FILE`, never derived again),
    for its checkpoints to restore into: the weights file it started from is not needed. `data.input_size` given
    as an override (another resolution) replaces the recorded input size."""
    workdir = Path(workdir)
    prep = recorded_preprocessing(workdir, read_record(workdir)) or _derived_preprocessing(config, workdir)
    if config.data.input_size and config.data.input_size != prep.input_size:
        prep = prep.with_input_size(config.data.input_size)
    return model_plan(config, resolve=False), prep


def _kwargs(kwargs) -> dict[str, Any]:
    """`model.kwargs` as plain build arguments (lists as the tuples a module attribute needs)."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in dict(kwargs).items()}


def preprocessing(config: ml_collections.ConfigDict, model: ModelPlan) -> Preprocessing:
    """The weights' preprocessing, at `data.input_size` when set (the crop fraction kept)."""
    prep = get_preprocessing(model.name, model.weights)
    return prep.with_input_size(config.data.input_size) if config.data.input_size else prep


def phases(config: ml_collections.ConfigDict, groups: tuple[str, ...]) -> tuple[Phase, ...]:
    """The strategy's phases over the backbone's groups; each strategy reads only its own keys."""
    t = config.transfer
    extra = {"finetune_top": lambda: {"num_stages": t.num_stages},
             "discriminative": lambda: {"lr_ratio": t.lr_ratio},
             "gradual": lambda: {"phase_epochs": tuple(t.phase_epochs)},
             "custom": lambda: {"rules": tuple(t.rules)}}.get(t.strategy, dict)()
    epochs = 0 if t.strategy == "gradual" else config.train.epochs  # gradual's epochs are its phases'
    return tuple(make_phases(t.strategy, epochs, groups, **extra))


def optimizer(config: ml_collections.ConfigDict) -> OptimizerPlan:
    o = config.optimizer
    return OptimizerPlan(name=o.name, lr=o.lr, momentum=o.momentum if o.name in ("sgd", "lars") else 0.0,
                         weight_decay=o.weight_decay, decay_rules=tuple(o.decay_rules),
                         warmup_epochs=o.warmup_epochs, label_smoothing=o.label_smoothing,
                         layer_decay=o.layer_decay)


def fit_settings(config: ml_collections.ConfigDict, groups: tuple[str, ...], train_frozen_bn: bool = False
                 ) -> FitSettings:
    t = config.train
    recipe = Recipe(class_weights=t.class_weights, accumulate_steps=t.accumulate_steps, ema_decay=t.ema_decay,
                    ema_warmup=t.ema_warmup if t.ema_decay else True,
                    early_stopping_patience=t.early_stopping_patience, tta=config.eval.tta,
                    sampler=config.data.sampler)
    return FitSettings(phases(config, groups), optimizer(config), t.checkpoint_every_steps,
                       t.checkpoint_every_minutes, train_frozen_bn, t.skip_nonfinite, recipe)


def feature_cache_root(config: ml_collections.ConfigDict) -> Location:
    """`features.cache_dir` (a local folder, `~` and variables expanded, or a bucket's URL), default
    `$JAXTL_CACHE_DIR/features`: where a run's features are, and where `auto` measures into them."""
    return location(config.features.cache_dir) if config.features.cache_dir else default_root()


def strategy_key(strategy: str) -> str:
    """How errors name the rules of a strategy."""
    return "transfer.rules" if strategy == "custom" else f"transfer.strategy={strategy}"


# ---- checks that need the model (still no variables: parameter shapes come from `jax.eval_shape`) ----

def check_model(model: ModelPlan, prep: Preprocessing, fit: FitSettings | None, strategy: str) -> None:
    """The head's layers, and every rule list (the strategy's phases, `optimizer.decay_rules`, `model.reinit`)
    against the parameter paths."""
    module = model.classifier(num_classes=2)
    check_features(module.backbone, model.head_layers, "head.layers")
    size = prep.input_size  # at the run's own size: a ViT needs multiples of its patch size
    params = jax.eval_shape(lambda: model.adapt(module.init(jax.random.key(0), jnp.zeros((1, size, size, 3)))[
        "params"]))
    if fit is not None:
        for i, phase in enumerate(fit.phases):
            match_rules(params, phase.rules, strategy_key(strategy) + ("" if strategy == "custom" else f" (phase {i})"))
        match_rules(params, fit.optimizer.decay_rules, "optimizer.decay_rules")
    if model.reinit:
        match_patterns(params, model.reinit, "model.reinit")
