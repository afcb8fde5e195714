"""The backbone contract and its vocabulary, named once.

Every backbone family is a Flax module that:

- `__call__(images, train=False) -> {name: array}` returns every named feature of one forward pass, in order
  from the input: the outputs of its layer groups (NHWC maps for the CNNs; the patch grid as a map for ViT) and
  `PRE_LOGITS`, the `(B, D)` features the pretrained classifier read.
- `groups`: its top-level parameter groups, input to output (`STEM`, `stage1`, ...). Strategies freeze and
  unfreeze them by name (`jaxtl.transfer.strategies`).
- `features`: the names `__call__` returns, input to output, ending with `PRE_LOGITS`.
- `feature_channels`: `{feature: channels}`.

The CNNs' groups end at the same output strides (4, 8, 16, 32 for `stage1`..`stage4`), so a head that reads
`stage3` means the same thing for every family.
"""

from __future__ import annotations

STEM = "stem"
PRE_LOGITS = "pre_logits"
STAGES = ("stage1", "stage2", "stage3", "stage4")
GROUPS = (STEM, *STAGES)  # the groups of ResNet, EfficientNet-Lite, MobileNetV2 and ViT
FEATURES = (*GROUPS, PRE_LOGITS)


def stage(index: int) -> str:
    """`stage1`, `stage2`, ... (1-based)."""
    return f"stage{index}"
