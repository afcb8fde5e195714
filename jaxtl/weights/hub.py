"""Weights from the Hugging Face Hub, as timm's users get them: `hf-hub:<owner>/<repo>[@revision]`
(`hf-hub:timm/resnet50.a1_in1k`), fetched by the `huggingface_hub` client into the Hub's own cache (`HF_HOME`,
`HF_HUB_CACHE`) and read from there offline (`HF_HUB_OFFLINE=1`), as `timm.create_model(..., pretrained=True)`
does. The repository's weights file (`model.safetensors`, else `pytorch_model.bin`, read without unpickling) is
converted by the family's layouts (`jaxtl.weights.convert`); its `config.json` (timm's `pretrained_cfg`) gives
the preprocessing. The file's sha256 is recorded at first use per repository commit
(`$JAXTL_CACHE_DIR/weights/hf-hub/...`) and checked on every later load.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jaxtl.core.errors import ConfigError
from jaxtl.core.paths import cache_dir
from jaxtl.core.store import sha256_file
from jaxtl.weights.files import WeightsUnavailableError
from jaxtl.weights.torch_file import WeightsFileError

HUB_PREFIX = "hf-hub:"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # timm's, in the order timm prefers them
_EXPECTED = (f"expected {HUB_PREFIX}<owner>/<repo>[@revision] naming a Hub model repository that holds "
             f"{' or '.join(WEIGHT_FILES)} in timm's layout (e.g. {HUB_PREFIX}timm/resnet50.a1_in1k)")


@dataclass(frozen=True)
class HubFile:
    """A weights file of a Hub repository, in the Hub cache. commit: the repository revision it came from."""

    spec: str
    repo: str
    commit: str
    path: Path
    sha256: str
    preprocessing: tuple[tuple[str, Any], ...]  # the fields the repository's config.json names (see `_preprocessing`)


def parse(spec: str) -> tuple[str, str | None]:
    """`(repo, revision)` of `hf-hub:<owner>/<repo>[@revision]`; anything else is an error saying what is expected."""
    repo, _, revision = spec.removeprefix(HUB_PREFIX).partition("@")
    parts = repo.split("/")
    if len(parts) != 2 or not all(parts) or (_ and not revision):
        raise ConfigError(f"weights '{spec}': {_EXPECTED}")
    return repo, revision or None


def fetch(spec: str) -> HubFile:
    """The weights file of `spec`, downloaded into the Hub cache once (offline: found there), hash-checked."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    repo, revision = parse(spec)
    offline = constants.is_offline_mode()
    where = f"in the Hub cache {constants.HF_HUB_CACHE} (HF_HUB_OFFLINE is set)" if offline else "on the Hub"
    path = None
    for filename in WEIGHT_FILES:
        try:
            path = Path(hf_hub_download(repo, filename, revision=revision))
            break
        except EntryNotFoundError:
            continue
        except (RepositoryNotFoundError, RevisionNotFoundError):
            raise WeightsUnavailableError(f"weights '{spec}': no such repository or revision {where}; "
                                          f"{_EXPECTED}") from None
        except LocalEntryNotFoundError as e:
            if offline:
                continue
            raise WeightsUnavailableError(f"weights '{spec}': could not reach the Hub ({e}); {_EXPECTED}") from e
        except (HfHubHTTPError, OSError) as e:
            raise WeightsUnavailableError(f"weights '{spec}': could not download from the Hub ({e})") from e
    if path is None and offline:
        raise WeightsUnavailableError(
            f"weights '{spec}': not {where}; download it once with network access (or unset HF_HUB_OFFLINE), or "
            f"point HF_HUB_CACHE at a cache that holds it; {_EXPECTED}")
    if path is None:
        raise WeightsFileError(f"weights '{spec}': the repository holds none of {', '.join(WEIGHT_FILES)}; "
                               f"{_EXPECTED}")
    commit = path.parent.name  # the Hub cache keeps each revision's files under snapshots/<commit>/
    return HubFile(spec, repo, commit, path, _checked_sha256(repo, commit, path), _preprocessing(repo, commit))


def _checked_sha256(repo: str, commit: str, path: Path) -> str:
    """The file's sha256, recorded the first time this commit's file is used and compared with every time after:
    a file changed in the cache since is an error, not other weights silently."""
    record = cache_dir() / "weights" / "hf-hub" / repo.replace("/", "--") / commit / f"{path.name}.sha256"
    actual = sha256_file(path)
    if record.is_file():
        recorded = record.read_text().strip()
        if recorded != actual:
            raise WeightsFileError(f"{path}: its sha256 is no longer the {recorded} recorded when it was first "
                                   f"used (hf-hub:{repo} at {commit[:12]}); delete it from the Hub cache to "
                                   "download it again")
    else:
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(actual + "\n")
    return actual


def _preprocessing(repo: str, commit: str) -> tuple[tuple[str, Any], ...]:
    """The preprocessing fields timm's `pretrained_cfg` in the repository's `config.json` names (input size, crop
    fraction, mean, std, interpolation), as `(field, value)` pairs; the variant's defaults fill in the rest, as
    timm does (no `config.json`, or one naming only its `architecture`: all of them)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        config = Path(hf_hub_download(repo, "config.json", revision=commit))
    except (EntryNotFoundError, LocalEntryNotFoundError):
        return ()
    readers = {"input_size": ("input_size", lambda v: int(v[-1])), "crop_pct": ("crop_fraction", float),
               "mean": ("mean", lambda v: tuple(map(float, v))), "std": ("std", lambda v: tuple(map(float, v))),
               "interpolation": ("interpolation", str)}
    try:
        cfg = json.loads(config.read_text())
        cfg = cfg.get("pretrained_cfg", cfg)
        fields = tuple((field, read(cfg[key])) for key, (field, read) in readers.items() if cfg.get(key) is not None)
        for field, value in fields:
            if field in ("mean", "std") and len(value) != 3:
                raise ValueError(f"{field} has {len(value)} values, not 3")
        return fields
    except (ValueError, TypeError, IndexError, AttributeError) as e:
        raise WeightsFileError(f"{config}: not timm's config.json (a pretrained_cfg whose input_size, crop_pct, mean, "
                               f"std and interpolation, where given, are timm's): {e}") from e
