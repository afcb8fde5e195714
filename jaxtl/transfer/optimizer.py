"""The optimizer: one `optax.multi_transform` over labels derived from the LR multipliers of the rules.

Frozen parameters (multiplier 0) get `optax.set_to_zero()`, which holds no state. Trainable parameters are
grouped into cohorts: the parameters with the same multiplier that have trained together since the same phase.
Each cohort gets its own optimizer at its multiple of the schedule, so when `gradual` unfreezes another group,
the cohorts already training keep their optimizer state (and the new one starts fresh). Weight decay follows
`decay` (a bool per parameter from `optimizer.decay_rules`: kernels by default, never biases or norm scales).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import jax
import optax

from jaxtl.core.errors import ConfigError
from jaxtl.rules import Rule, match_rules, path_of, tree_paths

FROZEN = "frozen"
OPTIMIZERS = ("sgd", "adamw", "lars", "lamb")
KERNELS_DECAY = ((".*/kernel", True), (".*", False))  # weight decay on kernels only, never biases or norm scales


@dataclass(frozen=True)
class Cohort:
    """Parameters that train at `multiplier` since phase `since`."""

    multiplier: float
    since: int


def cohort_labels(multipliers: Sequence[Any]) -> tuple[Any, dict[str, Cohort]]:
    """Labels for the last of a sequence of per-phase multiplier trees (phases 0..k).

    A parameter's label is `frozen`, or `x<multiplier>@<phase>` where phase is the first of the trailing run of
    phases in which it had this multiplier. Returns `(labels tree, {label: Cohort})`.
    """
    cohorts: dict[str, Cohort] = {}

    def label(*history: float) -> str:
        m = float(history[-1])
        if m == 0.0:
            return FROZEN
        since = len(history) - 1
        while since > 0 and float(history[since - 1]) == m:
            since -= 1
        name = f"x{m:g}@{since}"
        cohorts[name] = Cohort(m, since)
        return name

    return jax.tree_util.tree_map(label, *multipliers), cohorts


def _base_optimizer(name: str, lr: Callable, weight_decay: float, momentum: float,
                    decay: Callable) -> optax.GradientTransformation:
    if name == "sgd":
        return optax.chain(optax.add_decayed_weights(weight_decay, mask=decay),
                           optax.sgd(lr, momentum=momentum or None, nesterov=bool(momentum)))
    if name == "adamw":
        return optax.adamw(lr, weight_decay=weight_decay, mask=decay)
    # the large-batch optimisers: a per-layer trust ratio ||w|| / ||update||, kernels only (not biases or norms)
    if name == "lars":
        return optax.lars(lr, weight_decay=weight_decay, weight_decay_mask=decay, trust_ratio_mask=decay,
                          momentum=momentum)
    if name == "lamb":
        return optax.lamb(lr, weight_decay=weight_decay, mask=decay)
    raise ConfigError(f"optimizer.name='{name}': choose from {', '.join(OPTIMIZERS)}")


def make_schedule(base_lr: float, total_steps: int, warmup_steps: int) -> optax.Schedule:
    """Linear warmup to `base_lr`, then cosine decay to 0 at `total_steps`."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(0.0, base_lr, warmup_steps, max(total_steps, warmup_steps + 1))


def make_optimizer(
    labels: Any,
    cohorts: dict[str, Cohort],
    schedule: optax.Schedule,
    name: str = "sgd",
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    decay: Any = None,
    steps_done: dict[str, int] | None = None,
) -> optax.GradientTransformation:
    """`multi_transform` over `labels`: set_to_zero for `frozen`, else the optimizer at
    `cohort.multiplier * schedule(phase step)`.

    `decay`: a bool tree like `labels` (None: decay every trainable parameter). `steps_done[label]` is how many
    steps the cohort trained in earlier phases: its optimizer count (carried over by `carry_over_state`) starts
    there, and the schedule is this phase's, so it is shifted back to phase step 0.
    """
    steps_done = steps_done or {}
    decay_by_path = None if decay is None else dict(zip(jax.tree_util.tree_leaves(tree_paths(decay)),
                                                        jax.tree_util.tree_leaves(decay)))

    def decay_mask(params):  # params here are the cohort's, the others masked out by multi_transform
        if decay_by_path is None:
            return jax.tree_util.tree_map(lambda _: True, params)
        return jax.tree_util.tree_map_with_path(lambda kp, _: bool(decay_by_path[path_of(kp)]), params)

    transforms = {FROZEN: optax.set_to_zero()}
    for label, cohort in cohorts.items():
        offset = steps_done.get(label, 0)
        lr = lambda count, m=cohort.multiplier, o=offset: m * schedule(count - o)  # noqa: E731
        transforms[label] = _base_optimizer(name, lr, weight_decay, momentum, decay_mask)
    return optax.multi_transform(transforms, labels)


def carry_over_state(old_state: optax.MultiTransformState, new_state: optax.MultiTransformState):
    """The new phase's state, keeping the old inner state of every cohort that trains in both phases."""
    inner = dict(new_state.inner_states)
    for label, state in old_state.inner_states.items():
        if label != FROZEN and label in inner and (
                jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(inner[label])):
            inner[label] = state
    return new_state._replace(inner_states=inner)


def optimizer_from_rules(params: Any, rules: Sequence[Rule], schedule: optax.Schedule, name: str = "sgd", *,
                         weight_decay: float = 0.0, momentum: float = 0.9,
                         decay_rules: Sequence[Rule] = KERNELS_DECAY) -> optax.GradientTransformation:
    """The optimizer of one phase of `rules` (`(regex, LR multiplier)` over parameter paths, 0 freezes): frozen
    parameters get no update and no state; the others `name` at their multiple of `schedule`, with weight decay
    where `decay_rules` say. For a multi-phase run (gradual unfreezing) the loop builds cohorts itself."""
    multipliers = jax.tree_util.tree_map(float, match_rules(params, rules, "rules"))
    decay = jax.tree_util.tree_map(bool, match_rules(params, decay_rules, "decay_rules"))
    return make_optimizer(*cohort_labels([multipliers]), schedule, name, weight_decay, momentum, decay)
