"""What masked large views and small crops cost: CPU DALI view-pipeline throughput of the same loader
with ReLICv2's saliency masks on and off, and of the relicv2 recipe against the relic one.

    python -m benchmarks.views [--quick] [--out benchmarks/results/views.json]

Data: ``PHOTOS`` natural photographs from scikit-image (``skimage.data``), cut into ImageNet-like
JPEGs (500 x 375 or 375 x 500, quality 90), each with its real saliency mask, computed by the
project's baseline (``pipeline.shards.masks.spectral_residual_mask``: 64 px wide, 0/255, resized to
the image by the view graph), stored as shards store it (``encode_mask``). An in-memory reader hands
``RawBatch``es of ``BATCH`` images with their masks to ``pipeline.loader.ViewLoader`` (2 threads: two
single-threaded DALI pipelines, the loader's default on 2 cores), views copied into torch tensors:
the production path minus the tar streaming.

Contenders, each in a fresh process:

- ``relic``: ``preset("relic")``, 2 large 224 views, no masks (the masks are not even fed);
- ``relic_masked``: the same with ``mask_prob=0.5`` (each large view from the background-removed
  image with probability 0.5, black fill: ``ViewRecipe.mask_fill``'s default);
- ``relic_masked_p01``: the same with ``mask_prob=0.1``, the value configs/imagenet_r50_relicv2.yaml
  assumes for ReLICv2's p_m;
- ``relicv2_masked``: ``preset("relicv2", mask_prob=0.5)``: 2 large 224 views + 4 small 96 crops.

How they are compared: interleaved (``benchmarks.common.run_interleaved``): all start together and
take turns in ``WINDOW_S``-second windows, the others' processes frozen with SIGSTOP (their DALI
threads included, so no contender's prefetching runs in another's window); each first runs alone
until its first ``WARMUP`` batches are out (pipeline build, allocator growth). A batch counts for
its contender when the interval from the previous batch to it lies inside one of its windows;
throughput is counted batches x ``BATCH`` over their summed intervals. On a 2-core VM the host's
speed drifts by 10% and more over seconds: adjacent windows see the same host.

Headline (DESIGN.md: ``mask_cost``, ReLICv2 saliency masks): ``mask_cost`` = relic_masked /
relic pairs per second (target >= 0.90), at mask_prob 0.5; ``mask_cost_p01`` the same at 0.1; ``relicv2_vs_relic`` = relicv2_masked / relic images per
second (an image of relicv2 is 2 large views + 4 small crops, of relic 2 large views).
"""

from __future__ import annotations

import io
import itertools
import os
import tempfile
import time
from pathlib import Path

from benchmarks.common import parser, print_table, run_interleaved, write_results

BATCH = 32
THREADS = 2
WARMUP = 3
WINDOW_S = 2.0
PHOTOS = 64
MASK_PROB = 0.5
MASK_PROB_CONFIG = 0.1  # views.options.mask_prob of configs/imagenet_r50_relicv2.yaml
#: skimage.data photographs (RGB or grey, natural scenes and objects).
SOURCES = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "cat",
    "immunohistochemistry",
    "hubble_deep_field",
    "camera",
)


def photos(count: int = PHOTOS, seed: int = 0) -> tuple[list[bytes], list[bytes]]:
    """``count`` JPEGs of 500 x 375 (or 375 x 500) cut at random from the scikit-image photos, each
    with its spectral-residual saliency mask (encoded as shards store masks)."""
    import numpy as np
    import skimage.data
    from PIL import Image

    from pipeline.shards.masks import encode_mask, spectral_residual_mask

    rng = np.random.default_rng(seed)
    images, masks = [], []
    for k in range(count):
        source = getattr(skimage.data, SOURCES[k % len(SOURCES)])()
        if source.ndim == 2:
            source = np.repeat(source[..., None], 3, axis=2)
        picture = Image.fromarray(source[..., :3])
        w, h = (500, 375) if k % 2 == 0 else (375, 500)
        zoom = max(w / picture.width, h / picture.height) * rng.uniform(1.0, 1.6)
        picture = picture.resize((round(picture.width * zoom), round(picture.height * zoom)), Image.BILINEAR)
        x0 = int(rng.integers(0, picture.width - w + 1))
        y0 = int(rng.integers(0, picture.height - h + 1))
        crop = picture.crop((x0, y0, x0 + w, y0 + h))
        buf = io.BytesIO()
        crop.save(buf, format="JPEG", quality=90)
        images.append(buf.getvalue())
        masks.append(encode_mask(spectral_residual_mask(np.asarray(crop))))
    return images, masks


class MemoryReader:
    """The ShardReader contract over photos in memory, cycling through them, with their masks."""

    def __init__(self, images: list[bytes], masks: list[bytes], batches: int) -> None:
        self.images, self.masks, self.batches_per_epoch = images, masks, batches

    def epoch(self, epoch: int, start_batch: int = 0):
        import numpy as np

        from pipeline.reader import RawBatch

        n = len(self.images)
        for b in range(start_batch, self.batches_per_epoch):
            idx = [(b * BATCH + i) % n for i in range(BATCH)]
            yield RawBatch(
                images=[self.images[i] for i in idx],
                labels=np.zeros(BATCH, dtype=np.int64),
                keys=[f"{epoch}-{b}-{i}" for i in range(BATCH)],
                masks=[self.masks[i] for i in idx],
            )


