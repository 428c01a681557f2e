"""``relic shards verify``: does a shard set still match its manifest?

Every listed shard must exist with the recorded byte size and sha256 and hold the recorded number of
samples, each with an image member (and a valid class index when the set is labelled); listed DALI
index files must exist and describe the shard exactly. ``decode=True`` also decodes every image with
PIL. Shards are checked in parallel threads (I/O and hashing release the GIL).
"""

from __future__ import annotations

import concurrent.futures as cf
import io
import json
from dataclasses import dataclass
from typing import Any

from PIL import Image

from pipeline import storage
from pipeline.shards import dali_index
from pipeline.shards.manifest import Manifest, load_manifest


@dataclass(frozen=True)
class Problem:
    shard: str  # shard (or manifest) name the problem is about
    message: str  # what was expected and what was found

    def __str__(self) -> str:
        return f"{self.shard}: {self.message}"


def _label_of(manifest: Manifest, exts: dict[str, dali_index.Member]) -> int | None:
    if manifest.label_ext == "cls" and "cls" in exts and exts["cls"].data is not None:
        return int(exts["cls"].data.decode().strip())
    if manifest.label_ext == "json" and "json" in exts and exts["json"].data:
        value = json.loads(exts["json"].data).get(manifest.label_key)
        return value if isinstance(value, int) else None
    return None


def verify_shard(
    manifest: Manifest, i: int, *, decode: bool = False, options: dict[str, Any] | None = None
) -> list[Problem]:
    info = manifest.shards[i]
    url = manifest.shard_url(i)
    problems: list[Problem] = []
    read_exts = {manifest.label_ext} if manifest.label_ext else set()
    if decode:
        read_exts.add(manifest.image_ext)
    samples = 0
    components: list[list[dali_index.Component]] = []
    try:
        with storage.open_url(url, "rb", options) as raw:
            reader = dali_index.HashingReader(raw)
            for group in dali_index.group_samples(dali_index.scan_tar(reader, frozenset(read_exts))):
                samples += 1
                key = dali_index.split_name(group[0].name)[0]
                components.append(
                    [(dali_index.split_name(m.name)[1], m.offset, m.size, m.name) for m in group]
                )
                exts = {dali_index.split_name(m.name)[1]: m for m in group}
                if manifest.image_ext not in exts:
                    problems.append(Problem(info.name, f"sample {key} has no .{manifest.image_ext} member"))
                elif decode:
                    try:
                        with Image.open(io.BytesIO(exts[manifest.image_ext].data or b"")) as img:
                            img.load()
                    except Exception as e:
                        problems.append(Problem(info.name, f"sample {key}: image does not decode: {e}"))
                if manifest.label_ext:
                    try:
                        label = _label_of(manifest, exts)
                    except (ValueError, UnicodeDecodeError):
                        label = None
                    n = len(manifest.classes or [])
                    if label is None or (n > 0 and not 0 <= label < n):
                        problems.append(
                            Problem(
                                info.name, f"sample {key}: label {label!r} is not a class index in [0, {n})"
                            )
                        )
            reader.drain()
    except FileNotFoundError:
        return [Problem(info.name, f"missing: {url} does not exist")]
    except Exception as e:
        return [*problems, Problem(info.name, f"unreadable tar ({type(e).__name__}: {e})")]
    if reader.bytes != info.bytes:
        problems.append(Problem(info.name, f"size {reader.bytes} bytes, manifest says {info.bytes}"))
    if reader.sha256.hexdigest() != info.sha256:
        problems.append(
            Problem(info.name, f"sha256 {reader.sha256.hexdigest()}, manifest says {info.sha256}")
        )
    if samples != info.samples:
        problems.append(Problem(info.name, f"{samples} samples, manifest says {info.samples}"))
    if info.index:
        idx_url = storage.join(storage.dirname(manifest.url or ""), info.index)
        try:
            with storage.open_url(idx_url, "rb", options) as f:
                text = f.read().decode()
        except FileNotFoundError:
            problems.append(Problem(info.name, f"index file {info.index} is missing"))
        else:
            if components and text != dali_index.format_dali_index(components):
                problems.append(
                    Problem(info.name, f"index file {info.index} does not match the shard's contents")
                )
    return problems


def verify_shards(
    url: str, decode: bool = False, *, storage_options: dict[str, Any] | None = None, workers: int = 4
) -> list[Problem]:
    """All problems found in the shard set at ``url`` (a directory or manifest URL); empty when sound."""
    options = dict(storage_options) if storage_options is not None else storage.storage_options(url)
    try:
        manifest = load_manifest(url, options)
    except (FileNotFoundError, ValueError) as e:
        return [Problem("manifest.json", str(e))]
    problems: list[Problem] = []
    if sum((manifest.class_counts or {}).values()) not in (0, manifest.total_samples):
        problems.append(
            Problem(
                "manifest.json",
                f"class_counts sum to {sum(manifest.class_counts.values())}, "
                f"shards hold {manifest.total_samples} samples",
            )
        )
    with cf.ThreadPoolExecutor(max(1, workers)) as pool:
        for found in pool.map(
            lambda i: verify_shard(manifest, i, decode=decode, options=options), range(len(manifest.shards))
        ):
            problems.extend(found)
    return problems
