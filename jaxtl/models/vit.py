"""Vision Transformer backbones (ViT-Ti/S/B at patch 16, B/32) in timm's and big_vision's shape, and timm's
AugReg weights on the Hugging Face hub (no published hash: recorded at first download): pre-norm blocks
(LayerNorm epsilon 1e-6, exact GELU), a class token and learnt position embeddings.

Any input size whose sides are multiples of the patch size works: the position embeddings of the patch grid
are resampled to the input's grid by bicubic interpolation with antialiasing, as timm's
`resample_abs_pos_embed` does (the class token's embedding is kept).

Groups: `stem` (patch embedding, class token, position embeddings) and `stage1`..`stage4`, a quarter of the blocks
each (`stage4` also holds the final LayerNorm). Features: each group's patch tokens as an NHWC map of the patch
grid (`(B, H/P, W/P, D)`, the class token left out, so heads and extraction pool them like a CNN's maps), and
`pre_logits`: the class token after the final LayerNorm (`pool="token"`), or the mean of the normalised patch
tokens (`pool="gap"`, big_vision's models without a class token).

Visual prompt tuning (Jia et al., 2022): with `prompts=P`, P learnt tokens (`prompt0`, in `stage1`) join the
sequence after the class token before the first block (VPT-shallow); with `deep_prompts`, every later block `b`
replaces them with its own (`prompt<b>`, in the block's stage: VPT-deep). Prompts carry no position embedding and
are left out of the feature maps and of `pool="gap"`. `prompts=0` is the model without them, exactly.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxtl.core.errors import ConfigError
from jaxtl.core.preprocessing import Preprocessing
from jaxtl.models.backbone import GROUPS, PRE_LOGITS, STEM, stage
from jaxtl.models.layers import drop_path, rematerialised
from jaxtl.models.registry import ModelSpec, register_model, register_weights, timm_hub_weights

_dense_init = nn.initializers.truncated_normal(0.02)


def resample_position_embeddings(posemb: jnp.ndarray, grid: tuple[int, int]) -> jnp.ndarray:
    """`(1, h*w, D)` embeddings of a square grid resampled to `grid` (bicubic, antialiased when shrinking:
    `jax.image.resize`'s), as two matrix products with weights fixed by the sizes alone, so an exported program
    holds plain products (exporters lack antialiased resizing)."""
    old = int(round(posemb.shape[1] ** 0.5))
    if (old, old) == tuple(grid):
        return posemb
    image = posemb.reshape(1, old, old, -1).astype(jnp.promote_types(posemb.dtype, jnp.float32))
    rows, cols = _resize_weights(old, grid[0]), _resize_weights(old, grid[1])
    resized = jnp.einsum("ho,bowc,pw->bhpc", rows, image, cols, precision=jax.lax.Precision.HIGHEST)
    return resized.reshape(1, grid[0] * grid[1], -1).astype(posemb.dtype)


@functools.lru_cache(maxsize=None)
def _resize_weights(old: int, new: int) -> np.ndarray:
    """`(new, old)`: row i holds the weights `jax.image.resize` (bicubic, antialiased) gives the `old` inputs in
    output i, found by resizing the identity."""
    with jax.ensure_compile_time_eval():
        scale = jnp.array([new / old], jnp.float32)
        eye = jnp.eye(old, dtype=jnp.float32)
        weights = jax.image.scale_and_translate(eye, (new, old), (0,), scale, jnp.zeros(1, jnp.float32), "cubic",
                                                antialias=True, precision=jax.lax.Precision.HIGHEST)
        return np.asarray(weights)


class Stem(nn.Module):
    """Patch embedding (a PxP conv of stride P), class token, position embeddings; returns `(tokens, grid)`."""

    patch_size: int
    dim: int
    image_size: int
    class_token: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> tuple[jnp.ndarray, tuple[int, int]]:
        p = self.patch_size
        if x.shape[1] % p or x.shape[2] % p:
            raise ConfigError(f"data.input_size: a ViT input of {x.shape[1]}x{x.shape[2]} pixels; both sides must be "
                              f"multiples of the patch size {p}")
        x = nn.Conv(self.dim, (p, p), (p, p), padding="VALID", dtype=self.dtype, name="patch_embed")(x)
        batch, h, w, _ = x.shape
        x = x.reshape(batch, h * w, self.dim)
        native = (self.image_size // p) ** 2
        prefix = 1 if self.class_token else 0
        pos = self.param("pos_embedding", nn.initializers.normal(0.02), (1, prefix + native, self.dim), jnp.float32)
        pos = jnp.concatenate([pos[:, :prefix], resample_position_embeddings(pos[:, prefix:], (h, w))], axis=1)
        if self.class_token:
            cls = self.param("cls", nn.initializers.zeros, (1, 1, self.dim), jnp.float32)
            x = jnp.concatenate([jnp.broadcast_to(cls, (batch, 1, self.dim)).astype(x.dtype), x], axis=1)
        return x + pos.astype(x.dtype), (h, w)


class Attention(nn.Module):
    dim: int
    heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        batch, tokens, _ = x.shape
        head_dim = self.dim // self.heads
        dense = functools.partial(nn.Dense, self.dim, kernel_init=_dense_init, dtype=self.dtype)
        q, k, v = (dense(name=n)(x).reshape(batch, tokens, self.heads, head_dim) for n in ("query", "key", "value"))
        softmax_dtype = jnp.promote_types(q.dtype, jnp.float32)  # bfloat16 logits would round the softmax
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(softmax_dtype) / jnp.sqrt(head_dim).astype(softmax_dtype)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, tokens, self.dim)
        return dense(name="out")(out)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x)); stochastic depth when training."""

    dim: int
    heads: int
    mlp_dim: int
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        norm = functools.partial(nn.LayerNorm, epsilon=1e-6, dtype=self.dtype)
        x = x + drop_path(self, Attention(self.dim, self.heads, self.dtype, name="attn")(norm(name="norm1")(x)),
                          self.drop_path_rate, train)
        y = norm(name="norm2")(x)
        y = nn.Dense(self.mlp_dim, kernel_init=_dense_init, dtype=self.dtype, name="fc1")(y)
        y = nn.Dense(self.dim, kernel_init=_dense_init, dtype=self.dtype, name="fc2")(nn.gelu(y, approximate=False))
        return x + drop_path(self, y, self.drop_path_rate, train)


class Stage(nn.Module):
    """A run of blocks (named by their global index) and, for the last stage, the final LayerNorm."""

    first: int
    count: int
    dim: int
    heads: int
    mlp_dim: int
    drop_path_rates: tuple = ()
    final_norm: bool = False
    remat: str = "none"
    dtype: Any = jnp.float32
    prompts: int = 0  # VPT: prompt tokens after the `prefix` class token (see the module docstring)
    deep_prompts: bool = False
    prefix: int = 1
    prompt_init: Any = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
        block = rematerialised(Block, self.remat)
        for j in range(self.count):
            index = self.first + j
            if _prompted(index, self.prompts, self.deep_prompts):
                tokens = self.param(f"prompt{index}", self.prompt_init, (1, self.prompts, self.dim), jnp.float32)
                tokens = jnp.broadcast_to(tokens, (x.shape[0], self.prompts, self.dim)).astype(x.dtype)
                rest = x[:, self.prefix + (self.prompts if index else 0):]  # block 0 inserts, later ones replace
                x = jnp.concatenate([x[:, :self.prefix], tokens, rest], axis=1)
            rate = self.drop_path_rates[j] if self.drop_path_rates else 0.0
            x = block(self.dim, self.heads, self.mlp_dim, rate, self.dtype, name=f"block{index}")(x, train)
        if self.final_norm:
            x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm")(x)
        return x


class VisionTransformer(nn.Module):
    """ViT backbone: `__call__(images, train)` returns `{stem, stage1..stage4, pre_logits}`.

    Attributes:
      patch_size, dim, depth, heads, mlp_dim: the variant (ViT-S/16: 16, 384, 12, 6, 1536).
      image_size: the resolution the position embeddings were learnt at (other sizes are resampled).
      class_token: whether the model has one (timm and the original ViT), else `pool` must be "gap".
      pool: "token" (the class token) or "gap" (mean of the patch tokens) for `pre_logits`.
      drop_path_rate: stochastic depth at the last block, scaled linearly from 0 at the first (train only).
      remat: "blocks" recomputes each block's activations in the backward pass (`layers.rematerialised`).
      prompts, deep_prompts: visual prompt tuning (module docstring).
    """

    patch_size: int = 16
    dim: int = 384
    depth: int = 12
    heads: int = 6
    mlp_dim: int = 1536
    image_size: int = 224
    class_token: bool = True
    pool: str = "token"
    drop_path_rate: float = 0.0
    remat: str = "none"
    dtype: Any = jnp.float32
    prompts: int = 0
    deep_prompts: bool = False

    groups = GROUPS
    features = (*GROUPS, PRE_LOGITS)

    @property
    def feature_channels(self) -> dict[str, int]:
        return {name: self.dim for name in self.features}

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool = False) -> dict[str, jnp.ndarray]:
        if self.pool not in ("token", "gap") or (self.pool == "token" and not self.class_token):
            raise ConfigError(f"model.kwargs: ViT pool='{self.pool}' with class_token={self.class_token}: use "
                              "pool='token' with a class token or pool='gap'")
        x, grid = Stem(self.patch_size, self.dim, self.image_size, self.class_token, self.dtype, name=STEM)(x)
        prefix = 1 if self.class_token else 0

        def as_map(tokens):
            return tokens[:, tokens.shape[1] - grid[0] * grid[1]:].reshape(tokens.shape[0], *grid, self.dim)

        out = {STEM: as_map(x)}
        bounds = _stage_bounds(self.depth)
        rates = [self.drop_path_rate * i / max(self.depth - 1, 1) for i in range(self.depth)]
        bound = _prompt_bound(self.patch_size, self.dim)
        prompt_init = functools.partial(jax.random.uniform, minval=-bound, maxval=bound)
        for i in range(4):
            first, stop = bounds[i], bounds[i + 1]
            x = Stage(first, stop - first, self.dim, self.heads, self.mlp_dim, tuple(rates[first:stop]),
                      final_norm=i == 3, remat=self.remat, dtype=self.dtype, prompts=self.prompts,
                      deep_prompts=self.deep_prompts, prefix=prefix, prompt_init=prompt_init,
                      name=stage(i + 1))(x, train)
            out[stage(i + 1)] = as_map(x)
        pooled = x[:, 0] if self.pool == "token" else x[:, x.shape[1] - grid[0] * grid[1]:].mean(axis=1)
        out[PRE_LOGITS] = pooled.astype(jnp.promote_types(pooled.dtype, jnp.float32))
        return out


