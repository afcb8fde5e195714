"""jaxtl's BatchNorm against Flax's, what a bf16 step keeps for its backward pass, and rematerialisation."""

from __future__ import annotations

import contextlib
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals

import jaxtl
from jaxtl.models import layers
from jaxtl.models.backbone import PRE_LOGITS
from jaxtl.models.batchnorm import BatchNorm
from tests.conftest import TinyEfficientNetLite, TinyMobileNetV2, TinyResNet, TinyViT


def _pair(x, dtype=None):
    ours, flax_bn = BatchNorm(momentum=0.9, epsilon=1e-3, dtype=dtype), nn.BatchNorm(
        momentum=0.9, epsilon=1e-3, dtype=dtype, use_fast_variance=True)
    variables = flax_bn.init(jax.random.key(0), x, use_running_average=False)
    rng = np.random.default_rng(1)
    params = {"scale": jnp.asarray(rng.normal(1, 0.3, x.shape[-1]), jnp.float32),
              "bias": jnp.asarray(rng.normal(0, 0.3, x.shape[-1]), jnp.float32)}
    variables = {"params": params, "batch_stats": variables["batch_stats"]}
    assert jax.tree.structure(ours.init(jax.random.key(0), x)) == jax.tree.structure(variables)
    return ours, flax_bn, variables


def _loss(module, variables, weights, nonlinear=True):
    def loss(params, x):
        y, updates = module.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                                  use_running_average=False, mutable=["batch_stats"])
        value = jnp.sum(y.astype(jnp.float32) * weights)
        return value + (jnp.sum(jnp.sin(y.astype(jnp.float32))) if nonlinear else 0.0), updates
    return loss


def test_batchnorm_matches_flax_forward_statistics_and_gradients():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(2.0, 3.0, (4, 5, 5, 6)), jnp.float32)
    weights = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    ours, flax_bn, variables = _pair(x)
    results = {}
    for name, module in (("ours", ours), ("flax", flax_bn)):
        loss = _loss(module, variables, weights)
        (value, updates), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(variables["params"], x)
        results[name] = (value, updates, grads)
        evaluated = module.apply(variables, x, use_running_average=True)
        results[name + "_eval"] = evaluated
    np.testing.assert_allclose(results["ours"][0], results["flax"][0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(results["ours"][1:]), jax.tree.leaves(results["flax"][1:])):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(results["ours_eval"], results["flax_eval"], rtol=1e-5, atol=1e-6)


def test_batchnorm_gradient_of_the_statistics_themselves():
    """Something downstream that reads the batch mean and variance gets their gradient (checked numerically)."""
    from jaxtl.models.batchnorm import normalize_batch

    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(6, 3)), jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)
    scale, bias = jnp.ones(3, x.dtype) * 1.5, jnp.zeros(3, x.dtype)

    def f(x):
        y, mean, var = normalize_batch(x, scale, bias, 1e-3, x.dtype)
        return jnp.sum(y ** 3) + jnp.sum(mean * 2.0) + jnp.sum(jnp.sqrt(var))

    def reference(x):
        mean = x.mean(0)
        var = (x * x).mean(0) - mean * mean
        y = (x - mean) * jax.lax.rsqrt(var + 1e-3) * scale + bias
        return jnp.sum(y ** 3) + jnp.sum(mean * 2.0) + jnp.sum(jnp.sqrt(var))

    np.testing.assert_allclose(jax.grad(f)(x), jax.grad(reference)(x), rtol=2e-4, atol=2e-5)


def test_bf16_batchnorm_keeps_its_input_in_bf16_for_the_backward_pass():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 4, 4, 16)), jnp.bfloat16)
    weights = jnp.linspace(-1.0, 1.0, 16)  # per channel: the loss keeps no activation-sized constant
    for module, expect_float32 in ((BatchNorm(dtype=jnp.bfloat16), False),
                                   (nn.BatchNorm(dtype=jnp.bfloat16, use_fast_variance=True), True)):
        variables = module.init(jax.random.key(0), x, use_running_average=False)
        loss = _loss(module, variables, weights, nonlinear=False)  # the loss itself keeps nothing
        big = [aval for aval, _ in saved_residuals(lambda p: loss(p, x)[0], variables["params"])
               if hasattr(aval, "shape") and aval.size >= x.size]
        assert big, "the backward pass keeps an activation"
        assert any(a.dtype == jnp.float32 for a in big) == expect_float32, (type(module), big)


@pytest.mark.parametrize("family,native", [
    (TinyResNet, False), (functools.partial(TinyEfficientNetLite, depth=0.1), False), (TinyMobileNetV2, True),
    (TinyViT, False)], ids=["resnet", "lite", "mobilenet_v2", "vit"])
@pytest.mark.slow
def test_remat_blocks_gives_the_same_gradients_and_keeps_less(family, native):
    """Lite at depth 0.1: one block a run (7), each kind of block Lite0 has, at half the compile time, in the forms
    traced on a CPU (depthwise convolutions as shifted multiply-adds with their own gradient); MobileNetV2, the
    same blocks, in the native forms an accelerator runs (`portable_ops`), which also compile faster here."""
    with layers.portable_ops() if native else contextlib.nullcontext():
        _remat_gives_the_same_gradients_and_keeps_less(family)


def _remat_gives_the_same_gradients_and_keeps_less(family):
    inputs = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
    results, kept = {}, {}
    for remat in ("none", "blocks"):
        model = family(remat=remat)
        variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0), inputs)

        def loss(params, model=model, variables=variables):
            out, _ = model.apply({**variables, "params": params}, inputs, train=True, mutable=["batch_stats"],
                                 rngs={"dropout": jax.random.key(1)})
            return jnp.sum(jnp.sin(out[PRE_LOGITS]))

        results[remat] = jax.jit(jax.grad(loss))(variables["params"])
        kept[remat] = sum(a.size for a, _ in saved_residuals(loss, variables["params"]) if hasattr(a, "shape"))
    assert jax.tree.structure(results["none"]) == jax.tree.structure(results["blocks"])
    # Compiled separately, the two programs sum in different orders; where BatchNorm cancels a gradient to about
    # zero the difference is the rounding of the terms cancelled, so the tolerance is set by the largest gradient
    # (a wrong recomputation is off by the gradient itself).
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(results["none"]))
    for a, b in zip(jax.tree.leaves(results["none"]), jax.tree.leaves(results["blocks"])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale)
    assert kept["blocks"] < kept["none"]


def test_remat_unknown_value_is_refused():
    with pytest.raises(ValueError, match="model.kwargs.remat"):
        jaxtl.create_model("resnet18", num_classes=3, remat="everything", width=8)
