"""The DALI view graph (pipeline/augment.py) on CPU: recipes, exact single-op results against numpy,
per-op firing rates against their configured probabilities, and seeding."""

from __future__ import annotations

import dataclasses
import io
import math

import numpy as np
import pytest
from mask_helpers import dali_views
from PIL import Image
from pydantic import ValidationError

from pipeline.augment import PresetError, PresetOptions, ViewRecipe, ViewSpec, preset

# A 32x32 test card: left half (200, 60, 20), right half (40, 140, 230). Every op leaves a trace:
# flip swaps the halves, grayscale equalises channels, solarize maps 200 -> 55, blur softens the
# edge at column 16, brightness moves the flat colours. PNG keeps pixel values exact.
LEFT, RIGHT = (200, 60, 20), (40, 140, 230)


def card() -> np.ndarray:
    a = np.zeros((32, 32, 3), np.uint8)
    a[:, :16] = LEFT
    a[:, 16:] = RIGHT
    return a


def png(a: np.ndarray) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return np.frombuffer(buf.getvalue(), np.uint8)


def plain(**kw) -> ViewSpec:
    """A view that changes nothing (full-frame crop, every op off, output = pixel / 255) plus ``kw``."""
    base = dict(
        size=32, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0,
        solarize_p=0.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
    )  # fmt: skip
    base.update(kw)
    return ViewSpec(**base)


def run(recipe: ViewRecipe, images: list[np.ndarray], batches: int, seed: int = 0) -> list[np.ndarray]:
    """Pixel values (0..255 scale, HWC) of every view: ``[batches * len(images), H, W, 3]`` per view.
    ``images``: HWC arrays (fed as PNG) or already encoded files (1-D uint8)."""
    return dali_views(recipe, [a if a.ndim == 1 else png(a) for a in images], batches=batches, seed=seed)


def test_presets_follow_the_papers():
    relic = preset("relic")
    assert relic.num_large == 2 and relic.sizes == [224, 224]
    assert [v.blur_p for v in relic.views] == [1.0, 0.1]
    assert [v.solarize_p for v in relic.views] == [0.0, 0.2]
    for v in relic.views:
        assert (v.jitter, v.jitter_p, v.grayscale_p, v.flip_p) == ((0.4, 0.4, 0.2, 0.1), 0.8, 0.2, 0.5)
        assert v.blur_sigma == (0.1, 2.0) and v.scale == (0.08, 1.0)
    v2 = preset("relicv2", num_small=6)
    assert v2.num_large == 2 and v2.sizes == [224, 224] + [96] * 6
    assert [v.scale for v in v2.views] == [(0.14, 1.0)] * 2 + [(0.05, 0.14)] * 6
    demo = preset("demo")
    assert demo.sizes == [32, 32] and demo.num_large == 2


def test_preset_overrides_and_errors():
    r = preset("relic", size=64, blur_p=[0.5, 0.0], grayscale_p=0.0)
    assert r.sizes == [64, 64] and [v.blur_p for v in r.views] == [0.5, 0.0]
    assert all(v.grayscale_p == 0.0 for v in r.views)
    assert preset("relic", PresetOptions(size=64, blur_p=[0.5, 0.0], grayscale_p=0.0)) == r
    assert preset("relicv2", num_small=2, small_size=48).sizes == [224, 224, 48, 48]
    with pytest.raises(ValueError, match="blurp"):
        preset("relic", blurp=0.1)
    with pytest.raises(ValueError, match="unknown view preset"):
        preset("simclr")
    with pytest.raises(PresetError, match="2 values for 3 views") as info:
        preset("relicv2", num_small=1, blur_p=[1.0, 0.1])
    assert info.value.option == "blur_p"
    with pytest.raises(PresetError, match="num_small is a relicv2 option") as info:
        preset("demo", num_small=2)
    assert info.value.option == "num_small"
    with pytest.raises(ValidationError, match="greater than or equal to 2") as info:
        preset("relic", num_large=1)
    assert info.value.errors()[0]["loc"] == ("num_large",)
    with pytest.raises(TypeError, match="not both"):
        preset("relic", PresetOptions(size=64), blur_p=0.5)


