"""The view recipes in torchvision (transforms v2) with a ``torch.utils.data.DataLoader``.

This is what the DALI graph of :mod:`pipeline.augment` is measured against: the throughput baseline
of ``benchmarks/pipeline.py`` and the statistical reference of ``tests/pipeline/test_reference.py``.
It follows BYOL's published order (Grill et al. 2020, arXiv 2006.07733, Appendix B): random resized
crop, flip, colour jitter (random order, with probability), grayscale, Gaussian blur, solarize,
normalise. The blur kernel is ``2 * ceil(3 * sigma_max) + 1`` taps, DALI's default window at the
largest sigma (BYOL uses 23 taps at 224 px; the Gaussian beyond 3 sigma is below 0.5 %).

Reading: the shards listed in the manifest, in order, split across DataLoader workers by shard
(worker ``w`` of ``W`` reads shards ``w, w + W, ...``), parsed by the shard format's own reader
(:mod:`pipeline.shards.format`); images decoded by Pillow (libjpeg-turbo), as torchvision's own
ImageNet recipes do (``torchvision.io``'s decoders are deprecated since 0.29).

Masks (``ViewRecipe.mask_prob > 0``): each large view, with probability ``mask_prob`` (one
``torch.rand`` draw per large view and sample), starts from the background-removed image instead of
the decoded one, before its random resized crop: ``fill + m (image - fill)`` with ``m`` the sample's
mask (:func:`pipeline.shards.masks.decode_mask`) / 255, resized to the image with Pillow's bilinear
filter, rounded to uint8 (half up). A sample without a mask is never masked; small views never are.
The shard reader reads the masks (``{key}.mask.png``) of sets that have them.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torchvision.transforms import v2

from pipeline.augment import ViewRecipe, ViewSpec


def view_transform(spec: ViewSpec) -> v2.Compose:
    """One view of ``spec`` as torchvision v2 transforms: RGB PIL image -> float32 ``[3, size, size]``.

    The geometric and colour steps run on the PIL image (Pillow's C code, as in the usual torchvision
    training scripts); blur and solarize on uint8 tensors, then scaling and normalisation."""
    brightness, contrast, saturation, hue = spec.jitter
    kernel = 2 * math.ceil(3 * spec.blur_sigma[1]) + 1
    return v2.Compose(
        [
            v2.RandomResizedCrop(spec.size, scale=spec.scale, ratio=spec.ratio, antialias=True),
            v2.RandomHorizontalFlip(p=spec.flip_p),
            v2.RandomApply([v2.ColorJitter(brightness, contrast, saturation, hue)], p=spec.jitter_p),
            v2.RandomGrayscale(p=spec.grayscale_p),
            v2.PILToTensor(),
            v2.RandomApply([v2.GaussianBlur(kernel, sigma=spec.blur_sigma)], p=spec.blur_p),
            v2.RandomSolarize(threshold=128, p=spec.solarize_p),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(spec.mean), std=list(spec.std)),
        ]
    )


def remove_background(image, mask: bytes, fill: tuple[int, int, int]):
    """The background-removed RGB PIL ``image``: ``fill + m (image - fill)``, ``m`` the encoded
    ``mask`` decoded, resized to the image (Pillow's bilinear, antialiased when shrinking) and divided
    by 255; rounded half up to uint8."""
    from PIL import Image

    from pipeline.shards.masks import decode_mask

    m = Image.fromarray(decode_mask(mask), mode="L")
    if m.size != image.size:
        m = m.resize(image.size, Image.Resampling.BILINEAR)
    w = np.asarray(m, dtype=np.float64)[..., None] / 255.0
    colour = np.asarray(fill, dtype=np.float64)
    out = np.floor(colour + w * (np.asarray(image, dtype=np.float64) - colour) + 0.5)
    return Image.fromarray(out.astype(np.uint8), mode="RGB")


class RecipeTransform:
    """Encoded image bytes (and mask) -> the list of view tensors of ``recipe`` (decode once)."""

    def __init__(self, recipe: ViewRecipe) -> None:
        self.recipe = recipe
        self.transforms = [view_transform(s) for s in recipe.views]

    def decode(self, data: bytes):
        from PIL import Image

        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")

    def __call__(self, data: bytes, mask: bytes | None = None) -> list[torch.Tensor]:
        """The views of one image; ``mask``: its encoded saliency mask (None: no mask, unmasked)."""
        image = self.decode(data)
        recipe = self.recipe
        if recipe.mask_prob <= 0:
            return [t(image) for t in self.transforms]
        masked = None
        views = []
        for i, t in enumerate(self.transforms):
            source = image
            if i < recipe.num_large and float(torch.rand(())) < recipe.mask_prob and mask is not None:
                if masked is None:
                    masked = remove_background(image, mask, recipe.mask_fill)
                source = masked
            views.append(t(source))
        return views


class ShardViews(torch.utils.data.IterableDataset):
    """(views, label) per sample of the manifest's shards, split across DataLoader workers by shard."""

    def __init__(self, manifest_url: str, recipe: ViewRecipe, *, seed: int = 0, storage_options=None) -> None:
        from pipeline.shards.manifest import load_manifest

        super().__init__()
        self.manifest = load_manifest(manifest_url, storage_options)
        self.storage_options = storage_options
        self.recipe = recipe
        self.seed = seed

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], int]]:
        from pipeline import storage
        from pipeline.shards.format import image_member, samples, tar_members
        from pipeline.shards.masks import MASK_EXT

        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        torch.manual_seed(self.seed * 1000 + worker)
        m = self.manifest
        rule = m.labels
        read = {"jpg", "jpeg", m.image_ext} | ({rule.ext} if rule.ext else set())
        if self.recipe.mask_prob > 0:
            read.add(MASK_EXT)
        transform = RecipeTransform(self.recipe)
        for shard in range(worker, len(m.shards), workers):
            with storage.open_stream(m.shard_url(shard), self.storage_options) as f:
                for sample in samples(tar_members(f), read, shard=m.shards[shard].name):
                    ext = image_member(sample.parts, m.image_ext)
                    if ext is not None:
                        label = rule.parse(sample.parts)
                        views = transform(sample.parts[ext], sample.parts.get(MASK_EXT))
                        yield views, -1 if label is None else label


