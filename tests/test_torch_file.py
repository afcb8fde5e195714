"""The torch-free .pth reader against torch.load, and its refusals."""

import os
import pickle

import numpy as np
import pytest
import torch

from jaxtl.weights.torch_file import UnsafeWeightsFileError, WeightsFileError, load_torch_file


def _state():
    torch.manual_seed(0)
    return {
        "conv.weight": torch.randn(4, 3, 3, 3),
        "transposed": torch.arange(12.0).reshape(3, 4).t(),  # non-contiguous
        "sliced": torch.arange(10.0)[3:7],  # storage offset
        "half": torch.randn(5).half(),
        "bf16": torch.randn(5).bfloat16(),
        "steps": torch.tensor(7),  # 0-d long, like num_batches_tracked
        "param": torch.nn.Parameter(torch.ones(2)),
    }


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_matches_torch_load(tmp_path, zip_format):
    state = _state()
    path = tmp_path / "w.pth"
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    loaded = load_torch_file(path)
    assert set(loaded) == set(state)
    for name, tensor in state.items():
        expected = tensor.detach().float().numpy() if tensor.dtype == torch.bfloat16 else tensor.detach().numpy()
        np.testing.assert_array_equal(loaded[name].astype(expected.dtype), expected, err_msg=name)
        assert loaded[name].shape == tuple(tensor.shape)


def test_unwraps_checkpoint_dicts_and_data_parallel_prefix(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {"module.fc.weight": torch.ones(2, 3)}, "epoch": 3}, path)
    assert list(load_torch_file(path)) == ["fc.weight"]


class _RunsShell:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_refuses_pickle_that_calls_os_system(tmp_path, zip_format):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.ones(2), "payload": _RunsShell(marker)}, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(UnsafeWeightsFileError, match=r"system"):
        load_torch_file(path)
    assert not marker.exists()


def test_refuses_plain_pickle_of_arbitrary_object(tmp_path):
    path = tmp_path / "plain.pth"
    path.write_bytes(pickle.dumps({"x": _RunsShell(tmp_path / "pwned")}))
    with pytest.raises(WeightsFileError):  # not a torch file at all; nothing executed either way
        load_torch_file(path)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_truncated_file_is_a_clear_error(tmp_path, zip_format):
    path = tmp_path / "w.pth"
    torch.save({"w": torch.randn(1000)}, path, _use_new_zipfile_serialization=zip_format)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsFileError, match=str(path)):
        load_torch_file(path)


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.ones(1)], path)
    with pytest.raises(WeightsFileError, match="expected a state dict"):
        load_torch_file(path)


def test_a_member_that_inflates_beyond_its_tensor_is_refused_before_inflating(tmp_path, monkeypatch):
    """A zip bomb: a storage member that claims a few floats but inflates to 64 MB (deflated to a few KB). It is
    refused from the archive's directory alone, before anything is inflated."""
    import zipfile

    path = tmp_path / "w.pth"
    torch.save({"w": torch.ones(4)}, path)
    bomb = tmp_path / "bomb.pth"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as out:
        for info in src.infolist():
            data = src.read(info)
            if "/data/" in info.filename:
                data = bytes(64 << 20)  # 64 MB of zeros for a 16-byte storage
            out.writestr(info.filename, data)
    assert bomb.stat().st_size < 1 << 20
    inflated = []
    real_read = zipfile.ZipFile.read
    monkeypatch.setattr(zipfile.ZipFile, "read", lambda self, name, *a: inflated.append(name) or real_read(self, name, *a))
    with pytest.raises(WeightsFileError, match=r"would inflate to 67,108,864 bytes, but its tensor storage holds 16"):
        load_torch_file(bomb)
    assert not [name for name in inflated if "/data/" in name]
