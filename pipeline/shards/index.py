"""``relic shards index``: our ``manifest.json`` (and DALI ``.idx`` files) for shards made elsewhere.

WebDataset shards written by ``webdataset.ShardWriter``, img2dataset or GNU tar — plain or compressed
(``.tar.gz``/``.tgz``/``.tar.bz2``/``.tar.xz``) — are scanned once, streaming and in parallel (threads:
the work is I/O and sha256, both outside the GIL), without rewriting any shard; samples are what
:mod:`pipeline.shards.format` says they are. The manifest records per shard the sample count, byte
size and sha256, which member extension holds the image (the most common of jpg/jpeg/png/webp) and
which the label (:class:`~pipeline.shards.format.LabelRule`): ``.cls``, else the first JSON field of
``label``/``cls``/``class``/``target`` (or the one named) that every sample has — integer class
indices, or class names (then ``classes`` lists them sorted). Samples without an image member are
listed as rejected (the reader skips them). Samples with a saliency mask member (``{key}.mask.png``,
:mod:`pipeline.shards.masks`) are counted into ``masks`` (method ``"indexed"``), so that readers use
them; the masks themselves are checked by ``relic shards verify`` and the reader.

A shard that cannot be read (truncated, not a tar, members of a sample scattered over the file) is
left out of the manifest and listed among its rejected inputs with the reason; ``strict=True`` makes
it an error instead. DALI index files are written for plain tars only (DALI reads no compressed ones).
"""

from __future__ import annotations

import concurrent.futures as cf
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import braceexpand

from pipeline import storage
from pipeline.shards import dali_index
from pipeline.shards.format import IMAGE_EXTS, LABEL_KEYS, LabelRule, ShardScan, TarFormatError
from pipeline.shards.manifest import MANIFEST_NAME, Manifest, Rejected, ShardInfo, save_manifest
from pipeline.shards.masks import MASK_EXT

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
_PLAIN_SUFFIX = ".tar"


class ShardIndexError(ValueError):
    """The shards cannot be indexed (none found, none readable, no images); the message says why."""


def is_shard_name(name: str) -> bool:
    return name.endswith(SHARD_SUFFIXES)


def expand_shard_urls(url_or_pattern: str, options: dict[str, Any] | None = None) -> list[str]:
    """Shard URLs from a brace pattern, a directory (every shard below it), one shard, or a list file
    (one URL/path per line, relative ones against the list's folder)."""
    options = options or {}
    if "{" in url_or_pattern and "}" in url_or_pattern:
        return list(braceexpand.braceexpand(url_or_pattern))
    fs, path = storage.filesystem(url_or_pattern, options)
    if not fs.exists(path):
        raise ShardIndexError(f"{url_or_pattern} does not exist")
    if fs.isdir(path):
        scheme = url_or_pattern.split("://", 1)[0] + "://" if storage.is_remote(url_or_pattern) else ""
        urls = sorted(scheme + p for p in fs.find(path) if is_shard_name(p))
        if not urls:
            raise ShardIndexError(f"no shards ({', '.join(SHARD_SUFFIXES)}) below {url_or_pattern}")
        return urls
    if is_shard_name(url_or_pattern):
        return [url_or_pattern]
    base = storage.dirname(url_or_pattern)
    try:
        with fs.open(path, "rt") as f:
            lines = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    except UnicodeDecodeError:
        raise ShardIndexError(
            f"{url_or_pattern} is neither a shard ({', '.join(SHARD_SUFFIXES)}) nor a text list of shards"
        ) from None
    if not lines:
        raise ShardIndexError(f"list file {url_or_pattern} names no shards")
    return [ln if "://" in ln or os.path.isabs(ln) else storage.join(base, ln) for ln in lines]


def label_candidates(label_key: str | None) -> list[LabelRule]:
    """The label rules an index tries, in order of preference."""
    if label_key is not None:
        return [LabelRule("json", label_key)]
    return [LabelRule("cls"), *(LabelRule("json", k) for k in LABEL_KEYS)]


