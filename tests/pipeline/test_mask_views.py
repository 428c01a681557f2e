"""Masked large views (ReLICv2 saliency masks): the DALI graph on CPU (pipeline/augment.py) and the
torchvision reference (pipeline/reference.py) cut large views from the background-removed image
with probability ``mask_prob``, aligned with their crop and flip; small views never are masked;
``mask_prob = 0`` is today's graph, bit for bit."""

from __future__ import annotations

import collections
import hashlib

import numpy as np
import pytest
import torch
from mask_helpers import FILL, RECT, SIDE, dali_views, fill_pixels, off_segment, png, scene, scene_mask
from PIL import Image
from scipy import ndimage
from scipy.stats import binomtest

from pipeline.augment import ViewRecipe, build_pipeline, preset
from pipeline.reference import reference_views, remove_background
from pipeline.shards.masks import FULL_MASK, decode_mask, encode_mask


def plain(**kw) -> dict:
    """ViewSpec fields of a view that changes nothing (output = pixel / 255) plus ``kw``."""
    base = dict(
        size=SIDE, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0,
        solarize_p=0.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
    )  # fmt: skip
    return {**base, **kw}


def recipe_of(large: list[dict], small: list[dict], **kw) -> ViewRecipe:
    return ViewRecipe(views=large + small, num_large=len(large), **kw)


def dali(recipe: ViewRecipe, images: list[bytes], masks, batches: int = 1, seed: int = 0) -> list[np.ndarray]:
    """Pixel values (0..255, HWC) of every view of the CPU DALI graph: ``[batches * N, H, W, 3]``."""
    return dali_views(recipe, images, masks, batches=batches, seed=seed)


def reference(recipe: ViewRecipe, images: list[bytes], masks, seed: int = 0) -> list[np.ndarray]:
    """The same from the torchvision reference (CHW tensors -> HWC pixel values)."""
    views = reference_views(recipe, images, masks=masks, seed=seed)
    return [v.permute(0, 2, 3, 1).numpy().astype(np.float64) * 255.0 for v in views]


def test_masked_large_views_align_with_their_crop_and_flip():
    """mask_prob = 1, full-frame crops (deterministic), the first large view flipped, the mask at a
    quarter of the image's size: large views show the fill exactly where the (flipped) background is
    and the image exactly where the foreground is, and agree everywhere with the reference's
    background removal (Pillow bilinear mask, within 1.5 grey levels at the partial edge band); the
    small view (same crop) is the untouched image."""
    image = scene()
    recipe = recipe_of([plain(flip_p=1.0), plain()], [plain()], mask_prob=1.0, mask_fill=FILL)
    flipped, straight, small = (v[0] for v in dali(recipe, [png(image)], [encode_mask(scene_mask())]))
    fg = np.zeros((SIDE, SIDE), bool)
    fg[RECT] = True
    inner = np.zeros_like(fg)  # more than the resize's reach (1/2 mask px = 2 image px) inside the edge
    inner[RECT[0].start + 3 : RECT[0].stop - 3, RECT[1].start + 3 : RECT[1].stop - 3] = True
    outer = ~fg.copy()
    outer[RECT[0].start - 3 : RECT[0].stop + 3, RECT[1].start - 3 : RECT[1].stop + 3] = False
    for view, mirror in ((straight, False), (flipped, True)):
        v = view[:, ::-1] if mirror else view  # back to image coordinates
        np.testing.assert_allclose(v[inner], image[inner].astype(np.float64), atol=1e-3)
        np.testing.assert_allclose(v[outer], np.broadcast_to(FILL, v[outer].shape), atol=1e-3)
        expected = np.asarray(remove_background(Image.fromarray(image), encode_mask(scene_mask()), FILL))
        np.testing.assert_allclose(v, expected.astype(np.float64), atol=1.5)
    # the flip is applied to the masked image: unflipped, the flipped view does not match
    assert np.abs(flipped[inner] - image[inner]).max() > 50
    np.testing.assert_allclose(small, image.astype(np.float64), atol=1e-3)