def test_presets_build_num_large_large_views_and_num_small_small_ones():
    """L = 4, S = 2: four large views of the large size alternating BYOL's view 1 / view 2 settings,
    then two small crops; group options size and scale per group, per-view options on top."""
    r = preset("relicv2", num_large=4, num_small=2)
    assert r.num_large == 4 and r.sizes == [224] * 4 + [96] * 2
    assert [v.blur_p for v in r.views] == [1.0, 0.1, 1.0, 0.1, 0.5, 0.5]
    assert [v.solarize_p for v in r.views] == [0.0, 0.2, 0.0, 0.2, 0.0, 0.0]
    assert [v.scale for v in r.views] == [(0.14, 1.0)] * 4 + [(0.05, 0.14)] * 2
    assert r.views[0] == r.views[2] and r.views[1] == r.views[3] and r.views[0] != r.views[1]
    three = preset("relic", num_large=3)  # every preset: num_large builds large views, never relabels
    assert three.num_large == 3 and three.sizes == [224] * 3
    assert [v.blur_p for v in three.views] == [1.0, 0.1, 1.0]
    demo = preset("demo", num_large=4)
    assert demo.sizes == [32] * 4 and all(v.flip_p == 0.0 and v.scale == (0.4, 1.0) for v in demo.views)
    groups = preset("relicv2", num_small=1, large_scale=(0.3, 1.0), small_scale=(0.1, 0.2), small_size=64)
    assert [v.scale for v in groups.views] == [(0.3, 1.0)] * 2 + [(0.1, 0.2)]
    assert groups.sizes == [224, 224, 64]
    assert [v.scale for v in preset("relic", large_scale=(0.3, 1.0)).views] == [(0.3, 1.0)] * 2
    # the every-view / per-view scale applies after the group options
    over = preset("relicv2", num_small=1, large_scale=(0.3, 1.0), scale=[[0.5, 1.0], [0.6, 1.0], [0.1, 0.3]])
    assert [v.scale for v in over.views] == [(0.5, 1.0), (0.6, 1.0), (0.1, 0.3)]
    assert {v.scale for v in preset("relicv2", num_small=1, scale=(0.2, 0.9)).views} == {(0.2, 0.9)}


def test_mask_options_go_to_the_recipe():
    assert (preset("relicv2").mask_prob, preset("relicv2").mask_fill) == (0.0, (0, 0, 0))
    r = preset("relicv2", num_small=2, mask_prob=0.3, mask_fill=(124, 116, 104))
    assert (r.mask_prob, r.mask_fill) == (0.3, (124, 116, 104))
    assert preset("relic", mask_prob=1.0).mask_prob == 1.0


def test_sequence_options_take_one_value_or_one_per_view():
    one = preset("relic", scale=[0.2, 1.0])
    assert [v.scale for v in one.views] == [(0.2, 1.0), (0.2, 1.0)]
    each = preset("relic", scale=[[0.2, 1.0], [0.3, 0.9]], jitter=(0.1, 0.1, 0.1, 0.0))
    assert [v.scale for v in each.views] == [(0.2, 1.0), (0.3, 0.9)]
    assert [v.jitter for v in each.views] == [(0.1, 0.1, 0.1, 0.0)] * 2


