"""A dataset listed in a file (`data.source="manifest"`): the form timm, fastai and Keras users keep their labels
in, beside or instead of class folders.

- `.csv` with a header naming the columns `path` and `label`, and optionally `split`;
- `.jsonl`, one object a line with those keys.

`path` is relative to the listing's folder, or absolute, or a URL (the listing itself may be one: a manifest in a
bucket lists images beside it; `jaxtl.core.locations`); `split` is `train`, `val` or `test` (empty: train). The
class names are the labels, sorted. With `multi_label`, a row's `label` holds its labels: separated by `delimiter` in
a CSV (a space by default, as fastai's), a JSON list (or such a string) in a JSON line; the labels are then multi-hot
rows (`jaxtl.data.split`). A split the listing does not give is carved from train as for a folder
(`data.val_fraction`, `data.test_fraction`, seeded and stratified). Each image is checked to decode as a folder's
are (`jaxtl.data.folder`), in the listing's order. A bad row (a file that is not there, an empty label, a split
not one of the three, a path listed twice) is one error naming the listing, the row and what to do, before any
image is read.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from jaxtl.core import locations
from jaxtl.core.errors import ConfigError, DataError, MissingFileError
from jaxtl.core.locations import Location
from jaxtl.data.folder import checked_dataset
from jaxtl.data.images import DEFAULT_MAX_PIXELS
from jaxtl.data.manifest import map_in_chunks
from jaxtl.data.split import ImageDataset

SPLITS = ("train", "val", "test")
SUFFIXES = (".csv", ".jsonl")


def _rows(listing: Location) -> list[tuple[int, dict]]:
    """`(row number, {"path", "label", "split"})` of every row: CSV rows counted from the header (1), JSON lines
    from the first (1); blank lines skipped."""
    text = locations.read_text(listing)
    if locations.suffix(listing) == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        columns = set(reader.fieldnames or ())
        if not {"path", "label"} <= columns:
            raise DataError(f"{listing}: its header names {sorted(columns)}; it must name the columns path and "
                            "label (and optionally split)")
        return [(number + 2, row) for number, row in enumerate(reader) if any((v or "").strip()
                                                                               for v in row.values())]
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise DataError(f"{listing}: line {number} is not JSON; write one object a line, e.g. "
                            '{"path": "cats/1.jpg", "label": "cat"}') from None
        if not isinstance(row, dict) or "path" not in row or "label" not in row:
            raise DataError(f"{listing}: line {number} has no path and label; write one object a line, e.g. "
                            '{"path": "cats/1.jpg", "label": "cat"}')
        rows.append((number, row))
    return rows


def _labels(value, multi_label: bool, delimiter: str, where: str) -> tuple[str, ...]:
    """A row's labels: one, or with `multi_label` those its value lists (a JSON list, or text split at
    `delimiter`), each once, in order."""
    if isinstance(value, list):
        if not multi_label:
            raise DataError(f"{where} has a list of labels; set data.multi_label=True to read several labels an image")
        names = [str(v).strip() for v in value]
    elif multi_label:
        names = str(value if value is not None else "").split(delimiter or None)
    else:
        return (str(value if value is not None else "").strip(),)
    return tuple(dict.fromkeys(name.strip() for name in names if name.strip()))


def read_listing(listing: Location, multi_label: bool = False, delimiter: str = " "
                 ) -> tuple[tuple[str, ...], dict[str, tuple[list[Location], list]]]:
    """`(class names, {split: (files, labels)})` of the splits the listing gives, every row checked (see the module
    docstring); a label is a class index, or with `multi_label` a tuple of them."""
    listing = locations.as_location(listing)
    if not locations.is_file(listing):
        raise MissingFileError(f"data.path='{listing}' does not exist; data.source='manifest' reads a .csv or .jsonl "
                               "file of image paths and labels")
    if locations.suffix(listing) not in SUFFIXES:
        raise ConfigError(f"data.path='{listing}': data.source='manifest' reads a .csv (a header naming path, label "
                          "and optionally split) or a .jsonl file")
    kind = "row" if locations.suffix(listing) == ".csv" else "line"
    folder = locations.parent(listing)
    seen: dict[Location, int] = {}
    entries = []
    for number, row in _rows(listing):
        where = f"{listing}: {kind} {number}"
        text = str(row.get("path") or "").strip()
        label = _labels(row.get("label"), multi_label, delimiter, where)
        split = str(row.get("split") or "").strip() or "train"
        if not text:
            raise DataError(f"{where} has no path; give each image's path (relative to {folder}) or remove the row")
        if not label or not all(label):
            raise DataError(f"{where} ('{text}') has an empty label; label it or remove the row")
        if split not in SPLITS:
            raise DataError(f"{where} ('{text}') has split '{split}'; use train, val or test (empty: train)")
        if not locations.is_absolute(text):
            path = locations.join(folder, text)
        else:
            path = locations.location(text) if "://" in text else Path(text).expanduser()
        if path in seen:
            raise DataError(f"{where} lists '{text}' again ({kind} {seen[path]} has it); list each image once")
        seen[path] = number
        entries.append((path, label, split, where))
    if not entries:
        raise DataError(f"{listing} lists no images")
    for (path, _, _, where), there in zip(entries, map_in_chunks(locations.is_file, [e[0] for e in entries])):
        if not there:  # checked in threads (a bucket answers each in a round trip), named in the listing's order
            raise DataError(f"{where}: '{path}' does not exist; fix the path (relative to {folder}) or remove the "
                            "row")
    class_names = tuple(sorted({name for _, label, _, _ in entries for name in label}))
    index = {name: i for i, name in enumerate(class_names)}
    given: dict[str, tuple[list[Location], list]] = {}
    for path, label, split, _ in entries:
        listed, labels = given.setdefault(split, ([], []))
        listed.append(path)
        labels.append(tuple(index[name] for name in label) if multi_label else index[label[0]])
    return class_names, given


def listed_splits(listing: str | Path) -> tuple[str, ...]:
    """The splits a listing gives, from its split column alone (no file checked; a listing that does not parse
    gives none, and loading it says why): for the check that a fraction set for one of them is never read."""
    listing = locations.as_location(listing)
    if locations.suffix(listing) not in SUFFIXES or not locations.is_file(listing):
        return ()
    try:
        found = {str(row.get("split") or "").strip() or "train" for _, row in _rows(listing)}
    except DataError:
        return ()
    return tuple(split for split in SPLITS if split in found)


def listing_dataset(
    listing: Location,
    val_fraction: float = 0.2,
    test_fraction: float = 0.0,
    seed: int = 0,
    skip_bad_images: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    exif: bool = True,
    multi_label: bool = False,
    delimiter: str = " ",
) -> ImageDataset:
    """The dataset a listing describes (see the module docstring); as `folder_dataset` for the rest."""
    listing = locations.as_location(listing)
    class_names, raw = read_listing(listing, multi_label, delimiter)
    if len(class_names) < 2:
        raise DataError(f"{listing}: found {len(class_names)} label(s); need at least 2")
    if "train" not in raw:
        raise DataError(f"{listing} lists no train images (rows with split train, or no split)")
    return checked_dataset(locations.parent(listing), class_names, raw, val_fraction, test_fraction, seed,
                           skip_bad_images, max_pixels, exif, "add some or remove their rows", source=str(listing),
                           multi_label=multi_label)
