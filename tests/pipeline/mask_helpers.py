"""A synthetic scene whose foreground is known exactly, its saliency mask, and detectors of masked
pixels: shared by the mask tests of the view graph, the reference and the loader; and the CPU DALI
graph's views as pixel values, shared by the view tests."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

# The scene: a textured background (R <= 100, B >= 150: never near the fill or on the line between
# fill and foreground), a green rectangle (the foreground: the mask's rectangle, painted 3 px wider
# on each side so that the mask's partial edge band, 2 px, only ever weighs green), and a magenta
# fill. A pixel of a masked image is then on the fill-green segment (R = B, R + G = 255), whatever
# the crop's interpolation mixes; background texture is off it (|R - B| >= 50).
FILL = (255, 0, 255)
GREEN = (0, 255, 0)
SIDE = 64
RECT = (slice(16, 40), slice(8, 32))  # rows, columns: off centre, so that a flip moves it
MARGIN = 3  # green beyond the mask's rectangle
QUARTER = 4  # the mask is stored at 1/4 of the image's size


def scene(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = np.empty((SIDE, SIDE, 3), np.uint8)
    a[..., 0] = rng.integers(0, 101, (SIDE, SIDE))
    a[..., 1] = rng.integers(0, 256, (SIDE, SIDE))
    a[..., 2] = rng.integers(150, 256, (SIDE, SIDE))
    a[RECT[0].start - MARGIN : RECT[0].stop + MARGIN, RECT[1].start - MARGIN : RECT[1].stop + MARGIN] = GREEN
    return a


def scene_mask() -> np.ndarray:
    """The rectangle's mask at a quarter of the image's size (the rectangle's edges fall on multiples
    of 4, so the upscaled mask is 0 or 255 outside a 2 px band on each side of the edges)."""
    m = np.zeros((SIDE // QUARTER, SIDE // QUARTER), np.uint8)
    m[
        RECT[0].start // QUARTER : RECT[0].stop // QUARTER, RECT[1].start // QUARTER : RECT[1].stop // QUARTER
    ] = 255
    return m


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def fill_pixels(views: np.ndarray) -> np.ndarray:
    """Per view, how many pixels are (nearly) the fill colour."""
    near = (views[..., 0] > 200) & (views[..., 1] < 50) & (views[..., 2] > 200)
    return near.reshape(len(views), -1).sum(axis=1)


def off_segment(views: np.ndarray, tol: float = 3.0) -> np.ndarray:
    """Per view, how many pixels are off the fill-foreground segment (R = B, R + G = 255): background."""
    r, g, b = views[..., 0], views[..., 1], views[..., 2]
    off = (np.abs(r - b) > tol) | (np.abs(r + g - 255) > tol)
    return off.reshape(len(views), -1).sum(axis=1)


def dali_views(recipe, encoded: list, masks=None, batches: int = 1, seed: int = 0) -> list[np.ndarray]:
    """Pixel values (0..255 scale, HWC) of every view of the CPU DALI graph of ``recipe`` for the
    encoded images (bytes or 1-D uint8 arrays) and, when the recipe masks, their encoded masks:
    ``[batches * N, H, W, 3]`` per view. Checks that the labels come through in order."""
    from pipeline.augment import build_pipeline

    data = [np.frombuffer(b, np.uint8) if isinstance(b, bytes) else b for b in encoded]
    labels = np.arange(len(data), dtype=np.int64)
    fed = (data, labels)
    if recipe.mask_prob > 0:
        fed = (data, labels, [np.frombuffer(m, np.uint8) for m in masks])
    pipe = build_pipeline(
        recipe, batch_size=len(data), num_threads=2, seed=seed, source=lambda: fed, layout="HWC"
    )
    pipe.build()
    outs: list[list[np.ndarray]] = [[] for _ in recipe.views]
    for _ in range(batches):
        result = pipe.run()
        for v in range(len(recipe.views)):
            outs[v].append(np.array(result[v].as_tensor()))
        assert np.array_equal(np.array(result[len(recipe.views)].as_tensor()).ravel(), labels)
    return [np.concatenate(o) * 255.0 for o in outs]
