"""The optimizer: one `optax.multi_transform` over layer-group labels.

Frozen groups get `optax.set_to_zero()` (no state); every other group its own optimizer at its multiple of the
schedule. Weight decay touches only kernels of trainable groups (never biases, BatchNorm scales or frozen groups).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import optax

from jaxtl.transfer.strategies import Phase

FROZEN = "frozen"


def group_labels(params: Any, phase: Phase) -> dict:
    """The label of every parameter: its top-level group's name, or "frozen"."""
    return {
        group: jax.tree_util.tree_map(lambda _: group if group in phase.trainable else FROZEN, subtree)
        for group, subtree in params.items()
    }


def decay_mask(params: Any) -> Any:
    """True for kernels (ndim > 1): biases and norm scales are not decayed."""
    return jax.tree_util.tree_map(lambda p: p.ndim > 1, params)


def _base_optimizer(name: str, lr: Callable, weight_decay: float, momentum: float) -> optax.GradientTransformation:
    if name == "sgd":
        return optax.chain(
            optax.add_decayed_weights(weight_decay, mask=decay_mask),
            optax.sgd(lr, momentum=momentum, nesterov=True),
        )
    if name == "adamw":
        return optax.adamw(lr, weight_decay=weight_decay, mask=decay_mask)
    raise ValueError(f"unknown optimizer.name '{name}'; choose 'sgd' or 'adamw'")


def make_schedule(base_lr: float, total_steps: int, warmup_steps: int) -> optax.Schedule:
    """Linear warmup to `base_lr`, then cosine decay to 0 at `total_steps`."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(0.0, base_lr, warmup_steps, max(total_steps, warmup_steps + 1))


def make_optimizer(
    params: Any,
    phase: Phase,
    schedule: optax.Schedule,
    name: str = "sgd",
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    steps_done: dict[str, int] | None = None,
) -> optax.GradientTransformation:
    """`multi_transform` over `group_labels(params, phase)`: set_to_zero for frozen groups, else the optimizer
    at `phase.lr_multipliers[group] * schedule(phase step)`.

    `steps_done[group]` is how many steps the group trained in earlier phases: its optimizer count (carried over
    by `carry_over_state`) starts there, and the schedule is this phase's, so it is shifted back to phase step 0.
    """
    steps_done = steps_done or {}
    transforms = {FROZEN: optax.set_to_zero()}
    for group in phase.trainable:
        multiplier, offset = phase.lr_multipliers[group], steps_done.get(group, 0)
        lr = lambda count, m=multiplier, o=offset: m * schedule(count - o)  # noqa: E731
        transforms[group] = _base_optimizer(name, lr, weight_decay, momentum)
    return optax.multi_transform(transforms, group_labels(params, phase))


def carry_over_state(old_state: optax.MultiTransformState, new_state: optax.MultiTransformState):
    """The new phase's state, keeping the old inner state of every group trainable in both phases."""
    inner = dict(new_state.inner_states)
    for label, state in old_state.inner_states.items():
        if label != FROZEN and label in inner:
            inner[label] = state
    return new_state._replace(inner_states=inner)