RECIPES = {
    "relic": ("relic", {}),
    "relic_masked": ("relic", {"mask_prob": MASK_PROB}),
    "relic_masked_p01": ("relic", {"mask_prob": MASK_PROB_CONFIG}),
    "relicv2_masked": ("relicv2", {"mask_prob": MASK_PROB}),
}


def run_contender(
    name: str, images: list[bytes], masks: list[bytes], deadline: float, ready_path: str
) -> dict:
    """Batches of ``RECIPES[name]`` until ``deadline`` (``time.perf_counter()``, one clock for every
    process on Linux); the time stamp of each batch, the first ``WARMUP`` excluded."""
    import torch

    from pipeline.augment import preset
    from pipeline.loader import ViewLoader

    torch.set_num_threads(1)
    preset_name, options = RECIPES[name]
    recipe = preset(preset_name, **options)
    loader = ViewLoader(MemoryReader(images, masks, batches=10**9), recipe, seed=0, num_threads=THREADS)
    stamps: list[float] = []
    batches = loader.epoch(0)
    for i, _ in enumerate(batches):
        if i + 1 == WARMUP:
            Path(ready_path).touch()
        if i + 1 >= WARMUP:
            stamps.append(time.perf_counter())
        if stamps and stamps[-1] > deadline:
            break
    batches.close()
    return {"views": len(recipe.views), "num_large": recipe.num_large, "stamps": stamps}


def window_rate(stamps: list[float], windows: list[tuple[float, float]], batch: int = BATCH) -> dict:
    """Images per second over the batches whose interval (previous stamp to its own) lies inside one
    of ``windows``; with the number of such batches and their summed seconds."""
    spans = [t1 - t0 for t0, t1 in itertools.pairwise(stamps) if any(a <= t0 and t1 <= b for a, b in windows)]
    seconds = sum(spans)
    return {
        "batches_counted": len(spans),
        "seconds_counted": round(seconds, 3),
        "images_per_s": batch * len(spans) / seconds if seconds else 0.0,
    }


def main() -> None:
    args = parser("views", __doc__).parse_args()
    run_s = 8.0 if args.quick else 25.0  # each contender's share of the interleaved run
    t = time.perf_counter()
    images, masks = photos()
    print(f"{len(images)} photos with spectral-residual masks, ready in {time.perf_counter() - t:.1f} s")

    with tempfile.TemporaryDirectory(prefix="relic-bench-views-") as tmp:
        ready_paths = {name: os.path.join(tmp, f"{name}.ready") for name in RECIPES}
        # Start-up (spawn, imports, pipeline build) runs alone per contender; the deadline leaves each
        # run_s seconds of its own windows after that (about 20 s of start-up in all on 2 cores).
        deadline = time.perf_counter() + 20.0 + run_s * len(RECIPES)
        contenders = {
            name: (run_contender, (name, images, masks, deadline, ready_paths[name])) for name in RECIPES
        }
        results, windows = run_interleaved(
            contenders, window_s=WINDOW_S, ready=lambda name: os.path.exists(ready_paths[name])
        )
    figures: dict[str, dict] = {}
    for name, result in results.items():
        rate = window_rate(result.pop("stamps"), windows[name])
        large = result["num_large"]
        figures[name] = {
            **rate,
            "pairs_per_s": rate["images_per_s"] * large / 2,  # pairs of large views
            "views_per_s": rate["images_per_s"] * result["views"],
            "windows": len(windows[name]),
            **result,
        }
    rows = [{"contender": name, **fig} for name, fig in figures.items()]
    print_table(
        rows,
        [
            "contender",
            "images_per_s",
            "pairs_per_s",
            "views_per_s",
            "views",
            "batches_counted",
            "seconds_counted",
            "windows",
            "tree_peak_rss_mb",
        ],
        title=f"ViewLoader on CPU, batch {BATCH}, {THREADS} threads, {len(images)} photos 500x375, "
        f"mask_prob {MASK_PROB} ({MASK_PROB_CONFIG} for relic_masked_p01; spectral-residual masks)",
    )
    headline = {
        "mask_cost": figures["relic_masked"]["pairs_per_s"] / figures["relic"]["pairs_per_s"],
        "mask_cost_p01": figures["relic_masked_p01"]["pairs_per_s"] / figures["relic"]["pairs_per_s"],
        "relicv2_vs_relic": figures["relicv2_masked"]["images_per_s"] / figures["relic"]["images_per_s"],
    }
    print_table([headline], list(headline), title="headline")
    write_results(
        args.out,
        headline,
        figures,
        photos=len(images),
        batch_size=BATCH,
        threads=THREADS,
        mask_prob=MASK_PROB,
        window_s=WINDOW_S,
        quick=args.quick,
    )


if __name__ == "__main__":
    main()
