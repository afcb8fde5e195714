"""`transfer.strategy=auto`, above training: measure the data (`jaxtl.advice.measure`), place it in the matrix
(`jaxtl.advice.matrix`), try the cell's candidates within the budget (`jaxtl.advice.trials`, which train through
the same trainers as any run), adopt the winner, and train it as an ordinary run (`jaxtl.train.run`).

The advice goes to `WORKDIR/advice.json`; a resumed `auto` run reads it back instead of measuring again. A winning
fine-tuning trial that was the run itself (every training image, the run's epochs) hands its checkpoints over,
and the run only evaluates and reports.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import ml_collections
from jax.sharding import Mesh

from jaxtl.advice.matrix import decide, format_advice
from jaxtl.advice.measure import measure
from jaxtl.advice.models import rank_models
from jaxtl.advice.trials import adopt, run_trials
from jaxtl.config import CONFIG_FILE, KEYS, apply_overrides, check_values
from jaxtl.core.atomic import read_json, share, write_json_atomic
from jaxtl.core.errors import ConfigError, RunFileError
from jaxtl.core.paths import cache_dir
from jaxtl.core.processes import barrier, is_main
from jaxtl.core.sharding import make_mesh
from jaxtl.data.decoded import decoded_dataset
from jaxtl.data.split import ImageDataset
from jaxtl.train import plan as plans
from jaxtl.train.run import (check_config, check_data, make_plan, prepare_workdir, train, unread_keys,
                             unread_message)
from jaxtl.train.checkpoints import move_checkpoints, remove_run
from jaxtl.train.workdir import owned
from jaxtl.weights.create import weights_read_once

log = logging.getLogger(__name__)

# What `auto` reads itself, before it knows which strategy the run will be.
AUTO_KEYS = frozenset(name for name, key in KEYS.items() if key.read_by_strategy("auto"))
ADVICE_FILE = "advice.json"


def check(config: ml_collections.ConfigDict) -> None:
    """Before any work: every value (`auto`'s candidates and backbones are checked by their declarations)."""
    check_values(config)


def load_dataset(config: ml_collections.ConfigDict) -> ImageDataset:
    """The run's data, loaded once for the measurement, the trials and the run (decoded once, with
    `data.decoded_cache`)."""
    dataset = plans.data_source(config).load()
    if config.data.decoded_cache:
        model = plans.model_plan(config)
        dataset = decoded_dataset(dataset, plans.preprocessing(config, model), cache_dir() / "decoded",
                                  config.data.decoded_cache_side)
    return dataset


def follow_advice(config: ml_collections.ConfigDict, dataset: ImageDataset, workdir: Path, mesh: Mesh
                  ) -> tuple[ml_collections.ConfigDict, dict]:
    """Ranks the backbones of `transfer.auto_models` (when given) and takes the best, measures, decides, tries the
    candidates, writes `advice.json` and returns the config with the winner's overrides applied, and the advice."""
    path = workdir / ADVICE_FILE
    advice = read_advice(path, started=(workdir / CONFIG_FILE).is_file())
    if advice is not None:
        log.info("transfer.strategy=auto: following the advice in %s: %s", path, " ".join(advice["overrides"]))
    else:
        start, models = time.perf_counter(), None
        if config.transfer.auto_models:
            models = rank_models(config.transfer.auto_models, dataset, input_size=config.data.input_size,
                                 dtype=plans.model_plan(config, resolve=False).compute_dtype, seed=config.seed,
                                 cache_dir=plans.feature_cache_root(config), batch_size=config.train.batch_size,
                                 progress=config.progress and is_main())
            config = apply_overrides(config.copy_and_resolve_references(), models["overrides"])
        model = plans.model_plan(config)
        measured = measure(dataset, model.name, model.weights, plans.preprocessing(config, model),
                           backbone_kwargs=model.backbone_kwargs, dtype=model.compute_dtype, seed=config.seed,
                           cache_dir=plans.feature_cache_root(config), batch_size=config.train.batch_size,
                           progress=config.progress and is_main(), l2_grid=tuple(config.probe.l2_grid) or None)
        advice = decide(measured, epochs=config.train.epochs)
        if config.transfer.auto_budget_minutes > 0:
            trials = run_trials(config, dataset, advice, mesh, workdir, config.transfer.auto_budget_minutes,
                                spent_seconds=time.perf_counter() - start, keep_winner=True)
            run_dir = trials.pop("run_dir")
            if run_dir:
                continue_from_trial(Path(run_dir), workdir, trials["winner"])
            advice = adopt(advice, trials)
        if models is not None:  # the backbone first: the strategy's overrides were chosen on it
            advice = advice | {"models": models, "overrides": [*models["overrides"], *advice["overrides"]]}
        if is_main():
            write_json_atomic(path, advice)
        for line in format_advice(advice, dataset.source).splitlines():
            log.info("advice: %s", line)
        log.info("transfer.strategy=auto follows the advice: %s", " ".join(advice["overrides"]))
    return apply_overrides(config.copy_and_resolve_references(), advice["overrides"]), advice


def read_advice(path: Path, started: bool) -> dict | None:
    """The advice an earlier start of this run wrote, or None if there is none. Damaged, it is measured again while
    the run has not started training (no `config.json` yet); after that it is an error, since the advice chose the
    strategy the checkpoints were trained with."""
    if not path.is_file():
        return None
    fix = "it chose the strategy this run trains with: restore it from a copy, or train in a new --workdir"
    try:
        advice = read_json(path, fix)
        if not isinstance(advice.get("overrides"), list):
            raise RunFileError(f"{path} is damaged (no list of overrides); {fix}")
        return advice
    except RunFileError as e:
        if started:
            raise
        log.warning("%s; measuring again", str(e).removesuffix(f"; {fix}"))
        return None


def continue_from_trial(trial_dir: Path, workdir: Path, name: str) -> None:
    """The winning trial trained this very run (every training image, the run's epochs and config): its checkpoints,
    TensorBoard events and record (`plan.json`: the weights and preprocessing it resolved) become the run's, which
    then reads that record, finds itself finished and only evaluates and reports."""
    if is_main():
        move_checkpoints(trial_dir, workdir)  # in the bucket, for a bucket workdir of several processes
        for part in ("tensorboard", plans.RECORD_FILE):
            if (trial_dir / part).exists() and not (workdir / part).exists():
                shutil.move(str(trial_dir / part), str(workdir / part))
        remove_run(trial_dir)
    barrier("auto: trial kept")
    share(workdir / plans.RECORD_FILE)  # what the run reads next, on every host
    log.info("auto: the trial of %s was this run (every training image, the run's epochs): its checkpoints are "
             "kept, not trained again", name)


def train_auto(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """A whole `auto` run: the advice, then the winner trained (or its trial kept) and finished."""
    config = config.copy_and_resolve_references()
    with weights_read_once():  # checked, measured, timed, tried and trained: one read
        check(config)
        with owned(workdir) as workdir:
            return _train_auto(config, workdir, make_mesh())


def _train_auto(config: ml_collections.ConfigDict, workdir: Path, mesh: Mesh) -> dict:
    dataset = load_dataset(config)
    if dataset.multi_label and config.transfer.auto_models:
        raise ConfigError("transfer.auto_models ranks backbones by a kNN vote, which picks one class an image; "
                          "multi-label data (data.multi_label): remove it and set model.name")
    log.info("dataset %s: %d classes, %s%s", dataset.source, dataset.num_classes,
             {k: len(v) for k, v in dataset.splits.items()},
             "".join(f"; {k} carved from train ({v:g})" for k, v in (dataset.carved or {}).items()))
    config, advice = follow_advice(config, dataset, workdir, mesh)
    unread = unread_keys(config, also_read=AUTO_KEYS)
    if unread:  # the user could not know which path auto would choose
        log.warning("%s", unread_message(config, unread))
    check_config(config, unread_is_error=False)
    prepare_workdir(config, workdir)
    plan = check_data(make_plan(config, workdir, dataset=dataset))
    extra = {"auto": {key: advice.get(key) for key in ("size", "similarity", "cell", "chosen", "trials", "models")}}
    return train(plan, mesh, extra)
