"""Config files and --config.KEY=VALUE overrides: misspellings and wrong types are errors naming the key."""

import ast

import pytest

from jaxtl.config import apply_overrides, base_config, load_config
from tests.conftest import REPO


def test_every_config_file_loads_with_known_keys():
    files = sorted((REPO / "configs").glob("*.py"))
    assert files
    for path in files:
        config = load_config(path)
        assert config.model.name and (config.data.path or config.data.name), path
        docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
        assert f"run.py train --config configs/{path.name}" in docstring, f"{path.name}: docstring lacks its command"


def test_overrides_apply_and_parse_literals():
    config = apply_overrides(base_config(), ["train.epochs=3", "optimizer.lr=1e-3", "transfer.strategy=linear_probe",
                                             "data.augment.crop_scale=(0.5, 1.0)", "model.kwargs.width=8"])
    assert config.train.epochs == 3 and config.optimizer.lr == 1e-3
    assert config.transfer.strategy == "linear_probe" and config.data.augment.crop_scale == (0.5, 1.0)
    assert config.model.kwargs.width == 8


@pytest.mark.parametrize("override,match", [
    ("train.epoch=3", r"unknown config key 'train.epoch'; did you mean 'train.epochs'"),
    ("trian.epochs=3", r"unknown config key 'trian'"),
    ("train.epochs", "must be KEY=VALUE"),
    ("train.epochs=three", "train.epochs"),
])
def test_bad_overrides_name_the_key(override, match):
    with pytest.raises((KeyError, ValueError), match=match):
        apply_overrides(base_config(), [override])


def test_misspelled_key_in_a_file(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text("from jaxtl.config import base_config\n"
                    "def get_config():\n    c = base_config()\n    c.optimizer.learning_rate = 0.1\n    return c\n")
    with pytest.raises(KeyError, match=r"bad.py: unknown config key 'optimizer.learning_rate'"):
        load_config(path)
