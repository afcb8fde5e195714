"""The folder manifest: each file read once (checked and hashed together); unchanged files are neither checked nor
hashed again on later runs, a changed one is."""

import os
from pathlib import Path

from jaxtl.data import folder as folder_module
from jaxtl.data.folder import folder_dataset
from jaxtl.data.split import split_fingerprint
from tests.conftest import make_image_folder


def test_each_file_is_read_once_and_only_a_changed_one_again(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXTL_CACHE_DIR", str(tmp_path / "cache"))
    root = make_image_folder(tmp_path / "images", classes=("red", "blue"), per_class=4)
    verified, read = [], []
    real_verify, real_read = folder_module.verify_image, Path.read_bytes
    monkeypatch.setattr(folder_module, "verify_image", lambda path, *a: (verified.append(path), real_verify(path, *a)))
    monkeypatch.setattr(Path, "read_bytes",  # the images read (the manifest reads itself too)
                        lambda self: (self.suffix == ".png" and read.append(self), real_read(self))[1])

    first = folder_dataset(root, val_fraction=0.0).splits["train"]
    fingerprint = split_fingerprint(first)
    assert len(verified) == 8 and sorted(read) == sorted(first.files)  # read once: checked and hashed

    verified.clear(), read.clear()
    second = folder_dataset(root, val_fraction=0.0).splits["train"]
    assert split_fingerprint(second) == fingerprint
    assert verified == [] and read == []  # a stat per file, nothing read

    changed = root / "red" / "001.png"
    changed.write_bytes(real_read(root / "red" / "002.png"))
    os.utime(changed, ns=(1, 1))  # a new modification time
    third = folder_dataset(root, val_fraction=0.0).splits["train"]
    assert split_fingerprint(third) != fingerprint
    assert verified == [changed] and read == [changed]