def _collate(items: list[tuple[list[torch.Tensor], int]]) -> tuple[list[torch.Tensor], torch.Tensor]:
    views = [torch.stack([it[0][v] for it in items]) for v in range(len(items[0][0]))]
    return views, torch.tensor([it[1] for it in items], dtype=torch.int64)


def reference_loader(
    manifest_url: str,
    recipe: ViewRecipe,
    *,
    batch_size: int,
    num_workers: int = 2,
    seed: int = 0,
    storage_options: dict[str, Any] | None = None,
    prefetch_factor: int = 2,
) -> torch.utils.data.DataLoader:
    """A DataLoader yielding ``(views: list[Tensor [B,3,H,W]], labels: Tensor [B])``, full batches only."""
    return torch.utils.data.DataLoader(
        ShardViews(manifest_url, recipe, seed=seed, storage_options=storage_options),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
        drop_last=True,
        persistent_workers=False,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
    )


def reference_views(
    recipe: ViewRecipe, images: list[bytes], *, masks: list[bytes | None] | None = None, seed: int = 0
) -> list[torch.Tensor]:
    """The views of ``images`` in one process (for tests): ``[N, 3, H, W]`` per view. ``masks``: the
    encoded mask of each image (None for one without; None altogether: no masks).

    Runs with one intra-op thread, as a DataLoader worker does: on small per-image tensors, torch's
    thread pool costs more than it saves (ten times slower with two threads on two cores).
    """
    if masks is not None and len(masks) != len(images):
        raise ValueError(f"reference_views: {len(images)} images but {len(masks)} masks")
    torch.manual_seed(seed)
    transform = RecipeTransform(recipe)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        per_image = [transform(b, m) for b, m in zip(images, masks or [None] * len(images))]
    finally:
        torch.set_num_threads(threads)
    return [torch.stack([views[v] for views in per_image]) for v in range(len(recipe.views))]


__all__ = [
    "RecipeTransform",
    "ShardViews",
    "reference_loader",
    "reference_views",
    "remove_background",
    "view_transform",
]
