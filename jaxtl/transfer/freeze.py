"""What freezing a parameter means inside the train step, beyond a zero update.

- No gradient: frozen parameters enter the loss through `stop_gradient`, so JAX builds no backward pass for
  them; with everything below the head frozen, backpropagation stops at the head.
- BatchNorm statistics kept (the Keras rule, the default): a BatchNorm layer whose parameters are all frozen
  normalises with its running statistics and does not update them, even in train mode. A frozen conv's output
  only means what the next layers learnt if it is normalised the same way, and a small dataset's batch
  statistics are noisy. `transfer.train_frozen_bn=True` lets them train (fastai's choice).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax

from jaxtl.models.batchnorm import BatchNorm
from jaxtl.rules import Rule, match_rules, path_of


def trainable_mask(multipliers: Any) -> Any:
    """True where the LR multiplier is above 0."""
    return jax.tree_util.tree_map(lambda m: float(m) > 0.0, multipliers)


def stop_frozen_gradients(params: Any, trainable: Any) -> Any:
    """`params` with `stop_gradient` on every frozen leaf."""
    return jax.tree_util.tree_map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, trainable)


def frozen_batchnorm_layers(trainable: Any, batch_stats: Any) -> frozenset[tuple[str, ...]]:
    """Module paths of the BatchNorm layers (those holding `batch_stats`) none of whose parameters train."""
    training = {path_of(kp) for kp, t in jax.tree_util.tree_leaves_with_path(trainable) if t}
    layers = {tuple(path_of(kp).split("/")[:-1]) for kp, _ in jax.tree_util.tree_leaves_with_path(batch_stats)}
    return frozenset(layer for layer in layers
                     if not any(p.startswith("/".join(layer) + "/") for p in training))


@contextlib.contextmanager
def frozen_batchnorm(layers: frozenset[tuple[str, ...]]) -> Iterator[None]:
    """Within the block, the BatchNorm layers at `layers` (module paths) use and keep their running statistics."""

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if (layers and context.method_name == "__call__" and isinstance(module, BatchNorm)
                and tuple(module.scope.path) in layers):
            if len(args) > 1:
                args = (args[0], True, *args[2:])
            else:
                kwargs = {**kwargs, "use_running_average": True}
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        yield


@dataclass(frozen=True)
class Freezing:
    """What the train step does with frozen parameters: `trainable` (a bool tree like the params; None: everything
    trains) and `batchnorm` (module paths of the BatchNorm layers that keep their running statistics)."""

    trainable: Any = None
    batchnorm: frozenset[tuple[str, ...]] = field(default_factory=frozenset)

    @classmethod
    def from_multipliers(cls, multipliers: Any, batch_stats: Any, train_frozen_bn: bool = False) -> "Freezing":
        trainable = trainable_mask(multipliers)
        kept = frozenset() if train_frozen_bn else frozen_batchnorm_layers(trainable, batch_stats or {})
        return cls(trainable, kept)

    @classmethod
    def from_rules(cls, variables: dict, rules: Sequence[Rule], train_frozen_bn: bool = False) -> "Freezing":
        """From `(regex, LR multiplier)` rules over the parameter paths of `variables["params"]`."""
        multipliers = jax.tree_util.tree_map(float, match_rules(variables["params"], rules, "rules"))
        return cls.from_multipliers(multipliers, variables.get("batch_stats"), train_frozen_bn)
