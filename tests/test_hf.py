"""Hugging Face datasets as a source (`data.source="hf"`): a dataset the tests save to disk gives the folder
dataset of the same images (classes from its ClassLabel, splits as it names them, the missing ones carved); a run
on it equals the folder run; a wrong column or name is one line naming the key."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxtl.core.errors import ConfigError, DataError
from jaxtl.data.folder import folder_dataset
from jaxtl.data.sources import DataSource
from jaxtl.train.run import train_and_evaluate
from tests.conftest import make_image_folder, tiny_config
from tests.helpers import cli, config_file, one_line_error

datasets = pytest.importorskip("datasets")


def _save(folder, path, splits: dict[str, str], label_names: bool = True) -> None:
    """`folder`'s splits (jaxtl name -> the dataset's name), rows in the folder dataset's order, images as their
    encoded bytes, labels as a ClassLabel (or as the class names themselves)."""
    label = (datasets.ClassLabel(names=list(folder.class_names)) if label_names else datasets.Value("string"))
    features = datasets.Features({"image": datasets.Image(), "label": label})
    parts = {}
    for ours, theirs in splits.items():
        split = folder.splits[ours]
        labels = split.labels.tolist() if label_names else [folder.class_names[i] for i in split.labels]
        parts[theirs] = datasets.Dataset.from_dict(
            {"image": [{"bytes": p.read_bytes(), "path": None} for p in split.files], "label": labels},
            features=features)
    datasets.DatasetDict(parts).save_to_disk(str(path))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = make_image_folder(tmp_path_factory.mktemp("hf") / "data", per_class=8, splits=("train", "val"),
                             textured=True)
    folder = folder_dataset(root)
    _save(folder, root.parent / "saved", {"train": "train", "val": "validation"})
    return root, folder, root.parent / "saved"


def test_a_saved_dataset_gives_the_folders_images_labels_and_classes(saved, tmp_path):
    root, folder, path = saved
    dataset = DataSource(source="hf", name=str(path)).load()
    assert dataset.class_names == folder.class_names and set(dataset.splits) == {"train", "val"}
    for split, part in folder.splits.items():
        np.testing.assert_array_equal(dataset.splits[split].labels, part.labels)
        for i in (0, len(part) - 1):  # the same pixels, decoded here as the folder's are
            np.testing.assert_array_equal(np.asarray(dataset.splits[split].load(i)), np.asarray(part.load(i)))
            assert dataset.splits[split].content_sha256(i) == part.content_sha256(i)
    # string labels and no val split: classes sorted, val carved from train (seeded, stratified)
    _save(folder, tmp_path / "strings", {"train": "train"}, label_names=False)
    carved = DataSource(source="hf", name=str(tmp_path / "strings"), val_fraction=0.25).load()
    assert carved.class_names == tuple(sorted(folder.class_names)) and carved.carved == {"val": 0.25}
    assert len(carved.splits["val"]) == len(folder.splits["train"]) // 4
    assert np.bincount(carved.splits["val"].labels).tolist() == [len(folder.splits["train"]) // 4 //
                                                                 folder.num_classes] * folder.num_classes


@pytest.mark.slow
def test_an_hf_run_equals_the_folder_run_on_the_same_images(saved, tmp_path):
    root, _, path = saved
    runs = {}
    for name, overrides in (("folder", {}), ("hf", {"data.source": "hf", "data.name": str(path)})):
        config = tiny_config(root, **overrides, **{"data.val_fraction": 0.2, "train.epochs": 1})  # val given
        runs[name] = train_and_evaluate(config, tmp_path / name)
    for key in ("splits", "classes", "steps", "best_val_accuracy", "final_val_accuracy"):
        assert runs["hf"][key] == runs["folder"][key], key
    assert runs["hf"]["final_val"]["loss"] == pytest.approx(runs["folder"]["final_val"]["loss"], rel=1e-6)
    fingerprints = {name: json.loads((tmp_path / name / "plan.json").read_text())["data"] for name in runs}
    assert fingerprints["hf"]["splits"] == fingerprints["folder"]["splits"]  # same images and labels, same sha256


def test_a_missing_column_or_dataset_is_one_line_naming_the_key(saved, tmp_path):
    root, _, path = saved
    with pytest.raises(ConfigError, match="data.hf_label_column='class' is not a column"):
        DataSource(source="hf", name=str(path), hf_label_column="class").load()
    with pytest.raises(DataError, match="no train split"):
        datasets.DatasetDict({"test": datasets.Dataset.from_dict({"image": [b""], "label": [0]})}).save_to_disk(
            str(tmp_path / "no_train"))
        DataSource(source="hf", name=str(tmp_path / "no_train")).load()
    config = config_file(tmp_path, root, {"data.source": "hf"})  # no data.name
    one_line_error(cli("train", "--config", config, "--workdir", tmp_path / "run"), "data.name", "save_to_disk")
    config = config_file(tmp_path, root, {"data.source": "hf", "data.name": str(path), "data.val_fraction": 0.3},
                         name="fraction.py")  # the saved dataset has its own validation split
    one_line_error(cli("train", "--config", config, "--workdir", tmp_path / "run2"), "data.val_fraction=0.3",
                   f"{path} has that split", "never read")
