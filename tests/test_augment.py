"""Device augmentation policies (`jaxtl.data.augment`) against torchvision's operations on uint8 tensors and timm's
random erasing, and their wiring into the train step and the config."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torchvision.transforms import ColorJitter, InterpolationMode
from torchvision.transforms import autoaugment as tv_autoaugment
from torchvision.transforms import functional as tvf

import jax
import jax.numpy as jnp

from jaxtl.config import base_config, check_values
from jaxtl.core.errors import ConfigError
from jaxtl.core.preprocessing import Preprocessing
from jaxtl.data import augment as aug
from jaxtl.data.augment import OPS, Policy
from jaxtl.train.steps import image_inputs

TORCHVISION_NAMES = {"identity": "Identity", "shear_x": "ShearX", "shear_y": "ShearY", "translate_x": "TranslateX",
                     "translate_y": "TranslateY", "rotate": "Rotate", "brightness": "Brightness", "color": "Color",
                     "contrast": "Contrast", "sharpness": "Sharpness", "posterize": "Posterize",
                     "solarize": "Solarize", "autocontrast": "AutoContrast", "equalize": "Equalize"}


GEOMETRY = ("shear_x", "shear_y", "rotate")  # sub-pixel maps: nearest-neighbour ties may round the other way


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """A natural-looking uint8 image of odd size: smooth gradients, edges and noise (deterministic)."""
    rng = np.random.default_rng(0)
    h, w = 37, 45
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 5, yy * 6, (xx + yy) * 3], -1) + rng.normal(0, 20, (h, w, 3))
    base[10:20, 12:30] = (200, 40, 90)
    return np.clip(base, 0, 255).astype(np.uint8)


def torchvision_op(image: np.ndarray, op: str, magnitude: float) -> np.ndarray:
    tensor = torch.from_numpy(image.copy()).permute(2, 0, 1).contiguous()
    out = tv_autoaugment._apply_op(tensor, TORCHVISION_NAMES[op], magnitude, InterpolationMode.NEAREST, None)
    return out.permute(1, 2, 0).numpy()


def jaxtl_op(image: np.ndarray, op: str, magnitude: float) -> np.ndarray:
    out = aug.apply_op(jnp.asarray(image[None], jnp.float32), jnp.array([OPS.index(op)]),
                       jnp.array([magnitude], jnp.float32))
    return np.asarray(out[0]).astype(np.uint8)


@pytest.mark.parametrize("policy", ["randaugment", "trivialaugment"])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.slow
def test_each_operation_matches_torchvision_at_its_magnitudes(photo, op, policy):
    table = aug.magnitude_table(policy, *photo.shape[:2])
    for bin_ in (3, 9, 30):
        for sign in ((1, -1) if op in aug.SIGNED else (1,)):
            magnitude = float(table[OPS.index(op), bin_]) * sign
            ours, theirs = jaxtl_op(photo, op, magnitude), torchvision_op(photo, op, magnitude)
            differ = np.mean(ours != theirs)
            assert differ <= (0.01 if op in GEOMETRY else 0.0), (op, bin_, sign, differ)


def test_magnitude_tables_are_torchvisions(photo):
    h, w = photo.shape[:2]
    ra = tv_autoaugment.RandAugment()._augmentation_space(aug.BINS, (h, w))
    ta = tv_autoaugment.TrivialAugmentWide()._augmentation_space(aug.BINS)
    for ours, theirs in ((aug.magnitude_table("randaugment", h, w), ra),
                         (aug.magnitude_table("trivialaugment", h, w), ta)):
        assert list(theirs) == [TORCHVISION_NAMES[op] for op in OPS]
        for i, (values, signed) in enumerate(theirs.values()):
            expected = np.broadcast_to(values.numpy().astype(np.float32), (aug.BINS,))
            np.testing.assert_allclose(ours[i], expected, rtol=1e-6, atol=1e-6, err_msg=OPS[i])
            assert signed == (OPS[i] in aug.SIGNED)


def test_two_operations_apply_in_order_as_torchvision_chains_them(photo):
    table = aug.magnitude_table("randaugment", *photo.shape[:2])
    for first, second in (("shear_x", "contrast"), ("equalize", "translate_y"), ("solarize", "sharpness")):
        m1, m2 = float(table[OPS.index(first), 12]), -float(table[OPS.index(second), 20]) if second in aug.SIGNED \
            else float(table[OPS.index(second), 20])
        ours = jaxtl_op(jaxtl_op(photo, first, m1), second, m2)
        theirs = torchvision_op(torchvision_op(photo, first, m1), second, m2)
        assert np.mean(ours != theirs) <= (0.01 if first in GEOMETRY else 0.0), f"{first} then {second}"


def test_sampled_operations_are_uniform_with_the_policys_magnitudes():
    n = 20000
    ops, mags = aug.sample_ops(jax.random.key(0), n, Policy("randaugment", magnitude=7, num_ops=3), 224, 224)
    assert ops.shape == mags.shape == (3, n)
    counts = np.bincount(np.asarray(ops).ravel(), minlength=len(OPS)) / ops.size
    np.testing.assert_allclose(counts, 1 / len(OPS), atol=0.01)
    table = aug.magnitude_table("randaugment", 224, 224)
    ops, mags = np.asarray(ops).ravel(), np.asarray(mags).ravel()
    np.testing.assert_allclose(np.abs(mags), table[ops, 7], rtol=1e-6)
    rotate = ops == OPS.index("rotate")
    assert 0.45 < np.mean(mags[rotate] < 0) < 0.55  # signed operations flip a fair coin
    assert np.all(mags[ops == OPS.index("posterize")] > 0)
    # TrivialAugment: one operation, its bin drawn per image over all 31
    ops, mags = aug.sample_ops(jax.random.key(1), n, Policy("trivialaugment"), 224, 224)
    assert ops.shape == (1, n)
    brightness = np.asarray(ops[0]) == OPS.index("brightness")
    bins = np.round(np.abs(np.asarray(mags[0])[brightness]) / 0.99 * 30).astype(int)
    assert set(bins) == set(range(aug.BINS))


def test_colour_jitter_matches_torchvision_with_the_drawn_order_and_factors(photo):
    batch = np.stack([photo, photo[::-1], photo[:, ::-1], 255 - photo])
    order, factors = aug.jitter_params(jax.random.key(3), len(batch), 0.4)
    order, factors = np.asarray(order), np.asarray(factors)
    assert len({tuple(o) for o in order}) > 1 and np.all((factors >= 0.6) & (factors <= 1.4))
    ours = np.asarray(aug.color_jitter(jnp.asarray(batch, jnp.float32), jnp.asarray(order), jnp.asarray(factors)))
    adjust = (tvf.adjust_brightness, tvf.adjust_contrast, tvf.adjust_saturation)
    for i, image in enumerate(batch):
        tensor = torch.from_numpy(image.copy()).permute(2, 0, 1).contiguous()
        for j in order[i]:
            tensor = adjust[j](tensor, float(factors[j, i]))
        np.testing.assert_array_equal(ours[i].astype(np.uint8), tensor.permute(1, 2, 0).numpy())
    assert ColorJitter(0.4, 0.4, 0.4).brightness == (0.6, 1.4)  # the range jitter_params draws from


@pytest.mark.slow
def test_random_erasing_draws_timms_boxes_with_its_probability():
    n, h, w = 4000, 40, 50
    boxes = np.asarray(aug.erasing_boxes(jax.random.key(0), n, h, w, 0.25))
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    erased = area > 0
    assert abs(erased.mean() - 0.25) < 0.03
    fraction = area[erased] / (h * w)
    assert fraction.min() >= 0.01 and fraction.max() <= 0.36  # 0.02 .. 1/3 before rounding to whole pixels
    assert np.all(boxes[erased, 0] >= 0) and np.all(boxes[erased, 2] <= h)
    assert np.all(boxes[erased, 1] >= 0) and np.all(boxes[erased, 3] <= w)
    aspect = (boxes[erased, 2] - boxes[erased, 0]) / (boxes[erased, 3] - boxes[erased, 1])
    assert aspect.min() > 0.2 and aspect.max() < 5 and np.median(aspect) == pytest.approx(1.0, abs=0.2)
    x = jnp.full((8, h, w, 3), 7.0)
    assert np.array_equal(np.asarray(aug.random_erasing(jax.random.key(1), x, 0.0)), np.asarray(x))
    erased_all = np.asarray(aug.random_erasing(jax.random.key(1), x, 1.0))
    changed = np.any(erased_all != 7.0, axis=-1)
    for i in range(8):  # one filled rectangle per image, noise of unit scale
        rows, cols = np.nonzero(changed[i])
        assert changed[i].sum() == (np.ptp(rows) + 1) * (np.ptp(cols) + 1)
        assert 0.5 < np.std(erased_all[i][changed[i]]) < 1.5


@pytest.mark.slow
def test_the_train_step_augments_and_evaluation_does_not():
    prep = Preprocessing(input_size=32)
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    batch = {"images": jnp.asarray(images)}
    plain = image_inputs(prep)
    policy = image_inputs(prep, Policy("trivialaugment", color_jitter=0.3, random_erasing=0.5))
    reference = np.asarray(plain(batch))
    np.testing.assert_array_equal(np.asarray(policy(batch)), reference)  # evaluation: no rng, no augmentation
    np.testing.assert_array_equal(np.asarray(plain(batch, jax.random.key(0))), reference)
    one, two = np.asarray(policy(batch, jax.random.key(0))), np.asarray(policy(batch, jax.random.key(1)))
    assert not np.array_equal(one, reference) and not np.array_equal(one, two)
    # jitted (fused, so rounded differently at a few pixels' truncations): the same draws
    assert np.mean(np.asarray(jax.jit(policy)(batch, jax.random.key(0))) != one) < 0.005


@pytest.mark.parametrize("key,value,allowed", [
    ("data.augment.policy", "autoaugment", "choose from none, randaugment, trivialaugment"),
    ("data.augment.magnitude", 31, "a magnitude bin from 0 to 30"),
    ("data.augment.num_ops", -1, "a number of operations"),
    ("data.augment.color_jitter", 1.5, "0 (off) or a strength up to 1"),
    ("data.augment.random_erasing", 1.2, "0 (off) or a probability"),
])
def test_bad_augmentation_values_are_errors_naming_the_key(key, value, allowed):
    config = base_config()
    config.data.path = "somewhere"
    section, name = key.rsplit(".", 1)
    config.data.augment[name] = value
    with pytest.raises(ConfigError, match=re.escape(allowed)) as error:
        check_values(config)
    assert key in str(error.value)


def test_randaugments_keys_and_policies_without_augmentation_are_refused():
    config = base_config()
    config.data.path = "somewhere"
    config.data.augment.policy, config.data.augment.magnitude = "trivialaugment", 12
    with pytest.raises(ConfigError, match="data.augment.magnitude.*RandAugment's"):
        check_values(config)
    config.data.augment.policy, config.data.augment.magnitude = "randaugment", 12
    check_values(config)
    config.data.augment.enabled = False
    with pytest.raises(ConfigError, match="data.augment.policy.*needs data.augment.enabled=True"):
        check_values(config)
