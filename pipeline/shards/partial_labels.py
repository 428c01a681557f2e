"""Partly labelled shard sets (``relic shards build --label-fraction F | --labelled-keys FILE``).

Semi-supervised pretraining (SemPPL, Bošnjak et al. 2023) trains on a set where only some samples
keep their class. A build chooses those samples from the *listed* inputs, in the main process, before
any image is read, so the choice depends only on the source listing and the options: never on
``--workers``, ``--max-samples`` or ``--max-bytes``. Every other sample is stored unlabelled: its
``.cls`` member holds ``-1`` (and its ``.json`` ``"label": -1``), which :class:`~pipeline.shards.format.
LabelRule` reads as unlabelled (a missing ``.cls`` would read as a *bad* label).

``--label-fraction F`` (0 < F <= 1), class-balanced: the inputs of class ``c`` in listing order
(relative path order for a folder, row order for a list, index order for ``builtin:digits``), ``n_c``
of them, keep ``max(1, round(F * n_c))`` labels (Python's ``round``, half to even), the first ones of
the permutation ``numpy.random.default_rng([seed, c]).permutation(n_c)``: the build's ``--seed``
and the class index.

``--labelled-keys FILE``: a text file, one entry per line (surrounding whitespace and blank lines
ignored), each naming inputs to keep labelled by, in this order of precedence:

1. the input's name as the source lists it: its path relative to a SOURCE folder (``cat/001.jpg``,
   a leading ``./`` allowed), the path as a list writes it, or ``builtin:digits#5``;
2. its file name, the last ``/``-separated part (``n01440764_10026.JPEG``: what SimCLR's 1% and 10%
   ImageNet subset files list); a file name shared by inputs of different paths is refused as
   ambiguous (write their relative paths);
3. its sample key in this build (``000000042``, as ``relic shards inspect`` shows it; keys follow
   the shuffle, so they name the same inputs only with the same ``--seed`` and source).

An entry that names no input is an error listing the first few such entries and their number.

The manifest records the choice in ``Manifest.labelled`` (:func:`manifest_record`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline import storage
from pipeline.shards.format import sample_key
from pipeline.shards.sources import Item

UNLABELLED = -1
"""The class index an unlabelled sample of a partly labelled set carries (``.cls`` text ``-1``)."""
MISSING_SHOWN = 5
"""How many unmatched entries of a keys file an error message lists."""


class LabelSubsetError(ValueError):
    """The options choosing the labelled samples cannot be used; the message names the bad one."""


@dataclass(frozen=True)
class LabelSubset:
    """Which listed inputs keep their label: ``keep`` holds indices into the source's items."""

    keep: frozenset[int]
    fraction: float | None = None
    seed: int | None = None
    keys_file: str | None = None

    def settings(self) -> dict[str, Any]:
        """The options, for the manifest and the build's chunk digests."""
        return {"fraction": self.fraction, "seed": self.seed, "keys_file": self.keys_file}


def check_fraction(fraction: float) -> float:
    """``fraction`` as a float when 0 < fraction <= 1, else :class:`LabelSubsetError`."""
    try:
        value = float(fraction)
    except (TypeError, ValueError):
        raise LabelSubsetError(f"--label-fraction must be a number in (0, 1], got {fraction!r}") from None
    if math.isnan(value) or not 0.0 < value <= 1.0:
        raise LabelSubsetError(f"--label-fraction must be in (0, 1] (0 < F <= 1), got {fraction!r}")
    return value


def labels_per_class(fraction: float, n: int) -> int:
    """How many of a class's ``n`` inputs keep their label at ``fraction``: ``max(1, round(F * n))``
    (none of an empty class)."""
    return 0 if n == 0 else min(n, max(1, round(fraction * n)))


def fraction_subset(items: Sequence[Item], fraction: float, seed: int) -> LabelSubset:
    """The class-balanced subset of ``items`` keeping ``fraction`` of each class's labels (module doc)."""
    fraction = check_fraction(fraction)
    by_class: dict[int, list[int]] = {}
    for i, item in enumerate(items):
        if item.label is not None and item.label >= 0:
            by_class.setdefault(item.label, []).append(i)
    keep: set[int] = set()
    for c, members in sorted(by_class.items()):
        k = labels_per_class(fraction, len(members))
        perm = np.random.default_rng([seed, c]).permutation(len(members))
        keep.update(members[int(j)] for j in perm[:k])
    return LabelSubset(frozenset(keep), fraction=fraction, seed=seed)


