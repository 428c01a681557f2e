"""``relic shards index``: our ``manifest.json`` (and DALI ``.idx`` files) for shards made elsewhere.

WebDataset shards written by ``webdataset.ShardWriter``, img2dataset or GNU tar are scanned once,
streaming and in parallel (threads: the work is I/O and sha256, both outside the GIL), without
rewriting any shard. The manifest records per shard the sample count, byte size and sha256, which
member extension holds the image (the most common of jpg/jpeg/png/webp) and which the label:
``cls`` (decimal class index) or ``json`` with an integer field (``label_key``: given, or the first
of ``label``/``cls``/``class``/``target`` present in every sample). Samples without an image member
are listed as rejected (the reader skips them).
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import os
import sys
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import braceexpand

from pipeline import storage
from pipeline.shards import dali_index
from pipeline.shards.manifest import IMAGE_EXTS, MANIFEST_NAME, Manifest, Rejected, ShardInfo, save_manifest

LABEL_KEYS = ("label", "cls", "class", "target")


class ShardIndexError(ValueError):
    """The shards cannot be indexed (none found, unreadable, mixed up); the message names the shard."""


def expand_shard_urls(url_or_pattern: str, options: dict[str, Any] | None = None) -> list[str]:
    """Shard URLs from a brace pattern, a list file (one URL/path per line), a directory, or one tar."""
    options = options or {}
    if "{" in url_or_pattern and "}" in url_or_pattern:
        return list(braceexpand.braceexpand(url_or_pattern))
    fs, path = storage.filesystem(url_or_pattern, options)
    if not fs.exists(path):
        raise ShardIndexError(f"{url_or_pattern} does not exist")
    if fs.isdir(path):
        scheme = url_or_pattern.split("://", 1)[0] + "://" if storage.is_remote(url_or_pattern) else ""
        urls = sorted(scheme + p for p in fs.find(path) if p.endswith(".tar"))
        if not urls:
            raise ShardIndexError(f"no .tar files below {url_or_pattern}")
        return urls
    if url_or_pattern.endswith(".tar"):
        return [url_or_pattern]
    base = storage.dirname(url_or_pattern)
    with fs.open(path, "rt") as f:
        lines = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise ShardIndexError(f"list file {url_or_pattern} names no shards")
    return [ln if "://" in ln or os.path.isabs(ln) else storage.join(base, ln) for ln in lines]


@dataclass
class ShardScan:
    url: str
    samples: int = 0
    bytes: int = 0
    sha256: str = ""
    image_exts: Counter = field(default_factory=Counter)
    cls_labels: list[int | None] = field(default_factory=list)
    json_labels: dict[str, list[Any]] = field(default_factory=dict)  # candidate key -> values per sample
    no_image: list[str] = field(default_factory=list)  # keys of samples without an image member
    idx_text: str | None = None


def _label_int(raw: bytes | None) -> int | None:
    try:
        return int(raw.decode().strip()) if raw is not None else None
    except (UnicodeDecodeError, ValueError):
        return None


def scan_shard(url: str, options: dict[str, Any] | None = None, *, want_idx: bool = False) -> ShardScan:
    """Stream one shard once: count samples, hash bytes, find image/label members, build its index."""
    scan = ShardScan(url)
    components: list[list[dali_index.Component]] = []
    try:
        with storage.open_url(url, "rb", options) as raw:
            reader = dali_index.HashingReader(raw)
            members = dali_index.scan_tar(reader, read_exts=frozenset({"cls", "json"}))
            for group in dali_index.group_samples(members):
                scan.samples += 1
                key = dali_index.split_name(group[0].name)[0]
                exts = {dali_index.split_name(m.name)[1]: m for m in group}
                image = next((e for e in exts if e in IMAGE_EXTS), None)
                if image is None:
                    scan.no_image.append(key)
                else:
                    scan.image_exts[image] += 1
                scan.cls_labels.append(_label_int(exts["cls"].data) if "cls" in exts else None)
                meta: Any = None
                if "json" in exts and exts["json"].data:
                    try:
                        meta = json.loads(exts["json"].data)
                    except ValueError:
                        meta = None
                for k in LABEL_KEYS:
                    v = meta.get(k) if isinstance(meta, dict) else None
                    scan.json_labels.setdefault(k, []).append(v if isinstance(v, int) else None)
                if want_idx:
                    components.append(
                        [(dali_index.split_name(m.name)[1], m.offset, m.size, m.name) for m in group]
                    )
            reader.drain()
    except FileNotFoundError:
        raise ShardIndexError(f"shard {url} does not exist") from None
    except (OSError, EOFError, ValueError) as e:  # tarfile.TarError is an Exception; caught below
        raise ShardIndexError(f"shard {url} cannot be read as a tar file: {e}") from None
    except Exception as e:
        raise ShardIndexError(f"shard {url} cannot be read as a tar file: {type(e).__name__}: {e}") from None
    scan.bytes, scan.sha256 = reader.bytes, reader.sha256.hexdigest()
    if want_idx and components:
        scan.idx_text = dali_index.format_dali_index(components)
    return scan


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


def index_shards(
    url_or_pattern: str,
    out: str | None = None,
    *,
    write_idx: bool = False,
    workers: int = 4,
    label_key: str | None = None,
    storage_options: dict[str, Any] | None = None,
    progress: bool | None = None,
) -> Manifest:
    """Scan existing shards and save ``manifest.json`` for them (in ``out``, a directory or manifest URL;
    default: the shards' common directory, which must hold every shard)."""
    options = (
        dict(storage_options) if storage_options is not None else storage.storage_options(url_or_pattern)
    )
    urls = expand_shard_urls(url_or_pattern, options)
    if out is None:
        dirs = {storage.dirname(u) for u in urls}
        out = (
            dirs.pop()
            if len(dirs) == 1
            else (os.path.commonpath(list(dirs)) if not storage.is_remote(urls[0]) else None)
        )
        if out is None:
            raise ShardIndexError(
                "shards lie in several directories; pass OUT (a directory above all of them)"
            )
    manifest_dir = out[: -len(MANIFEST_NAME)].rstrip("/") if out.endswith(".json") else out
    names = [_relative(manifest_dir, u) for u in urls]

    show = sys.stderr.isatty() if progress is None else progress
    bar = None
    if show:
        from tqdm import tqdm

        bar = tqdm(total=len(urls), unit="shard", desc="index", file=sys.stderr)
    scans: list[ShardScan] = []
    with cf.ThreadPoolExecutor(max(1, workers)) as pool:
        for scan in pool.map(lambda u: scan_shard(u, options, want_idx=write_idx), urls):
            scans.append(scan)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()

    total = sum(s.samples for s in scans)
    if total == 0:
        raise ShardIndexError(f"the shards of {url_or_pattern} hold no samples")
    image_counts = sum((s.image_exts for s in scans), Counter())
    if not image_counts:
        raise ShardIndexError(f"no sample of {url_or_pattern} has an image member ({'/'.join(IMAGE_EXTS)})")
    image_ext = image_counts.most_common(1)[0][0]

    labels: list[int | None]
    label_ext: str | None
    cls_labels = [v for s in scans for v in s.cls_labels]
    if label_key is None and all(v is not None for v in cls_labels):
        label_ext, labels = "cls", cls_labels
    else:
        label_ext, labels = None, []
        for k in [label_key] if label_key else LABEL_KEYS:
            if k in LABEL_KEYS:
                values = [v for s in scans for v in s.json_labels[k]]
            else:
                values = _json_key_values(scans, k, options)
            if values and all(v is not None for v in values):
                label_ext, label_key, labels = "json", k, values
                break
        else:
            if label_key is not None:
                raise ShardIndexError(f"not every sample has an integer {label_key!r} in its .json member")
            label_key = None
    classes = class_counts = None
    if label_ext is not None:
        if min(labels) < 0:  # type: ignore[type-var]
            raise ShardIndexError(f"negative class index {min(labels)} in {url_or_pattern}")  # type: ignore[type-var]
        n = max(labels) + 1  # type: ignore[type-var]
        classes = [str(i) for i in range(n)]
        counts = Counter(labels)
        class_counts = {str(i): counts.get(i, 0) for i in range(n)}

    shards = []
    for name, scan in zip(names, scans):
        idx_name = None
        if write_idx and scan.idx_text is not None:
            idx_name = name[: -len(".tar")] + ".idx" if name.endswith(".tar") else name + ".idx"
            idx_url = storage.join(manifest_dir, idx_name)
            fs, path = storage.filesystem(idx_url, options)
            if storage.is_remote(idx_url):
                fs.pipe_file(path, scan.idx_text.encode())
            else:
                tmp = f"{path}.tmp-{os.getpid()}"
                with open(tmp, "w") as f:
                    f.write(scan.idx_text)
                os.replace(tmp, path)
        shards.append(ShardInfo(name, scan.samples, scan.bytes, scan.sha256, idx_name))
    rejected = [Rejected(f"{s.url}:{k}", "sample has no image member") for s in scans for k in s.no_image]
    manifest = Manifest(
        shards=shards,
        image_ext=image_ext,
        label_ext=label_ext,
        label_key=label_key if label_ext == "json" else None,
        classes=classes,
        class_counts=class_counts,
        encoding={"indexed": True, "image_exts": dict(image_counts)},
        source=url_or_pattern,
        rejected=rejected,
    )
    save_manifest(manifest, out, options)
    return manifest


def _json_key_values(scans: list[ShardScan], key: str, options: dict[str, Any]) -> list[int | None]:
    """Integer values of a user-named JSON field, one per sample (a second pass over the shards)."""
    values: list[int | None] = []
    for s in scans:
        with storage.open_url(s.url, "rb", options) as raw:
            for group in dali_index.group_samples(dali_index.scan_tar(raw, read_exts=frozenset({"json"}))):
                meta = next((m.data for m in group if dali_index.split_name(m.name)[1] == "json"), None)
                try:
                    v = json.loads(meta).get(key) if meta else None
                except (ValueError, AttributeError):
                    v = None
                values.append(v if isinstance(v, int) else None)
    return values
