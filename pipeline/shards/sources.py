"""Where shard inputs come from: an ImageFolder tree, a CSV/TSV list, or a built-in set.

A source is listed once, in the main process, into a list of small :class:`Item` records (an input's
user-facing name, its label and a reference to read it by). Reading happens later, in the worker
processes, through the source's picklable :class:`Reader`, so image data is never held for the
whole dataset.

SOURCE forms (``open_source``):

- a directory (local or any fsspec URL), ImageFolder style: class = sub-folder name, classes sorted,
  files found recursively below each class folder. A directory without sub-folders is read as one
  unlabelled folder. Every file is an input: non-images are rejected with a reason, not skipped.
  A sub-folder named like an image file (``photo.jpg/``, any of ``IMAGE_EXTENSIONS``) is neither a
  class nor read: it is rejected and does not make the folder an ImageFolder tree. A symbolic link
  loop (a link that never resolves, or a folder link back to a folder that contains it) is rejected
  and not followed, so every real folder is listed once per path into it.
- a ``.csv``/``.tsv``/``.txt`` list with a header row holding ``path`` and optionally ``label``.
  Relative paths are resolved against the list file's directory. Labels that are all non-negative
  integers are class indices (classes ``"0".."max"``); otherwise they are class names, sorted.
- ``builtin:digits[?split=train|val|test|all][&size=32]``: scikit-learn's 8x8 handwritten digits
  (1,797 images, ``sklearn.datasets.load_digits``), upscaled to ``size`` x ``size`` RGB with bicubic
  resampling, labelled 0..9. ``split`` selects a stratified, deterministic 70/10/20 train/val/test
  split made with a fixed seed (``DIGITS_SPLIT_SEED``), independent of the build's ``--seed``.
- ``builtin:photos[?count=N]``: crops of the real photographs bundled with scikit-image (only the
  files present on disk; nothing is downloaded), ``N`` random crops resized so that the longer side
  is 375..500 px, like a typical ImageNet image. Unlabelled. Meant for throughput work.
"""

from __future__ import annotations

import csv
import errno
import gzip
import importlib.util
import io
import os
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache, lru_cache
from typing import Any

import numpy as np
from PIL import Image

from pipeline import storage

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff")
"""A top-level sub-folder whose name ends in one of these (any case) is not taken as a class folder."""
DIR_NAMED_LIKE_IMAGE = (
    "a directory named like an image file: not an image, not taken as a class folder, not read"
)
UNRESOLVED_LINK = (
    "symbolic link loop: the link never reaches a file or folder (it points to itself or around a cycle)"
)
DIGITS_SPLIT_SEED = 20210101
DIGITS_SPLIT_FRACTIONS = {"train": 0.7, "val": 0.1, "test": 0.2}
PHOTOS_SEED = 1234
PHOTOS_DEFAULT_COUNT = 2000
PHOTOS_SIDE = (375, 500)  # longer side of a crop after resizing, uniform in this range
# Photographs in skimage/data (synthetic images, logos and drawings left out).
PHOTO_FILES = (
    "astronaut.png",
    "brick.png",
    "camera.png",
    "cell.png",
    "chelsea.png",
    "coffee.png",
    "coins.png",
    "grass.png",
    "gravel.png",
    "hubble_deep_field.jpg",
    "ihc.png",
    "moon.png",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "retina.jpg",
    "rocket.jpg",
)


class SourceError(ValueError):
    """SOURCE cannot be used at all (missing, empty, malformed list); the message says why."""


@dataclass(frozen=True, slots=True)
class Item:
    input: str  # the input as the user would name it: a path, "list.csv:12", "builtin:digits#5"
    label: int | None
    ref: str | int  # what the reader needs: a path/URL or an index into a built-in set


@dataclass
class Source:
    spec: str  # SOURCE as given (no credentials are ever part of it)
    items: list[Item]
    classes: list[str] | None
    reader: Reader
    rejected: list[tuple[str, str]] = field(default_factory=list)  # (input, reason) found while listing
    settings: dict[str, Any] = field(default_factory=dict)  # builtin parameters, recorded in the manifest
    kind: str = "builtin"
    """``"folder"`` (item inputs are paths relative to the folder), ``"list"`` (paths as the list
    writes them) or ``"builtin"``."""


class Reader:
    """Picklable: ``reader(ref)`` returns the encoded file bytes or a PIL image for one input."""

    def __call__(self, ref: str | int) -> bytes | Image.Image:
        raise NotImplementedError


