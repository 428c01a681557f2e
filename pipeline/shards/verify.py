"""``relic shards verify``: does a shard set still match its manifest?

Every listed shard must exist with the recorded byte size and sha256 and hold the recorded number of
samples, each with an image member (and a valid class index when the set is labelled); listed DALI
index files must exist and describe the shard exactly. Every saliency mask member must pass
:func:`~pipeline.shards.masks.mask_problem` (a PNG, 8-bit greyscale, its image's aspect ratio), and the
masks of samples with an image must number what the manifest's ``masks["samples"]`` says. In a partly
labelled set (``Manifest.labelled``) the samples with label -1 must number its ``unlabelled`` and
``class_counts`` must sum to the others. ``decode=True`` also decodes every
image and mask with PIL. Shards are checked in parallel threads (I/O and hashing release the GIL).
"""

from __future__ import annotations

import concurrent.futures as cf
from dataclasses import dataclass
from typing import Any

from pipeline import storage
from pipeline.shards import dali_index
from pipeline.shards.format import ShardScan, TarFormatError, image_member
from pipeline.shards.images import decode_problem, image_size
from pipeline.shards.manifest import Manifest, load_manifest
from pipeline.shards.masks import MASK_EXT, mask_problem


@dataclass(frozen=True)
class Problem:
    shard: str  # shard (or manifest) name the problem is about
    message: str  # what was expected and what was found

    def __str__(self) -> str:
        return f"{self.shard}: {self.message}"


def verify_shard(
    manifest: Manifest,
    i: int,
    *,
    decode: bool = False,
    options: dict[str, Any] | None = None,
    masks: list[int] | None = None,
    unlabelled: list[int] | None = None,
) -> list[Problem]:
    """The problems of shard ``i``; ``masks`` and ``unlabelled``, when given, get the number of its
    mask members and of its samples with label -1 appended."""
    info = manifest.shards[i]
    rule = manifest.labels
    read = {rule.ext} if rule.ext else set()
    # the images too: a mask is checked against its image's size (the scan reads every byte anyway)
    read |= {"jpg", "jpeg"} if manifest.image_ext in ("jpg", "jpeg") else {manifest.image_ext}
    read.add(MASK_EXT)
    problems: list[Problem] = []
    scan = ShardScan(manifest.shard_url(i), options, read=read)
    samples = masked = no_label = 0
    try:
        for sample in scan:
            samples += 1
            image = image_member(dict.fromkeys(sample.exts), manifest.image_ext)
            if image is None:
                problems.append(
                    Problem(info.name, f"sample {sample.key} has no .{manifest.image_ext} member")
                )
            elif decode:
                problem = decode_problem(sample.parts[image])
                if problem is not None:
                    problems.append(
                        Problem(info.name, f"sample {sample.key}: image does not decode: {problem}")
                    )
            if MASK_EXT in sample.parts:
                masked += image is not None  # a mask without its image is no sample's mask
                size = image_size(sample.parts[image]) if image is not None else None
                bad = mask_problem(sample.parts[MASK_EXT], size, "decode" if decode else True)
                if bad is not None:
                    problems.append(Problem(info.name, f"sample {sample.key}: bad mask: {bad[1]}"))
            label = rule.parse(sample.parts) if rule.ext else None
            no_label += label == -1
            if rule.ext and label is None:
                n = len(manifest.classes or [])
                problems.append(
                    Problem(
                        info.name,
                        f"sample {sample.key}: label {rule.raw(sample.parts)!r} under .{rule.ext}"
                        + (f" field {rule.key!r}" if rule.key else "")
                        + f" is not a class of the manifest ({n} classes)",
                    )
                )
    except FileNotFoundError:
        return [Problem(info.name, f"missing: {scan.url} does not exist")]
    except (TarFormatError, OSError) as e:
        return [*problems, Problem(info.name, f"unreadable tar ({type(e).__name__}: {e})")]
    if scan.bytes != info.bytes:
        problems.append(Problem(info.name, f"size {scan.bytes} bytes, manifest says {info.bytes}"))
    if scan.sha256 != info.sha256:
        problems.append(Problem(info.name, f"sha256 {scan.sha256}, manifest says {info.sha256}"))
    if samples != info.samples:
        problems.append(Problem(info.name, f"{samples} samples, manifest says {info.samples}"))
    if masks is not None:
        masks.append(masked)
    if unlabelled is not None:
        unlabelled.append(no_label)
    if info.index:
        idx_url = storage.join(storage.dirname(manifest.url or ""), info.index)
        try:
            with storage.open_url(idx_url, "rb", options) as f:
                text = f.read().decode()
        except FileNotFoundError:
            problems.append(Problem(info.name, f"index file {info.index} is missing"))
        else:
            if scan.components and text != dali_index.format_dali_index(scan.components):
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
    partial = manifest.labelled
    expected_labelled = manifest.total_samples - int((partial or {}).get("unlabelled", 0))
    if sum((manifest.class_counts or {}).values()) not in (0, expected_labelled):
        problems.append(
            Problem(
                "manifest.json",
                f"class_counts sum to {sum(manifest.class_counts.values())}, "
                f"shards hold {expected_labelled} labelled samples",
            )
        )
    if partial is not None:
        recorded = sum(int(v) for v in (partial.get("per_class") or {}).values())
        if recorded != partial.get("labelled") or manifest.class_counts not in (
            None,
            partial.get("per_class"),
        ):
            problems.append(
                Problem(
                    "manifest.json",
                    f"labelled.per_class sums to {recorded}, labelled.labelled says "
                    f"{partial.get('labelled')}; class_counts must equal labelled.per_class",
                )
            )
    mask_counts: list[int] = []
    unlabelled_counts: list[int] = []
    with cf.ThreadPoolExecutor(max(1, workers)) as pool:
        for found in pool.map(
            lambda i: verify_shard(
                manifest, i, decode=decode, options=options, masks=mask_counts, unlabelled=unlabelled_counts
            ),
            range(len(manifest.shards)),
        ):
            problems.extend(found)
    if (
        partial is not None
        and len(unlabelled_counts) == len(manifest.shards)
        and sum(unlabelled_counts) != int(partial.get("unlabelled", 0))
    ):
        problems.append(
            Problem(
                "manifest.json",
                f"{sum(unlabelled_counts)} samples carry label -1 (unlabelled), manifest's labelled says "
                f"{partial.get('unlabelled', 0)}",
            )
        )
    expected = int((manifest.masks or {}).get("samples", 0))
    if len(mask_counts) == len(manifest.shards) and sum(mask_counts) != expected:
        problems.append(
            Problem(
                "manifest.json",
                f"{sum(mask_counts)} samples with an image carry a .{MASK_EXT} member, manifest says {expected}",
            )
        )
    return problems
