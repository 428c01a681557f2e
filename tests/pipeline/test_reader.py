"""ShardReader: epoch planning (pure), exact coverage across ranks x workers, resume, labels, formats.

Shards are written here with ``tarfile`` + ``save_manifest`` so that every member (and every defect,
see test_reader_bad_data.py) is under the test's control. Helpers are imported by the other
test_reader_* modules.
"""

from __future__ import annotations

import io
import itertools
import json
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline import reader as reader_mod
from pipeline.plan import EpochPlan, allowed_world_sizes, rank_partitions, shard_order, shuffle_order
from pipeline.reader import RawBatch, ShardReader
from pipeline.shards import format as shard_format
from pipeline.shards.manifest import Manifest, ShardInfo, save_manifest

# --- helpers ------------------------------------------------------------------------------------------


def encode(index: int, fmt: str = "JPEG", size: tuple[int, int] = (24, 16)) -> bytes:
    """A small image whose pixels depend on ``index`` (so decoded content identifies the sample)."""
    rng = np.random.default_rng(index)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))


def sample_members(
    index: int, image_ext: str = "jpg", label_ext: str | None = "cls"
) -> list[tuple[str, bytes]]:
    key = f"{index:09d}"
    fmt = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}[image_ext]
    members = [(f"{key}.{image_ext}", encode(index, fmt))]
    if label_ext == "cls":
        members.append((f"{key}.cls", str(index % 10).encode()))
    elif label_ext == "json":
        members.append((f"{key}.json", json.dumps({"label": index % 10, "source": f"s{index}"}).encode()))
    if label_ext != "json":
        members.append((f"{key}.json", json.dumps({"source": f"s{index}"}).encode()))
    return members


def make_shard_set(
    root: Path,
    shard_members: list[list[tuple[str, bytes]]],
    shard_samples: list[int],
    *,
    image_ext: str = "jpg",
    label_ext: str | None = "cls",
    label_key: str | None = None,
) -> str:
    """Write ``shard-{i:06d}.tar`` files and a manifest claiming ``shard_samples``; returns the manifest URL."""
    root.mkdir(parents=True, exist_ok=True)
    infos = []
    for i, (members, samples) in enumerate(zip(shard_members, shard_samples)):
        path = root / f"shard-{i:06d}.tar"
        write_tar(path, members)
        infos.append(ShardInfo(name=path.name, samples=samples, bytes=path.stat().st_size, sha256=""))
    manifest = Manifest(shards=infos, image_ext=image_ext, label_ext=label_ext, label_key=label_key)
    return save_manifest(manifest, str(root))


def make_clean_set(root: Path, sizes: list[int], **kw) -> str:
    """Shards of good samples, numbered consecutively across shards."""
    shards, start = [], 0
    for n in sizes:
        shards.append([m for i in range(start, start + n) for m in sample_members(i, **kw)])
        start += n
    return make_shard_set(root, shards, sizes, **kw)


def epoch_batches(reader: ShardReader, epoch: int, start_batch: int = 0) -> list[RawBatch]:
    return list(reader.epoch(epoch, start_batch))


def keys_of(batches: list[RawBatch]) -> list[str]:
    return [k for b in batches for k in b.keys]


def naive_steps(
    counts: list[int], global_batch: int, partitions: int, buffer: int, seed: int, epoch: int
) -> list[list[tuple[int, int]]]:
    """Independent reference of the epoch order (pipeline/plan.py's module doc, rules 1-4), written by
    listing every sample: the (shard, ordinal) of each sample of each global step, in order."""
    sequence = [(int(s), o) for s in shard_order(len(counts), seed, epoch) for o in range(counts[s])]
    steps = len(sequence) // global_batch
    b = global_batch // partitions
    per_partition = []
    for p in range(partitions):
        stretch = sequence[p * steps * b : (p + 1) * steps * b]
        rng = np.random.default_rng([seed, epoch, 1, p, 0])
        emitted = [stretch[i] for i in shuffle_order(len(stretch), buffer, rng)]
        per_partition.append(emitted)
    return [
        [x for p in range(partitions) for x in per_partition[p][k * b : (k + 1) * b]] for k in range(steps)
    ]


def expand(spans) -> list[tuple[int, int]]:
    return [(s, o) for s, a, b in spans for o in range(a, b)]


# --- planning (pure) ----------------------------------------------------------------------------------


@pytest.mark.parametrize("partitions,batch", [(1, 4), (2, 6), (3, 6), (6, 12), (12, 24)])
def test_partitions_match_the_naive_reference_and_cover_disjoint(partitions, batch):
    counts = [7, 3, 11, 5, 9, 1, 6, 23, 13, 17]
    plan = EpochPlan(tuple(counts), batch, partitions, seed=3, epoch=2)
    sequence = [(int(s), o) for s in shard_order(len(counts), 3, 2) for o in range(counts[s])]
    flat = [x for p in range(partitions) for x in expand(plan.spans(p))]
    assert flat == sequence[: plan.steps * batch]  # contiguous partitions, in order, the tail left out
    assert plan.steps == sum(counts) // batch and all(
        len(expand(plan.spans(p))) == plan.steps * plan.partition_batch for p in range(partitions)
    )


