"""Weight files: download into the cache with hash check, offline errors, safetensors, id resolution."""

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import jaxtl
from jaxtl.core.errors import ConfigError, MissingFileError
from jaxtl.models.registry import WEIGHTS, PretrainedWeights
from jaxtl.weights.convert import WeightsMismatchError
from jaxtl.weights.create import resolve_weights
from jaxtl.weights.files import (WeightsUnavailableError, _check_recorded, download, read_state_dict, recorded_sha256,
                                 sha256_file, weights_file)
from jaxtl.weights.torch_file import WeightsFileError


def _entry(url, sha256):
    return PretrainedWeights(id="resnet18.test", model="resnet18", sha256=sha256,
                             preprocessing=WEIGHTS["resnet18.tv_in1k"].preprocessing, url=url)


def test_download_verifies_hash_then_caches(tmp_path, monkeypatch):
    source = tmp_path / "remote" / "w-abc.pth"
    source.parent.mkdir()
    torch.save({"w": torch.ones(3)}, source)
    monkeypatch.setenv("JAXTL_CACHE_DIR", str(tmp_path / "cache"))
    entry = _entry(source.as_uri(), sha256_file(source)[:8])
    path = weights_file(entry)
    assert path == tmp_path / "cache" / "weights" / "w-abc.pth"
    assert path.read_bytes() == source.read_bytes()
    source.unlink()  # cached: no second download
    assert weights_file(entry) == path


def test_hash_mismatch_leaves_nothing_behind(tmp_path):
    source = tmp_path / "w.pth"
    source.write_bytes(b"tampered")
    target = tmp_path / "cache" / "w.pth"
    with pytest.raises(WeightsFileError, match="does not match"):
        download(source.as_uri(), target, "0000")
    assert list(target.parent.iterdir()) == []


def test_offline_download_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXTL_CACHE_DIR", str(tmp_path))
    entry = _entry("http://127.0.0.1:9/resnet18-f37072fd.pth", "f37072fd")
    with pytest.raises(WeightsUnavailableError) as info:
        weights_file(entry)
    assert str(tmp_path / "weights" / "resnet18-f37072fd.pth") in str(info.value)
    assert list((tmp_path / "weights").iterdir()) == []


def test_safetensors_and_pth_read_the_same(tmp_path):
    state = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float32)}
    save_file(state, tmp_path / "w.safetensors")
    torch.save({k: torch.from_numpy(v) for k, v in state.items()}, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        loaded = read_state_dict(tmp_path / name)
        for key, value in state.items():
            np.testing.assert_array_equal(loaded[key], value)


def test_unknown_format_and_missing_file(tmp_path):
    (tmp_path / "w.h5").write_bytes(b"x")
    with pytest.raises(WeightsFileError, match="unknown weights format '.h5'"):
        read_state_dict(tmp_path / "w.h5")
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        read_state_dict(tmp_path / "nope.pth")


def test_weights_resolution_errors():
    with pytest.raises(ConfigError, match="are for model 'resnet50', not 'resnet18'"):
        resolve_weights("resnet18", "resnet50.tv2_in1k")
    with pytest.raises(MissingFileError, match="'resnet18.nonsense' is neither a registered weights id"):
        resolve_weights("resnet18", "resnet18.nonsense")
    assert resolve_weights("efficientnet_lite0", "default").name == "efficientnet_lite0.in1k"


def test_every_registered_weight_fits_its_model_and_has_a_hash():
    for entry in WEIGHTS.values():
        assert entry.model in jaxtl.MODELS
        if entry.sha256 is None:  # hub files whose hash could not be read offline: recorded at first download
            assert entry.hub and entry.url.startswith(f"https://huggingface.co/{entry.hub}/")
        else:
            assert len(entry.sha256) in (8, 64) and int(entry.sha256, 16) >= 0
        assert entry.url or entry.pip_package
    files = [entry.filename for entry in WEIGHTS.values() if not entry.pip_package]
    assert len(files) == len(set(files)), "two entries would share a cache file"


def test_unregistered_hash_is_recorded_at_download_and_checked_after(tmp_path, monkeypatch):
    source = tmp_path / "remote" / "model.safetensors"
    source.parent.mkdir()
    save_file({"w": np.ones(3, np.float32)}, source)
    monkeypatch.setenv("JAXTL_CACHE_DIR", str(tmp_path / "cache"))
    entry = PretrainedWeights(id="vit_s16.test", model="vit_s16", sha256=None, hub="timm/x",
                              preprocessing=WEIGHTS["vit_s16.augreg_in21k_ft_in1k"].preprocessing, url=source.as_uri())
    path = weights_file(entry)
    assert path.name == "vit_s16.test.safetensors" and recorded_sha256(entry) == sha256_file(source)
    path.write_bytes(path.read_bytes()[:-1] + b"!")  # altered after the download
    _check_recorded.cache_clear()
    with pytest.raises(WeightsFileError, match="no longer the .* recorded when it was downloaded"):
        weights_file(entry)


def test_npz_reads_without_pickle(tmp_path):
    np.savez(tmp_path / "w.npz", **{"embedding/kernel": np.ones((2, 2), np.float32)})
    assert read_state_dict(tmp_path / "w.npz")["embedding/kernel"].shape == (2, 2)
    np.savez(tmp_path / "objects.npz", evil=np.array([{"a": 1}], dtype=object))  # pickled inside
    with pytest.raises(WeightsFileError, match="objects.npz: unreadable .npz file .*allow_pickle=False"):
        read_state_dict(tmp_path / "objects.npz")
    (tmp_path / "cut.npz").write_bytes(b"PK not a zip")
    with pytest.raises(WeightsFileError, match="cut.npz: unreadable .npz file"):
        read_state_dict(tmp_path / "cut.npz")


def test_pip_packaged_weights_match_their_hash():
    entry = WEIGHTS["efficientnet_lite0.in1k"]
    assert sha256_file(weights_file(entry)) == entry.sha256


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_weights_with_non_finite_values_are_an_error_naming_the_tensor(tmp_path, bad):
    import torchvision

    state = {k: v.numpy() for k, v in torchvision.models.resnet18(num_classes=10).state_dict().items()}
    state["layer2.0.conv1.weight"][0, 0, 0, 0] = bad
    path = tmp_path / "diverged.safetensors"
    save_file(state, str(path))
    with pytest.raises(WeightsMismatchError, match=r"diverged.safetensors: tensor\(s\) layer2.0.conv1.weight hold NaN "
                                                   r"or Inf values"):
        jaxtl.create_model("resnet18", path, 10)