@pytest.mark.parametrize(
    ("build", "loc", "value", "expected"),
    [
        (lambda: ViewSpec(grayscale_p=1.5), ("grayscale_p",), 1.5, "less than or equal to 1"),
        (lambda: ViewSpec(scale=(0.5, 0.1)), ("scale",), (0.5, 0.1), "min <= max"),
        (lambda: ViewSpec(jitter=(0.4, 0.4, 0.2, 0.6)), ("jitter", 3), 0.6, "less than or equal to 0.5"),
        (lambda: ViewRecipe(views=[ViewSpec()], num_large=2), ("num_large",), 2, "1..1"),
        (lambda: PresetOptions(size="abc"), ("size",), "abc", "valid integer"),
        (lambda: PresetOptions(num_large=1), ("num_large",), 1, "greater than or equal to 2"),
        (lambda: PresetOptions(mask_prob=1.5), ("mask_prob",), 1.5, "less than or equal to 1"),
        (
            lambda: ViewRecipe(views=[ViewSpec()], num_large=1, mask_fill=(0, 0, 256)),
            ("mask_fill", 2),
            256,
            "less than or equal to 255",
        ),
        (lambda: PresetOptions(blur_p=[0.5, 2.0]), ("blur_p", "per view", 1), 2.0, "less than or equal to 1"),
    ],
)
def test_bad_values_name_field_value_and_expectation(build, loc, value, expected):
    with pytest.raises(ValidationError) as info:
        build()
    error = info.value.errors()[0]
    assert (error["loc"], error["input"]) == (loc, value)
    assert expected in error["msg"], error["msg"]


def test_every_view_field_is_a_preset_option():
    options = {f.name for f in dataclasses.fields(PresetOptions)}
    assert options == {f.name for f in dataclasses.fields(ViewSpec)} | {
        "num_small",
        "small_size",
        "num_large",
        "large_scale",
        "small_scale",
        "mask_prob",
        "mask_fill",
    }


def test_single_ops_match_numpy():
    """With p = 1 each op is deterministic (up to blur): compare with the formula it implements."""
    a = card().astype(np.float64)
    luma = a @ np.array([0.299, 0.587, 0.114])
    recipe = ViewRecipe(
        views=[
            plain(),
            plain(flip_p=1.0),
            plain(grayscale_p=1.0),
            plain(solarize_p=1.0),
            plain(mean=(0.5, 0.25, 0.125), std=(0.5, 0.25, 2.0)),
        ],
        num_large=1,
    )
    same, flipped, gray, solar, normed = (v[0] for v in run(recipe, [card()], batches=1))
    np.testing.assert_allclose(same, a, atol=1e-3)
    np.testing.assert_allclose(flipped, a[:, ::-1], atol=1e-3)
    np.testing.assert_allclose(gray, np.repeat(luma[..., None], 3, axis=2), atol=1.01)
    np.testing.assert_allclose(solar, np.where(a >= 128, 255 - a, a), atol=1e-3)
    expected = (a / 255 - np.array([0.5, 0.25, 0.125])) / np.array([0.5, 0.25, 2.0]) * 255
    np.testing.assert_allclose(normed, expected, atol=1e-2)


def test_jpeg_decode_is_pillows():
    """DALI's CPU decoder (libjpeg-turbo, accurate integer IDCT) decodes a real photo exactly as Pillow,
    the torchvision reference's decoder, does."""
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buf, format="JPEG", quality=90)  # 512 x 512
    jpeg = np.frombuffer(buf.getvalue(), np.uint8)
    pillow = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")).astype(np.float64)
    # full-frame crop of a square image at its own size: the identity (test_single_ops_match_numpy)
    (decoded,) = run(ViewRecipe(views=[plain(size=512)], num_large=1), [jpeg], batches=1)
    np.testing.assert_allclose(decoded[0], pillow, atol=1e-3)


def _within_binomial(hits: np.ndarray, p: float, what: str) -> None:
    n = hits.size
    tol = 4 * math.sqrt(p * (1 - p) / n)
    assert abs(hits.mean() - p) <= tol, (
        f"{what}: fired in {hits.mean():.3f} of {n} samples, expected {p} ± {tol:.3f}"
    )


