"""Transfer strategies as presets of parameter rules (`jaxtl.rules`): which parameters train, at what multiple
of the base LR, phase by phase.

A rule list maps parameter paths to LR multipliers, first match wins, 0 freezes (no gradient, no optimizer state,
BatchNorm statistics kept). The presets name a backbone's layer groups (`backbone.groups`, input to output:
`stem, stage1..stage4` for the CNNs), so they read the same for every family:

- `linear_probe`: only the head trains (feature extraction).
- `finetune_top`: the last `num_stages` groups and the head.
- `finetune_all`: everything, at the config's (low) LR.
- `discriminative`: everything, multipliers geometric from `lr_ratio` at the first group to 1 at the head
  (fastai's `slice(lo, hi)` with lo = lr_ratio * hi).
- `gradual`: phases; the head first, then one more group per phase, top down (ULMFiT's gradual unfreezing).
- `norm_only`: the normalisation layers' scales and biases and the head; everything else frozen. A cheap
  adaptation to a new domain: the features are re-normalised and re-weighted, not relearnt.
- `bitfit`: every bias of the backbone (convolutions', dense layers', normalisation layers') and the head;
  scales and kernels frozen (Ben Zaken et al., 2022). Unlike `norm_only` it trains the attention and MLP biases
  of a ViT and leaves the normalisation scales alone.
- `lora`: low-rank factors beside the targeted kernels (`jaxtl.models.lora`) and the head; everything else
  frozen.
- `vpt`: a ViT's prompt tokens (`jaxtl.models.vit`, shallow or deep) and the head; everything else frozen.
- `scratch`: random init, everything trains (the baseline).
- `custom`: the config's own `transfer.rules`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from jaxtl.core.errors import ConfigError
from jaxtl.rules import Rule

STRATEGIES = ("linear_probe", "finetune_top", "finetune_all", "discriminative", "gradual", "norm_only", "bitfit",
              "lora", "vpt", "scratch", "custom")
# `auto`'s candidates (`jaxtl.advice.matrix`), the cheapest to train first: two probes on cached features, then
# fine-tuning the top stage, the top two, gradual unfreezing, everything.
AUTO_CANDIDATES = ("probe_pre_logits", "probe_earlier", "finetune_top_1", "finetune_top_2", "gradual", "finetune_all")
HEAD = "head/.*"
# Parameters of normalisation layers: every module whose name contains "bn" or "norm" (BatchNorm, LayerNorm).
NORM_PARAMS = r"backbone/(.*/)?[^/]*(bn|norm)[^/]*/(scale|bias)"
BIAS_PARAMS = r"backbone/(.*/)?bias"
LORA_PARAMS = r"backbone/.*/(lora_a|lora_b)"
PROMPT_PARAMS = r"backbone/.*/prompt\d+"


@dataclass(frozen=True)
class Phase:
    """A stretch of training with fixed rules: `rules` map parameter paths to LR multipliers (0 freezes)."""

    rules: tuple[Rule, ...]
    epochs: int


def _groups(groups: Sequence[str]) -> str:
    return f"backbone/({'|'.join(re.escape(g) for g in groups)})/.*"


def _top(groups: Sequence[str], count: int) -> tuple[Rule, ...]:
    """The head and the last `count` groups train, the rest is frozen."""
    trained = ((_groups(groups[len(groups) - count:]), 1.0),) if count else ()
    return ((HEAD, 1.0), *trained, (".*", 0.0))


def preset_rules(strategy: str, groups: Sequence[str], num_stages: int = 1, lr_ratio: float = 0.01) -> tuple[Rule, ...]:
    """The rules of a single-phase strategy for a backbone with layer `groups`."""
    if strategy in ("finetune_all", "scratch"):
        return ((".*", 1.0),)
    if strategy == "linear_probe":
        return _top(groups, 0)
    if strategy == "finetune_top":
        if not 1 <= num_stages <= len(groups):
            raise ConfigError(f"transfer.num_stages={num_stages}: finetune_top trains the last 1..{len(groups)} "
                              f"groups of this backbone ({', '.join(groups)})")
        return _top(groups, num_stages)
    if strategy == "discriminative":
        if not 0 < lr_ratio <= 1:
            raise ConfigError(f"transfer.lr_ratio={lr_ratio}: must be in (0, 1] (first group's LR / head's LR)")
        last = len(groups)
        return ((HEAD, 1.0), *((_groups([g]), lr_ratio ** ((last - i) / last)) for i, g in enumerate(groups)))
    if strategy == "norm_only":
        return ((HEAD, 1.0), (NORM_PARAMS, 1.0), (".*", 0.0))
    if strategy == "bitfit":
        return ((HEAD, 1.0), (BIAS_PARAMS, 1.0), (".*", 0.0))
    if strategy == "lora":
        return ((HEAD, 1.0), (LORA_PARAMS, 1.0), (".*", 0.0))
    if strategy == "vpt":
        return ((HEAD, 1.0), (PROMPT_PARAMS, 1.0), (".*", 0.0))
    raise ConfigError(f"transfer.strategy='{strategy}' has no single preset; choose from {', '.join(STRATEGIES)}")


def make_phases(
    strategy: str,
    epochs: int,
    groups: Sequence[str],
    *,
    num_stages: int = 1,
    lr_ratio: float = 0.01,
    phase_epochs: Sequence[int] = (),
    rules: Sequence[Rule] = (),
) -> list[Phase]:
    """The phases of a strategy (see module docstring); `gradual` is one phase per entry of `phase_epochs`."""
    if strategy == "gradual":
        if not phase_epochs or len(phase_epochs) > len(groups) + 1 or min(phase_epochs) < 1:
            raise ConfigError(f"transfer.phase_epochs={tuple(phase_epochs)}: gradual needs 1..{len(groups) + 1} "
                              "positive epoch counts, one per phase (head, +last group, ...), e.g. (2, 2, 3)")
        return [Phase(_top(groups, i), int(n)) for i, n in enumerate(phase_epochs)]
    if strategy == "custom":
        if not rules:
            raise ConfigError("transfer.strategy='custom' trains by transfer.rules, which is empty; give "
                              "(regex, LR multiplier) pairs, e.g. (('head/.*', 1.0), ('backbone/stage4/.*', 0.1), "
                              "('.*', 0.0))")
        return [Phase(tuple((str(p), float(m)) for p, m in rules), epochs)]
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown transfer.strategy '{strategy}'; choose from {', '.join(STRATEGIES)} or auto")
    return [Phase(preset_rules(strategy, groups, num_stages, lr_ratio), epochs)]
