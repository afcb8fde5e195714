"""TensorBoard's own reader (TensorFlow's `summary_iterator`, which checks every record's CRC) reads the scalars
jaxtl's event writer wrote, with their steps and values; CRC-32C against its published check value."""

import pytest

from jaxtl.core.events import ScalarEvents, crc32c


def test_crc32c_check_value():
    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C catalogue's check value
    assert crc32c(b"") == 0


def test_tensorflow_reads_the_scalars_back(tmp_path):
    tf = pytest.importorskip("tensorflow")
    writer = ScalarEvents(tmp_path / "tensorboard")
    written = [("train_loss", 0.75, 3), ("val_accuracy", 0.5, 3), ("train_loss", 0.25, 300), ("lr", 1e-4, 2**40)]
    for tag, value, step in written:
        writer.add_scalar(tag, value, step)
    writer.close()
    (path,) = (tmp_path / "tensorboard").iterdir()
    assert "tfevents" in path.name  # what TensorBoard looks for
    events = list(tf.compat.v1.train.summary_iterator(str(path)))
    assert events[0].file_version == "brain.Event:2"
    read = [(e.summary.value[0].tag, e.summary.value[0].simple_value, e.step) for e in events[1:]]
    assert read == [(tag, pytest.approx(value, rel=1e-7), step) for tag, value, step in written]
    assert all(e.wall_time > 1.7e9 for e in events)
    with pytest.raises(ValueError, match="step -1"):
        ScalarEvents(tmp_path / "other").add_scalar("loss", 1.0, -1)
    # a record damaged on disk is refused by the reader's CRC check, not read as another number
    data = bytearray(path.read_bytes())
    data[-6] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(Exception, match="(?i)corrupt|crc|checksum"):
        list(tf.compat.v1.train.summary_iterator(str(path)))
