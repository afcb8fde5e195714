"""Class-activation maps: Grad-CAM (Selvaraju et al. 2017) on a backbone's last stage, for every family.

A map `A` (B, H, W, C) is weighted per channel by the spatial mean of d(score)/dA and summed over channels; the
positive part, scaled to [0, 1], says where the evidence for the class lies. For a CNN `A` is the last
convolutional stage; for a ViT it is the patch tokens entering its last stage, laid out on their grid (Grad-CAM
on tokens).
The gradient reaches `A` through an interceptor that adds a zero array to the stage's output, so no family needs
a hook of its own.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxtl.core.compiler import jit
from jaxtl.models.classifier import is_backbone_feature


def last_map(backbone: nn.Module, features: dict[str, Any]) -> str:
    """The feature Grad-CAM reads: the backbone's last spatial map (`(B, H, W, C)` in `features`), or, for a ViT
    whose head reads the class token, the map before it: past the last stage's input, patch tokens no longer
    reach the class token, so their gradient there is zero (as pytorch-grad-cam takes the last block's norm1)."""
    maps = [name for name in backbone.features if getattr(features.get(name), "ndim", 0) == 4]
    return maps[-2] if getattr(backbone, "pool", None) == "token" and len(maps) > 1 else maps[-1]


def grad_cam(model: nn.Module, variables: dict, images: jnp.ndarray, classes: np.ndarray,
             layer: str | None = None, maps: jnp.ndarray | None = None) -> np.ndarray:
    """`(B, H, W)` Grad-CAM maps in [0, 1] of `classes` (one per image) on the backbone feature `layer` (default:
    `last_map`) for normalised `images` (B, S, S, 3), at the map's resolution.

    Given the images' `maps` of `layer` (from a forward pass the caller ran anyway), a CNN whose head reads
    nothing below `layer` is differentiated from those maps on (`Classifier.classify_maps`: the stages above and
    the head only, a fraction of the whole network's backward pass to compile and run); otherwise the gradient
    reaches the stage's output through an interceptor over the whole network."""
    if layer is None:
        layer = last_map(model.backbone, jax.eval_shape(lambda x: model.apply(variables, x, train=False), images)[1])
    classes = jnp.asarray(classes)
    names = list(model.backbone.features)
    above = all(names.index(h) >= names.index(layer) for h in model.head_layers)
    shape = _stage_output_shape(model, variables, images, layer)  # traced once, for either path
    if maps is not None and above and shape == maps.shape:
        top = model.clone(maps_from=layer, maps_input_size=images.shape[1])

        def from_maps(maps: jnp.ndarray) -> jnp.ndarray:
            logits = top.apply(variables, maps, train=False, method="classify_maps")[0]
            return jnp.take_along_axis(logits.astype(jnp.float32), classes[:, None], axis=1).sum()

        grads = jit(jax.grad(from_maps))(maps)
        return _cam(grads, maps)

    def score(delta: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        def shift(next_fun, args, kwargs, context):
            out = next_fun(*args, **kwargs)
            return out + delta if is_backbone_feature(context, layer) else out

        with nn.intercept_methods(shift):
            logits, features = model.apply(variables, images, train=False)
        chosen = jnp.take_along_axis(logits.astype(jnp.float32), classes[:, None], axis=1)
        return chosen.sum(), features[layer]

    grads, maps = jit(jax.grad(score, has_aux=True))(jnp.zeros(shape, jnp.float32))
    if grads.shape != maps.shape:  # a ViT stage returns tokens: the patch tokens are the last H*W, as in its maps
        h, w = maps.shape[1:3]
        grads = grads[:, grads.shape[1] - h * w :].reshape(maps.shape)
    return _cam(grads, maps)


def _stage_output_shape(model: nn.Module, variables: dict, images: jnp.ndarray, layer: str) -> tuple[int, ...]:
    """The shape of what the backbone's submodule `layer` returns (a CNN: its map; a ViT: its tokens)."""
    shapes = []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if is_backbone_feature(context, layer):
            shapes.append(out.shape)
        return out

    with nn.intercept_methods(record):
        jax.eval_shape(lambda x: model.apply(variables, x, train=False), images)
    return tuple(shapes[0])


def _cam(grads: jnp.ndarray, maps: jnp.ndarray) -> np.ndarray:
    """Channel weights (the gradient's spatial mean) times the maps, summed, positive part, scaled to [0, 1]."""
    maps = maps.astype(jnp.float32)
    weights = grads.astype(jnp.float32).mean(axis=(1, 2), keepdims=True)
    cam = jax.nn.relu((weights * maps).sum(-1))
    peak = cam.max(axis=(1, 2), keepdims=True)
    return np.asarray(jnp.where(peak > 0, cam / jnp.where(peak > 0, peak, 1), 0.0))


def overlay(pixels: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """uint8 `(S, S, 3)` image with `cam` (h, w in [0, 1]) upsampled bilinearly and laid over it as a heat map."""
    import matplotlib

    size = pixels.shape[:2]
    heat = np.asarray(jax.image.resize(jnp.asarray(cam, jnp.float32), size, "bilinear"))
    colours = matplotlib.colormaps["jet"](np.clip(heat, 0, 1))[..., :3] * 255
    return np.clip((1 - alpha) * pixels + alpha * colours, 0, 255).astype(np.uint8)
