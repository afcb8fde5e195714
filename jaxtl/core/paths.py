"""Where jaxtl keeps things: caches under `$JAXTL_CACHE_DIR` (default `~/.cache/jaxtl`), datasets under
`$JAXTL_DATA_DIR` (default `~/.cache/jaxtl/data`)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$JAXTL_CACHE_DIR`, default `~/.cache/jaxtl`: downloaded weights, the feature, decoded-image and map caches,
    folder manifests."""
    return Path(os.environ.get("JAXTL_CACHE_DIR") or Path.home() / ".cache" / "jaxtl")


def data_dir() -> Path:
    """`$JAXTL_DATA_DIR`, default `~/.cache/jaxtl/data`."""
    return Path(os.environ.get("JAXTL_DATA_DIR") or Path.home() / ".cache" / "jaxtl" / "data")


def resolve_path(path: str) -> Path:
    """Expands `$JAXTL_DATA_DIR` (with its default) and other variables, and `~`."""
    env = dict(os.environ, JAXTL_DATA_DIR=str(data_dir()))
    expanded = path
    for name, value in env.items():
        expanded = expanded.replace(f"${{{name}}}", value).replace(f"${name}", value)
    return Path(expanded).expanduser()