@dataclass
class ShardSummary:
    """What one pass over a shard found (``scan_shard``)."""

    url: str
    samples: int = 0
    bytes: int = 0
    sha256: str = ""
    image_exts: Counter = field(default_factory=Counter)
    labels: dict[LabelRule, Counter] = field(default_factory=dict)
    """Per candidate rule that every sample satisfied so far: how often each raw value occurs."""
    no_image: list[str] = field(default_factory=list)
    masked: int = 0
    """Samples with a mask member."""
    idx_text: str | None = None
    error: str | None = None
    """Why the shard cannot be used (it is then left out of the manifest)."""


def scan_shard(
    url: str, options: dict[str, Any] | None = None, *, candidates: list[LabelRule], want_idx: bool = False
) -> ShardSummary:
    """Stream one shard once: count samples, hash bytes, find image and label members, build its index."""
    summary = ShardSummary(url, labels={rule: Counter() for rule in candidates})
    scan = ShardScan(url, options, read={rule.ext for rule in candidates if rule.ext})
    try:
        for sample in scan:
            summary.samples += 1
            image = next((e for e in IMAGE_EXTS if e in sample.exts), None)
            if image is None:
                summary.no_image.append(sample.key)
            else:
                summary.image_exts[image] += 1
                summary.masked += MASK_EXT in sample.exts
            for rule in list(summary.labels):
                value = rule.raw(sample.parts)
                if value is None:
                    del summary.labels[rule]
                else:
                    summary.labels[rule][value] += 1
    except FileNotFoundError:
        summary.error = "shard does not exist"
        return summary
    except (TarFormatError, OSError) as e:
        summary.error = f"cannot be read as a tar file: {e}"
        return summary
    summary.bytes, summary.sha256 = scan.bytes, scan.sha256
    if want_idx and scan.components and url.endswith(_PLAIN_SUFFIX):
        summary.idx_text = dali_index.format_dali_index(scan.components)
    return summary


def choose_labels(
    summaries: list[ShardSummary], candidates: list[LabelRule]
) -> tuple[LabelRule, dict[str, int]] | None:
    """The first candidate every sample of every shard satisfies with one kind of value (all class
    indices >= -1, or all class names), its classes filled in, and the samples per class."""
    for rule in candidates:
        if not all(rule in s.labels for s in summaries):
            continue
        counts = sum((s.labels[rule] for s in summaries), Counter())
        names = [v for v in counts if isinstance(v, str)]
        if names and len(names) < len(counts):
            continue  # mixed indices and names
        if not names and min(counts) < -1:
            raise ShardIndexError(f"negative class index {min(counts)} under {_describe(rule)}")
        if names:
            classes = sorted(names)
            per_class = {c: counts[c] for c in classes}
        else:
            classes = [str(i) for i in range(max(counts) + 1)]
            per_class = {c: counts.get(i, 0) for i, c in enumerate(classes)}
        return LabelRule(rule.ext, rule.key, tuple(classes)), per_class
    return None


def _describe(rule: LabelRule) -> str:
    return f".{rule.ext}" + (f" field {rule.key!r}" if rule.key else "")


def _relative(base: str, url: str) -> str:
    if storage.is_remote(base) != storage.is_remote(url):
        raise ShardIndexError(f"shard {url} and manifest directory {base} are on different storage")
    if storage.is_remote(url):
        prefix = base.rstrip("/") + "/"
        if not url.startswith(prefix):
            raise ShardIndexError(f"shard {url} is not below the manifest's directory {base}")
        return url[len(prefix) :]
    rel = os.path.relpath(os.path.abspath(url), os.path.abspath(base))
    if rel.startswith(".."):
        raise ShardIndexError(f"shard {url} is not below the manifest's directory {base}")
    return rel.replace(os.sep, "/")


def _manifest_dir(urls: list[str], out: str | None) -> str:
    if out is None:
        dirs = {storage.dirname(u) for u in urls}
        if len(dirs) == 1:
            return dirs.pop()
        if storage.is_remote(urls[0]):
            raise ShardIndexError(
                "shards lie in several directories; pass OUT (a directory above all of them)"
            )
        return os.path.commonpath(list(dirs))
    return out[: -len(MANIFEST_NAME)].rstrip("/") if out.endswith(".json") else out


