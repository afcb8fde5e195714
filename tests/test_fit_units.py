"""The units `fit` is made of, each alone: which phase an epoch is in, early stopping's patience, the watch that
finds a non-finite step without waiting for the device, and `PhaseSteps`, the phase's optimizer and step."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jaxtl.core.sharding import global_batch, make_mesh
from jaxtl.train.loop import NonFiniteWatch, PhaseSteps, patience_spent, phase_at
from jaxtl.train.on_images import image_source
from jaxtl.train.run import make_plan
from jaxtl.transfer.strategies import Phase
from tests.conftest import make_image_folder, tiny_config


def test_an_epoch_belongs_to_the_phase_its_count_reaches():
    phases = tuple(Phase((), epochs) for epochs in (2, 1, 3))
    assert [phase_at(phases, epoch) for epoch in range(8)] == [0, 0, 1, 2, 2, 2, 2, 2]  # past the end: the last


def test_patience_counts_epochs_since_the_best_and_only_with_val():
    history = [{"epoch": e, "val_accuracy": a} for e, a in ((1, 0.5), (2, 0.7), (3, 0.6), (4, 0.65))]
    best = {"epoch": 2, "val_accuracy": 0.7}
    assert not patience_spent(history[:3], best, 2) and patience_spent(history, best, 2)
    assert not patience_spent(history, best, 0)  # off
    assert not patience_spent([{"epoch": 4, "train_loss": 1.0}], {"epoch": -1}, 1)  # no val split: never
    assert not patience_spent([], best, 1)


class _Flag:
    """A step's non-finite flag that the test says is computed or not."""

    def __init__(self, value: float, ready: bool):
        self.value, self.ready = value, ready

    def is_ready(self) -> bool:
        return self.ready

    def __float__(self) -> float:
        return self.value


def test_the_non_finite_watch_reads_finished_flags_and_waits_only_past_its_lag():
    watch = NonFiniteWatch(lag=2)
    pending = [_Flag(0.0, False), _Flag(1.0, False)]
    assert watch.add(1, pending[0]) is None and watch.add(2, pending[1]) is None  # not computed: not read
    assert watch.add(3, _Flag(0.0, False)) is None  # past the lag, step 1 is read (finite)
    assert watch.add(4, _Flag(1.0, False)) == 2  # step 2 read: the first non-finite
    watch = NonFiniteWatch(lag=8)
    assert watch.add(1, _Flag(0.0, True)) is None and watch.add(2, _Flag(1.0, True)) == 2  # computed: read at once
    watch = NonFiniteWatch(lag=8)
    for step, value in ((1, 0.0), (2, 0.0), (3, 1.0)):
        watch.add(step, _Flag(value, False))
    assert watch.first(default=99) == 3 and watch.first(default=99) == 99  # the rest, waited for


@pytest.mark.slow
def test_phase_steps_freeze_each_phase_as_its_rules_say(tmp_path):
    """gradual (head, then the head and the last group): the multipliers of each phase, and phase 0's step
    changes the head alone."""
    data = make_image_folder(tmp_path / "data", per_class=8)
    config = tiny_config(data, **{"transfer.strategy": "gradual", "transfer.phase_epochs": (1, 1),
                                  "data.augment.enabled": False})
    plan = make_plan(config, tmp_path / "run")
    model, variables = plan.model.create(plan.num_classes)
    source, mesh = image_source(plan), make_mesh()
    built = PhaseSteps(plan, plan.settings.fit, model, variables, source, mesh)
    assert [set(jax.tree_util.tree_leaves(m["head"])) for m in built.multipliers] == [{1.0}, {1.0}]
    stage = model.backbone.groups[-1]
    assert [set(jax.tree_util.tree_leaves(m["backbone"][stage])) for m in built.multipliers] == [{0.0}, {1.0}]
    tx = built.optimizer(0)
    state = built.initial_state(tx)
    before = jax.device_get(state.params)
    state, sums = built.train_step(0, tx)(state, global_batch(next(iter(source.train_batches(0))), mesh))
    after = jax.device_get(state.params)
    assert np.isfinite(float(sums["loss"]))
    changed = jax.tree_util.tree_map(lambda a, b: bool(np.any(a != b)), before, after)
    assert all(jax.tree_util.tree_leaves(changed["head"]))
    assert not any(jax.tree_util.tree_leaves(changed["backbone"]))