@pytest.mark.parametrize("side", ["dali", "reference"])
def test_masked_views_hold_no_background_under_random_crops(side):
    """Random crops and flips, mask_prob = 1, 128 samples: every pixel of every large view lies on the
    fill-foreground segment (no background texture survives the mask, wherever the crop and flip
    cut), most large views show the fill; small views never show it."""
    large = [plain(size=32, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), flip_p=0.5)] * 2
    small = [plain(size=16, scale=(0.05, 0.3), ratio=(3 / 4, 4 / 3), flip_p=0.5)] * 2
    recipe = recipe_of(large, small, mask_prob=1.0, mask_fill=FILL)
    images = [png(scene(seed)) for seed in range(16)]
    masks = [encode_mask(scene_mask())] * 16
    if side == "dali":
        views = dali(recipe, images, masks, batches=8)
    else:
        views = reference(recipe, images * 8, masks * 8)
    for v in views[:2]:
        assert v.shape == (128, 32, 32, 3)
        assert off_segment(v).max() == 0
        assert (fill_pixels(v) > 0).mean() > 0.5
    for v in views[2:]:
        assert v.shape == (128, 16, 16, 3)
        assert fill_pixels(v).max() == 0 and v[..., 0].max() <= 100 + 1e-3
        assert (off_segment(v) > 0).mean() > 0.5  # the texture is there


