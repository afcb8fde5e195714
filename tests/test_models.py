"""Model structure: named outputs, layer groups, the CPU depthwise conv, EfficientNet-Lite scaling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtl.models import efficientnet_lite
from jaxtl.models.common import DepthwiseConv, init_variables, same_padding
from jaxtl.models.registry import MODELS, TinyEfficientNetLite, TinyResNet, get_model_spec

TINY = {"resnet": TinyResNet, "efficientnet_lite": TinyEfficientNetLite}


@pytest.mark.parametrize("family", list(TINY))
def test_named_layers_from_one_pass(family):
    model = TINY[family](num_classes=5)
    x = jnp.ones((2, 64, 48, 3))
    variables = init_variables(model, jax.random.key(0), x.shape)
    assert set(variables["params"]) == set(model.layer_groups)
    out = jax.jit(lambda v, x: model.apply(v, x, layers=model.layer_names))(variables, x)
    # Output strides 4, 8, 16, 32 for stage1..4 in both families (stem: 4 for ResNet, 2 for EfficientNet).
    for i, stride in enumerate((4, 8, 16, 32), start=1):
        assert out[f"stage{i}"].shape[1:3] == (-(-64 // stride), -(-48 // stride)), (family, i)
    assert out["pre_logits"].shape == (2, model.num_features)
    assert out["logits"].shape == (2, 5)
    np.testing.assert_allclose(out["logits"], jax.jit(model.apply)(variables, x), rtol=1e-6)
    np.testing.assert_allclose(out["pre_logits"], out["stage4"].mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", list(TINY))
def test_head_on_several_layers_and_mlp_head(family):
    x = jnp.ones((2, 64, 48, 3))
    model = TINY[family](num_classes=3, head_layers=("stage2", "stage4"), head_hidden=6)
    variables = init_variables(model, jax.random.key(0), x.shape)
    out = jax.jit(lambda v, x: model.apply(v, x, layers=model.layer_names))(variables, x)
    for name, channels in model.layer_channels.items():
        assert out[name].shape[-1] == channels, name
    expected = jnp.concatenate([out["stage2"].mean(axis=(1, 2)), out["stage4"].mean(axis=(1, 2))], axis=-1)
    assert out["pre_logits"].shape == (2, model.num_features)
    np.testing.assert_allclose(out["pre_logits"], expected, rtol=1e-5, atol=1e-6)
    head = variables["params"]["head"]
    assert head["hidden"]["kernel"].shape == (model.num_features, 6) and head["fc"]["kernel"].shape == (6, 3)
    hidden = jax.nn.relu(expected @ head["hidden"]["kernel"] + head["hidden"]["bias"])
    np.testing.assert_allclose(out["logits"], hidden @ head["fc"]["kernel"] + head["fc"]["bias"], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match=r"head_layers \['stage9'\] must be"):
        TINY[family](head_layers=("stage9",)).init(jax.random.key(0), x)


def test_unknown_layer_is_an_error():
    model = TinyResNet()
    variables = init_variables(model, jax.random.key(0))
    with pytest.raises(ValueError, match=r"no layer\(s\) \['stage9'\]; choose from"):
        model.apply(variables, jnp.ones((1, 32, 32, 3)), layers=("stage9",))


def test_train_mode_updates_batch_stats_eval_does_not():
    model = TinyResNet(num_classes=3)
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3)) * 3 + 1
    variables = init_variables(model, jax.random.key(0), x.shape)
    _, updated = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
    before = variables["batch_stats"]["stem"]["bn"]["mean"]
    assert not np.allclose(updated["batch_stats"]["stem"]["bn"]["mean"], before)
    # momentum 0.9 == PyTorch's 0.1: new = 0.9 * old + 0.1 * batch mean
    conv = variables["params"]["stem"]["conv"]["kernel"]
    y = jax.lax.conv_general_dilated(x, conv, (2, 2), ((3, 3), (3, 3)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(updated["batch_stats"]["stem"]["bn"]["mean"], 0.1 * y.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kernel,stride,size", [(3, 1, (9, 7)), (3, 2, (9, 7)), (5, 2, (10, 13)), (5, 1, (6, 6))])
def test_depthwise_conv_matches_grouped_conv(kernel, stride, size):
    x = jax.random.normal(jax.random.key(0), (2, *size, 6))
    conv = DepthwiseConv(kernel, stride)
    variables = conv.init(jax.random.key(1), x)
    expected = jax.lax.conv_general_dilated(
        x, variables["params"]["kernel"], (stride, stride), "SAME",
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=6,
    )
    np.testing.assert_allclose(conv.apply(variables, x), expected, rtol=1e-5, atol=1e-5)


def test_same_padding_puts_the_odd_pixel_last():
    assert same_padding(224, 3, 2) == (0, 1)
    assert same_padding(28, 5, 2) == (1, 2)
    assert same_padding(7, 3, 1) == (1, 1)


@pytest.mark.parametrize("index", range(5))
def test_lite_variants_match_reference_shapes(index):
    from efficientnet_lite_pytorch import EfficientNet

    reference = EfficientNet.from_name(f"efficientnet-lite{index}", image_size=None)
    ref_shapes = sorted(tuple(p.shape) for p in reference.parameters())
    model = get_model_spec(f"efficientnet_lite{index}").build()
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))["params"]
    ours = jax.tree_util.tree_leaves(params)
    assert sum(np.prod(a.shape) for a in ours) == sum(int(np.prod(s)) for s in ref_shapes)
    assert len(ours) == len(ref_shapes)


def test_registry_knows_every_variant_and_rejects_others():
    assert {"resnet18", "resnet34", "resnet50", "resnet101", "resnet152"} <= set(MODELS)
    assert {f"efficientnet_lite{i}" for i in range(5)} <= set(MODELS)
    with pytest.raises(ValueError, match="unknown model 'resnet19'; available: resnet18"):
        get_model_spec("resnet19")


def test_round_filters_matches_reference():
    from efficientnet_lite_pytorch.utils import get_model_params, round_filters

    for index in range(5):
        _, params = get_model_params(f"efficientnet-lite{index}", None)
        for filters in (16, 24, 40, 80, 112, 192, 320):
            assert efficientnet_lite.round_filters(filters, params.width_coefficient) == round_filters(filters, params)

