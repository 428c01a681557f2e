"""ViewLoader on real shards through pipeline.reader.ShardReader: a whole epoch of the digits shard
set, and a corrupt JPEG that only DALI notices (reader validation off) versus the reader catching it."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.augment import preset
from pipeline.loader import ViewLoader
from pipeline.reader import ShardReader
from pipeline.shards.manifest import Manifest, ShardInfo, save_manifest


def write_shards(root: str, samples: list[tuple[str, bytes, int]], per_shard: int) -> str:
    """A minimal shard set in the documented format (``{key}.jpg`` + ``{key}.cls``, manifest.json)."""
    infos = []
    for s in range(0, len(samples), per_shard):
        name = f"shard-{s // per_shard:06d}.tar"
        path = os.path.join(root, name)
        with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
            for key, data, label in samples[s : s + per_shard]:
                for ext, payload in (("jpg", data), ("cls", str(label).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        with open(path, "rb") as f:
            blob = f.read()
        digest = hashlib.sha256(blob).hexdigest()
        infos.append(
            ShardInfo(name=name, samples=len(samples[s : s + per_shard]), bytes=len(blob), sha256=digest)
        )
    save_manifest(Manifest(shards=infos, classes=[str(i) for i in range(10)]), root)
    return root


def jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    small = Image.fromarray(rng.integers(0, 256, (3, 3, 3), dtype=np.uint8))
    small.resize((48, 40), Image.BILINEAR).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_digits_epoch_through_shard_reader(digits_shards):
    reader = ShardReader(digits_shards, batch_size=64, seed=0)
    loader = ViewLoader(reader, preset("demo"), seed=0)
    labels = Counter()
    n = 0
    for batch in loader.epoch(0):
        assert [tuple(v.shape) for v in batch.views] == [(64, 3, 32, 32)] * 2
        labels.update(batch.labels.tolist())
        n += 1
    assert n == len(loader) == reader.batches_per_epoch == 1258 // 64
    assert set(labels) == set(range(10)) and sum(labels.values()) == n * 64
    assert loader.stats["decode_fallback"] == 0


def test_prepared_segments_give_the_same_batches_and_a_wrong_guess_costs_nothing(digits_shards):
    """prepare() sets the next segment up ahead (reading, DALI build, first run); what it yields must
    be exactly what the same call yields without it, and an announced segment that is not asked
    for must not disturb the one that is."""

    def run(announce):
        reader = ShardReader(digits_shards, batch_size=128, seed=3)
        loader = ViewLoader(reader, preset("demo", size=16), seed=7, num_threads=1)
        out, prepared = [], []
        for epoch, start in ((0, 0), (0, 5), (1, 0)):
            batches = loader.epoch(epoch, start)
            nxt = announce.get((epoch, start))
            if nxt is not None:
                loader.prepare(*nxt)
            out.append([(b.views[0].clone(), b.views[1].clone(), b.labels.clone()) for b in batches])
            prepared.append(loader._prepared.key if loader._prepared is not None else None)
        loader.close()
        return out, prepared

    plain, none = run({})
    ahead, ahead_keys = run({(0, 0): (0, 5), (0, 5): (1, 0)})
    wrong, wrong_keys = run({(0, 0): (1, 3), (0, 5): (2, 0)})
    # by the end of each segment the announced one was set up
    assert (
        none == [None] * 3 and ahead_keys == [(0, 5), (1, 0), None] and wrong_keys == [(1, 3), (2, 0), None]
    )
    assert [len(seg) for seg in plain] == [9, 4, 9]
    for other in (ahead, wrong):
        for seg_a, seg_b in zip(plain, other):
            assert len(seg_a) == len(seg_b)
            for a, b in zip(seg_a, seg_b):
                for x, y in zip(a, b):
                    assert torch.equal(x, y)


@pytest.mark.parametrize("validate", [False, True])
def test_corrupt_jpeg_past_validation_is_survived(tmp_path, validate):
    """A JPEG whose header is intact but whose entropy data is random bytes is handed out by a reader
    with ``validate=False``; DALI fails on it and the loader replaces it. With validation on, the
    reader skips it itself. Either way every batch is full and the bad key never reaches training."""
    good = jpeg(1)
    sos = good.index(b"\xff\xda")
    rng = np.random.default_rng(0)
    bad = good[: sos + 14] + rng.integers(0, 255, 64, dtype=np.uint8).tobytes()  # no EOI, garbage scan
    samples = [(f"{i:05d}", bad if i == 6 else jpeg(i + 10), i % 10) for i in range(24)]
    root = write_shards(str(tmp_path), samples, per_shard=8)
    reader = ShardReader(root, batch_size=4, seed=0, shuffle_buffer=1, validate=validate)
    loader = ViewLoader(reader, preset("demo"), seed=0)
    batches = list(loader.epoch(0))
    assert len(batches) == reader.batches_per_epoch
    assert all(b.views[0].shape == (4, 3, 32, 32) and torch.isfinite(b.views[0]).all() for b in batches)
    stats = loader.stats
    if validate:
        assert (stats["corrupt_image"], stats["decode_fallback"], stats["pipeline_rebuilds"]) == (1, 0, 0)
    else:
        assert (stats["corrupt_image"], stats["decode_fallback"], stats["pipeline_rebuilds"]) == (0, 1, 1)