def test_the_images_source_draws_classes_evenly_when_the_config_says(tmp_path):
    """data.sampler reaches the images trainer's batches: 16 red images against 4 blue, drawn evenly."""
    data = make_image_folder(tmp_path / "data", classes=("red", "blue"), per_class=16)
    for path in sorted((data / "blue").iterdir())[4:]:
        path.unlink()
    counts = {}
    for sampler in ("uniform", "balanced"):
        plan = make_plan(tiny_config(data, **{"data.sampler": sampler, "data.val_fraction": 0.0}), tmp_path / sampler)
        source = image_source(plan)
        labels = np.concatenate([batch["labels"] for batch in source.train_batches(0)])
        counts[sampler] = np.bincount(labels, minlength=2)
    # an epoch's 20 draws are 10 a class, of which the two full batches take 16; uniform: the 4 blue at most
    assert counts["balanced"].sum() == counts["uniform"].sum() == 16
    blue = plan.dataset.class_names.index("blue")
    assert abs(int(counts["balanced"][0]) - int(counts["balanced"][1])) <= 4 and counts["balanced"][blue] >= 6
    assert counts["uniform"][blue] <= 4


def test_a_run_resumes_from_its_newest_usable_checkpoint_with_its_progress(tmp_path):
    """`resume`: nothing before the first checkpoint; then the state, in the structure asked for at the saved step,
    and the progress (steps, records, best, the epoch's running sums and seconds) as saved; a damaged newest
    checkpoint gives the one before it."""
    import jax.numpy as jnp

    from jaxtl.train.checkpoints import Checkpoints
    from jaxtl.train.loop import Progress, resume

    checkpoints = Checkpoints(tmp_path)
    structure = {"w": jax.ShapeDtypeStruct((3,), jnp.float32)}
    asked = []

    def abstract_at(step):
        asked.append(step)
        return structure

    assert resume(checkpoints, abstract_at) is None
    runs = {}
    for step in (4, 6):
        run = Progress(step, [{"epoch": 1, "val_accuracy": 0.5}], {"val_accuracy": 0.5, "epoch": 1}, 1.5 * step)
        sums = {"loss": jnp.float32(step), "count": jnp.float32(8)}
        checkpoints.save(checkpoints.latest, step, {"w": jnp.full(3, float(step))},
                         run.meta(["a", "b"], sums, run.epoch_seconds), wait=True)
        runs[step] = run
    state, run = resume(checkpoints, abstract_at)
    assert asked == [6] and run.step == 6 and run.history == runs[6].history and run.best == runs[6].best
    assert run.epoch_seconds == 9.0 and {k: float(v) for k, v in run.totals.items()} == {"loss": 6.0, "count": 8.0}
    np.testing.assert_array_equal(state["w"], np.full(3, 6.0))
    checkpoints.close()
    for part in (tmp_path / "checkpoints" / "6").rglob("*"):  # the newest damaged: the one before it
        if part.is_file() and part.stat().st_size and "meta" not in str(part):
            part.write_bytes(b"\0" * part.stat().st_size)
    checkpoints = Checkpoints(tmp_path)
    state, run = resume(checkpoints, abstract_at)
    assert run.step == 4 and float(run.totals["loss"]) == 4.0 and float(state["w"][0]) == 4.0
    checkpoints.close()


def test_an_epochs_record_is_its_mean_loss_and_accuracy_over_its_examples():
    from jaxtl.train.loop import epoch_record

    totals = {"loss": np.float32(6.0), "correct": np.float32(3.0), "count": np.float32(4.0), "nonfinite": 1.0}
    record = epoch_record(totals, 2, 30, 1, 12.5, skip_nonfinite=True)
    assert record == {"epoch": 3, "step": 30, "phase": 1, "train_loss": 1.5, "train_accuracy": 0.75, "seconds": 12.5,
                      "skipped_steps": 1}
    assert "skipped_steps" not in epoch_record(totals, 2, 30, 1, 12.5, skip_nonfinite=False)
