"""Read PyTorch `.pth` state dicts into NumPy arrays without torch and without running code from the file.

A `.pth` file is a pickle. Unpickling it with the standard library would let the file call any importable
function (`os.system`, ...), so the unpickler here resolves only an allow-list of globals: the containers a
state dict is made of and torch's tensor-rebuild functions, which are replaced by NumPy equivalents. Anything
else in the file raises `UnsafeWeightsFileError` before it can run.

Both formats torch has written are read:
- the zip format (torch >= 1.6): `<name>/data.pkl` plus one raw file per storage under `<name>/data/`;
- the legacy format: a magic number, a protocol version, system info, the pickle itself, the list of storage
  keys, then each storage as an int64 element count followed by its bytes.
"""

from __future__ import annotations

import collections
import io
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jaxtl.core.errors import JaxtlError

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
MAX_PICKLE_BYTES = 256 << 20  # a state dict's pickle holds names and storage references only
_LEGACY_PROTOCOL = 1001

_STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16",
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class WeightsFileError(JaxtlError, ValueError):
    """A weights file is unreadable, truncated or not a state dict."""


class UnsafeWeightsFileError(WeightsFileError):
    """A weights file asks the unpickler for a global that a state dict never needs."""


@dataclass(frozen=True)
class _StorageType:
    name: str

    @property
    def dtype(self) -> np.dtype:
        dtype = _STORAGE_DTYPES[self.name]
        if dtype == "bfloat16":
            import ml_dtypes  # shipped with jax

            return np.dtype(ml_dtypes.bfloat16)
        return np.dtype(dtype)


def _rebuild_tensor(storage: np.ndarray, offset: int, size, stride, *_unused) -> np.ndarray:
    """NumPy stand-in for torch._utils._rebuild_tensor(_v2): a strided view of the storage, copied."""
    size, stride = tuple(size), tuple(stride)
    if not size:
        return np.array(storage[offset])
    needed = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1
    if min(size) > 0 and needed > storage.size:
        raise WeightsFileError(f"tensor of shape {size} reads past the end of its storage ({storage.size} elements)")
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=size, strides=tuple(s * itemsize for s in stride), writeable=False
    )
    return np.ascontiguousarray(view)


def _rebuild_parameter(data: np.ndarray, *_unused) -> np.ndarray:
    return data


def _ordered_dict(*args) -> collections.OrderedDict:
    return collections.OrderedDict(*args)


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): _ordered_dict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    **{("torch", name): _StorageType(name) for name in _STORAGE_DTYPES},
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, persistent_load, source: str, allowed: dict = _ALLOWED_GLOBALS):
        super().__init__(file)
        self._persistent_load = persistent_load
        self._source = source
        self._allowed = allowed

    def find_class(self, module: str, name: str):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafeWeightsFileError(
                f"{self._source}: refusing to load global '{module}.{name}'; a weights file only needs tensors "
                "and dicts. The file may be malicious or not a state dict; convert it to .safetensors from a "
                "trusted environment."
            ) from None

    def persistent_load(self, pid):
        return self._persistent_load(pid)


def _storage_from_bytes(raw: bytes, storage_type: _StorageType, numel: int, source: str, key: str) -> np.ndarray:
    dtype = storage_type.dtype
    if len(raw) < numel * dtype.itemsize:
        raise WeightsFileError(f"{source}: storage '{key}' holds {len(raw)} bytes, expected {numel * dtype.itemsize}")
    return np.frombuffer(raw, dtype=dtype, count=numel)


def _load_zip(path: Path, source: str) -> dict:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pickles = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if not pickles:
            raise WeightsFileError(f"{source}: zip archive without data.pkl; not a torch.save file")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = archive.read(prefix + "byteorder").decode() if prefix + "byteorder" in names else "little"
        if byteorder != "little":
            raise WeightsFileError(f"{source}: big-endian torch files are not supported")

        def persistent_load(pid):
            kind, storage_type, key, _location, numel = pid
            if kind != "storage" or not isinstance(storage_type, _StorageType):
                raise WeightsFileError(f"{source}: unexpected persistent id {pid!r}")
            name = f"{prefix}data/{key}"
            try:
                info = archive.getinfo(name)
            except KeyError:
                raise WeightsFileError(f"{source}: storage '{key}' is missing from the archive") from None
            declared = int(numel) * storage_type.dtype.itemsize
            if info.file_size > declared:  # checked before inflating: a zip bomb never reaches memory
                raise WeightsFileError(f"{source}: archive member {name} would inflate to {info.file_size:,} bytes, "
                                       f"but its tensor storage holds {declared:,}; refusing to read a damaged or "
                                       "malicious file")
            return _storage_from_bytes(archive.read(name), storage_type, numel, source, key)

        info = archive.getinfo(pickles[0])
        if info.file_size > MAX_PICKLE_BYTES:
            raise WeightsFileError(f"{source}: its pickle {pickles[0]} would inflate to {info.file_size:,} bytes, more "
                                   f"than a state dict's ({MAX_PICKLE_BYTES:,} at most); refusing to read it")
        with archive.open(pickles[0]) as data:
            return _RestrictedUnpickler(data, persistent_load, source).load()


