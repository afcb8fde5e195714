"""Backbones and the classifier: named features, groups, the composed head, BatchNorm modes, the CPU depthwise
conv, 1x1 conv and max pool with their gradients, EfficientNet-Lite scaling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtl.core.errors import ConfigError
from jaxtl.models.classifier import Classifier, init_variables
from jaxtl.models.layers import DepthwiseConv, PointwiseConv, make_divisible, max_pool, same_padding
from jaxtl.models.registry import MODELS, WEIGHTS, build_backbone, get_model_spec
from tests.conftest import TinyEfficientNetLite, TinyMobileNetV2, TinyResNet, TinyVGG, TinyViT

TINY = {"resnet": TinyResNet, "efficientnet_lite": TinyEfficientNetLite, "vgg": TinyVGG,
        "mobilenet_v2": TinyMobileNetV2, "vit": TinyViT}
# Output stride of each feature map: the CNNs' stages end at 4, 8, 16, 32 (VGG's five at 2..32); a ViT's every
# group is a map of its patch grid.
STRIDES = {"resnet": {"stem": 4, "stage1": 4, "stage2": 8, "stage3": 16, "stage4": 32},
           "efficientnet_lite": {"stem": 2, "stage1": 4, "stage2": 8, "stage3": 16, "stage4": 32},
           "mobilenet_v2": {"stem": 2, "stage1": 4, "stage2": 8, "stage3": 16, "stage4": 32},
           "vgg": {"stage1": 2, "stage2": 4, "stage3": 8, "stage4": 16, "stage5": 32},
           "vit": {name: 8 for name in ("stem", "stage1", "stage2", "stage3", "stage4")}}


@pytest.mark.parametrize("family", list(TINY))
@pytest.mark.slow
def test_backbone_returns_every_named_feature_of_one_pass(family):
    backbone = TINY[family]()
    x = jnp.ones((2, 64, 48, 3))
    variables = init_variables(backbone, jax.random.key(0), x.shape)
    assert set(variables["params"]) == set(backbone.groups)
    out = jax.jit(backbone.apply)(variables, x)
    assert set(out) == set(backbone.features) and backbone.features[-1] == "pre_logits"
    size = (lambda n, s: n // s) if family in ("vgg", "vit") else (lambda n, s: -(-n // s))  # max-pool floors
    for name, stride in STRIDES[family].items():
        assert out[name].shape[1:3] == (size(64, stride), size(48, stride)), (family, name)
    for name, channels in backbone.feature_channels.items():
        assert out[name].shape[-1] == channels, name
    assert out["pre_logits"].shape == (2, backbone.feature_channels["pre_logits"])
    if family in ("resnet", "efficientnet_lite", "mobilenet_v2"):
        np.testing.assert_allclose(out["pre_logits"], out["stage4"].mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_vit_pre_logits_is_the_normalised_class_token_or_the_mean_of_patch_tokens():
    x = jax.random.normal(jax.random.key(1), (2, 32, 40, 3))
    token = TinyViT()
    variables = init_variables(token, jax.random.key(0), x.shape)
    out = jax.jit(token.apply)(variables, x)
    assert out["stage4"].shape == (2, 4, 5, 16)  # the class token is not part of the maps
    gap = TinyViT(class_token=False, pool="gap")
    gap_variables = init_variables(gap, jax.random.key(0), x.shape)
    assert "cls" not in gap_variables["params"]["stem"]
    gap_out = jax.jit(gap.apply)(gap_variables, x)
    np.testing.assert_allclose(gap_out["pre_logits"], gap_out["stage4"].mean(axis=(1, 2)), rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="multiples of the patch size 8"):
        token.apply(variables, jnp.ones((1, 30, 32, 3)))


@pytest.mark.parametrize("family", list(TINY))
@pytest.mark.slow
def test_classifier_composes_backbone_and_head_over_chosen_layers(family):
    x = jnp.ones((2, 64, 48, 3))
    backbone = TINY[family]()
    model = Classifier(backbone, num_classes=3, head_layers=("stage2", "pre_logits"), head_hidden=6)
    variables = init_variables(model, jax.random.key(0), x.shape)
    assert set(variables["params"]) == {"backbone", "head"}
    logits, out = jax.jit(model.apply)(variables, x)
    # the backbone inside the classifier is the backbone alone, with the same parameters
    alone = jax.jit(backbone.apply)({"params": variables["params"]["backbone"],
                                     "batch_stats": variables.get("batch_stats", {}).get("backbone", {})}, x)
    np.testing.assert_allclose(out["stage2"], alone["stage2"], rtol=1e-6)
    expected = jnp.concatenate([out["stage2"].mean(axis=(1, 2)), out["pre_logits"]], axis=-1)
    assert expected.shape == (2, model.head_features)
    head = variables["params"]["head"]
    assert head["hidden"]["kernel"].shape == (model.head_features, 6) and head["fc"]["kernel"].shape == (6, 3)
    hidden = jax.nn.relu(expected @ head["hidden"]["kernel"] + head["hidden"]["bias"])
    np.testing.assert_allclose(logits, hidden @ head["fc"]["kernel"] + head["fc"]["bias"], rtol=1e-4, atol=1e-5)
    # the head alone on precomputed features gives the same logits
    from_features, _ = model.apply(variables, expected, method="classify_features")
    np.testing.assert_allclose(from_features, logits, rtol=1e-5, atol=1e-6)


def test_unknown_head_layer_is_an_error_naming_the_features():
    with pytest.raises(ConfigError, match=r"head_layers=\['stage9'\]: choose one or more distinct features of "
                                          r"ResNet: stem, stage1, .*pre_logits"):
        init_variables(Classifier(TinyResNet(), 2, head_layers=("stage9",)), jax.random.key(0))


def test_train_mode_updates_batch_stats_eval_does_not():
    backbone = TinyResNet()
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3)) * 3 + 1
    variables = init_variables(backbone, jax.random.key(0), x.shape)
    _, updated = jax.jit(lambda v, x: backbone.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
    before = variables["batch_stats"]["stem"]["bn"]["mean"]
    assert not np.allclose(updated["batch_stats"]["stem"]["bn"]["mean"], before)
    # momentum 0.9 == PyTorch's 0.1: new = 0.9 * old + 0.1 * batch mean
    conv = variables["params"]["stem"]["conv"]["kernel"]
    y = jax.lax.conv_general_dilated(x, conv, (2, 2), ((3, 3), (3, 3)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(updated["batch_stats"]["stem"]["bn"]["mean"], 0.1 * y.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)
    _, same = jax.jit(lambda v, x: backbone.apply(v, x, train=False, mutable=["batch_stats"]))(variables, x)
    np.testing.assert_array_equal(same["batch_stats"]["stem"]["bn"]["mean"], before)


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


@pytest.mark.parametrize("kernel,stride,size,padding", [
    (3, 1, (9, 7), "SAME"), (3, 2, (9, 7), "SAME"), (5, 2, (10, 13), "SAME"), (5, 1, (6, 6), "SYMMETRIC"),
    (3, 2, (8, 11), "SYMMETRIC"),
])
@pytest.mark.slow
def test_depthwise_conv_gradients_match_grouped_conv(kernel, stride, size, padding):
    # the CPU form has its own VJP (input gradient by interior padding, kernel gradient folded in halves): both
    # gradients against XLA's grouped convolution's, odd and even sizes, both paddings
    x = jax.random.normal(jax.random.key(0), (3, *size, 5))
    conv = DepthwiseConv(kernel, stride, padding)
    w = conv.init(jax.random.key(1), x)["params"]["kernel"]
    pads = "SAME" if padding == "SAME" else [((kernel - 1) // 2,) * 2] * 2

    def grouped(x, w):
        return jax.lax.conv_general_dilated(x, w, (stride, stride), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                            feature_group_count=5)

    out, vjp = jax.vjp(lambda x, w: conv.apply({"params": {"kernel": w}}, x), x, w)
    expected_out, expected_vjp = jax.vjp(grouped, x, w)
    g = jax.random.normal(jax.random.key(2), out.shape)
    np.testing.assert_allclose(out, expected_out, rtol=1e-5, atol=1e-5)
    for ours, theirs in zip(vjp(g), expected_vjp(g)):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=2e-5)
    # a non-finite incoming gradient stays non-finite
    assert not np.isfinite(vjp(g.at[0, 0, 0, 0].set(jnp.inf))[1]).all()


@pytest.mark.parametrize("window,stride,pad", [(3, 2, 1), (2, 2, 0), (3, 1, 1), (3, 2, 0)])
def test_max_pool_gradient_matches_reduce_window(window, stride, pad):
    # ties (a ReLU's zeros, copied maxima) go to the first maximum in the window, as XLA's select-and-scatter does
    x = jax.nn.relu(jax.random.normal(jax.random.key(0), (2, 9, 11, 3)))
    x = x.at[0, 2, 2, 0].set(x[0, 2, 3, 0])

    def reference(x):
        padding = ((0, 0), (pad, pad), (pad, pad), (0, 0))
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, window, window, 1), (1, stride, stride, 1),
                                     padding)

    out, vjp = jax.vjp(lambda x: max_pool(x, window, stride, pad), x)
    expected_out, expected_vjp = jax.vjp(reference, x)
    np.testing.assert_array_equal(out, expected_out)
    g = jax.random.normal(jax.random.key(1), out.shape)
    np.testing.assert_allclose(vjp(g)[0], expected_vjp(g)[0], rtol=1e-6, atol=1e-6)
    # what the backward pass keeps: one int8 window offset per output value, not the input
    saved = jax.linearize(lambda x: max_pool(x, window, stride, pad), x)[1]
    leaves = [leaf for leaf in jax.tree_util.tree_leaves(saved) if hasattr(leaf, "dtype")]
    assert any(leaf.dtype == jnp.int8 and leaf.shape == out.shape for leaf in leaves)


def test_pointwise_conv_matches_1x1_conv_with_gradients():
    x = jax.random.normal(jax.random.key(0), (2, 7, 6, 5))
    conv = PointwiseConv(4, stride=2)
    w = conv.init(jax.random.key(1), x)["params"]["kernel"]

    def reference(x, w):
        return jax.lax.conv_general_dilated(x, w, (2, 2), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    out, vjp = jax.vjp(lambda x, w: conv.apply({"params": {"kernel": w}}, x), x, w)
    expected_out, expected_vjp = jax.vjp(reference, x, w)
    np.testing.assert_allclose(out, expected_out, rtol=1e-5, atol=1e-5)
    g = jax.random.normal(jax.random.key(2), out.shape)
    for ours, theirs in zip(vjp(g), expected_vjp(g)):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_same_padding_puts_the_odd_pixel_last():
    assert same_padding(224, 3, 2) == (0, 1)
    assert same_padding(28, 5, 2) == (1, 2)
    assert same_padding(7, 3, 1) == (1, 1)


@pytest.mark.parametrize("index", range(5))
def test_lite_variants_match_reference_shapes(index):
    from efficientnet_lite_pytorch import EfficientNet

    reference = EfficientNet.from_name(f"efficientnet-lite{index}", image_size=None)
    ref_shapes = sorted(tuple(p.shape) for name, p in reference.named_parameters() if not name.startswith("_fc"))
    backbone = get_model_spec(f"efficientnet_lite{index}").build()
    params = jax.eval_shape(lambda: backbone.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3))))["params"]
    ours = jax.tree_util.tree_leaves(params)
    assert sum(np.prod(a.shape) for a in ours) == sum(int(np.prod(s)) for s in ref_shapes)
    assert len(ours) == len(ref_shapes)
    assert backbone.feature_channels["pre_logits"] == reference._fc.in_features


def test_registry_knows_every_variant_and_rejects_others():
    assert {"resnet18", "resnet34", "resnet50", "resnet101", "resnet152"} <= set(MODELS)
    assert {f"efficientnet_lite{i}" for i in range(5)} <= set(MODELS)
    assert {f"vgg{d}{bn}" for d in (11, 13, 16, 19) for bn in ("", "_bn")} <= set(MODELS)
    assert {"mobilenet_v2", "vit_ti16", "vit_s16", "vit_b16", "vit_b32"} <= set(MODELS)
    for spec in MODELS.values():
        backbone = spec.build()
        assert backbone.features[-1] == "pre_logits" and set(backbone.feature_channels) == set(backbone.features)
        if spec.default_weights in WEIGHTS:
            assert WEIGHTS[spec.default_weights].model == spec.name
    with pytest.raises(ConfigError, match="unknown model 'resnet19'; available: resnet18"):
        get_model_spec("resnet19")
    with pytest.raises(ConfigError, match=r"model.kwargs \['widht'\]: resnet18 does not take it; its build arguments are width"):
        build_backbone("resnet18", widht=8)


def test_channel_rounding_matches_both_references():
    """One rounding helper for both inverted-residual families: TF EfficientNet's `round_filters` and torchvision's
    `_make_divisible`."""
    from efficientnet_lite_pytorch.utils import get_model_params, round_filters
    from torchvision.models._utils import _make_divisible

    for index in range(5):
        _, params = get_model_params(f"efficientnet-lite{index}", None)
        for filters in (16, 24, 40, 80, 112, 192, 320):
            assert make_divisible(filters * params.width_coefficient) == round_filters(filters, params)
    for width in (0.25, 0.35, 0.5, 0.75, 1.0, 1.3):
        for channels in (16, 24, 32, 64, 96, 160, 320, 1280):
            assert make_divisible(channels * width) == _make_divisible(channels * width, 8)
