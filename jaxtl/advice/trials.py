"""`auto` measures instead of only guessing: the matrix orders the candidates (`jaxtl.advice.matrix`), and the
trials score them on val within a time budget (`transfer.auto_budget_minutes`), which is the whole `auto` run's:
measuring, trials and the final run's training.

- Probes (cached features): the layer probe of the measurement is the trial, fitted exactly as the final run
  fits it (logistic regression, L2 chosen on val); seconds.
- Fine-tuning candidates (medium and large data, or small data when `transfer.auto_candidates` names them):
  successive halving with continuation (as Hyperband and ASHA spend a budget). Each candidate's trial is its real
  run: every training image, the run's epochs, optimizer and schedule (`jaxtl.train.run`, the same trainers as
  any run), paused after a rung (`jaxtl.train.plan.Plan.pause_after_epochs`). Every candidate trains the first
  rung (`transfer.auto_trial_epochs` epochs); the better half by val accuracy continue from their own checkpoints
  to twice that, and so on, the last one to `train.epochs`: a continued run ends exactly as if it had never
  stopped, and the final run continues the winner's instead of starting over. The top-stage candidates of a CNN
  (`finetune_top_1`, `_2`, and `gradual`, whose last phase trains the top two groups) train on cached maps of
  their frozen part (`transfer.cached_maps`: computed once, flip of the maps the only augmentation kept), so a
  step costs the top alone, and so does the final run that continues them.
- The budget is planned before any rung, from each candidate's timed step (and, on maps, a frozen forward pass
  per image): the worst case (the dearest candidates surviving every rung) must fit, else the dearest candidates
  are left untried, named in the table; the plan is checked again after each rung with what the rungs took.

The winner is the best val accuracy among the probes and the candidates that trained all their epochs;
candidates within the noise of the val set (one standard error of the best accuracy, at least one image) count
as ties, and the cheapest of them wins (`matrix.COST`), which the verdict says, unless a tied fine-tuning run is
still rising (its val accuracy went up over its last epoch). `test` is never used for any of this.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import jax
import ml_collections
import numpy as np
import optax

from jaxtl.advice.matrix import (COST, FINETUNES, PROBES, candidate_overrides, gradual_phase_epochs, recommend,
                                 score_of, score_words)
from jaxtl.config import apply_overrides
from jaxtl.core.atomic import read_json_lines, share
from jaxtl.core.multilabel import score_name
from jaxtl.core.processes import ProcessSlice, barrier, is_main
from jaxtl.core.sharding import global_batch
from jaxtl.data.split import ImageDataset
from jaxtl.models.registry import get_model_spec
from jaxtl.train import plan as plans
from jaxtl.train.checkpoints import remove_run
from jaxtl.train.loop import PhaseSteps
from jaxtl.train.on_images import image_source
from jaxtl.train.preemption import Paused
from jaxtl.train.run import make_plan, train
from jaxtl.train.steps import MAPS, image_inputs, step_for_rules
from jaxtl.transfer.strategies import preset_rules

log = logging.getLogger(__name__)


def noise_margin(accuracy: float, count: int) -> float:
    """One standard error of an accuracy measured on `count` images (at least one image's worth)."""
    return max(math.sqrt(max(accuracy * (1 - accuracy), 0.0) / max(count, 1)), 1 / max(count, 1))


def choose(rows: list[dict], val_images: int) -> tuple[str, str]:
    """`(winner, verdict)`: the best val score (accuracy; multi-label: mAP, its noise taken as an accuracy's), or
    the cheapest of those within the noise of it when none of them is still rising (a row's `rising`: its val
    score went up over its last epoch)."""
    scored = [r for r in rows if score_of(r) is not None]
    words = score_words(scored)
    best = max(scored, key=lambda r: (score_of(r), -COST.index(r["name"])))
    margin = noise_margin(score_of(best), val_images)
    ties = [r for r in scored if score_of(best) - score_of(r) <= margin]
    winner = min(ties, key=lambda r: COST.index(r["name"]))
    rising = [r["name"] for r in ties if r.get("rising")]
    if rising and winner is not best:
        return best["name"], (f"{', '.join(r['name'] for r in ties)} are within the noise of {val_images} val images "
                              f"(+-{margin:.3f}), but {', '.join(rising)} still rising at the trial's end: the best, "
                              f"{best['name']} ({score_of(best):.3f}), wins")
    if winner is best or len(ties) == 1:
        return best["name"], (f"{best['name']} wins with {words} {score_of(best):.3f} (noise of "
                              f"{val_images} val images: +-{margin:.3f})")
    return winner["name"], (f"{', '.join(r['name'] for r in ties)} are within the noise of {val_images} val images "
                            f"(+-{margin:.3f}) of the best ({best['name']}, {score_of(best):.3f}): the "
                            f"cheapest, {winner['name']} ({score_of(winner):.3f}), wins")


def _probe_rows(advice: dict, names: list[str], metric: str) -> list[dict]:
    """The measurement's layer probes of the probe candidates' layers: the same fit as the final run's."""
    probes = {tuple(p["layers"]): p for p in advice["measured"]["layer_probe"]}
    rows = []
    for candidate in advice["candidates"]:
        if candidate["name"] in names:
            probe = probes[tuple(candidate["layers"])]
            rows.append({"name": candidate["name"], metric: probe[metric], "steps": 0,
                         "seconds": probe.get("seconds", 0.0),
                         "note": f"{'+'.join(probe['layers'])}, L2 {probe['l2']:.3g} (cached features)"})
    return rows


def _timed(step, state, batch) -> float:
    """Seconds of one call of `step` after its first (which compiles it), the mean of two."""
    state, sums = step(state, batch)
    sums["loss"].block_until_ready()
    start = time.perf_counter()
    for _ in range(2):
        state, sums = step(state, batch)
    sums["loss"].block_until_ready()
    return (time.perf_counter() - start) / 2


def _with_epochs(config: ml_collections.ConfigDict, epochs: int) -> ml_collections.ConfigDict:
    """`config` with `epochs` epochs (itself when it has them)."""
    if epochs == config.train.epochs:
        return config
    return apply_overrides(config.copy_and_resolve_references(), [f"train.epochs={epochs}"])


def _trial_config(config: ml_collections.ConfigDict, name: str, maps: bool = False):
    """Candidate `name`'s run: the run's config with the candidate's overrides (its epochs the run's), no progress
    bars, and (`maps`) trained on cached maps of its frozen part."""
    extra = ["transfer.cached_maps=True"] if maps else []
    return apply_overrides(config.copy_and_resolve_references(),
                           candidate_overrides(name, (), config.train.epochs) + extra + ["progress=False"])


def _trial_step_seconds(config: ml_collections.ConfigDict, dataset: ImageDataset, mesh, trial_dir: Path) -> float:
    """Seconds of a step of `finetune_all`'s run, built as that run builds it (`jaxtl.train.loop.PhaseSteps`) and
    timed on its first batch: the program compiled for the timing is the one its trial runs, so with JAX's
    persistent compilation cache on (`JAX_COMPILATION_CACHE_DIR`) the trial does not compile it again. Nothing is
    written to `trial_dir`."""
    plan = make_plan(_trial_config(config, "finetune_all"), trial_dir, dataset=dataset)
    model, variables = plan.model.create(plan.num_classes)
    source = image_source(plan)
    built = PhaseSteps(plan, plan.settings.fit, model, variables, source, mesh)
    tx = built.optimizer(0)
    batch = global_batch(next(iter(source.train_batches(0))), mesh)
    return _timed(built.train_step(0, tx), built.initial_state(tx), batch)


def _step_seconds(config: ml_collections.ConfigDict, dataset: ImageDataset, mesh, stages: int = 0,
                  trial_dir: Path | None = None) -> float:
    """Seconds of one step at the run's batch size, timed after compiling: full fine-tuning on images (the most
    expensive candidate's; with `trial_dir`, `finetune_all`'s own step, see `_trial_step_seconds`), or with
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
    `gradual` (whose last phase trains the top two groups), of a CNN with the feature cache on and its frozen
    BatchNorm fixed."""
    if not config.features.cache or config.transfer.train_frozen_bn or (
            get_model_spec(config.model.name).family == "vit"):
        return 0
    if name == "gradual":
        return len(gradual_phase_epochs(config.train.epochs)) - 1
    return int(name[-1]) if name.startswith("finetune_top_") else 0


def rung_ends(first: int, total: int, candidates: int) -> list[int]:
    """The epoch each rung ends at: halving `candidates` to one takes ceil(log2 n) rungs before the last, which end
    at `first` epochs, twice that, and so on (those below `total`); the last ends at `total`."""
    halvings = math.ceil(math.log2(candidates)) if candidates > 1 else 0
    return sorted({min(first * 2**k, total) for k in range(halvings)} - {total}) + [total]


@dataclass(frozen=True)
class Cost:
    """A candidate's predicted seconds: `epoch`, an epoch of its run (its steps and its val pass); `once`,
    compiling its steps and, on maps, the frozen part's pass over the train and val images."""

    epoch: float
    once: float


def worst_case(costs: dict[str, Cost], ends: list[int]) -> float:
    """Seconds of successive halving over `costs`'s candidates to `ends`, when the dearest survive every rung."""
    dearest = sorted(costs, key=lambda name: -costs[name].epoch)
    seconds, alive, done = sum(c.once for c in costs.values()), len(costs), 0
    for end in ends:
        seconds += (end - done) * sum(costs[name].epoch for name in dearest[:alive])
        alive, done = max(1, math.ceil(alive / 2)), end
    return seconds


def plan_rungs(costs: dict[str, Cost], first: int, total: int, budget: float, keep_one: bool
               ) -> tuple[list[str], list[int], dict[str, float]]:
    """The candidates the budget's worst case allows (the dearest left out until it fits; with `keep_one`, the
    cheapest stays even over the budget: there is nothing else to train) and their rungs' ends; and for each left
    out, the seconds its own run would have needed."""
    kept, left_out = dict(costs), {}
    while kept:
        ends = rung_ends(first, total, len(kept))
        if worst_case(kept, ends) <= budget or (keep_one and len(kept) == 1):
            return list(kept), ends, left_out
        dearest = max(kept, key=lambda name: (kept[name].epoch, name))
        left_out[dearest] = worst_case({dearest: kept.pop(dearest)}, [total])
    return [], [], left_out


def plan_budget(costs_at: Callable[[int], dict[str, Cost]], first: int, total: int, budget: float, keep_one: bool
                ) -> tuple[int, list[str], list[int], dict[str, float]]:
    """The budget buys the model: the run's epochs it affords and the rungs for them, `(epochs, kept, ends,
    left_out)`. The most epochs up to `total` whose worst case keeps two candidates (all, when fewer are given),
    unless one candidate alone could have more than twice as many: then that. None fitting (`keep_one`: nothing
    else to train): the cheapest at `total` regardless. `costs_at(epochs)`: each candidate's costs when the run
    has that many epochs."""
    want, two, one = min(2, len(costs_at(total))), None, None
    for epochs in range(total, 0, -1):
        plan = plan_rungs(costs_at(epochs), min(first, epochs), epochs, budget, keep_one=False)
        if len(plan[0]) >= want:
            two = (epochs, *plan)
            break
        if plan[0] and one is None:
            one = (epochs, *plan)
    if two is not None and (one is None or 2 * two[0] >= one[0]):
        return two
    if one is not None:
        return one
    return (total, *plan_rungs(costs_at(total), first, total, budget, keep_one))


def run_trials(config: ml_collections.ConfigDict, dataset: ImageDataset, advice: dict, mesh, workdir: Path,
               budget_minutes: float, spent_seconds: float = 0.0, keep_winner: bool = False) -> dict:
    """Scores the advice's candidates (see module docstring); returns `{"rows", "winner", "verdict", "rungs",
    "run_dir", "maps", ...}`.

    With `keep_winner`, the winning fine-tuning candidate's run (trained to its last epoch, not finished) is kept,
    its directory returned as `"run_dir"` (else None), and `"maps"` says whether it trained on cached maps: the
    caller's run continues it (`transfer.cached_maps=True` then) instead of training it again.
    """
    started = time.perf_counter()
    names = [c["name"] for c in advice["candidates"]]
    chosen = tuple(config.transfer.auto_candidates)
    if chosen:
        names = [n for n in names if n in chosen]
    elif advice["size"] == "small":
        names = [n for n in names if n in PROBES]
    finetunes = [n for n in names if n in FINETUNES]
    probes = [n for n in names if n in PROBES]
    metric = score_name(dataset.multi_label)  # what ranks the candidates: val accuracy, or val mAP
    rows = _probe_rows(advice, probes, metric)
    val_images = len(dataset.splits["val"])
    budget = 60 * budget_minutes - spent_seconds
    total, first = config.train.epochs, min(config.transfer.auto_trial_epochs, config.train.epochs)
    finalists, ends, trained, shortened = [], [], {}, None
    if finetunes and budget <= 0:  # measuring used it all: timing a step (compiling it) would only overrun it
        rows += [{"name": name, metric: None,
                  "note": f"untried: measuring the data took {spent_seconds:.0f} s of the {budget_minutes:g} "
                          "minutes; raise transfer.auto_budget_minutes"} for name in finetunes]
    elif finetunes:
        steps, timings = {}, {}  # per stage count: seconds of a step, and of timing it (compiling included)
        # 0: a full step on images, which the candidates on images take and the maps' forward pass is sized from
        for stages in sorted({on_maps(config, n) for n in finetunes} | {0}):
            start = time.perf_counter()
            # finetune_all's own step when it is a candidate: its trial then finds the program compiled
            trial_dir = Path(workdir) / ".trials" / "finetune_all" if "finetune_all" in finetunes else None
            steps[stages] = _step_seconds(config, dataset, mesh, stages, trial_dir=trial_dir)
            timings[stages] = time.perf_counter() - start  # each run compiles its steps again
        budget -= sum(timings.values())  # timing the full step is paid for even when no candidate trains on images
        train_images, batch = len(dataset.splits["train"]), config.train.batch_size
        per_epoch = math.ceil(train_images / batch)
        forward = steps[0] / batch / 3  # a frozen forward pass per image: about a third of a full step's work

        def costs_at(epochs: int) -> dict[str, Cost]:
            run, costs = _with_epochs(config, epochs), {}
            for name in finetunes:
                stages = on_maps(run, name)  # gradual's phases, and so its maps, follow the epochs
                step, compile_ = steps.get(stages, steps[0]), timings.get(stages, timings[0])
                val_pass = math.ceil(val_images / batch) * step / 3
                costs[name] = Cost(epoch=per_epoch * step + val_pass,
                                   once=compile_ + ((train_images + val_images) * forward if stages else 0.0))
            return costs

        epochs, kept, ends, left_out = plan_budget(costs_at, first, total, budget, keep_one=not probes)
        for name, needed in left_out.items():
            rows.append({"name": name, metric: None,
                         "note": f"untried: its run ({epochs} epochs on {train_images} images) needs about "
                                 f"{needed / 60:.1f} of the {max(budget, 0) / 60:.1f} minutes left; raise "
                                 "transfer.auto_budget_minutes"})
        if kept and epochs < total:
            shortened = epochs
            log.warning("auto: %g minutes afford %d of the run's %d epochs (train.epochs) for %s: the candidates' "
                        "runs, and so the final run, train %d; raise transfer.auto_budget_minutes for all %d",
                        budget_minutes, epochs, total, ", ".join(kept), epochs, total)
        if kept:
            costs = costs_at(epochs)
            log.info("auto: successive halving of %s: rungs ending at epoch%s %s of %d, every training image (%d); "
                     "worst case %.0f s of the %.0f s left", ", ".join(kept), "s" * (len(ends) > 1),
                     ", ".join(map(str, ends)), epochs, train_images, worst_case({n: costs[n] for n in kept}, ends),
                     budget)
            finalists, trained = _halve(_with_epochs(config, epochs), dataset, kept, ends, costs, mesh,
                                        Path(workdir), budget - (time.perf_counter() - started), steps, metric)
            rows += [trained[name]["row"] for name in kept]
    eligible = [r for r in rows if r["name"] in probes or r["name"] in finalists]
    if eligible:
        winner, verdict = choose(eligible, val_images)
    else:  # no probe among the candidates, and no time for any run: the cell's first, untried
        winner, verdict = names[0], f"nothing could be tried within the budget: the cell's first, {names[0]}"
    first_name = names[0] if names else None
    first_row = next((r for r in rows if r["name"] == first_name), None)
    if first_row is not None and score_of(first_row) is None and winner != first_name:
        verdict += (f"; the cell's first candidate, {first_name}, was not tried within the budget and may do "
                    "better (raise transfer.auto_budget_minutes to try it)")
    run_dir, maps = None, False
    for name, result in trained.items():
        if name == winner and keep_winner:
            run_dir, maps = str(result["dir"]), result["maps"]
            result["row"]["note"] += (f"; continued into the run, whose kept model is its epoch "
                                      f"{result['row']['best_epoch']} (the best {score_words([result['row']])})")
        elif is_main():
            remove_run(result["dir"])  # (and its folder in the bucket, for a bucket workdir of several processes)
    barrier("auto: trials")
    order = {name: i for i, name in enumerate(names)}
    rows.sort(key=lambda r: order[r["name"]])
    for row in rows:
        row["chosen"] = row["name"] == winner
    return {"rows": rows, "winner": winner, "verdict": verdict, "budget_minutes": budget_minutes,
            "val_images": val_images, "rungs": ends, "run_dir": run_dir, "maps": maps, "shortened_to": shortened,
            "seconds": round(time.perf_counter() - started + spent_seconds, 1)}


def _halve(config: ml_collections.ConfigDict, dataset: ImageDataset, names: list[str], ends: list[int],
           costs: dict[str, Cost], mesh, workdir: Path, budget: float, steps: dict[int, float],
           metric: str = "val_accuracy") -> tuple[list[str], dict[str, dict]]:
    """Successive halving of `names` over the rungs ending at `ends`: all train the first rung, the better half
    (by best val score so far, `metric` of the runs' records; ties: the cheaper) the next, and so on. When the
    rungs left no longer fit what is left of `budget` (the worst case, with the epochs' seconds as measured), the
    best one alone goes on to the last epoch. Returns the candidates that trained to the last epoch, and per
    candidate its row, run directory and whether it trained on maps."""
    start = time.perf_counter()
    results = {name: {"dir": workdir / ".trials" / name, "maps": bool(on_maps(config, name)), "history": [],
                      "rungs": [], "seconds": 0.0, "done": False} for name in names}
    for name in names:
        if is_main():
            remove_run(results[name]["dir"])  # a trial a killed run left: start it again
    alive, done_epochs = list(names), 0
    for index, end in enumerate(ends):
        for name in alive:
            result = results[name]
            if not result["done"]:
                _rung(config, dataset, name, end, mesh, result, metric)
        done_epochs = end
        if index == len(ends) - 1:
            break
        rest = ends[index + 1:]
        alive.sort(key=lambda name: (-max(results[name]["history"] or [0.0]), COST.index(name)))
        alive = alive[: max(1, math.ceil(len(alive) / 2))]
        # each survivor's epochs as its rungs ran against their prediction (slower or faster)
        measured = {name: Cost(costs[name].epoch * results[name]["seconds"] / max(
            costs[name].once + done_epochs * costs[name].epoch, 1e-9), 0.0) for name in alive}
        left = budget - (time.perf_counter() - start)
        if len(alive) > 1 and worst_case(measured, [e - done_epochs for e in rest]) > left:
            log.info("auto: the rungs left need more than the %.0f s left: %s alone goes on", left, alive[0])
            alive = alive[:1]
        log.info("auto: after epoch %d: %s go%s on", end, ", ".join(alive), "es" * (len(alive) == 1))
    finalists = list(alive)
    for name, result in results.items():
        history = result["history"]
        best = max(history) if history else None
        rising = len(history) >= 2 and history[-1] > history[-2]
        where = " on cached maps" if result["maps"] else ""
        speedup = ""
        if result["maps"]:
            speedup = f", a step {steps[0] / steps[on_maps(config, name)]:.1f}x faster than on images"
        rungs = "; ".join(f"{r['epochs']} ep {r[metric]:.3f} ({r['seconds']:.0f} s)" for r in result["rungs"])
        fate = ("trained to the last epoch" if name in finalists
                else f"stopped after epoch {result['rungs'][-1]['epochs']}")
        result["row"] = {"name": name, metric: best, "images": len(dataset.splits["train"]),
                         "epochs": len(history), "steps": result.get("steps", 0), "rising": rising,
                         "seconds": round(result["seconds"], 1), "rungs": result["rungs"],
                         "best_epoch": (history.index(best) + 1) if history else None,
                         "note": f"rungs: {rungs}; {fate}{where}{speedup}" + (", still rising" if rising else "")}
    return finalists, results


def _rung(config: ml_collections.ConfigDict, dataset: ImageDataset, name: str, end: int, mesh, result: dict,
          metric: str = "val_accuracy") -> None:
    """Candidate `name`'s run trained (or continued from its checkpoint) to epoch `end` and paused there, in its
    directory (every process sees it, as orbax needs); its val scores (`metric` of its records), seconds and rung
    recorded in `result`."""
    trial = _trial_config(config, name, result["maps"])
    start = time.perf_counter()
    plan = dataclasses.replace(make_plan(trial, result["dir"], dataset=dataset), pause_after_epochs=end)
    try:
        train(plan, mesh)
        result["done"] = True  # stopped early (no better val accuracy for the patience's epochs): finished
    except Paused:
        pass
    finally:
        barrier(f"trial {name}")
    seconds = time.perf_counter() - start
    share(result["dir"] / "metrics.jsonl")  # process 0 wrote it, every process decides by it
    records = _records(result["dir"])
    result["history"] = [float(r[metric]) for r in records if r.get(metric) is not None]
    result["steps"] = int(records[-1].get("step", 0)) if records else 0
    result["seconds"] += seconds
    best = max(result["history"]) if result["history"] else 0.0
    result["rungs"].append({"epochs": len(result["history"]), metric: best, "seconds": round(seconds, 1)})
    log.info("auto: %s to epoch %d: best %s %.3f (%.0f s)", name, len(result["history"]), metric, best, seconds)


def adopt(advice: dict, trials: dict) -> dict:
    """`advice` with the trials' table, their winner as its recommendation and their verdict among its reasons; a
    winner that trained on cached maps is continued on them (`transfer.cached_maps=True`), and for the epochs the
    budget afforded its run (`train.epochs`, and `gradual`'s phases)."""
    adopted = recommend(advice, trials["winner"])
    if trials.get("shortened_to") and trials["winner"] in FINETUNES:  # the epochs the budget afforded its run
        epochs = trials["shortened_to"]
        adopted["overrides"] = candidate_overrides(trials["winner"], (), epochs) + (
            [] if trials["winner"] == "gradual" else [f"train.epochs={epochs}"])  # gradual's are its phases
    if trials.get("maps"):
        adopted["overrides"] = [*adopted["overrides"], "transfer.cached_maps=True"]
    return adopted | {"trials": trials, "reasons": [*advice["reasons"], trials["verdict"]]}


def _records(directory: Path) -> list[dict]:
    """A run's `metrics.jsonl` records, one per epoch (what could be read of it)."""
    path = directory / "metrics.jsonl"
    return read_json_lines(path)[0] if path.is_file() else []
