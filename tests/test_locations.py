"""The path layer (`jaxtl.core.locations`): a folder or a manifest at a URL (here fsspec's in-memory file system,
standing for a bucket) reads the same dataset, and trains the same run, as the local folder it was copied from; a
scheme whose package is missing is one error naming the package."""

from __future__ import annotations

import json

import fsspec
import numpy as np
import pytest

from jaxtl.core import locations
from jaxtl.core.errors import ConfigError, DataError
from jaxtl.data.folder import folder_dataset
from jaxtl.data.sources import DataSource
from tests.conftest import make_image_folder, tiny_config


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    """A local folder with train and val folders, its copy in `memory://bucket/data`, and a CSV listing beside
    the copy (paths relative to it)."""
    root = make_image_folder(tmp_path_factory.mktemp("local") / "data", per_class=6, splits=("train", "val"),
                             textured=True)
    memory = fsspec.filesystem("memory")
    for path in sorted(root.rglob("*.png")):
        memory.pipe_file(f"/bucket/data/{path.relative_to(root).as_posix()}", path.read_bytes())
    local = folder_dataset(root)
    rows = "".join(f"{path.relative_to(root).as_posix()},{local.class_names[label]},{split}\n"
                   for split, part in local.splits.items() for path, label in zip(part.files, part.labels))
    memory.pipe_file("/bucket/data/images.csv", ("path,label,split\n" + rows).encode())
    yield root, local
    memory.rm("/bucket", recursive=True)


def test_a_folder_and_a_manifest_at_a_url_read_the_local_folders_dataset(bucket):
    root, local = bucket
    for source in (DataSource(path="memory://bucket/data"),
                   DataSource(source="manifest", path="memory://bucket/data/images.csv")):
        remote = source.load()
        assert remote.class_names == local.class_names and set(remote.splits) == set(local.splits)
        for split, part in local.splits.items():
            names = [str(p).split("/bucket/data/", 1)[1] for p in remote.splits[split].files]
            assert names == [p.relative_to(root).as_posix() for p in part.files]
            assert all(locations.is_url(p) for p in remote.splits[split].files)
            np.testing.assert_array_equal(remote.splits[split].labels, part.labels)
            assert remote.splits[split].load(0).tobytes() == part.load(0).tobytes()
    assert source.split_folders() == {"train": "memory://bucket/data/images.csv",
                                      "val": "memory://bucket/data/images.csv"}


def test_a_run_on_data_at_a_url_equals_the_run_on_the_local_copy(bucket, tmp_path):
    from jaxtl.train.run import train_and_evaluate

    root, _ = bucket
    runs = {name: train_and_evaluate(tiny_config(path, **{"data.val_fraction": 0.2, "train.epochs": 1}),
                                     tmp_path / name)
            for name, path in (("local", root), ("url", "memory://bucket/data"))}
    for key in ("splits", "classes", "steps", "best_val_accuracy"):
        assert runs["url"][key] == runs["local"][key], key
    assert runs["url"]["final_val"]["loss"] == pytest.approx(runs["local"]["final_val"]["loss"], rel=1e-6)
    recorded = {name: json.loads((tmp_path / name / "plan.json").read_text())["data"] for name in runs}
    assert recorded["url"]["splits"] == recorded["local"]["splits"]  # the same contents, wherever they are


def test_a_listed_file_missing_from_the_bucket_is_named_by_its_row(bucket):
    memory = fsspec.filesystem("memory")
    memory.pipe_file("/bucket/data/bad.csv", b"path,label\ntrain/red/000.png,red\ntrain/red/gone.png,red\n")
    with pytest.raises(DataError, match=r"bad.csv: row 3: 'memory://bucket/data/train/red/gone.png' does not exist"):
        DataSource(source="manifest", path="memory://bucket/data/bad.csv").load()


def test_a_scheme_without_its_package_names_the_package():
    with pytest.raises(ConfigError, match=r"gs://bucket/images: reading gs:// needs gcsfs; pip install gcsfs"):
        DataSource(path="gs://bucket/images").load()


def test_locations_join_and_split_urls_and_paths_alike(tmp_path):
    assert locations.join("gs://b/data/", "train", "x.png") == "gs://b/data/train/x.png"
    assert locations.parent("gs://b/data/list.csv") == "gs://b/data" and locations.name("gs://b/data/x.PNG") == "x.PNG"
    assert locations.location("file:///tmp/x") == locations.location("/tmp/x")
    assert locations.join(tmp_path, "a") == tmp_path / "a" and not locations.is_url(tmp_path)


def test_a_workdir_url_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    from tests.helpers import cli, config_file, one_line_error

    monkeypatch.chdir(tmp_path)
    result = cli("train", "--config", config_file(tmp_path, tmp_path / "data"), "--workdir", "gs://bucket/run")
    one_line_error(result, "--workdir gs://bucket/run", "a local folder")
    assert not (tmp_path / "gs:").exists()