def test_each_random_op_fires_at_its_probability():
    """1024 samples; each view isolates one op at p = 0.3 (grayscale with full jitter on, to check that
    jitter never makes channels equal by itself) and a detector tells per sample whether it fired."""
    p = 0.3
    recipe = ViewRecipe(
        views=[
            plain(flip_p=p),
            plain(grayscale_p=p, jitter_p=0.8, jitter=(0.4, 0.4, 0.2, 0.1)),
            plain(solarize_p=p),
            plain(blur_p=p, blur_sigma=(1.0, 2.0)),
            plain(jitter_p=p, jitter=(0.4, 0.0, 0.0, 0.0)),
        ],
        num_large=1,
    )
    flip, gray, solar, blur, jitter = run(recipe, [card()] * 128, batches=8)
    _within_binomial(flip[:, :, :16, 0].mean(axis=(1, 2)) < flip[:, :, 16:, 0].mean(axis=(1, 2)), p, "flip")
    channel_spread = (gray.max(axis=3) - gray.min(axis=3)).max(axis=(1, 2))
    _within_binomial(channel_spread < 2.0, p, "grayscale")
    _within_binomial(solar[:, 0, 0, 0] < 128, p, "solarize")
    _within_binomial(np.abs(blur[:, 16, 15, 0] - LEFT[0]) > 3, p, "blur")
    # Brightness b ~ U[0.6, 1.4] is invisible when |200 b - 200| <= 1.5: probability 0.015 / 0.8.
    _within_binomial(np.abs(jitter[:, 0, 0, 0] - LEFT[0]) > 1.5, p * (1 - 0.015 / 0.8), "jitter")


def test_probability_test_detects_a_wrong_rate():
    """The detector and tolerance above are sharp enough to reject p = 0.45 when 0.3 is claimed."""
    (gray,) = run(ViewRecipe(views=[plain(grayscale_p=0.45)], num_large=1), [card()] * 128, batches=4)
    with pytest.raises(AssertionError, match="grayscale"):
        _within_binomial((gray.max(axis=3) - gray.min(axis=3)).max(axis=(1, 2)) < 2.0, 0.3, "grayscale")


def test_same_seed_same_views_other_seed_different():
    recipe = preset("relic", size=32)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (48, 40, 3), dtype=np.uint8) for _ in range(8)]
    a = run(recipe, images, batches=2, seed=7)
    b = run(recipe, images, batches=2, seed=7)
    c = run(recipe, images, batches=2, seed=8)
    for x, y, z in zip(a, b, c):
        assert x.shape == (16, 32, 32, 3)
        np.testing.assert_array_equal(x, y)
        assert not np.array_equal(x, z)


def _graph_ops(device: str) -> list[tuple[str, str]]:
    """(operator, device) of every operator that feeds the views, defined without building (so the
    GPU variant can be inspected on a machine without CUDA)."""
    import nvidia.dali.fn as fn
    from nvidia.dali import pipeline_def

    from pipeline.augment import views_graph

    outputs = []

    @pipeline_def(enable_conditionals=True)
    def graph():
        outputs.extend(
            views_graph(fn.external_source(name="jpegs"), preset("relicv2", num_small=1), device=device)
        )
        return tuple(outputs)

    graph(batch_size=2, num_threads=1, device_id=None)
    seen, ops, stack = set(), [], list(outputs)
    while stack:
        node = stack.pop()
        op = node.source
        if id(op) in seen:
            continue
        seen.add(id(op))
        ops.append((getattr(op._op, "schema_name", type(op._op).__name__), op._op.device))
        stack.extend(op.inputs)
    return sorted(ops)


def test_gpu_graph_is_the_cpu_graph_on_the_gpu():
    cpu, gpu = _graph_ops("cpu"), _graph_ops("gpu")
    assert [name for name, _ in cpu] == [name for name, _ in gpu]  # same operators, same count
    decoders = [d for name, d in gpu if name.startswith("decoders__Image")]
    assert decoders == ["mixed"] and [d for name, d in cpu if name.startswith("decoders__Image")] == ["cpu"]
    image_ops = ("RandomResizedCrop", "ColorTwist", "GaussianBlur", "CropMirrorNormalize")
    assert {d for name, d in gpu if name in image_ops} == {"gpu"}
    assert {d for name, d in cpu if name != "ExternalSource"} == {"cpu"}
    assert sum(name == "RandomResizedCrop" for name, _ in gpu) == 3  # decode once, crop per view
