"""Labelled images read straight from shards, for evaluation: the kNN monitor during training,
``relic eval`` and the demo's report all score encoders on exactly these tensors.

Unlike the training reader this never shuffles, pads or skips: shards in manifest order, samples in
tar order, and a sample without an image or a readable label is an error that names shard and key.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline import storage
from pipeline.shards.format import image_member, samples, tar_members
from pipeline.shards.manifest import load_manifest


def _resize_center_crop(img: Image.Image, size: int) -> Image.Image:
    """Shorter side to ``size`` (bicubic), then the central ``size`` x ``size`` square."""
    w, h = img.size
    if (w, h) == (size, size):
        return img
    scale = size / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def load_labelled_images(
    url: str,
    *,
    size: int | None = None,
    max_samples: int | None = None,
    storage_options: dict[str, Any] | None = None,
    unlabelled: str = "error",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every labelled sample of the shard set at ``url`` -> ``(uint8 [N, 3, S, S], int64 labels [N])``.

    ``unlabelled``: what a sample without a label (-1, e.g. in a partly labelled set built with
    ``--label-fraction``) is: ``"error"`` (the default: an evaluation set must be labelled) or
    ``"skip"`` (evaluate on the labelled part; ``max_samples`` counts the labelled samples kept).

    Shards are read in manifest order, samples in tar order (deterministic, no shuffling, no
    padding); ``max_samples`` keeps the first N. Images are decoded with PIL as RGB and, when ``size``
    is given, resized (shorter side) and centre-cropped to it; without ``size`` all images must have
    the same size. A sample without an image or a readable label raises ``ValueError`` naming the
    shard and key, as does a shard holding fewer samples than its manifest lists.
    """
    if unlabelled not in ("error", "skip"):
        raise ValueError(f"unlabelled: expected 'error' or 'skip', got {unlabelled!r}")
    manifest = load_manifest(url, storage_options)
    if not manifest.has_labels:
        raise ValueError(
            f"{manifest.url}: the shards carry no labels (label_ext is null); evaluation needs labels"
        )
    rule = manifest.labels
    read = {"jpg", "jpeg", manifest.image_ext, rule.ext}
    images: list[np.ndarray] = []
    labels: list[int] = []
    for i, info in enumerate(manifest.shards):
        shard = manifest.shard_url(i)
        found = 0
        with storage.open_stream(shard, storage_options) as f:
            for sample in samples(tar_members(f), read, shard=shard):
                found += 1
                ext = image_member(sample.parts, manifest.image_ext)
                if ext is None:
                    raise ValueError(f"{shard}: sample {sample.key!r} has no .{manifest.image_ext} image")
                label = rule.parse(sample.parts)
                if label is not None and label < 0 and unlabelled == "skip":
                    continue
                if label is None or label < 0:
                    raise ValueError(f"{shard}: sample {sample.key!r} has no readable .{rule.ext} label")
                with Image.open(io.BytesIO(sample.parts[ext])) as img:
                    rgb = img.convert("RGB")
                if size is not None:
                    rgb = _resize_center_crop(rgb, size)
                arr = np.asarray(rgb, dtype=np.uint8)
                if images and arr.shape != images[0].shape:
                    raise ValueError(
                        f"{shard}: sample {sample.key!r} is {arr.shape[1]}x{arr.shape[0]}, earlier samples "
                        f"{images[0].shape[1]}x{images[0].shape[0]}; pass size= to resize"
                    )
                images.append(arr)
                labels.append(label)
                if max_samples is not None and len(images) >= max_samples:
                    break
        if max_samples is not None and len(images) >= max_samples:
            break
        if found != info.samples:
            raise ValueError(f"{shard}: {found} samples in the tar, the manifest lists {info.samples}")
    if not images:
        raise ValueError(f"{manifest.url}: no {'labelled ' if unlabelled == 'skip' else ''}samples")
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return x, torch.tensor(labels, dtype=torch.int64)


def load_labels(url: str, *, storage_options: dict[str, Any] | None = None) -> dict[str, int]:
    """``{sample key: label}`` of every labelled sample of the shard set at ``url``, read without
    decoding an image (the label members only); unlabelled samples (-1) are left out."""
    manifest = load_manifest(url, storage_options)
    if not manifest.has_labels:
        raise ValueError(f"{manifest.url}: the shards carry no labels (label_ext is null)")
    rule = manifest.labels
    out: dict[str, int] = {}
    for i in range(len(manifest.shards)):
        shard = manifest.shard_url(i)
        with storage.open_stream(shard, storage_options) as f:
            for sample in samples(tar_members(f), {rule.ext}, shard=shard):
                label = rule.parse(sample.parts)
                if label is not None and label >= 0:
                    out[sample.key] = label
    return out
