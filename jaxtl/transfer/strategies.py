"""Transfer strategies, each a `Phase` list: which layer groups train, at what fraction of the base LR.

Every backbone's top-level parameter groups are `stem, stage1..stage4, head`, so a strategy is a mapping
group -> LR multiplier, 0 meaning frozen (no gradient, no optimizer state, BatchNorm statistics kept):

- `linear_probe`: only the head trains (feature extraction).
- `finetune_top`: the last `num_stages` stages and the head.
- `finetune_all`: everything, at the config's (low) LR.
- `discriminative`: everything, multipliers geometric from `lr_ratio` at the stem to 1 at the head (fastai's
  `slice(lo, hi)` with lo = lr_ratio * hi).
- `gradual`: phases; the head first, then one more stage per phase, top down (ULMFiT's gradual unfreezing).
- `scratch`: random init, everything trains (the baseline).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

GROUPS = ("stem", "stage1", "stage2", "stage3", "stage4", "head")
STRATEGIES = ("linear_probe", "finetune_top", "finetune_all", "discriminative", "gradual", "scratch")


@dataclass(frozen=True)
class Phase:
    """A stretch of training with fixed group multipliers.

    lr_multipliers: group -> factor of the base LR; 0 freezes the group.
    epochs: length of the phase.
    """

    lr_multipliers: Mapping[str, float]
    epochs: int

    @property
    def frozen(self) -> tuple[str, ...]:
        return tuple(g for g in GROUPS if self.lr_multipliers.get(g, 0.0) == 0.0)

    @property
    def trainable(self) -> tuple[str, ...]:
        return tuple(g for g in GROUPS if self.lr_multipliers.get(g, 0.0) > 0.0)


def _train(groups: Sequence[str], multiplier: float = 1.0) -> dict[str, float]:
    return {g: (multiplier if g in groups else 0.0) for g in GROUPS}


def make_phases(
    strategy: str,
    epochs: int,
    num_stages: int = 1,
    lr_ratio: float = 0.01,
    phase_epochs: Sequence[int] = (),
) -> list[Phase]:
    """The phases of a strategy (see module docstring). `phase_epochs` is used by `gradual` only."""
    if strategy in ("finetune_all", "scratch"):
        return [Phase(_train(GROUPS), epochs)]
    if strategy == "linear_probe":
        return [Phase(_train(("head",)), epochs)]
    if strategy == "finetune_top":
        if not 1 <= num_stages <= 4:
            raise ValueError(f"transfer.num_stages must be 1..4 for finetune_top, got {num_stages}")
        return [Phase(_train(GROUPS[5 - num_stages :]), epochs)]
    if strategy == "discriminative":
        if not 0 < lr_ratio <= 1:
            raise ValueError(f"transfer.lr_ratio must be in (0, 1], got {lr_ratio}")
        last = len(GROUPS) - 1
        return [Phase({g: lr_ratio ** ((last - i) / last) for i, g in enumerate(GROUPS)}, epochs)]
    if strategy == "gradual":
        if not phase_epochs:
            raise ValueError("transfer.phase_epochs must list the epochs of each gradual phase, e.g. (2, 2, 3)")
        if len(phase_epochs) > len(GROUPS):
            raise ValueError(f"transfer.phase_epochs has {len(phase_epochs)} phases; at most {len(GROUPS)}")
        return [Phase(_train(GROUPS[len(GROUPS) - 1 - i :]), n) for i, n in enumerate(phase_epochs)]
    raise ValueError(f"unknown transfer.strategy '{strategy}'; choose from {', '.join(STRATEGIES)} (or auto in a config)")
