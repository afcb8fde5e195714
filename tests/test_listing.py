"""`data.source="manifest"`: a .csv or .jsonl listing of image paths, labels and splits reads the same images as
the folder it lists, and trains the same run; a bad row is one line naming the row and what to do."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxtl.core.errors import ConfigError, DataError
from jaxtl.data.folder import folder_dataset
from jaxtl.data.listing import listed_splits
from jaxtl.data.sources import DataSource
from jaxtl.train.run import train_and_evaluate
from tests.conftest import make_image_folder, tiny_config
from tests.helpers import cli, config_file, one_line_error


@pytest.fixture(scope="module")
def listed(tmp_path_factory):
    """A folder with train and val folders, and a CSV and a JSON-lines listing of its images in the folder
    dataset's order (paths relative to the listings' folder: the folder itself)."""
    root = make_image_folder(tmp_path_factory.mktemp("listing") / "data", per_class=8, splits=("train", "val"),
                             textured=True)
    folder = folder_dataset(root)
    rows = [(str(path.relative_to(root)), folder.class_names[label], split)
            for split, part in folder.splits.items() for path, label in zip(part.files, part.labels)]
    (root / "images.csv").write_text("path,label,split\n" + "".join(f"{p},{c},{s}\n" for p, c, s in rows))
    (root / "images.jsonl").write_text("".join(json.dumps({"path": p, "label": c, "split": s}) + "\n"
                                               for p, c, s in rows))
    return root, folder


@pytest.mark.parametrize("name", ["images.csv", "images.jsonl"])
def test_a_listing_gives_the_folders_dataset(listed, name):
    root, folder = listed
    listing = DataSource(source="manifest", path=str(root / name)).load()
    assert listing.class_names == folder.class_names and set(listing.splits) == {"train", "val"}
    for split, part in folder.splits.items():
        assert listing.splits[split].files == part.files
        np.testing.assert_array_equal(listing.splits[split].labels, part.labels)


@pytest.mark.slow
def test_a_manifest_run_equals_the_folder_run_on_the_same_images(listed, tmp_path):
    root, _ = listed
    runs = {}
    for name, overrides in (("folder", {}), ("manifest", {"data.source": "manifest",
                                                           "data.path": str(root / "images.csv")})):
        config = tiny_config(root, **overrides, **{"data.val_fraction": 0.2, "train.epochs": 1})  # val given
        runs[name] = train_and_evaluate(config, tmp_path / name)
    for key in ("splits", "classes", "steps", "best_val_accuracy", "final_val_accuracy"):
        assert runs["manifest"][key] == runs["folder"][key], key
    assert runs["manifest"]["final_val"]["loss"] == pytest.approx(runs["folder"]["final_val"]["loss"], rel=1e-6)
    recorded = json.loads((tmp_path / "manifest" / "plan.json").read_text())["data"]["manifest"]
    assert recorded["path"] == str(root / "images.csv") and len(recorded["sha256"]) == 64


def test_a_listing_without_splits_is_carved_and_relative_or_absolute_paths_both_read(listed, tmp_path):
    root, folder = listed
    files = [(path, folder.class_names[label]) for path, label in zip(folder.splits["train"].files,
                                                                     folder.splits["train"].labels)]
    listing = tmp_path / "train_only.csv"  # absolute paths, in another folder than the images
    listing.write_text("label,path\n" + "".join(f"{label},{path}\n" for path, label in files))
    dataset = DataSource(source="manifest", path=str(listing), val_fraction=0.25).load()
    assert dataset.carved == {"val": 0.25} and len(dataset.splits["val"]) == len(files) // 4
    assert sorted(dataset.splits["train"].files + dataset.splits["val"].files) == sorted(p for p, _ in files)


@pytest.mark.parametrize("rows,named", [
    ("path,label\nred/a.png,red\n", ["row 2", "does not exist"]),
    ("path,label\n{first},\n", ["row 2", "empty label"]),
    ("path,label,split\n{first},red,holdout\n", ["row 2", "split 'holdout'", "train, val or test"]),
    ("path,label\n{first},red\n{second},red\n{first},blue\n", ["row 4", "again (row 2 has it)"]),
    ("file,class\n{first},red\n", ["header", "path and", "label"]),
], ids=["missing file", "empty label", "unknown split", "duplicate", "header"])
def test_a_bad_row_is_an_error_naming_it(listed, tmp_path, rows, named):
    root, folder = listed
    first, second = (str(path.relative_to(root)) for path in folder.splits["train"].files[:2])
    listing = root / f"bad_{len(list(root.glob('bad_*')))}.csv"
    listing.write_text(rows.format(first=first, second=second))
    with pytest.raises(DataError) as error:
        DataSource(source="manifest", path=str(listing)).load()
    for part in named:
        assert part in str(error.value), (part, str(error.value))
    assert str(listing) in str(error.value) and "\n" not in str(error.value)


def test_a_fraction_for_a_split_the_listing_gives_is_never_read(listed, tmp_path):
    root, _ = listed
    assert listed_splits(root / "images.csv") == ("train", "val") == listed_splits(root / "images.jsonl")
    config = tiny_config(root, **{"data.source": "manifest", "data.path": str(root / "images.csv"),
                                  "data.val_fraction": 0.3})
    with pytest.raises(ConfigError, match="data.val_fraction=0.3: set, but .*images.csv lists that split"):
        train_and_evaluate(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_the_command_line_says_a_bad_listing_in_one_line(listed, tmp_path):
    root, _ = listed
    (tmp_path / "lines.jsonl").write_text('{"path": "red/a.png", "label": "red"}\nnot json\n')
    config = config_file(tmp_path, root, {"data.source": "manifest", "data.path": str(tmp_path / "lines.jsonl")})
    one_line_error(cli("train", "--config", config, "--workdir", tmp_path / "run"), "lines.jsonl", "line 2 is not JSON")
    assert not (tmp_path / "run" / "checkpoints").exists()