@dataclass
class FileReader(Reader):
    options: dict[str, Any] = field(default_factory=dict)
    base: str | None = None  # refs are relative to this directory (local path or URL) when set

    def __call__(self, ref: str | int) -> bytes:
        ref = str(ref) if self.base is None else f"{self.base}/{ref}"
        if storage.is_remote(ref):
            with storage.open_url(ref, "rb", self.options) as f:
                return f.read()
        with open(ref, "rb") as f:
            return f.read()


@dataclass
class DigitsReader(Reader):
    size: int = 32

    def __call__(self, ref: str | int) -> Image.Image:
        images, _ = load_digits_arrays()
        gray = Image.fromarray(np.round(images[int(ref)] * (255.0 / 16.0)).astype(np.uint8), mode="L")
        rgb = gray.resize((self.size, self.size), Image.Resampling.BICUBIC).convert("RGB")
        rgb.info["original_size"] = (8, 8)
        return rgb


@dataclass
class PhotosReader(Reader):
    def __call__(self, ref: str | int) -> Image.Image:
        return photo_crop(int(ref))


def open_source(
    spec: str,
    *,
    storage_options: dict[str, Any] | None = None,
    digits_size: int = 32,
    photos_count: int | None = None,
    split: str | None = None,
) -> Source:
    """List SOURCE (see the module docstring). Raises :class:`SourceError` when it cannot be used."""
    if spec.startswith("builtin:"):
        name, _, query = spec[len("builtin:") :].partition("?")
        params = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
        if name == "digits":
            unknown = set(params) - {"split", "size"}
            if unknown:
                raise SourceError(f"{spec}: unknown parameters {sorted(unknown)} (expected split, size)")
            return _digits_source(
                spec, split=split or params.get("split"), size=int(params.get("size", digits_size))
            )
        if name == "photos":
            unknown = set(params) - {"count"}
            if unknown:
                raise SourceError(f"{spec}: unknown parameters {sorted(unknown)} (expected count)")
            count = int(params.get("count", photos_count or PHOTOS_DEFAULT_COUNT))
            return _photos_source(spec, count)
        raise SourceError(f"unknown built-in source {spec!r}: expected builtin:digits or builtin:photos")
    options = storage_options or {}
    fs, path = storage.filesystem(spec, options)
    if not fs.exists(path):
        raise SourceError(f"SOURCE {spec} does not exist")
    if fs.isdir(path):
        return _folder_source(spec, fs, path, options)
    if spec.lower().endswith((".csv", ".tsv", ".txt")):
        return _list_source(spec, fs, path, options)
    raise SourceError(
        f"SOURCE {spec} is a file but not a .csv/.tsv/.txt list; expected a directory, a list or builtin:..."
    )


# ---------------------------------------------------------------- folders and lists


def _folder_source(spec: str, fs: Any, root: str, options: dict[str, Any]) -> Source:
    """Class folders are the top-level sub-folders not named like image files; without any, the
    top-level files are one unlabelled set. Items carry the path relative to the root once (input and
    ref share the string): a listing of millions of files costs one short string and one small object
    per file."""
    remote = storage.is_remote(spec)
    root = root.rstrip("/")
    top_files: list[str] = []
    rejected: list[tuple[str, str]] = []
    if remote:
        entries = fs.ls(root, detail=True)
        top_files = [e["name"][len(root) + 1 :] for e in entries if e["type"] == "file"]
        top_dirs = [e["name"].rstrip("/")[len(root) + 1 :] for e in entries if e["type"] == "directory"]

        def files_below(name: str) -> tuple[list[str], list[tuple[str, str]]]:
            return [p[len(root) + 1 :] for p in fs.find(f"{root}/{name}")], []

        base = spec.split("://", 1)[0] + "://" + root
    else:
        st = os.stat(root)
        ancestors = {(st.st_dev, st.st_ino): "the SOURCE folder"}
        dir_ids = dict(_scan_local(root, "", ancestors, top_files, rejected))
        top_dirs = list(dir_ids)

        def files_below(name: str) -> tuple[list[str], list[tuple[str, str]]]:
            files: list[str] = []
            below_rejected: list[tuple[str, str]] = []
            _walk_local(root, name, {**ancestors, dir_ids[name]: repr(name)}, files, below_rejected)
            return files, below_rejected

        base = root
    class_names = sorted(d for d in top_dirs if not d.lower().endswith(IMAGE_EXTENSIONS))
    rejected += [(d, DIR_NAMED_LIKE_IMAGE) for d in top_dirs if d.lower().endswith(IMAGE_EXTENSIONS)]
    items: list[Item] = []
    if not class_names:
        items = [Item(rel, None, rel) for rel in sorted(top_files)]
        classes = None
    else:
        classes = class_names
        rejected += [(rel, "file outside any class folder") for rel in top_files]
        for label, name in enumerate(class_names):
            files, below_rejected = files_below(name)
            items.extend(Item(rel, label, rel) for rel in sorted(files))
            rejected += below_rejected
    rejected.sort()
    if not items:
        left_out = "".join(f"\n  {rel}: {reason}" for rel, reason in rejected[:5])
        raise SourceError(f"SOURCE {spec} holds no files" + (f"; left out:{left_out}" if left_out else ""))
    return Source(spec, items, classes, FileReader(options, base), rejected, kind="folder")