def test_shard_order_and_dropped_remainder_change_between_epochs():
    counts = [10] * 8 + [3]  # 83 samples, global batch 16 -> 80 used, 3 dropped
    dropped, orders = [], []
    everything = {(s, o) for s in range(len(counts)) for o in range(counts[s])}
    for epoch in range(6):
        orders.append(tuple(shard_order(len(counts), 0, epoch)))
        plan = EpochPlan(tuple(counts), 16, 2, 0, epoch)
        used = {x for p in range(2) for x in expand(plan.spans(p))}
        dropped.append(frozenset(everything - used))
        assert len(everything - used) == 3
    assert len(set(orders)) == 6
    assert len(set(dropped)) > 1
    assert orders[0] == tuple(shard_order(len(counts), 0, 0))  # deterministic
    assert tuple(shard_order(len(counts), 1, 0)) != orders[0]  # seed matters


def test_ranks_must_share_the_partitions_equally():
    assert list(rank_partitions(12, 3, 1)) == [4, 5, 6, 7]
    with pytest.raises(ValueError, match="5 ranks cannot share 12 data partitions"):
        rank_partitions(12, 5, 0)
    with pytest.raises(ValueError, match="rank"):
        rank_partitions(4, 2, 2)
    with pytest.raises(ValueError, match="global batch 10 does not split over 4 data partitions"):
        EpochPlan((100,), 10, 4, 0, 0)
    assert allowed_world_sizes(12, 1, 8) == [1, 2, 3, 4, 6]


def test_shuffle_order_is_a_bounded_permutation():
    rng = np.random.default_rng(0)
    order = shuffle_order(1000, 50, rng)
    assert sorted(order.tolist()) == list(range(1000))
    assert np.all(order <= np.arange(1000) + 50)
    assert not np.array_equal(order, np.arange(1000))
    assert np.array_equal(shuffle_order(1000, 50, np.random.default_rng(0)), order)
    assert not np.array_equal(shuffle_order(1000, 50, np.random.default_rng(1)), order)
    assert np.array_equal(shuffle_order(10, 1, rng), np.arange(10))
    assert sorted(shuffle_order(7, 100, rng).tolist()) == list(range(7))


# --- reading -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def clean_set(tmp_path_factory):
    return make_clean_set(tmp_path_factory.mktemp("clean"), [23, 17, 30, 9, 21])  # 100 samples


def test_one_rank_epoch_exact_keys_labels_and_bytes(clean_set):
    reader = ShardReader(clean_set, batch_size=8, shuffle_buffer=16, seed=5)
    assert reader.batches_per_epoch == len(reader) == 12 and reader.samples_per_rank == 96
    batches = epoch_batches(reader, 0)
    assert len(batches) == 12 and all(len(b.images) == len(b.keys) == b.labels.shape[0] == 8 for b in batches)
    keys = keys_of(batches)
    assert len(set(keys)) == 96
    counts = [s.samples for s in reader.manifest.shards]
    offsets = np.cumsum([0, *counts])
    expected = [f"{offsets[s] + o:09d}" for step in naive_steps(counts, 8, 1, 16, 5, 0) for s, o in step]
    assert keys == expected
    for b in batches:
        assert b.labels.dtype == np.int64
        for key, label, image in zip(b.keys, b.labels, b.images):
            assert label == int(key) % 10
            assert image == encode(int(key))
    assert reader.stats["samples"] == 96 and reader.stats["filled"] == 0
    assert sum(reader.stats[r] for r in reader_mod.SKIP_REASONS) == 0


def test_new_epoch_changes_order_same_epoch_repeats(clean_set):
    reader = ShardReader(clean_set, batch_size=8, shuffle_buffer=16, seed=5)
    e0, e0_again, e1 = (keys_of(epoch_batches(reader, e)) for e in (0, 0, 1))
    assert e0 == e0_again
    assert e0 != e1
    other_seed = ShardReader(clean_set, batch_size=8, shuffle_buffer=16, seed=6)
    assert keys_of(epoch_batches(other_seed, 0)) != e0


def test_shuffle_buffer_mixes_within_shard(clean_set):
    unshuffled = keys_of(epoch_batches(ShardReader(clean_set, batch_size=4, shuffle_buffer=1), 0))
    shuffled = keys_of(epoch_batches(ShardReader(clean_set, batch_size=4, shuffle_buffer=32), 0))
    assert sorted(unshuffled) == sorted(shuffled) and unshuffled != shuffled
    # Without the buffer, each shard's samples come in tar order.
    runs = [int(k) for k in unshuffled]
    assert sum(b == a + 1 for a, b in itertools.pairwise(runs)) >= len(runs) - 5


