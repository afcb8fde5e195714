"""`auto` measures instead of only guessing: the matrix orders the candidates (`jaxtl.advice.matrix`), and the
trials score them on val within a time budget (`transfer.auto_budget_minutes`).

- Probes (cached features): the layer probe of the measurement is the trial, fitted exactly as the final run
  fits it (logistic regression, L2 chosen on val); seconds.
- Fine-tuning candidates (medium and large data, or small data when `transfer.auto_candidates` names them): each
  trains on a stratified subset of train for the same short schedule (`transfer.auto_trial_epochs` epochs, the
  run's optimizer), as a run of its own (`jaxtl.train.run`: the same trainers as any run), and is scored by its
  best val accuracy on the same val images. The top-stage candidates of a CNN (`finetune_top_1`, `_2`, and
  `gradual`, whose trial's phases unfreeze the top two groups) train on cached maps of their frozen part
  (`transfer.cached_maps`: computed once, flip of the maps the only augmentation kept), so a step costs the top
  alone. Each candidate's subset is as large as its share of the
  budget allows, from its own timed step (and, on maps, a frozen forward pass per image); a candidate with too
  little budget for `MIN_PER_CLASS` images a class is named untried in the table (all of them, untimed, when
  measuring the data used the whole budget), and when the matrix cell's first candidate is untried the verdict
  says that it might do better.

The winner is the best val accuracy; candidates within the noise of the val set (one standard error of the best
accuracy, at least one image) count as ties, and the cheapest of them wins (`matrix.COST`), which the verdict
says, unless a tied fine-tuning trial is still rising (its val accuracy went up over its last epoch): a short
schedule ranks fine-tuning by how it starts, so the best of the ties wins then. `test` is never used for any of
this.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
import optax

from jaxtl.advice.matrix import COST, FINETUNES, PROBES, candidate_overrides, gradual_phase_epochs, recommend
from jaxtl.config import apply_overrides
from jaxtl.core.processes import ProcessSlice, barrier, is_main
from jaxtl.core.sharding import global_batch
from jaxtl.data.split import ImageDataset, stratified_split
from jaxtl.models.registry import get_model_spec
from jaxtl.train import plan as plans
from jaxtl.train.loop import PhaseSteps
from jaxtl.train.on_images import image_source
from jaxtl.train.run import make_plan, train
from jaxtl.train.steps import MAPS, image_inputs, step_for_rules
from jaxtl.transfer.strategies import preset_rules

log = logging.getLogger(__name__)

MIN_PER_CLASS = 20
MAX_TRIAL_VAL = 2_000


def noise_margin(accuracy: float, count: int) -> float:
    """One standard error of an accuracy measured on `count` images (at least one image's worth)."""
    return max(math.sqrt(max(accuracy * (1 - accuracy), 0.0) / max(count, 1)), 1 / max(count, 1))


def choose(rows: list[dict], val_images: int) -> tuple[str, str]:
    """`(winner, verdict)`: the best val accuracy, or the cheapest of those within the noise of it when none of
    them is still rising (a row's `rising`: its val accuracy went up over its last epoch)."""
    scored = [r for r in rows if r.get("val_accuracy") is not None]
    best = max(scored, key=lambda r: (r["val_accuracy"], -COST.index(r["name"])))
    margin = noise_margin(best["val_accuracy"], val_images)
    ties = [r for r in scored if best["val_accuracy"] - r["val_accuracy"] <= margin]
    winner = min(ties, key=lambda r: COST.index(r["name"]))
    rising = [r["name"] for r in ties if r.get("rising")]
    if rising and winner is not best:
        return best["name"], (f"{', '.join(r['name'] for r in ties)} are within the noise of {val_images} val images "
                              f"(+-{margin:.3f}), but {', '.join(rising)} still rising at the trial's end: the best, "
                              f"{best['name']} ({best['val_accuracy']:.3f}), wins")
    if winner is best or len(ties) == 1:
        return best["name"], (f"{best['name']} wins with val accuracy {best['val_accuracy']:.3f} (noise of "
                              f"{val_images} val images: +-{margin:.3f})")
    return winner["name"], (f"{', '.join(r['name'] for r in ties)} are within the noise of {val_images} val images "
                            f"(+-{margin:.3f}) of the best ({best['name']}, {best['val_accuracy']:.3f}): the "
                            f"cheapest, {winner['name']} ({winner['val_accuracy']:.3f}), wins")


def _probe_rows(advice: dict, names: list[str]) -> list[dict]:
    """The measurement's layer probes of the probe candidates' layers: the same fit as the final run's."""
    probes = {tuple(p["layers"]): p for p in advice["measured"]["layer_probe"]}
    rows = []
    for candidate in advice["candidates"]:
        if candidate["name"] in names:
            probe = probes[tuple(candidate["layers"])]
            rows.append({"name": candidate["name"], "val_accuracy": probe["val_accuracy"], "steps": 0,
                         "seconds": probe.get("seconds", 0.0),
                         "note": f"{'+'.join(probe['layers'])}, L2 {probe['l2']:.3g} (cached features)"})
    return rows


def _subset(dataset: ImageDataset, count: int, seed: int) -> ImageDataset:
    """`dataset` with a stratified `count`-image train subset and val capped at `MAX_TRIAL_VAL` images."""
    splits = dict(dataset.splits)
    for name, limit in (("train", count), ("val", MAX_TRIAL_VAL)):
        split = splits[name]
        if len(split) > limit:
            fraction = limit / len(split)
            kept = stratified_split(split.labels, {"kept": fraction}, seed + 1)["kept"]
            splits[name] = split.subset(kept)
    splits.pop("test", None)  # never used for a choice
    return dataclasses.replace(dataset, splits=splits)


def _timed(step, state, batch) -> float:
    """Seconds of one call of `step` after its first (which compiles it), the mean of two."""
    state, sums = step(state, batch)
    sums["loss"].block_until_ready()
    start = time.perf_counter()
    for _ in range(2):
        state, sums = step(state, batch)
    sums["loss"].block_until_ready()
    return (time.perf_counter() - start) / 2


def _trial_config(config: ml_collections.ConfigDict, name: str, epochs: int, maps: bool = False):
    """Candidate `name`'s trial: the run's config with the candidate's overrides, `epochs` epochs, no progress bars,
    and (`maps`) trained on cached maps of its frozen part."""
    extra = ["transfer.cached_maps=True"] if maps else []
    return apply_overrides(config.copy_and_resolve_references(), candidate_overrides(name, (), epochs) + extra
                           + [f"train.epochs={epochs}", "progress=False"])


def _trial_step_seconds(config: ml_collections.ConfigDict, dataset: ImageDataset, mesh, trial_dir: Path) -> float:
    """Seconds of a step of `finetune_all`'s trial on every training image, built as that trial's run builds it
    (`jaxtl.train.loop.PhaseSteps`) and timed on its first batch: the program compiled for the timing is the one the
    trial runs when the budget allows it every image, so with JAX's persistent compilation cache on
    (`JAX_COMPILATION_CACHE_DIR`) that trial does not compile it again. Nothing is written to `trial_dir`."""
    trial = _trial_config(config, "finetune_all", config.transfer.auto_trial_epochs)
    plan = make_plan(trial, trial_dir, dataset=_subset(dataset, len(dataset.splits["train"]), config.seed))
    model, variables = plan.model.create(plan.num_classes)
    source = image_source(plan)
    built = PhaseSteps(plan, plan.settings.fit, model, variables, source, mesh)
    tx = built.optimizer(0)
    batch = global_batch(next(iter(source.train_batches(0))), mesh)
    return _timed(built.train_step(0, tx), built.initial_state(tx), batch)


def _step_seconds(config: ml_collections.ConfigDict, dataset: ImageDataset, mesh, stages: int = 0,
                  trial_dir: Path | None = None) -> float:
    """Seconds of one step at the run's batch size, timed after compiling: full fine-tuning on images (the most
    expensive candidate's; with `trial_dir`, `finetune_all`'s own trial step, see `_trial_step_seconds`), or with
    `stages`, `finetune_top` of that many stages on cached maps."""
    if trial_dir is not None and not stages:
        return _trial_step_seconds(config, dataset, mesh, trial_dir)
    model_plan = plans.model_plan(config)
    model, variables = model_plan.create(dataset.num_classes)
    prep = plans.preprocessing(config, model_plan)
    size, local = prep.input_size, ProcessSlice.current().local(config.train.batch_size)
    x = np.zeros((local, size, size, 3), np.uint8)
    rules, inputs = ((".*", 1.0),), image_inputs(prep)
    if stages:
        groups = model.backbone.groups
        entry = groups[len(groups) - stages - 1]
        shape = jax.eval_shape(lambda v, x: model.apply(v, x)[1][entry], variables, x.astype(np.float32)).shape
        model, x = model.clone(maps_from=entry, maps_input_size=size), np.zeros(shape, np.float32)
        rules, inputs = preset_rules("finetune_top", groups, stages), MAPS
    step, state = step_for_rules(model, variables, rules, optax.constant_schedule(1e-4), mesh, inputs=inputs)
    batch = global_batch({inputs.key: x, "labels": np.zeros(local, np.int32), "mask": np.ones(local, np.float32)},
                         mesh)
    return _timed(step, state, batch)


def on_maps(config: ml_collections.ConfigDict, name: str) -> int:
    """How many top stages candidate `name` trains on cached maps (0: it trains on images): `finetune_top_*`, and
    `gradual` (whose trial's last phase trains the top two groups), of a CNN with the feature cache on and its
    frozen BatchNorm fixed."""
    if not config.features.cache or config.transfer.train_frozen_bn or (
            get_model_spec(config.model.name).family == "vit"):
        return 0
    if name == "gradual":
        return len(gradual_phase_epochs(config.transfer.auto_trial_epochs)) - 1
    return int(name[-1]) if name.startswith("finetune_top_") else 0


def run_trials(config: ml_collections.ConfigDict, dataset: ImageDataset, advice: dict, mesh, workdir: Path,
               budget_minutes: float, spent_seconds: float = 0.0, keep_winner: bool = False) -> dict:
    """Scores the advice's candidates (see module docstring); returns `{"rows", "winner", "verdict", ...}`.

    With `keep_winner`, a fine-tuning trial that is the run itself (every training image, the run's epochs, val not
    capped) keeps its run directory while the others are scored, and the winner's is returned as `"run_dir"` (else
    None) for the caller to continue from instead of training the same run again.
    """
    names = [c["name"] for c in advice["candidates"]]
    chosen = tuple(config.transfer.auto_candidates)
    if chosen:
        names = [n for n in names if n in chosen]
    elif advice["size"] == "small":
        names = [n for n in names if n in PROBES]
    finetunes = [n for n in names if n in FINETUNES]
    epochs = config.transfer.auto_trial_epochs
    rows = _probe_rows(advice, [n for n in names if n in PROBES])
    val_images = len(dataset.splits["val"])
    budget = 60 * budget_minutes - spent_seconds
    if finetunes and budget <= 0:  # measuring used it all: timing a step (compiling it) would only overrun it
        rows += [{"name": name, "val_accuracy": None,
                  "note": f"untried: measuring the data took {spent_seconds:.0f} s of the {budget_minutes:g} "
                          "minutes; raise transfer.auto_budget_minutes"} for name in finetunes]
    elif finetunes:
        steps, timings = {}, {}  # per candidate: seconds of a step, and of timing it (compiling included)
        # 0: a full step on images, which the candidates on images take and the maps' forward pass is sized from
        for stages in sorted({on_maps(config, n) for n in finetunes} | {0}):
            start = time.perf_counter()
            # finetune_all's own step when it is a candidate: its trial then finds the program compiled
            trial_dir = Path(workdir) / ".trials" / "finetune_all" if "finetune_all" in finetunes else None
            steps[stages] = _step_seconds(config, dataset, mesh, stages, trial_dir=trial_dir)
            timings[stages] = time.perf_counter() - start  # each trial compiles its steps again
        budget -= sum(timings.values())  # timing the full step is paid for even when no candidate trains on images
        per_trial = budget / len(finetunes)
        train, batch = len(dataset.splits["train"]), config.train.batch_size
        val_images = min(val_images, MAX_TRIAL_VAL)
        # a frozen forward pass per image (about a third of a full step's work) computes its cached maps
        forward = steps[0] / batch / 3
        for name in finetunes:
            stages = on_maps(config, name)
            left = per_trial - timings[stages] - (val_images * forward if stages else 0)
            cost = epochs * steps[stages] / batch + (forward if stages else 0)  # seconds per training image
            images = min(int(left / cost) if left > 0 else 0, train)
            if images < MIN_PER_CLASS * dataset.num_classes or images < batch:
                rows.append({"name": name, "val_accuracy": None,
                             "note": f"untried: {budget_minutes:g} minutes allow {images} training images for it, "
                                     f"fewer than {MIN_PER_CLASS} a class; raise transfer.auto_budget_minutes"})
                continue
            subset = _subset(dataset, images, config.seed)
            whole = (len(subset.splits["train"]) == train and epochs == config.train.epochs
                     and len(subset.splits["val"]) == len(dataset.splits["val"])
                     and (not stages or config.transfer.cached_maps))
            log.info("auto: trial %s: %d epochs on %d of %d training images%s (a step: %.2f s; %.0f s of the "
                     "budget)%s", name, epochs, len(subset.splits["train"]), train,
                     " on cached maps" if stages else "", steps[stages], per_trial,
                     "; it is the run itself, kept if it wins" if whole and keep_winner else "")
            row = _finetune_trial(config, subset, name, epochs, mesh, Path(workdir) / ".trials" / name,
                                  keep=whole and keep_winner, maps=bool(stages))
            if stages:
                row["speedup"] = round(steps[0] / steps[stages], 1)
                row["note"] += f", a step {row['speedup']:g}x faster than full fine-tuning's on images"
            rows.append(row)
    winner, verdict = choose(rows, val_images)
    first = next((r for r in rows if r["name"] == names[0]), None) if names else None
    if first is not None and first["val_accuracy"] is None and winner != first["name"]:
        verdict += (f"; the cell's first candidate, {first['name']}, was not tried within the budget and may do "
                    "better (raise transfer.auto_budget_minutes to try it)")
    run_dir = None
    for row in rows:
        kept = row.pop("run_dir", None)
        if kept and row["name"] == winner:
            run_dir = kept
        elif kept and is_main():
            shutil.rmtree(kept, ignore_errors=True)
    order = {name: i for i, name in enumerate(names)}
    rows.sort(key=lambda r: order[r["name"]])
    for row in rows:
        row["chosen"] = row["name"] == winner
    return {"rows": rows, "winner": winner, "verdict": verdict, "budget_minutes": budget_minutes,
            "val_images": val_images, "run_dir": run_dir}


def adopt(advice: dict, trials: dict) -> dict:
    """`advice` with the trials' table, their winner as its recommendation and their verdict among its reasons."""
    return recommend(advice, trials["winner"]) | {"trials": trials, "reasons": [*advice["reasons"], trials["verdict"]]}


def _val_accuracies(directory: Path) -> list[float]:
    """A trial's val accuracy epoch by epoch, from its `metrics.jsonl` (what it could read of it)."""
    values = []
    path = directory / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else ():
        try:
            value = json.loads(line).get("val_accuracy")
        except ValueError:
            continue
        if value is not None:
            values.append(float(value))
    return values


def _finetune_trial(config: ml_collections.ConfigDict, subset: ImageDataset, name: str, epochs: int, mesh,
                    directory: Path, keep: bool = False, maps: bool = False) -> dict:
    """One candidate trained as a run of its own in `directory` (every process sees it, as orbax needs), scored by
    its best val accuracy; the directory is removed after unless `keep` (then it is the row's `run_dir`). `maps`:
    a top-stage candidate trained on cached maps of its frozen part (`transfer.cached_maps`)."""
    trial = _trial_config(config, name, epochs, maps)
    start = time.perf_counter()
    if is_main():
        shutil.rmtree(directory, ignore_errors=True)  # a trial a killed run left: start it again
    summary, history = None, []
    try:
        summary = train(make_plan(trial, directory, dataset=subset), mesh)
        history = _val_accuracies(directory)
    finally:
        barrier(f"trial {name}")
        if is_main() and not (keep and summary is not None):
            shutil.rmtree(directory, ignore_errors=True)
    seconds = time.perf_counter() - start
    log.info("auto: trial %s: best val accuracy %.3f in %.0f s", name, summary["best_val_accuracy"], seconds)
    where = f" (cached {summary['map_cache']['layer']} maps)" if maps else ""
    images = summary["map_cache"]["train_images"] if maps else len(subset.splits["train"])  # past the cap: fewer
    rising = len(history) >= 2 and history[-1] > history[-2]
    row = {"name": name, "val_accuracy": summary["best_val_accuracy"], "steps": summary["steps"], "rising": rising,
           "seconds": round(seconds, 1), "images": images, "note": f"{epochs} epochs on {images} images{where}"
                   + (" (the run itself)" if keep else "") + (", still rising" if rising else "")}
    return row | ({"run_dir": str(directory)} if keep else {})
