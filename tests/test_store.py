"""The content-addressed store both caches stand on: keys from descriptions, entries published whole or not at
all, temporaries of killed writers swept."""

import os
import time

import pytest

from jaxtl.core.processes import ProcessSlice
from jaxtl.core.store import Store, key_of


def test_keys_depend_on_content_not_on_container_types():
    a = {"model": "resnet18", "kwargs": {"width": 8, "depth": (1, 2)}, "size": 32}
    b = {"size": 32, "kwargs": {"depth": [1, 2], "width": 8}, "model": "resnet18"}
    assert key_of(a) == key_of(b) and len(key_of(a)) == 64
    assert key_of(a) != key_of(a | {"size": 33})


def test_an_entry_is_published_whole_or_not_at_all(tmp_path):
    entry = Store(tmp_path).entry({"what": "test"})
    with pytest.raises(KeyboardInterrupt):
        with entry.writing(["a.bin", "b.bin"]) as files:
            files["a.bin"].write_bytes(b"complete")
            raise KeyboardInterrupt  # killed before b.bin was written
    assert not entry.file("a.bin").exists() and not list(entry.path.glob(".*.tmp"))
    with entry.writing(["a.bin", "b.bin"]) as files:
        for name, path in files.items():
            assert path.parent == entry.path and path.name.startswith(f".{name}.")  # beside its name, hidden
            path.write_bytes(name.encode())
    assert entry.file("a.bin").read_bytes() == b"a.bin" and entry.file("b.bin").read_bytes() == b"b.bin"
    assert '"what": "test"' in entry.file("meta.json").read_text()


def test_stale_temporaries_are_swept_by_the_next_write(tmp_path):
    entry = Store(tmp_path).entry({"what": "stale"})
    entry.path.mkdir(parents=True)
    old, young = entry.path / ".x.npy.1.dead.tmp", entry.path / ".y.npy.2.live.tmp"
    old.write_bytes(b"left by a killed run"), young.write_bytes(b"a live writer's")
    day_ago = time.time() - 2 * 86_400
    os.utime(old, (day_ago, day_ago))
    with entry.writing(["z.bin"]) as files:
        files["z.bin"].write_bytes(b"z")
    assert not old.exists() and young.exists()


def test_a_process_slice_is_its_share_of_every_global_batch():
    import numpy as np

    batch = np.arange(8)
    parts = [ProcessSlice(i, 4).of(batch, 8) for i in range(4)]
    np.testing.assert_array_equal(np.concatenate(parts), batch)
    assert [len(ProcessSlice(i, 4).of(np.arange(5), 8)) for i in range(4)] == [2, 2, 1, 0]  # a short last batch
    with pytest.raises(ValueError, match="batch size 6 is not divisible by the 4 processes"):
        ProcessSlice(0, 4).local(6)
