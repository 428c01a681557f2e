"""ViewLoader (pipeline/loader.py): tensors per recipe, dtypes and layouts, seeding, the decode-failure
fallback, and shutdown. Sources are in-memory readers here; test_loader_shards.py uses ShardReader."""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from mask_helpers import FILL, fill_pixels, png, scene, scene_mask
from PIL import Image

from pipeline.augment import preset
from pipeline.loader import ViewBatch, ViewLoader, pipeline_threads
from pipeline.shards.masks import encode_mask


def jpeg(rng: np.random.Generator, h: int, w: int) -> bytes:
    """A smooth random colour field (compresses like a photo, unlike white noise)."""
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize((w, h), Image.BILINEAR).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@dataclass
class Raw:
    images: list[bytes]
    labels: np.ndarray
    keys: list[str]


class ListReader:
    """The ShardReader contract over a list of encoded images, in order; ``corrupt`` maps a sample
    index to bytes that replace it (what a reader with validate=False would hand out)."""

    def __init__(self, images: list[bytes], batch_size: int, corrupt: dict[int, bytes] | None = None):
        self.images, self.batch_size, self.corrupt = images, batch_size, corrupt or {}
        self.batches_per_epoch = len(images) // batch_size
        self.stats = {"corrupt_image": 0}

    def epoch(self, epoch: int, start_batch: int = 0):
        for b in range(start_batch, self.batches_per_epoch):
            idx = range(b * self.batch_size, (b + 1) * self.batch_size)
            yield Raw(
                [self.corrupt.get(i, self.images[i]) for i in idx],
                np.array(list(idx), dtype=np.int64),
                [f"{i:06d}" for i in idx],
            )


@pytest.fixture(scope="module")
def images() -> list[bytes]:
    rng = np.random.default_rng(0)
    return [jpeg(rng, int(rng.integers(40, 90)), int(rng.integers(40, 90))) for _ in range(24)]


@pytest.mark.parametrize(
    ("recipe", "sizes", "num_large"),
    [
        (preset("relic"), [224, 224], 2),
        (preset("relicv2", num_small=2), [224, 224, 96, 96], 2),
        (preset("demo"), [32, 32], 2),
    ],
    ids=["relic", "relicv2", "demo"],
)
def test_views_per_recipe(images, recipe, sizes, num_large):
    loader = ViewLoader(ListReader(images[:8], batch_size=4), recipe, seed=0)
    batches = list(loader.epoch(0))
    assert len(batches) == len(loader) == 2 and recipe.num_large == num_large
    for i, batch in enumerate(batches):
        assert isinstance(batch, ViewBatch)
        assert [tuple(v.shape) for v in batch.views] == [(4, 3, s, s) for s in sizes]
        assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in batch.views)
        assert all(torch.isfinite(v).all() for v in batch.views)
        assert batch.labels.dtype == torch.int64 and batch.labels.tolist() == list(range(4 * i, 4 * i + 4))
        assert batch.keys == [f"{j:06d}" for j in range(4 * i, 4 * i + 4)]  # the reader's, in slot order
        assert batch.num_large == recipe.num_large


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_and_channels_last(images, dtype):
    reader = ListReader(images[:8], batch_size=4)
    reference = next(ViewLoader(reader, preset("demo"), seed=1).epoch(0))
    (batch,) = list(ViewLoader(reader, preset("demo"), seed=1, dtype=dtype, channels_last=True).epoch(0, 1))
    first = next(ViewLoader(reader, preset("demo"), seed=1, dtype=dtype, channels_last=True).epoch(0))
    for v, ref in zip(first.views, reference.views):
        assert v.dtype == dtype and v.shape == ref.shape
        assert v.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(v.float(), ref, atol=0.05, rtol=0.02)  # same seed: same views
    assert batch.labels.tolist() == [4, 5, 6, 7]