ViT_Ti16 = functools.partial(VisionTransformer, patch_size=16, dim=192, depth=12, heads=3, mlp_dim=768)
ViT_S16 = functools.partial(VisionTransformer, patch_size=16, dim=384, depth=12, heads=6, mlp_dim=1536)
ViT_B16 = functools.partial(VisionTransformer, patch_size=16, dim=768, depth=12, heads=12, mlp_dim=3072)
ViT_B32 = functools.partial(VisionTransformer, patch_size=32, dim=768, depth=12, heads=12, mlp_dim=3072)

# timm's AugReg ViTs: inputs scaled to [-1, 1], bicubic, 0.9 crop.
_AUGREG = Preprocessing(224, 0.9, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic")
_AUGREG_TEXT = "AugReg ImageNet-21k pretraining, ImageNet-1k fine-tuning; top-1 {}"

for _name, _build, _timm, _top1 in (("vit_ti16", ViT_Ti16, "vit_tiny_patch16_224", 75.5),
                                    ("vit_s16", ViT_S16, "vit_small_patch16_224", 81.4),
                                    ("vit_b16", ViT_B16, "vit_base_patch16_224", 84.5),
                                    ("vit_b32", ViT_B32, "vit_base_patch32_224", 80.7)):
    register_model(ModelSpec(_name, "vit", _build, f"{_name}.augreg_in21k_ft_in1k", 224, preprocessing=_AUGREG))
    register_weights(timm_hub_weights(_name, "augreg_in21k_ft_in1k", f"{_timm}.augreg_in21k_ft_in1k", _AUGREG,
                                      _AUGREG_TEXT.format(_top1)))


def _stage_bounds(depth: int) -> list[int]:
    """The first block of each stage (a quarter of the blocks each), and the depth."""
    return [round(depth * i / 4) for i in range(5)]


def _prompted(block: int, prompts: int, deep: bool) -> bool:
    """Whether block `block` takes learnt prompts (inserted before block 0; replaced before every block if deep)."""
    return bool(prompts) and (block == 0 or deep)


def _prompt_bound(patch_size: int, dim: int) -> float:
    """VPT's initialisation: uniform in +-bound, Xavier over the patch embedding's fan-in and the width."""
    return (6.0 / (3 * patch_size ** 2 + dim)) ** 0.5


def prompt_params(backbone: VisionTransformer, key: jax.Array) -> dict:
    """Fresh VPT prompts for `backbone` (`{stage: {prompt<b>: (1, P, D)}}`), to add to pretrained parameters that
    have none."""
    bounds, bound, out = _stage_bounds(backbone.depth), _prompt_bound(backbone.patch_size, backbone.dim), {}
    for i in range(4):
        for b in range(bounds[i], bounds[i + 1]):
            if _prompted(b, backbone.prompts, backbone.deep_prompts):
                out.setdefault(stage(i + 1), {})[f"prompt{b}"] = jax.random.uniform(
                    jax.random.fold_in(key, b), (1, backbone.prompts, backbone.dim), jnp.float32, -bound, bound)
    return out
