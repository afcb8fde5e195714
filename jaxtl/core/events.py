"""TensorBoard scalars, written straight to an event file.

A run logs a few scalars an epoch. tensorboardX did it before, and its import loads PyTorch wherever PyTorch is
installed (1.7 s at the start of every run here, for a library that never uses it); TensorFlow's writer is heavier
still. The format is small and stable: a TFRecord file named `events.out.tfevents.*` whose records are `Event`
protocol buffers (tensorboard/compat/proto/event.proto), the first naming the file version, each later one a
`Summary` holding one `simple_value`. A record is its length (uint64), the length's masked CRC-32C, the bytes, and
their masked CRC-32C, all little-endian.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # Castagnoli, reflected
        table.append(crc)
    return tuple(table)


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) of `data`, as TFRecord frames use it."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> bytes:
    crc = crc32c(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _bytes_field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int, body: bytes) -> bytes:
    """An `Event`: wall_time (field 1, double), step (2, int64) and `body` (file_version or summary)."""
    return b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step) + body


class ScalarEvents:
    """Appends scalars to a new event file in `directory` (one file per writer, as TensorBoard expects of a
    resumed run: it reads every file of the folder in order)."""

    def __init__(self, directory: Path | str):
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        now = time.time()
        self.path = directory / f"events.out.tfevents.{now:.6f}.{socket.gethostname()}.{os.getpid()}"
        self._file = open(self.path, "ab")
        self._record(_event(now, 0, _bytes_field(3, b"brain.Event:2")))

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        if step < 0:
            raise ValueError(f"step {step}: TensorBoard steps are counted from 0")
        summary_value = _bytes_field(1, tag.encode()) + b"\x15" + struct.pack("<f", value)  # tag, simple_value
        self._record(_event(time.time(), step, _bytes_field(5, _bytes_field(1, summary_value))))

    def _record(self, data: bytes) -> None:
        length = struct.pack("<Q", len(data))
        self._file.write(length + _masked_crc(length) + data + _masked_crc(data))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()