def _scan_local(
    root: str,
    rel_dir: str,
    ancestors: dict[tuple[int, int], str],
    files: list[str],
    rejected: list[tuple[str, str]],
) -> list[tuple[str, tuple[int, int]]]:
    """The sub-folders of ``root/rel_dir`` as ``(path, (st_dev, st_ino))``; its files are appended to
    ``files`` and its symbolic link loops to ``rejected``. Paths are '/'-separated, relative to ``root``.

    ``ancestors`` maps the identity of every folder from the root down to ``rel_dir`` to its name in
    a reason; a sub-folder with one of these identities is a loop. An entry that cannot be checked
    for another reason (permission denied) counts as a file, for the reader to reject precisely."""
    dirs = []
    with os.scandir(os.path.join(root, rel_dir)) as it:
        for e in it:
            rel = f"{rel_dir}/{e.name}" if rel_dir else e.name
            try:
                if not e.is_dir():
                    files.append(rel)
                    continue
                st = e.stat()
            except OSError as err:
                if err.errno == errno.ELOOP:
                    rejected.append((rel, UNRESOLVED_LINK))
                else:
                    files.append(rel)
                continue
            key = (st.st_dev, st.st_ino)
            if key in ancestors:
                rejected.append(
                    (rel, f"symbolic link loop: leads back to {ancestors[key]}, a folder it is in")
                )
            else:
                dirs.append((rel, key))
    return dirs


def _walk_local(
    root: str,
    rel_dir: str,
    ancestors: dict[tuple[int, int], str],
    files: list[str],
    rejected: list[tuple[str, str]],
) -> None:
    """Append the files below ``root/rel_dir`` (recursively) to ``files`` and the loops to
    ``rejected``, as :func:`_scan_local` does for one folder; ``ancestors`` includes ``rel_dir``."""
    for rel, key in _scan_local(root, rel_dir, ancestors, files, rejected):
        ancestors[key] = repr(rel)
        _walk_local(root, rel, ancestors, files, rejected)
        del ancestors[key]