@pytest.mark.parametrize("world,workers,batch", [(2, 1, 4), (3, 2, 4), (2, 3, 6)])
def test_ranks_and_workers_cover_disjoint_equal(clean_set, world, workers, batch):
    per_rank = []
    for rank in range(world):
        reader = ShardReader(
            clean_set, batch_size=batch, rank=rank, world_size=world, num_workers=workers, shuffle_buffer=8
        )
        assert reader.num_workers == workers and reader.partitions == world * workers
        batches = epoch_batches(reader, 1)
        assert len(batches) == reader.batches_per_epoch == 100 // (world * batch)
        per_rank.append(keys_of(batches))
    assert len({len(k) for k in per_rank}) == 1
    flat = [k for keys in per_rank for k in keys]
    assert len(flat) == len(set(flat)) == world * (100 // (world * batch)) * batch


def _step_keys(reader: ShardReader, epoch: int, start: int) -> list[list[str]]:
    return [b.keys for b in reader.epoch(epoch, start)]


def test_global_steps_hold_the_same_samples_at_every_world_size(clean_set):
    """12 partitions, global batch 24: at world sizes 1, 2, 3, 4 and 6 the ranks' batches of each
    step, rank by rank, are the naive reference's step; resumed at random steps with another world
    size, the remaining steps are the same (an elastic run trains on every sample once)."""
    counts = [s.samples for s in ShardReader(clean_set, batch_size=24).manifest.shards]
    first = np.cumsum([0, *counts])  # make_clean_set numbers the samples consecutively across shards
    key_of = {(i, o): f"{first[i] + o:09d}" for i in range(len(counts)) for o in range(counts[i])}
    reference = [[key_of[x] for x in step] for step in naive_steps(counts, 24, 12, 5, seed=7, epoch=1)]
    assert len(reference) == 100 // 24

    def readers(world):
        return [
            ShardReader(clean_set, batch_size=24 // world, rank=r, world_size=world, partitions=12,
                        shuffle_buffer=5, seed=7)
            for r in range(world)
        ]  # fmt: skip

    for world in (1, 2, 3, 4, 6):
        per_rank = [_step_keys(reader, 1, 0) for reader in readers(world)]
        steps = [[k for rank in per_rank for k in rank[step]] for step in range(len(reference))]
        assert steps == reference, world
    rng = np.random.default_rng(0)
    for world in (1, 2, 3, 4, 6):
        start = int(rng.integers(0, len(reference)))
        per_rank = [_step_keys(reader, 1, start) for reader in readers(world)]
        assert [
            [k for rank in per_rank for k in rank[i]] for i in range(len(reference) - start)
        ] == reference[start:]


@pytest.mark.parametrize("workers", [1, 2])
def test_resume_equals_uninterrupted_and_skips_consumed(clean_set, workers, monkeypatch):
    reader = ShardReader(clean_set, batch_size=4, num_workers=workers, shuffle_buffer=10, seed=1)
    full = epoch_batches(reader, 3)
    finished = Counter()
    real_validated = reader_mod.validated

    def spy(items, *args):
        for ordinal, sample in items:
            finished[sample.key] += 1
            yield from real_validated(iter([(ordinal, sample)]), *args)

    monkeypatch.setattr(reader_mod, "validated", spy)
    for start in (0, 1, 7, 17, 24, 25):
        finished.clear()
        resumed = epoch_batches(reader, 3, start)
        assert [b.keys for b in resumed] == [b.keys for b in full[start:]]
        assert all(np.array_equal(a.labels, b.labels) for a, b in zip(resumed, full[start:]))
        # Consumed samples are not read, apart from those still in the shuffle buffers.
        assert sum(finished.values()) <= 4 * (25 - start) + workers * 10
    with pytest.raises(ValueError, match="start_batch"):
        next(reader.epoch(0, 26))


def test_json_labels_png_and_webp(tmp_path):
    for image_ext in ("png", "webp", "jpeg"):
        url = make_clean_set(tmp_path / image_ext, [6, 7], image_ext=image_ext, label_ext="json")
        reader = ShardReader(url, batch_size=4)
        batches = epoch_batches(reader, 0)
        assert sum(reader.stats[r] for r in reader_mod.SKIP_REASONS) == 0, reader.stats
        for b in batches:
            assert [int(k) % 10 for k in b.keys] == b.labels.tolist()
    url = make_clean_set(tmp_path / "unlabelled", [9], label_ext=None)
    batches = epoch_batches(ShardReader(url, batch_size=3), 0)
    assert all(b.labels.tolist() == [-1, -1, -1] for b in batches)


def test_json_label_key_and_class_names(tmp_path):
    members = [
        ("a.jpg", encode(1)),
        ("a.json", json.dumps({"y": "cat"}).encode()),
        ("b.jpg", encode(2)),
        ("b.json", json.dumps({"y": 0}).encode()),
        ("c.jpg", encode(3)),
        ("c.json", json.dumps({"y": "unknown"}).encode()),
    ]
    url = make_shard_set(tmp_path, [members], [3], label_ext="json", label_key="y")
    from pipeline.shards.manifest import load_manifest

    manifest = load_manifest(url)
    manifest.classes = ["dog", "cat"]
    save_manifest(manifest, url)
    reader = ShardReader(url, batch_size=3, shuffle_buffer=1)
    (batch,) = epoch_batches(reader, 0)
    assert dict(zip(batch.keys, batch.labels.tolist())) == {"a": 1, "b": 0, "c": -1}
    assert reader.stats["bad_label"] == 1


def test_too_few_samples_for_one_batch_per_rank(clean_set):
    with pytest.raises(ValueError, match=r"100 samples cannot give one global batch of 128 \(4 ranks x 32\)"):
        ShardReader(clean_set, batch_size=32, world_size=4)


def test_built_digits_shards_match_tarfile_reference(digits_shards):
    """Shards from the real builder: every delivered (key, label, bytes) equals what tarfile reads."""
    reader0 = ShardReader(
        digits_shards, batch_size=32, rank=0, world_size=2, num_workers=2, shuffle_buffer=100
    )
    manifest = reader0.manifest
    reference: dict[str, tuple[int, bytes]] = {}
    for i in range(len(manifest.shards)):
        members: dict[str, dict[str, bytes]] = {}
        with tarfile.open(manifest.shard_url(i)) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                members.setdefault(key, {})[ext] = tar.extractfile(m).read()
        assert len(members) == manifest.shards[i].samples
        for key, parts in members.items():
            reference[key] = (int(parts[manifest.label_ext]), parts[manifest.image_ext])
    readers = [
        reader0,
        ShardReader(digits_shards, batch_size=32, rank=1, world_size=2, num_workers=2, shuffle_buffer=100),
    ]
    seen = []
    for reader in readers:
        for batch in reader.epoch(0):
            for key, label, image in zip(batch.keys, batch.labels.tolist(), batch.images):
                assert reference[key] == (label, image)
                seen.append(key)
        assert sum(reader.stats[r] for r in reader_mod.SKIP_REASONS) == 0
    assert len(seen) == len(set(seen)) == 2 * readers[0].samples_per_rank == 2 * (len(reference) // 64) * 32


def test_dali_index_seek_skips_headers_and_changes_nothing(digits_shards, monkeypatch):
    """Rank 1's block starts deep inside a shard: with the .idx the reader jumps there."""
    kw = {"batch_size": 32, "rank": 1, "world_size": 2, "shuffle_buffer": 50}
    with_index = ShardReader(digits_shards, **kw)
    without_index = ShardReader(digits_shards, **kw)
    for shard in without_index.manifest.shards:
        shard.index = None
    assert any(s.index for s in with_index.manifest.shards)
    stale = ShardReader(digits_shards, **kw)
    for shard in stale.manifest.shards:  # another shard's index: names differ, so it must be ignored
        shard.index = with_index.manifest.shards[0].index
    headers = Counter()
    real_read = shard_format.read_exact

    def counting_read(stream, n):
        headers[current] += n == 512
        return real_read(stream, n)

    monkeypatch.setattr(shard_format, "read_exact", counting_read)
    for start in (0, 7):
        results = {}
        for current, reader in (("index", with_index), ("plain", without_index), ("stale", stale)):
            results[current] = [(b.keys, b.images) for b in reader.epoch(2, start)]
        assert results["index"] == results["plain"] == results["stale"]
    assert headers["index"] < headers["plain"] - 100


@pytest.mark.parametrize("batch_size", [6, 33])  # 33: one batch per thread, each blocked after its last
def test_abandoning_a_threaded_epoch_stops_its_workers_quickly(clean_set, batch_size):
    import os
    import threading
    import time

    reader = ShardReader(clean_set, batch_size=batch_size, num_workers=3, prefetch=1)
    shard_dir = os.path.dirname(reader.manifest.url)

    def open_shards() -> list[str]:
        paths = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                paths.append(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                continue  # closed meanwhile
        return [p for p in paths if p.startswith(shard_dir)]

    before = threading.active_count()
    epoch = reader.epoch(0)
    next(epoch)
    time.sleep(0.2)  # let the workers fill their queues and block
    if batch_size == 4:
        assert open_shards()  # the workers are suspended inside their shards
    start = time.perf_counter()
    epoch.close()
    assert time.perf_counter() - start < 2
    assert threading.active_count() == before
    assert open_shards() == []