def read_keys_file(path: str, options: dict[str, Any] | None = None) -> list[str]:
    """The entries of a ``--labelled-keys`` file (local path or fsspec URL): stripped, non-blank lines."""
    try:
        with storage.open_url(path, "rb", options) as f:
            text = f.read().decode("utf-8")
    except FileNotFoundError:
        raise LabelSubsetError(f"--labelled-keys file {path} does not exist") from None
    except IsADirectoryError:
        raise LabelSubsetError(f"--labelled-keys file {path} is a directory, not a text file") from None
    except UnicodeDecodeError as e:
        raise LabelSubsetError(f"--labelled-keys file {path} is not UTF-8 text: {e}") from None
    except Exception as e:  # permission denied, a store's client error
        raise LabelSubsetError(
            f"--labelled-keys file {path} cannot be read: {type(e).__name__}: {e}"
        ) from None
    entries = [line.strip() for line in text.splitlines()]
    entries = [e for e in entries if e]
    if not entries:
        raise LabelSubsetError(f"--labelled-keys file {path} lists no inputs (it is empty)")
    return entries


def keys_subset(
    items: Sequence[Item], entries: Sequence[str], order: Sequence[int], keys_file: str
) -> LabelSubset:
    """The inputs of ``items`` that ``entries`` name (module doc); ``order[p]`` is the index of the
    item at shuffled position ``p`` (whose sample key is ``sample_key(p)``)."""
    by_input: dict[str, list[int]] = {}
    by_name: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        by_input.setdefault(item.input, []).append(i)
        by_name.setdefault(item.input.rsplit("/", 1)[-1], []).append(i)
    keep: set[int] = set()
    missing: list[str] = []
    ambiguous: list[tuple[str, list[str]]] = []
    for entry in dict.fromkeys(entries):  # first occurrence order, duplicates once
        name = entry.removeprefix("./")
        if name in by_input:
            keep.update(by_input[name])
        elif name in by_name:
            found = by_name[name]
            inputs = sorted({items[i].input for i in found})
            if len(inputs) > 1:
                ambiguous.append((entry, inputs))
            keep.update(found)
        elif name.isdigit() and int(name) < len(order) and sample_key(int(name)) == name:
            keep.add(int(order[int(name)]))
        else:
            missing.append(entry)
    if missing:
        shown = ", ".join(repr(m) for m in missing[:MISSING_SHOWN])
        more = f" and {len(missing) - MISSING_SHOWN} more" if len(missing) > MISSING_SHOWN else ""
        raise LabelSubsetError(
            f"--labelled-keys file {keys_file}: {len(missing)} of {len(set(entries))} entries name no "
            f"input of the source (matched by relative path, file name or sample key): {shown}{more}"
        )
    if ambiguous:
        entry, inputs = ambiguous[0]
        raise LabelSubsetError(
            f"--labelled-keys file {keys_file}: {len(ambiguous)} file names match several inputs, e.g. "
            f"{entry!r}: {', '.join(inputs[:MISSING_SHOWN])}; write their relative paths instead"
        )
    return LabelSubset(frozenset(keep), keys_file=keys_file)


def apply_subset(items: Sequence[Item], subset: LabelSubset) -> list[Item]:
    """``items`` with the label of every input outside ``subset`` replaced by ``UNLABELLED``."""
    return [
        it if i in subset.keep or it.label is None else Item(it.input, UNLABELLED, it.ref)
        for i, it in enumerate(items)
    ]


def manifest_record(subset: LabelSubset, counts: dict[int, int], classes: Sequence[str]) -> dict[str, Any]:
    """``Manifest.labelled`` from the stored samples' class counts (``UNLABELLED`` counted too):
    ``{"fraction", "seed", "keys_file", "labelled", "unlabelled", "per_class": {class name: n}}``."""
    per_class = {c: counts.get(i, 0) for i, c in enumerate(classes)}
    return {
        **subset.settings(),
        "labelled": sum(per_class.values()),
        "unlabelled": counts.get(UNLABELLED, 0),
        "per_class": per_class,
    }


__all__ = [
    "UNLABELLED",
    "LabelSubset",
    "LabelSubsetError",
    "apply_subset",
    "check_fraction",
    "fraction_subset",
    "keys_subset",
    "labels_per_class",
    "manifest_record",
    "read_keys_file",
]
