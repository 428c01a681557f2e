"""``relic shards inspect``: a summary of a shard set (shards, samples, classes, sizes, first keys)."""

from __future__ import annotations

import statistics
from typing import Any

from pipeline import storage
from pipeline.shards.format import first_samples
from pipeline.shards.manifest import Manifest, load_manifest


def first_keys(manifest: Manifest, n: int = 5, options: dict[str, Any] | None = None) -> list[str]:
    """The first ``n`` sample keys of the first shard, read by streaming its tar headers."""
    if not manifest.shards or n <= 0:
        return []
    return [s.key for s in first_samples(manifest.shard_url(0), n, options)]


def summary(manifest: Manifest) -> dict[str, Any]:
    """The figures ``inspect`` prints, as a dict (for scripts and tests)."""
    sizes = [s.bytes for s in manifest.shards]
    counts = [s.samples for s in manifest.shards]
    return {
        "shards": len(manifest.shards),
        "samples": manifest.total_samples,
        "bytes": manifest.total_bytes,
        "image_ext": manifest.image_ext,
        "label_ext": manifest.label_ext,
        "classes": len(manifest.classes) if manifest.classes else 0,
        "class_counts": dict(manifest.class_counts or {}),
        "samples_per_shard": {"min": min(counts), "median": statistics.median(counts), "max": max(counts)},
        "shard_mb": {
            "min": min(sizes) / 1e6,
            "median": statistics.median(sizes) / 1e6,
            "max": max(sizes) / 1e6,
        },
        "indexed": all(s.index for s in manifest.shards),
        "rejected": len(manifest.rejected),
        "masks": int((manifest.masks or {}).get("samples", 0)),
        "mask_method": (manifest.masks or {}).get("method"),
        "labelled": dict(manifest.labelled) if manifest.labelled is not None else None,
    }


def _partial_labels(m: Manifest) -> str:
    """The ``partial labels`` row: how many samples keep their label and how they were chosen."""
    p = m.labelled or {}
    n, u = int(p.get("labelled", 0)), int(p.get("unlabelled", 0))
    if p.get("keys_file"):
        how = f"--labelled-keys {p['keys_file']}"
    else:
        how = f"--label-fraction {p.get('fraction')} --seed {p.get('seed')}, class-balanced"
    return f"{n:,} labelled, {u:,} unlabelled (-1) = {100 * n / max(1, n + u):.1f}% labelled; {how}"


def inspect_shards(url: str, *, storage_options: dict[str, Any] | None = None, keys: int = 5) -> str:
    """A human-readable summary table of the shard set at ``url`` (directory or manifest URL)."""
    options = dict(storage_options) if storage_options is not None else storage.storage_options(url)
    m = load_manifest(url, options)
    s = summary(m)
    rows = [
        ("manifest", m.url or url),
        ("source", m.source),
        ("shards", f"{s['shards']:,}" + ("  (DALI .idx for every shard)" if s["indexed"] else "")),
        ("samples", f"{s['samples']:,}"),
        ("total size", f"{s['bytes'] / 1e6:,.1f} MB"),
        ("samples/shard", "min {min:,}  median {median:,.0f}  max {max:,}".format(**s["samples_per_shard"])),
        ("shard size", "min {min:,.2f}  median {median:,.2f}  max {max:,.2f} MB".format(**s["shard_mb"])),
        ("image member", f".{m.image_ext}"),
        (
            "label",
            f".{m.label_ext}" + (f" field {m.label_key!r}" if m.label_key else "") if m.label_ext else "none",
        ),
        (
            "saliency masks",
            f"{s['masks']:,} samples ({100 * s['masks'] / max(1, s['samples']):.1f}%), "
            f"method {s['mask_method']}, .{m.masks['member']}"
            if m.masks is not None
            else "none",
        ),
        ("rejected inputs", f"{s['rejected']:,}"),
    ]
    if m.labelled is not None:
        rows.insert(-1, ("partial labels", _partial_labels(m)))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k.ljust(width)}  {v}" for k, v in rows]
    if m.classes:
        lines.append(f"\nclasses ({len(m.classes)}):")
        cw = max(len(c) for c in [*m.classes, *(["-1"] if m.labelled is not None else [])])
        total = max(1, m.total_samples)
        for c in m.classes:
            n = (m.class_counts or {}).get(c, 0)
            lines.append(f"  {c.ljust(cw)}  {n:>9,}  {100 * n / total:5.1f}%")
        if m.labelled is not None:
            n = int(m.labelled.get("unlabelled", 0))
            lines.append(f"  {'-1'.ljust(cw)}  {n:>9,}  {100 * n / total:5.1f}%  (unlabelled)")
    if m.rejected:
        lines.append("\nfirst rejected inputs:")
        lines.extend(f"  {r.input}: {r.reason}" for r in m.rejected[:5])
    lines.append("\nfirst keys: " + ", ".join(first_keys(m, keys, options)))
    return "\n".join(lines)
