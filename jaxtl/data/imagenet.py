"""The 1000 ImageNet-1k classes in the standard index order (sorted wnids), with readable names."""

from __future__ import annotations

import functools
from importlib import resources


@functools.cache
def imagenet_classes() -> tuple[tuple[str, str], ...]:
    """`(wnid, name)` for class indices 0..999."""
    text = resources.files("jaxtl.data").joinpath("imagenet_classes.tsv").read_text()
    return tuple(tuple(line.split("\t", 1)) for line in text.splitlines())