def test_views_stay_valid_while_later_batches_are_made(images):
    """A view handed out must not change when DALI runs on (its buffers are reused or freed)."""
    batches = ViewLoader(ListReader(images, batch_size=2), preset("relic"), seed=0).epoch(0)
    first = next(batches)
    kept = [v.clone() for v in first.views]
    rest = list(batches)  # 11 more pipeline runs while `first` is held
    assert len(rest) == 11
    for v, ref in zip(first.views, kept):
        assert torch.equal(v, ref)
    assert not any(torch.equal(first.views[0], b.views[0]) for b in rest)


def test_same_seed_same_batches_and_epochs_differ(images):
    reader = ListReader(images, batch_size=6)

    def views(seed: int, epoch: int, start: int = 0) -> list[torch.Tensor]:
        return [
            torch.cat(b.views, 1) for b in ViewLoader(reader, preset("demo"), seed=seed).epoch(epoch, start)
        ]

    a, b = views(3, 0), views(3, 0)
    assert len(a) == 4
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not any(torch.equal(x, y) for x, y in zip(a, views(4, 0)))
    assert not any(torch.equal(x, y) for x, y in zip(a, views(3, 1)))
    assert len(views(3, 0, start=3)) == 1


@pytest.mark.parametrize("num_pipelines", [1, 2, 3])
def test_pipelines_deal_batches_round_robin_in_order(images, num_pipelines):
    """However many pipelines share the threads, batches come out in the reader's order, each once,
    and the same seed gives the same views (the deal does not depend on thread timing)."""
    reader = ListReader(images, batch_size=2)  # 12 batches

    def run() -> list[ViewBatch]:
        loader = ViewLoader(reader, preset("demo"), seed=5, num_threads=3, num_pipelines=num_pipelines)
        assert loader.num_pipelines == num_pipelines
        return list(loader.epoch(0, start_batch=1))

    a, b = run(), run()
    assert [x.labels.tolist() for x in a] == [[2 * j, 2 * j + 1] for j in range(1, 12)]
    assert all(torch.equal(torch.cat(x.views, 1), torch.cat(y.views, 1)) for x, y in zip(a, b))
    # pipelines are seeded apart: with one image everywhere, no two batches share their views
    same = ListReader([images[0]] * len(images), batch_size=2)
    loader = ViewLoader(same, preset("demo"), seed=5, num_threads=3, num_pipelines=num_pipelines)
    crops = [x.views[0] for x in loader.epoch(0)]
    assert not any(torch.equal(crops[i], crops[j]) for i in range(len(crops)) for j in range(i))


def test_pipeline_count_defaults_and_limits(images):
    reader = ListReader(images, batch_size=2)
    assert ViewLoader(reader, preset("demo"), num_threads=2).num_pipelines == 2
    assert ViewLoader(reader, preset("demo"), num_threads=1).num_pipelines == 1
    ten = ViewLoader(reader, preset("demo"), num_threads=10)
    assert ten.num_pipelines == 4 and ten.threads == [3, 3, 2, 2] == pipeline_threads(10)
    assert pipeline_threads(5, 2) == [3, 2] and pipeline_threads(3, 1) == [3]
    with pytest.raises(ValueError, match="num_pipelines"):
        ViewLoader(reader, preset("demo"), num_threads=2, num_pipelines=3)
    with pytest.raises(ValueError, match="num_threads"):
        ViewLoader(reader, preset("demo"), num_threads=0)


