"""LoRA (Hu et al., 2021) over plain parameter trees: a targeted kernel `W` gets two siblings, `lora_a` and
`lora_b`, and its layer computes `x W + scale * (x A) B` with `scale = alpha / rank`. `B` starts at zero, so a
model with fresh factors gives the pretrained outputs exactly; the strategy's rules train the factors (and the
head) and freeze `W`, which then gets no gradient and no optimizer state.

The layers themselves are unchanged: `Classifier` runs them under `lora_branch`, a Flax method interceptor that
adds the low-rank branch to any `Dense`, `Conv` or `PointwiseConv` whose parameters hold factors, as the layer
itself would compute it (same strides, padding and dtype: `A` is the layer's kernel with `rank` output channels,
so a kxk convolution's factor is a kxk convolution and the kernel is used as a matrix). `merge_lora` folds the
factors into plain kernels (`W + scale * A B`), which is what evaluation, the kept model and prediction use.
"""

from __future__ import annotations

import re
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxtl.core.errors import ConfigError
from jaxtl.models.layers import PointwiseConv, channel_product
from jaxtl.rules import path_of

LORA_A, LORA_B = "lora_a", "lora_b"  # the rule that trains them: `jaxtl.transfer.strategies.LORA_PARAMS`


def default_targets(params: dict) -> tuple[str, ...]:
    """The kernels LoRA adapts when `transfer.lora_targets` is empty: a ViT's attention projections and MLP
    layers; a CNN's 1x1 convolutions and dense layers (the bulk of EfficientNet-Lite's, MobileNetV2's and
    ResNet-50's parameters; ResNet-18's and VGG's are mostly 3x3: target those by name)."""
    chosen = []
    for path, leaf in _kernels(params):
        if re.search(r"/attn/(query|key|value|out)/kernel$|/fc\d?/kernel$", path):
            chosen.append(re.escape(path))
        elif leaf.ndim == 4 and leaf.shape[:2] == (1, 1) or leaf.ndim == 2:
            chosen.append(re.escape(path))
    return tuple(chosen)


def _kernels(params: dict) -> list[tuple[str, jax.Array]]:
    """`(path, kernel)` of every backbone kernel."""
    paths = ((path_of(kp), leaf) for kp, leaf in jax.tree_util.tree_leaves_with_path(params))
    return [(path, leaf) for path, leaf in paths if path.startswith("backbone/") and path.endswith("/kernel")]


def add_lora(params: dict, targets: Sequence[str], rank: int, key: jax.Array) -> dict:
    """`params` with fresh factors beside every backbone kernel whose path a `targets` regex matches in full:
    `lora_a` (the kernel's shape with `rank` outputs, uniform in +-1/sqrt(fan-in), as PEFT) and `lora_b`
    (`(rank, outputs)`, zeros)."""
    if rank < 1:
        raise ConfigError(f"transfer.lora_rank={rank}: must be a positive rank, e.g. 8")
    patterns = [re.compile(t) for t in targets]
    chosen = [(path, kernel) for path, kernel in _kernels(params) if any(p.fullmatch(path) for p in patterns)]
    if not chosen:
        raise ConfigError(f"transfer.lora_targets={list(targets)}: no backbone kernel matches; give regexes over "
                          "parameter paths such as 'backbone/stage4/.*/kernel'")
    # Checked before any factor is made (a rank of 100000 would fill the memory first): a kernel is a (fan-in,
    # outputs) matrix, and a rank above its smaller dimension adds parameters, not expressiveness.
    limit, narrowest = min((min(int(np.prod(kernel.shape[:-1])), kernel.shape[-1]), path) for path, kernel in chosen)
    if rank > limit:
        raise ConfigError(f"transfer.lora_rank={rank}: above the smaller dimension ({limit}) of {narrowest}, a kernel "
                          f"it adapts; give a rank of at most {limit} (e.g. 4, 8 or 16), or target larger kernels "
                          "with transfer.lora_targets")
    params = jax.tree_util.tree_map(lambda x: x, params)  # a copy to add to
    for i, (path, kernel) in enumerate(chosen):
        node = params
        for part in path.split("/")[:-1]:
            node = node[part]
        fan_in = int(np.prod(kernel.shape[:-1]))
        bound = 1.0 / np.sqrt(fan_in)
        node[LORA_A] = jax.random.uniform(jax.random.fold_in(key, i), (*kernel.shape[:-1], rank), jnp.float32,
                                          -bound, bound)
        node[LORA_B] = jnp.zeros((rank, kernel.shape[-1]), jnp.float32)
    return params


def has_lora(params: dict) -> bool:
    return any(path_of(kp).endswith(f"/{LORA_A}") for kp, _ in jax.tree_util.tree_leaves_with_path(params))


def merge_lora(params: dict, scale: float) -> dict:
    """Plain parameters: each factored kernel replaced by `W + scale * A B`, the factors dropped."""
    def merge(node):
        if not isinstance(node, dict):
            return node
        if LORA_A in node:
            a, b = node[LORA_A], node[LORA_B]
            merged = node["kernel"] + scale * jnp.tensordot(a, b, axes=1).astype(node["kernel"].dtype)
            return {k: v for k, v in node.items() if k not in (LORA_A, LORA_B)} | {"kernel": merged}
        return {k: merge(v) for k, v in node.items()}

    return merge(params)


def lora_branch(scale: float):
    """A method interceptor (`nn.intercept_methods`) adding `scale * (x A) B` to the output of every dense or
    convolution layer that holds factors."""

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name != "__call__" or not module.has_variable("params", LORA_A):
            return out
        if not isinstance(module, (nn.Dense, nn.Conv, PointwiseConv)) or (
                isinstance(module, nn.Conv) and module.feature_group_count != 1):
            raise ConfigError(f"transfer.lora_targets matches {'/'.join(module.path)}/kernel, a "
                              f"{type(module).__name__} layer: LoRA adapts dense and full convolution kernels only")
        a, b = module.get_variable("params", LORA_A), module.get_variable("params", LORA_B)
        updates = {"features": a.shape[-1], "parent": None}
        if hasattr(module, "use_bias"):
            updates["use_bias"] = False
        low = module.clone(**updates).apply({"params": {"kernel": a}}, *args, **kwargs)
        low, b = nn.dtypes.promote_dtype(low, b, dtype=getattr(module, "dtype", None))
        # a 4-D product here made XLA:CPU transpose the full-size gradient for B's (a Lite0 LoRA step at batch 16:
        # 5.0 s against 1.6 s)
        branch = channel_product(low, b)
        return out + (scale * branch).astype(out.dtype)

    return interceptor