def _list_source(spec: str, fs: Any, path: str, options: dict[str, Any]) -> Source:
    delimiter = "\t" if spec.lower().endswith(".tsv") else ","
    base = storage.dirname(spec)
    with fs.open(path, "rt", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            raise SourceError(f"SOURCE list {spec} is empty; expected a header row with 'path'[,'label']")
        header = [h.strip().lower() for h in header]
        if "path" not in header:
            raise SourceError(f"SOURCE list {spec}: header {header} has no 'path' column")
        path_col = header.index("path")
        label_col = header.index("label") if "label" in header else None
        rows = []
        rejected: list[tuple[str, str]] = []
        for line_no, row in enumerate(reader, start=2):
            name = f"{spec}:{line_no}"
            if not row or not any(c.strip() for c in row):
                continue
            p = row[path_col].strip() if path_col < len(row) else ""
            if not p:
                rejected.append((name, "empty path"))
                continue
            lab = row[label_col].strip() if label_col is not None and label_col < len(row) else None
            if label_col is not None and not lab:
                rejected.append((p, f"row {line_no}: empty label"))
                continue
            rows.append((p, lab))
    if label_col is None:
        classes = None
        index_of: Callable[[str | None], int | None] = lambda lab: None  # noqa: E731
    elif all(lab.isdigit() for _, lab in rows):
        classes = [str(i) for i in range(max((int(lab) for _, lab in rows), default=-1) + 1)]
        index_of = lambda lab: int(lab)  # noqa: E731
    else:
        classes = sorted({lab for _, lab in rows})
        positions = {c: i for i, c in enumerate(classes)}
        index_of = lambda lab: positions[lab]  # noqa: E731
    items = []
    for p, lab in rows:
        absolute = "://" in p or os.path.isabs(p)
        ref = p if absolute else storage.join(base, p)
        items.append(Item(p, index_of(lab), ref))
    if not items and not rejected:
        raise SourceError(f"SOURCE list {spec} lists no inputs")
    return Source(spec, items, classes, FileReader(options), rejected, kind="list")


# ---------------------------------------------------------------- builtin:digits


@lru_cache(maxsize=1)
def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """``(images [1797, 8, 8] float 0..16, targets [1797] int)``, exactly ``sklearn.datasets.load_digits``.

    Read from the data file that scikit-learn ships, without importing scikit-learn (seconds of
    import time that workers and test fixtures would pay for a 1 MB table)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise SourceError("builtin:digits needs scikit-learn installed (pip install scikit-learn)")
    path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")
    with gzip.open(path, "rb") as f:
        data = np.loadtxt(io.BytesIO(f.read()), delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)


def digits_split_indices(split: str | None) -> np.ndarray:
    """Sorted indices of the digits in ``split`` (stratified per class, fixed seed); all when None/'all'."""
    _, targets = load_digits_arrays()
    if split in (None, "", "all"):
        return np.arange(len(targets))
    if split not in DIGITS_SPLIT_FRACTIONS:
        raise SourceError(f"builtin:digits split must be one of train, val, test, all; got {split!r}")
    rng = np.random.default_rng(DIGITS_SPLIT_SEED)
    chosen = []
    for cls in range(10):
        members = rng.permutation(np.flatnonzero(targets == cls))
        n_train = round(len(members) * DIGITS_SPLIT_FRACTIONS["train"])
        n_val = round(len(members) * DIGITS_SPLIT_FRACTIONS["val"])
        bounds = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, None)}
        lo, hi = bounds[split]
        chosen.append(members[lo:hi])
    return np.sort(np.concatenate(chosen))


def _digits_source(spec: str, split: str | None, size: int) -> Source:
    if size < 8:
        raise SourceError(f"builtin:digits size must be >= 8, got {size}")
    _, targets = load_digits_arrays()
    idx = digits_split_indices(split)
    items = [Item(f"builtin:digits#{i}", int(targets[i]), int(i)) for i in idx]
    classes = [str(c) for c in range(10)]
    return Source(
        spec, items, classes, DigitsReader(size), settings={"digits_size": size, "split": split or "all"}
    )


# ---------------------------------------------------------------- builtin:photos


def skimage_data_dir() -> str:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise SourceError("builtin:photos needs scikit-image installed (pip install scikit-image)")
    return os.path.join(spec.submodule_search_locations[0], "data")


@lru_cache(maxsize=1)
def photo_files() -> tuple[str, ...]:
    """The bundled photographs present on disk (scikit-image fetches others on demand; we never do)."""
    d = skimage_data_dir()
    return tuple(os.path.join(d, f) for f in PHOTO_FILES if os.path.isfile(os.path.join(d, f)))


@cache
def _photo(path: str) -> Image.Image:
    with Image.open(path) as im:
        return im.convert("RGB")


def photo_crop(i: int) -> Image.Image:
    """Crop ``i``: a photo, a random crop of 25..100% of its area with aspect 3/4..4/3, a random flip,
    resized (bicubic) so that its longer side is 375..500 px. Deterministic in ``i`` alone."""
    files = photo_files()
    rng = np.random.default_rng([PHOTOS_SEED, i])
    photo = _photo(files[int(rng.integers(len(files)))])
    w, h = photo.size
    area = w * h * rng.uniform(0.25, 1.0)
    aspect = float(np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3))))
    cw = min(w, max(16, round((area * aspect) ** 0.5)))
    ch = min(h, max(16, round((area / aspect) ** 0.5)))
    x0 = int(rng.integers(w - cw + 1))
    y0 = int(rng.integers(h - ch + 1))
    crop = photo.crop((x0, y0, x0 + cw, y0 + ch))
    if rng.random() < 0.5:
        crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    side = int(rng.integers(PHOTOS_SIDE[0], PHOTOS_SIDE[1] + 1))
    scale = side / max(cw, ch)
    size = (max(1, round(cw * scale)), max(1, round(ch * scale)))
    return crop.resize(
        size, Image.Resampling.BICUBIC, reducing_gap=2.0
    )  # reducing_gap: box pre-shrink, 5x faster


def _photos_source(spec: str, count: int) -> Source:
    if count < 1:
        raise SourceError(f"builtin:photos count must be >= 1, got {count}")
    if not photo_files():
        raise SourceError(f"builtin:photos: no bundled photographs found in {skimage_data_dir()}")
    items = [Item(f"builtin:photos#{i}", None, i) for i in range(count)]
    return Source(spec, items, None, PhotosReader(), settings={"photos_count": count})
