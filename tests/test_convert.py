"""Parity: reference PyTorch models, saved as .pth and loaded through create_model, give the same logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torchvision

import jaxtl
from jaxtl.errors import ConfigError
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


REFERENCES = {
    **{name: (lambda name=name: getattr(torchvision.models, name)()) for name in RESNETS},
    "efficientnet_lite0": _lite_reference,
}


def _saved_reference(name, tmp_path, build=None, seed=0):
    torch.manual_seed(seed)
    reference = calibrate_batchnorm((build or REFERENCES[name])())
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
    assert expected.std(axis=0).mean() > 1e-2, "reference output does not depend on the input; test is vacuous"
    return np.abs(actual - expected).max()


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50", "efficientnet_lite0"])
def test_float32_logits_match_reference(name, tmp_path):
    reference, path = _saved_reference(name, tmp_path)
    model, variables = jaxtl.create_model(name, weights=path)
    for h, w in SIZES:
        assert _compare(reference, model, variables, h, w) < 1e-4, (name, h, w)


@pytest.mark.parametrize("name", RESNETS + ["efficientnet_lite0"])
def test_float64_logits_match_reference(name, tmp_path):
    """Every depth, with rounding taken out: torch's own float32 output differs from its float64 by ~1e-3 on a
    random ResNet-152 (chaotic depth amplifies rounding), so float32 cannot separate conversion from noise."""
    reference, path = _saved_reference(name, tmp_path)
    with jax.enable_x64(True):
        model, variables = jaxtl.create_model(name, weights=path, dtype=jnp.float64)
        variables = jax.tree_util.tree_map(lambda a: a.astype(jnp.float64), variables)
        for h, w in SIZES:
            assert _compare(reference, model, variables, h, w, float64=True) < 1e-8, (name, h, w)


def test_timm_efficientnet_lite_layout(tmp_path):
    reference, path = _saved_reference("efficientnet_lite0", tmp_path, build=_timm_lite_reference)
    model, variables = jaxtl.create_model("efficientnet_lite0", weights=path)
    for h, w in SIZES:
        assert _compare(reference, model, variables, h, w) < 1e-4, (h, w)


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