def masked_flags(views: list[np.ndarray], num_large: int) -> np.ndarray:
    """``[samples, num_large]``: whether each large view is masked (full-frame views of the scene:
    a masked view shows the fill over most of the background, an unmasked one nowhere)."""
    counts = np.stack([fill_pixels(v) for v in views[:num_large]], axis=1)
    assert ((counts == 0) | (counts > SIDE * SIDE // 2)).all(), "a view is neither masked nor unmasked"
    return counts > 0


P, WRONG_P = 0.3, 0.5


def assert_masked_at_rate(flags: np.ndarray, p: float) -> None:
    """Two-sided binomial tests: the masked fraction of large views is ``p``, and views are masked
    independently (both views of a sample masked at rate p^2)."""
    n, k = flags.size, int(flags.sum())
    assert binomtest(k, n, p).pvalue > 1e-3, f"{k} of {n} large views masked, expected rate {p}"
    both = int(flags.all(axis=1).sum())
    assert binomtest(both, len(flags), p * p).pvalue > 1e-3, (
        f"{both} of {len(flags)} samples with both views masked, expected rate {p * p}"
    )


@pytest.mark.parametrize("side", ["dali", "reference"])
def test_masked_fraction_matches_mask_prob(side):
    """512 large views (256 samples x 2) with mask_prob = 0.3: binomial tests accept 0.3 and reject
    0.5 (the test can fail); the small view is never masked. Samples with FULL_MASK, or no mask at all
    (reference: None), are never masked."""
    recipe = recipe_of([plain(), plain(flip_p=0.5)], [plain(size=32)], mask_prob=P, mask_fill=FILL)
    images = [png(scene(seed)) for seed in range(8)]
    masks = [encode_mask(scene_mask())] * 6 + [FULL_MASK] * 2
    has_mask = np.tile(np.arange(8) < 6, 40)  # per sample, batch after batch
    if side == "dali":
        views = dali(recipe, images, masks, batches=40, seed=5)
    else:  # the reference also takes None for "no mask"
        views = reference(recipe, images * 40, [*masks[:6], FULL_MASK, None] * 40, seed=5)
    flags = masked_flags(views, 2)
    masked, unmasked = flags[has_mask], flags[~has_mask]
    assert not unmasked.any()  # samples without a mask
    assert masked.size == 480
    assert_masked_at_rate(masked, P)
    with pytest.raises(AssertionError, match=r"expected rate 0\.5"):
        assert_masked_at_rate(masked, WRONG_P)
    assert fill_pixels(views[2]).max() == 0


def test_mask_prob_zero_is_todays_graph():
    """With mask_prob = 0 the graph has no mask input and no extra operator, and gives the views of
    the graph before masks existed bit for bit (the digest was taken from that graph, same inputs,
    same seed)."""
    rng = np.random.default_rng(2024)
    images = [
        rng.integers(0, 256, (int(rng.integers(30, 60)), int(rng.integers(30, 60)), 3), dtype=np.uint8)
        for _ in range(4)
    ]
    recipe = preset("relicv2", size=32, small_size=16, num_small=2)
    assert recipe.mask_prob == 0
    views = dali(recipe, [png(a) for a in images], None, batches=2, seed=11)
    digest = hashlib.sha256()
    for v in views:
        digest.update(np.ascontiguousarray(v, dtype=np.float32).tobytes())
    assert digest.hexdigest() == "2d679df54713e353c763cb6acecf68a196318735b127d393aa0d6794f01513b9"
    assert graph_ops(recipe) == TODAYS_OPS
    assert graph_ops(preset("relicv2", size=32, small_size=16, num_small=2, mask_prob=0.5)) != TODAYS_OPS


#: Operators of ``preset("relicv2", size=32, small_size=16, num_small=2)``'s graph before masks.
TODAYS_OPS = {
    "ColorTwist": 4, "CropMirrorNormalize": 4, "ExternalSource": 1, "GaussianBlur": 4,
    "RandomResizedCrop": 4, "_ArithmeticGenericOp": 60, "_conditional__Merge": 3,
    "_conditional__Split": 6, "decoders__Image": 1, "random__CoinFlip": 16, "random__Uniform": 20,
}  # fmt: skip


def graph_ops(recipe: ViewRecipe, device: str = "cpu", placed: bool = False) -> dict:
    """How many of each operator feed the views of ``recipe``'s graph (defined, not built, so that
    the GPU graph can be inspected without CUDA); ``placed``: keyed by (operator, device)."""
    import nvidia.dali.fn as fn
    from nvidia.dali import pipeline_def

    from pipeline.augment import views_graph

    outputs = []

    @pipeline_def(enable_conditionals=True)
    def graph():
        masks = fn.external_source(name="masks") if recipe.mask_prob > 0 else None
        outputs.extend(views_graph(fn.external_source(name="images"), recipe, masks, device=device))
        return tuple(outputs)

    graph(batch_size=2, num_threads=1, device_id=None)
    seen, counts, stack = set(), collections.Counter(), list(outputs)
    while stack:
        op = stack.pop().source
        if id(op) not in seen:
            seen.add(id(op))
            name = getattr(op._op, "schema_name", type(op._op).__name__)
            counts[(name, op._op.device) if placed else name] += 1
            stack.extend(op.inputs)
    return dict(sorted(counts.items()))


def test_a_recipe_with_masks_needs_them():
    recipe = recipe_of([plain(), plain()], [], mask_prob=0.5)
    with pytest.raises(ValueError, match=r"expected \(images, labels, masks\)"):
        build_pipeline(recipe, batch_size=1, num_threads=1, inputs=lambda: (None, None))._build_graph()


def test_reference_without_masks_draws_no_coin():
    """mask_prob = 0: the reference is what it was (same seed, same views with or without masks)."""
    recipe = preset("relic", size=32)
    images = [png(scene(s)) for s in range(4)]
    a = reference_views(recipe, images, seed=3)
    b = reference_views(recipe, images, masks=[encode_mask(scene_mask())] * 4, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_gpu_graph_with_masks_is_the_cpu_graph_on_the_gpu():
    """The device only places operators: the same operators in the same numbers; on the GPU the image
    decoder is "mixed", the mask is decoded and scaled on the CPU and moved over once, the crop
    windows are drawn on the CPU, and the crops, the mask resizes and the blends run on the GPU."""
    recipe = preset("relicv2", size=32, small_size=16, num_small=2, num_large=4, mask_prob=0.5)
    cpu, gpu = graph_ops(recipe, "cpu", placed=True), graph_ops(recipe, "gpu", placed=True)

    def by_name(ops: dict) -> collections.Counter:
        out: collections.Counter = collections.Counter()
        for (name, _), n in ops.items():
            out[name] += n
        return out

    assert by_name(cpu) == by_name(gpu)
    assert {d for _, d in cpu} == {"cpu"}
    assert gpu[("decoders__Image", "mixed")] == 1 and gpu[("decoders__Image", "cpu")] == 1  # image, mask
    assert gpu[("PeekImageShape", "cpu")] == 1 and gpu[("RandomCropGenerator", "cpu")] == 4  # per large view
    assert gpu[("Resize", "gpu")] == 8 and ("Resize", "cpu") not in gpu  # crop and mask of each large view
    assert gpu[("RandomResizedCrop", "gpu")] == 2 and ("RandomResizedCrop", "cpu") not in gpu  # small views


@pytest.mark.parametrize("mask_scale", [0.25, 1.0, 2.0, None], ids=["quarter", "same", "double", "full"])
@pytest.mark.parametrize("fill", [(0, 0, 0), (128, 128, 128), FILL])
def test_masked_crop_is_the_crop_of_the_background_removed_image(mask_scale, fill):
    """A masked view takes the crop window of the image and the same window of the mask (relative
    coordinates), and blends after resizing both; the reference blends the full image, then crops. On
    a non-square photo-like image with a soft-edged mask smaller than, equal to and larger than the
    image (and FULL_MASK), with the window the whole image and a view larger than it (DALI's linear
    upscale is Pillow's bilinear), the two agree within one grey level (rounding) wherever the mask
    is 0 or 255 around a pixel, and within 12 on the soft edge (the order of the interpolations)."""
    import nvidia.dali.fn as fn
    import nvidia.dali.types as types
    from nvidia.dali import pipeline_def

    from pipeline.augment import ViewSpec, _mask_weights, _masked_crop

    rng = np.random.default_rng(1)
    h, w, side = 48, 80, 96
    image = np.asarray(
        Image.fromarray(rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)).resize((w, h), Image.BILINEAR)
    )
    if mask_scale is None:
        mask = FULL_MASK
    else:
        mh, mw = int(h * mask_scale), int(w * mask_scale)
        yy, xx = np.mgrid[:mh, :mw]
        ellipse = ((yy - 0.45 * mh) / (0.3 * mh)) ** 2 + ((xx - 0.6 * mw) / (0.25 * mw)) ** 2
        mask = encode_mask(np.clip(255 * (1.5 - ellipse), 0, 255).astype(np.uint8))  # soft edge
    spec = ViewSpec(size=side, scale=(1.0, 1.0), ratio=(w / h, w / h))  # the window is the whole image
    recipe = ViewRecipe(views=[spec, spec], num_large=2, mask_prob=1.0, mask_fill=fill)

    @pipeline_def(enable_conditionals=True, batch_size=1, num_threads=1, device_id=None)
    def graph():
        encoded, masks = fn.external_source(
            source=lambda: ([np.frombuffer(png(image), np.uint8)], [np.frombuffer(mask, np.uint8)]),
            num_outputs=2,
            batch=True,
            dtype=[types.UINT8, types.UINT8],
        )
        decoded = fn.decoders.image(encoded, output_type=types.RGB)
        shape = fn.peek_image_shape(encoded, dtype=types.INT32)
        image_hw = fn.cast(shape[0:2], dtype=types.FLOAT)
        return _masked_crop(decoded, shape, image_hw, _mask_weights(masks, "cpu"), spec, recipe)

    pipe = graph()
    pipe.build()
    (out,) = pipe.run()
    ours = np.array(out[0]).astype(np.float64)
    assert np.array(out[0]).dtype == np.uint8  # rounded back, as the reference rounds its blend
    cleaned = remove_background(Image.fromarray(image), mask, fill)
    expected = np.asarray(cleaned.resize((side, side), Image.BILINEAR)).astype(np.float64)
    assert ours.shape == (side, side, 3)
    # where the mask is 0 or 255 over a pixel's footprint the two orders agree but for rounding; on the
    # soft edge band they differ by the order of the interpolations, boundedly
    weights = Image.fromarray(decode_mask(mask), mode="L").resize((w, h), Image.BILINEAR)
    flat = np.isin(np.asarray(weights.resize((side, side), Image.BILINEAR)), (0, 255))
    flat = ~ndimage.binary_dilation(~flat, iterations=2)
    error = np.abs(ours - expected).max(axis=2)
    assert error[flat].max() <= 1.0
    assert error.max() <= 12
    plain = np.asarray(Image.fromarray(image).resize((side, side), Image.BILINEAR)).astype(np.float64)
    if mask_scale is None:
        np.testing.assert_allclose(ours, plain, atol=1.5)
    else:
        assert flat.mean() > 0.5 and (np.abs(ours - plain) > 20).any() and (np.abs(ours - plain) < 1.0).any()