def _load_legacy(stream: io.BufferedReader, source: str) -> dict:
    def plain_load():
        return _RestrictedUnpickler(stream, _no_persistent, source).load()

    def _no_persistent(pid):
        raise WeightsFileError(f"{source}: unexpected persistent id {pid!r} in the header")

    if plain_load() != _LEGACY_MAGIC:
        raise WeightsFileError(f"{source}: not a torch.save file (bad magic number)")
    if plain_load() != _LEGACY_PROTOCOL:
        raise WeightsFileError(f"{source}: unsupported legacy torch protocol version")
    sys_info = plain_load()
    if not sys_info.get("little_endian", True):
        raise WeightsFileError(f"{source}: big-endian torch files are not supported")

    # Storages are only filled after the main pickle; tensors are rebuilt lazily once the bytes are known.
    storages: dict[str, tuple[_StorageType, int]] = {}

    def persistent_load(pid):
        kind = pid[0]
        if kind != "storage":
            raise WeightsFileError(f"{source}: unexpected persistent id kind {kind!r}")
        storage_type, key, _location, numel, view = pid[1:6]
        if view is not None:
            raise WeightsFileError(f"{source}: storage views in legacy files are not supported")
        storages.setdefault(key, (storage_type, numel))
        return _LazyStorage(key)

    lazy_globals = {k: (_LazyTensor.rebuild if v is _rebuild_tensor else v) for k, v in _ALLOWED_GLOBALS.items()}
    result = _RestrictedUnpickler(stream, persistent_load, source, lazy_globals).load()
    keys = plain_load()
    loaded = {}
    for key in keys:
        storage_type, numel = storages[key]
        header = stream.read(8)
        if len(header) < 8:
            raise WeightsFileError(f"{source}: file ends before storage '{key}'; it is truncated")
        count = int(np.frombuffer(header, dtype="<i8")[0])
        raw = stream.read(count * storage_type.dtype.itemsize)
        loaded[key] = _storage_from_bytes(raw, storage_type, numel, source, key)
    return _resolve_lazy(result, loaded)


@dataclass(frozen=True)
class _LazyStorage:
    key: str


@dataclass
class _LazyTensor:
    storage: _LazyStorage
    args: tuple

    @classmethod
    def rebuild(cls, storage: _LazyStorage, *args) -> "_LazyTensor":
        return cls(storage, args)


def _resolve_lazy(obj, loaded: dict):
    if isinstance(obj, _LazyTensor):
        return _rebuild_tensor(loaded[obj.storage.key], *obj.args)
    if isinstance(obj, dict):
        return type(obj)((k, _resolve_lazy(v, loaded)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_resolve_lazy(v, loaded) for v in obj)
    return obj


def load_torch_file(path: str | Path) -> dict[str, np.ndarray]:
    """Reads a `torch.save`d state dict as `{name: np.ndarray}` without importing torch.

    Accepts a bare state dict or the common checkpoint wrappers (`{"state_dict": ...}`, `{"model": ...}`).
    Raises `UnsafeWeightsFileError` for a pickle that asks for anything but tensors and dicts, and
    `WeightsFileError` for a truncated or malformed file; nothing from the file is executed.
    """
    path = Path(path)
    source = str(path)
    try:
        if zipfile.is_zipfile(path):
            obj = _load_zip(path, source)
        else:
            with open(path, "rb") as stream:
                obj = _load_legacy(stream, source)
    except WeightsFileError:
        raise
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, TypeError, KeyError, IndexError) as e:
        raise WeightsFileError(f"{source}: unreadable torch file ({type(e).__name__}: {e}); is it truncated?") from e
    return _as_state_dict(obj, source)


def _as_state_dict(obj, source: str) -> dict[str, np.ndarray]:
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(obj, dict) and wrapper in obj and isinstance(obj[wrapper], dict):
            obj = obj[wrapper]
            break
    if not isinstance(obj, dict):
        raise WeightsFileError(f"{source}: expected a state dict, found {type(obj).__name__}")
    state = {}
    for name, value in obj.items():
        if not isinstance(value, np.ndarray):
            raise WeightsFileError(f"{source}: entry '{name}' is {type(value).__name__}, not a tensor")
        state[name.removeprefix("module.")] = value
    return state