def index_shards(
    url_or_pattern: str,
    out: str | None = None,
    *,
    write_idx: bool = False,
    workers: int = 4,
    label_key: str | None = None,
    strict: bool = False,
    storage_options: dict[str, Any] | None = None,
    progress: bool | None = None,
) -> Manifest:
    """Scan existing shards and save ``manifest.json`` for them (in ``out``, a directory or manifest URL;
    default: the shards' common directory, which must hold every shard). Unreadable shards are listed
    in the manifest's ``rejected``; with ``strict`` the first one raises :class:`ShardIndexError`."""
    options = (
        dict(storage_options) if storage_options is not None else storage.storage_options(url_or_pattern)
    )
    urls = expand_shard_urls(url_or_pattern, options)
    manifest_dir = _manifest_dir(urls, out)
    names = [_relative(manifest_dir, u) for u in urls]
    candidates = label_candidates(label_key)

    show = sys.stderr.isatty() if progress is None else progress
    bar = None
    if show:
        from tqdm import tqdm

        bar = tqdm(total=len(urls), unit="shard", desc="index", file=sys.stderr)
    summaries: list[ShardSummary] = []
    with cf.ThreadPoolExecutor(max(1, workers)) as pool:
        for summary in pool.map(
            lambda u: scan_shard(u, options, candidates=candidates, want_idx=write_idx), urls
        ):
            summaries.append(summary)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()

    broken = [(n, s) for n, s in zip(names, summaries) if s.error is not None]
    if broken and (strict or len(broken) == len(summaries)):
        s = broken[0][1]
        raise ShardIndexError(
            f"shard {s.url}: {s.error}" + (f" ({len(broken)} unreadable)" if len(broken) > 1 else "")
        )
    usable = [(n, s) for n, s in zip(names, summaries) if s.error is None]
    good = [s for _, s in usable]
    if sum(s.samples for s in good) == 0:
        raise ShardIndexError(f"the shards of {url_or_pattern} hold no samples")
    image_counts = sum((s.image_exts for s in good), Counter())
    if not image_counts:
        raise ShardIndexError(f"no sample of {url_or_pattern} has an image member ({'/'.join(IMAGE_EXTS)})")
    image_ext = image_counts.most_common(1)[0][0]

    chosen = choose_labels(good, candidates)
    if chosen is None and label_key is not None:
        raise ShardIndexError(f"not every sample has a class in the field {label_key!r} of its .json member")
    rule, class_counts = chosen if chosen is not None else (LabelRule(), None)

    shards = []
    for name, s in usable:
        idx_name = None
        if s.idx_text is not None:
            idx_name = name[: -len(_PLAIN_SUFFIX)] + ".idx"
            storage.write_atomic(storage.join(manifest_dir, idx_name), s.idx_text.encode(), options)
        shards.append(ShardInfo(name, s.samples, s.bytes, s.sha256, idx_name))
    rejected = [Rejected(f"{s.url}:{k}", "sample has no image member") for s in good for k in s.no_image]
    rejected += [Rejected(s.url, f"shard left out: {s.error}") for _, s in broken]
    classes = list(rule.classes) if rule.classes else None
    masked = sum(s.masked for s in good)
    with_image = sum(image_counts.values())
    manifest = Manifest(
        shards=shards,
        image_ext=image_ext,
        label_ext=rule.ext,
        label_key=rule.key if rule.ext == "json" else None,
        classes=classes,
        class_counts=class_counts,
        encoding={"indexed": True, "image_exts": dict(image_counts)},
        source=url_or_pattern,
        rejected=rejected,
        masks={
            "member": MASK_EXT,
            "samples": masked,
            "method": "indexed",
            "rejected": 0,
            "missing": with_image - masked,
        }
        if masked
        else None,
    )
    save_manifest(manifest, out or manifest_dir, options)
    return manifest