def test_undecodable_sample_is_replaced_and_counted(images, caplog):
    """Random bytes and a truncated JPEG slip past a non-validating reader; DALI raises on them; the
    loader rebuilds, replaces them by decodable samples of the same batch and counts them."""
    corrupt = {5: b"\x00not an image" * 40, 13: images[13][: len(images[13]) // 3]}
    reader = ListReader(images[:16], batch_size=4, corrupt=corrupt)
    loader = ViewLoader(reader, preset("demo"), seed=0)
    with caplog.at_level("WARNING", logger="pipeline.loader"):
        batches = list(loader.epoch(0))
    assert len(batches) == 4 and all(b.views[0].shape == (4, 3, 32, 32) for b in batches)
    labels = torch.cat([b.labels for b in batches]).tolist()
    assert 5 not in labels and labels[:4] == [0, 1, 2, 3] and labels[4] == 4
    fallback = loader.stats["decode_fallback"]
    truncated_decodes = 13 in labels  # libjpeg may decode a truncated file (grey bottom): then it stays
    assert fallback == (1 if truncated_decodes else 2)
    assert loader.stats["pipeline_rebuilds"] >= 1 and loader.stats["corrupt_image"] == 0
    assert "000005" in caplog.text
    # a clean epoch afterwards needs no fallback
    clean = ViewLoader(ListReader(images[:16], batch_size=4), preset("demo"))
    assert len(list(clean.epoch(0))) == 4 and clean.stats["decode_fallback"] == 0


def test_a_batch_with_nothing_decodable_fails_with_its_keys(images):
    reader = ListReader(images[:8], batch_size=4, corrupt={i: b"junk" * 50 for i in range(4, 8)})
    with pytest.raises(RuntimeError, match=r"no decodable image.*000004"):
        list(ViewLoader(reader, preset("demo")).epoch(0))


def test_reader_errors_propagate_and_early_exit_stops_the_feeder(images):
    class Failing(ListReader):
        def epoch(self, epoch, start_batch=0):
            yield from list(super().epoch(epoch, start_batch))[:1]
            raise OSError("shard-000003.tar: connection reset")

    with pytest.raises(OSError, match="connection reset"):
        list(ViewLoader(Failing(images[:8], batch_size=4), preset("demo")).epoch(0))

    class Broken(ListReader):  # a RuntimeError from the reader is not mistaken for a DALI decode error
        def epoch(self, epoch, start_batch=0):
            yield from list(super().epoch(epoch, start_batch))[:1]
            raise RuntimeError("manifest changed under the reader")

    loader = ViewLoader(Broken(images[:8], batch_size=4), preset("demo"))
    with pytest.raises(RuntimeError, match="manifest changed"):
        list(loader.epoch(0))
    assert loader.stats["pipeline_rebuilds"] == 0

    before = threading.active_count()
    it = ViewLoader(ListReader(images, batch_size=2), preset("demo"), prefetch=1).epoch(0)
    next(it)
    it.close()
    assert threading.active_count() <= before


def test_malloc_tuning_applies_on_glibc_and_only_once():
    import platform

    from pipeline.loader import tune_process_malloc

    first = tune_process_malloc()
    if platform.libc_ver()[0] == "glibc":
        assert first is True  # mallopt accepted every parameter
    assert tune_process_malloc() is first


# --------------------------------------------------------------------------------------------------
# Masks (ReLICv2 background removal): fed beside the images, applied to large views only


@dataclass
class MaskedRaw(Raw):
    masks: list[bytes | None] | None = None


class MaskedReader(ListReader):
    """A reader of ``RawBatch``es with masks (``masks[i]`` of sample i, None: no usable mask), or with
    ``masks=None`` a set without masks (``RawBatch.masks is None``)."""

    def __init__(self, images, masks, batch_size, corrupt=None):
        super().__init__(images, batch_size, corrupt)
        self.masks = masks

    def epoch(self, epoch: int, start_batch: int = 0):
        for raw in super().epoch(epoch, start_batch):
            idx = [int(k) for k in raw.keys]
            masks = None if self.masks is None else [self.masks[i] for i in idx]
            yield MaskedRaw(raw.images, raw.labels, raw.keys, masks)


def plain_preset(**kw):
    """relicv2 with L = 4 large 64 px views and S = 2 small 32 px ones that change nothing but the
    crop's size (full frame, no colour op, output = pixel / 255): masked pixels stay visible."""
    return preset(
        "relicv2", num_large=4, num_small=2, size=64, small_size=32, scale=(1.0, 1.0), ratio=(1.0, 1.0),
        jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0, mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0), mask_fill=FILL, **kw,
    )  # fmt: skip


def pixels(view: torch.Tensor) -> np.ndarray:
    """``[B, 3, H, W]`` pixel / 255 -> ``[B, H, W, 3]`` pixel values."""
    return view.permute(0, 2, 3, 1).numpy().astype(np.float64) * 255.0


def test_masks_apply_to_the_large_views_only_and_follow_their_samples(caplog):
    """L = 4, S = 2, mask_prob = 1: a sample with a mask has all four large views masked (fill over
    the background) and both small views untouched; a sample without one (None) is never masked. The
    slot of an undecodable image without a mask is filled with a sample of the batch that has one:
    it takes its donor's mask with its image."""
    images = [png(scene(i)) for i in range(12)]
    masks = [encode_mask(scene_mask()) if i % 3 else None for i in range(12)]  # 0, 3, 6, 9: no mask
    reader = MaskedReader(images, masks, batch_size=4, corrupt={6: b"\x00not an image" * 40})
    loader = ViewLoader(reader, plain_preset(mask_prob=1.0), seed=0)
    with caplog.at_level("WARNING", logger="pipeline.loader"):
        batches = list(loader.epoch(0))
    assert len(batches) == 3 and loader.stats["decode_fallback"] == 1
    for batch in batches:
        assert len(batch.views) == 6 and batch.num_large == 4
        assert [tuple(v.shape) for v in batch.views] == [(4, 3, 64, 64)] * 4 + [(4, 3, 32, 32)] * 2
        has_mask = np.array([int(k) % 3 != 0 for k in batch.keys])
        for v in batch.views[:4]:
            np.testing.assert_array_equal(fill_pixels(pixels(v)) > 1000, has_mask)
        for v in batch.views[4:]:
            assert fill_pixels(pixels(v)).max() == 0
    keys = [k for b in batches for k in b.keys]
    assert "000006" not in keys and keys[4:8] == ["000004", "000005", "000004", "000007"]
    assert "000006" in caplog.text and "has no masks" not in caplog.text


def test_a_set_without_masks_is_unmasked_and_said_once(caplog):
    images = [png(scene(i)) for i in range(8)]
    loader = ViewLoader(MaskedReader(images, None, batch_size=4), plain_preset(mask_prob=1.0), seed=0)
    with caplog.at_level("WARNING", logger="pipeline.loader"):
        batches = list(loader.epoch(0))
    assert len(batches) == 2
    assert all(fill_pixels(pixels(v)).max() == 0 for b in batches for v in b.views)
    assert caplog.text.count("has no masks") == 1


def test_an_undecodable_mask_unmasks_its_sample(caplog):
    """DALI raises on a mask it cannot decode; the loader replaces it by FULL_MASK and goes on."""
    images = [png(scene(i)) for i in range(4)]
    masks = [encode_mask(scene_mask())] * 4
    masks[2] = masks[2][:40]  # truncated PNG
    loader = ViewLoader(MaskedReader(images, masks, batch_size=4), plain_preset(mask_prob=1.0), seed=0)
    with caplog.at_level("WARNING", logger="pipeline.loader"):
        (batch,) = list(loader.epoch(0))
    assert loader.stats["mask_fallback"] == 1 and "000002" in caplog.text
    np.testing.assert_array_equal(fill_pixels(pixels(batch.views[0])) > 1000, [True, True, False, True])


def test_without_mask_prob_masks_are_not_fed(images):
    """mask_prob = 0: the recipe's graph has no mask input; masks in the raw batches are ignored."""
    masks = [encode_mask(scene_mask())] * 8
    a = ViewLoader(MaskedReader(images[:8], masks, batch_size=4), preset("demo"), seed=2)
    b = ViewLoader(ListReader(images[:8], batch_size=4), preset("demo"), seed=2)
    for x, y in zip(a.epoch(0), b.epoch(0)):
        assert all(torch.equal(u, v) for u, v in zip(x.views, y.views))
