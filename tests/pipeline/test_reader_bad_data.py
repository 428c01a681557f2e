"""Bad data never stops the stream and is never silent; what the reader hands out DALI can decode.

One shard set holds every kind of defect next to good samples. The tests check the exact counters,
that every good sample (and only those) arrives once per epoch, that resume still matches, and — the
point of validation — that DALI's CPU decoder takes every image handed out while it raises on the
rejected ones.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_reader import encode, epoch_batches, keys_of, make_shard_set, sample_members
from webdataset.tariterators import tar_file_iterator

from pipeline.reader import SKIP_REASONS, ShardReader
from pipeline.shards.format import split_key, tar_members
from pipeline.shards.images import image_problem, sniff_format


def png_bytes(index: int) -> bytes:
    return encode(index, "PNG")


def jpeg_without_eoi(index: int) -> bytes:
    return encode(index)[:-2]


def jpeg_bad_marker(index: int) -> bytes:
    data = bytearray(encode(index))
    data[data.index(b"\xff\xdb") + 1] = 0xA0  # DQT marker -> an invalid marker code
    return bytes(data)


def jpeg_lossless_sof(index: int) -> bytes:
    data = bytearray(encode(index))
    data[data.index(b"\xff\xc0") + 1] = 0xC3  # baseline frame header -> lossless
    return bytes(data)


def jpeg_corrupt_entropy(index: int) -> bytes:
    """Scan data overwritten: decoders warn and produce garbage pixels, they do not fail."""
    data = bytearray(encode(index, size=(128, 128)))
    scan = data.index(b"\xff\xda") + 40
    data[scan : scan + 300] = bytes(300)
    return bytes(data)


def replace_image(members, image: bytes | None):
    out = [(n, d) for n, d in members if not n.endswith(".jpg")]
    return out if image is None else [(members[0][0], image), *out]


# (shard, sample index) -> defect; the reason each one must be counted under
DEFECTS = {
    2: ("corrupt_image", lambda i: encode(i)[: len(encode(i)) // 2]),
    4: ("corrupt_image", lambda i: np.random.default_rng(i).bytes(3000)),
    5: ("wrong_format", png_bytes),
    7: ("empty_image", lambda i: b""),
    8: ("missing_image", None),
    51: ("corrupt_image", jpeg_without_eoi),
    52: ("corrupt_image", jpeg_bad_marker),
    53: ("unsupported_image", jpeg_lossless_sof),
}
GOOD_ODDITIES = {54: jpeg_corrupt_entropy}  # passes validation, DALI decodes it
BAD_LABEL = 55


def build_bad_set(root: Path) -> tuple[str, set[str], dict[str, int]]:
    """Shards: 0 defects; 1 truncated inside sample 16's image; 2 missing; 3 not a tar; 4 good; 5 defects.

    Returns the manifest URL, the keys that must be delivered, and the expected skip counters.
    """
    root.mkdir(parents=True, exist_ok=True)

    def members(i):
        m = sample_members(i)
        if i in DEFECTS:
            make = DEFECTS[i][1]
            m = replace_image(m, None if make is None else make(i))
        if i in GOOD_ODDITIES:
            m = replace_image(m, GOOD_ODDITIES[i](i))
        if i == BAD_LABEL:
            m = [(n, b"not-a-number" if n.endswith(".cls") else d) for n, d in m]
        return m

    shard_ranges = [range(0, 10), range(10, 20), range(20, 30), range(30, 35), range(35, 45), range(50, 56)]
    shards = [[x for i in r for x in members(i)] for r in shard_ranges]
    url = make_shard_set(root, shards, [len(r) for r in shard_ranges])
    # Shard 1: cut in the middle of sample 16's image data.
    path1 = root / "shard-000001.tar"
    with tarfile.open(path1) as tar:
        cut = tar.getmember(f"{16:09d}.jpg").offset_data + 100
    path1.write_bytes(path1.read_bytes()[:cut])
    (root / "shard-000002.tar").unlink()
    (root / "shard-000003.tar").write_bytes(np.random.default_rng(0).bytes(5000))
    good = {f"{i:09d}" for r in (range(0, 10), range(10, 16), range(35, 45), range(50, 56)) for i in r}
    good -= {f"{i:09d}" for i in DEFECTS}
    expected = dict.fromkeys(SKIP_REASONS, 0)
    for reason, _ in DEFECTS.values():
        expected[reason] += 1
    expected["truncated_tar"] = 4  # samples 16..19
    expected["unreadable_shard"] = 10 + 5
    return url, good, expected


@pytest.fixture(scope="module")
def bad_set(tmp_path_factory):
    return build_bad_set(tmp_path_factory.mktemp("bad"))


def reader_for(url, **kw) -> ShardReader:
    # 51 samples in the manifest: one rank, batch 17 -> every planned sample is read each epoch.
    return ShardReader(url, batch_size=17, shuffle_buffer=8, retry_delay=0.01, max_open_retries=2, **kw)


def test_every_good_sample_once_and_exact_counts(bad_set, caplog):
    url, good, expected = bad_set
    reader = reader_for(url)
    with caplog.at_level(logging.INFO, logger="pipeline.reader"):
        batches = epoch_batches(reader, 0)
    assert len(batches) == reader.batches_per_epoch == 3
    assert all(len(b.images) == 17 and b.labels.shape == (17,) for b in batches)
    keys = keys_of(batches)
    assert set(keys) == good
    stats = reader.stats
    assert {r: stats[r] for r in SKIP_REASONS} == expected
    skipped = sum(expected.values())
    assert stats["filled"] == skipped == 51 - len(good)
    assert stats["samples"] == len(good)
    assert stats["bad_label"] == 1
    # Fills are duplicates of good samples of the same batch, nothing else repeats.
    assert sum(len(b.keys) - len(set(b.keys)) for b in batches) == skipped == len(keys) - len(set(keys))
    for b in batches:
        for key, label in zip(b.keys, b.labels.tolist()):
            assert label == (-1 if int(key) == BAD_LABEL else int(key) % 10)

    # Each kind logged with its shard and key, once; the missing shard was retried twice first.
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for reason in SKIP_REASONS:
        assert any(f"skipping {reason}" in m for m in warnings), reason
    assert any("shard-000000.tar key 000000004" in m for m in warnings)
    assert any("shard-000002.tar" in m and "unreadable_shard" in m for m in warnings)
    assert sum("retrying" in r.getMessage() and "shard-000002" in r.getMessage() for r in caplog.records) == 2
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.reader"):
        second = epoch_batches(reader, 1)
    assert set(keys_of(second)) == good
    assert not [r for r in caplog.records if "corrupt_image" in r.getMessage()]  # already logged
    assert reader.stats["corrupt_image"] == 2 * expected["corrupt_image"]  # counted again


def test_resume_with_bad_data_matches(bad_set):
    url, _, _ = bad_set
    reader = reader_for(url)
    full = epoch_batches(reader, 4)
    for start in (1, 2):
        assert [b.keys for b in epoch_batches(reader, 4, start)] == [b.keys for b in full[start:]]


def test_two_ranks_with_bad_data_keep_equal_batches(bad_set):
    url, good, _ = bad_set
    per_rank = [
        keys_of(epoch_batches(ShardReader(url, batch_size=5, rank=r, world_size=2, retry_delay=0.01), 0))
        for r in range(2)
    ]
    assert len(per_rank[0]) == len(per_rank[1]) == 25
    assert not set(per_rank[0]) & set(per_rank[1])
    assert set(per_rank[0]) | set(per_rank[1]) <= good


def test_all_shards_unreadable_is_an_error_not_a_hang(tmp_path):
    url = make_shard_set(tmp_path, [[]], [8])
    (tmp_path / "shard-000000.tar").unlink()
    reader = ShardReader(url, batch_size=4, retry_delay=0.0, max_open_retries=1)
    with pytest.raises(RuntimeError, match="no readable sample"):
        list(reader.epoch(0))
    assert reader.stats["unreadable_shard"] == 8


def test_dali_decodes_everything_handed_out_and_raises_on_the_rejected(bad_set):
    """The reason for validation: DALI's decoder raises on these bytes, and not on what we hand out."""
    url, _, _ = bad_set
    batches = epoch_batches(reader_for(url), 0)
    for b in batches:
        assert all(len(s) == 3 and s[2] == 3 for s in dali_decode(b.images))
    rejected = [
        (make(i), "jpg") for i, (reason, make) in DEFECTS.items() if make and reason != "wrong_format"
    ]
    png, webp = png_bytes(1), encode(1, "WEBP")
    rejected += [(png[: len(png) // 2], "png"), (png[:-12], "png"), (webp[:-10], "webp")]
    for data, ext in rejected:
        assert image_problem(data, ext) is not None
        with pytest.raises(RuntimeError):
            dali_decode([data])
    accepted = [jpeg_corrupt_entropy(54), png, webp]  # DALI decodes them and so they pass validation
    assert all(image_problem(data, ext) is None for data, ext in zip(accepted, ["jpg", "png", "webp"]))
    assert len(dali_decode(accepted)) == 3


def dali_decode(images: list[bytes]) -> list[tuple[int, ...]]:
    """Shapes of ``images`` decoded by DALI's CPU decoder in one batch; raises if any fails."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=len(images), num_threads=1, device_id=None, prefetch_queue_depth=1)
    def pipe():
        data = fn.external_source(
            source=lambda: [np.frombuffer(x, np.uint8) for x in images], batch=True, dtype=types.UINT8
        )
        return fn.decoders.image(data, device="cpu", output_type=types.RGB)

    p = pipe()
    p.build()
    (out,) = p.run()
    return [tuple(out[i].shape()) for i in range(len(images))]


@pytest.mark.parametrize("progressive", [False, True])
def test_mutated_jpegs_that_pass_the_cheap_check_decode_in_dali(progressive):
    """Random byte changes anywhere in a JPEG: whatever the cheap check accepts, DALI decodes (a
    progressive JPEG has table and scan headers between its scans; they are checked too)."""
    buf = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, "JPEG", quality=90, progressive=progressive)
    good = buf.getvalue()
    rng = np.random.default_rng(11)
    accepted, rejected = [], 0
    for _ in range(300):
        data = bytearray(good)
        for _ in range(int(rng.integers(1, 3))):
            data[int(rng.integers(2, len(good) - 2))] = int(rng.integers(0, 256))
        if image_problem(bytes(data)) is None:
            accepted.append(bytes(data))
        else:
            rejected += 1
    assert accepted and rejected
    assert len(dali_decode(accepted)) == len(accepted)


def test_image_problem_formats_and_decode_mode():
    assert image_problem(encode(1)) is None
    assert image_problem(png_bytes(1), "png") is None
    assert image_problem(encode(1, "WEBP"), "webp") is None
    assert image_problem(encode(1), "png")[0] == "wrong_format"
    assert image_problem(encode(1, "WEBP"), "jpg")[0] == "wrong_format"
    assert image_problem(png_bytes(1)[:-20], "png")[0] == "corrupt_image"
    webp = encode(1, "WEBP")
    assert image_problem(webp[: len(webp) // 2], "webp")[0] == "corrupt_image"
    assert image_problem(b"", "jpg")[0] == "empty_image"
    assert image_problem(b"junk", "jpg", validate=False) is None
    assert image_problem(jpeg_corrupt_entropy(2), "jpg", validate="decode") is None
    assert sniff_format(b"RIFF\0\0\0\0WAVE") is None
    # Every strict prefix of a JPEG is rejected by the cheap check (truncation anywhere).
    jpeg = encode(3)
    assert all(image_problem(jpeg[:n]) is not None for n in range(0, len(jpeg) - 1, 7))


def test_tar_members_matches_webdataset_on_long_names_pax_and_meta(tmp_path):
    path = tmp_path / "odd.tar"
    long_dir = "d" * 120
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in [
            (f"{long_dir}/a.jpg", b"x" * 700),
            (f"{long_dir}/a.cls", b"1"),
            ("__meta__", b"m"),
            ("b.jpg", b"y" * 512),
            ("b.cls", b""),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        d = tarfile.TarInfo("subdir")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
    pax = tmp_path / "pax.tar"
    with tarfile.open(pax, "w", format=tarfile.PAX_FORMAT) as tar:
        for name in ("ünïcode/ç.jpg", "p" * 200 + ".cls"):
            info = tarfile.TarInfo(name)
            info.size = 3
            tar.addfile(info, io.BytesIO(b"abc"))
    ustar = tmp_path / "ustar.tar"  # a 150-character path: split into the POSIX prefix and name fields
    with tarfile.open(ustar, "w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("u/" * 70 + "k.jpg")
        info.size, info.mtime = 3, 1_000_000_000
        tar.addfile(info, io.BytesIO(b"abc"))
    for p in (path, pax, ustar):
        with open(p, "rb") as f:
            ours = [(m.name, m.read()) for m in tar_members(f) if split_key(m.name)]
        with open(p, "rb") as f:
            theirs = [(m["fname"], m["data"]) for m in tar_file_iterator(f)]
        assert ours == theirs and ours
    with open(path, "rb") as f:  # members left unread are skipped, and the next ones still come
        read = [(m.name, m.read()) for m in tar_members(f) if m.name.endswith(".cls")]
    assert read == [(f"{long_dir}/a.cls", b"1"), ("b.cls", b"")]


def test_gzipped_shard_reads_through_webdataset(tmp_path):
    members = [m for i in range(6) for m in sample_members(i)]
    url = make_shard_set(tmp_path, [members], [6])
    path = tmp_path / "shard-000000.tar"
    path.write_bytes(gzip.compress(path.read_bytes()))
    batches = epoch_batches(ShardReader(url, batch_size=3, shuffle_buffer=1), 0)
    assert keys_of(batches) == [f"{i:09d}" for i in range(6)]


def test_sample_without_label_member_is_kept_with_minus_one(tmp_path):
    members = [m for i in range(3) for m in sample_members(i, label_ext="json")]
    url = make_shard_set(tmp_path, [members[:5]], [3], label_ext="json")  # 2.json left out
    reader = ShardReader(url, batch_size=3, shuffle_buffer=1)
    (batch,) = epoch_batches(reader, 0)
    assert batch.keys == [f"{i:09d}" for i in range(3)]
    assert batch.labels.tolist() == [0, 1, -1]
    assert reader.stats["bad_label"] == 1
    assert json.loads(members[1][1])["label"] == 0


def test_read_error_mid_shard_reopens_and_loses_nothing(tmp_path, monkeypatch):
    """A storage read error (OSError) in the middle of a shard: re-open at the next sample, no skips."""
    from pipeline import storage

    url = make_shard_set(tmp_path, [[m for i in range(12) for m in sample_members(i)]], [12])
    reference = epoch_batches(ShardReader(url, batch_size=4, shuffle_buffer=5), 0)
    real_open = storage.open_stream
    opened = []

    class Flaky(io.RawIOBase):
        def __init__(self, f, fail_at):
            self.f, self.fail_at = f, fail_at

        def readable(self):
            return True

        def seekable(self):
            return True

        def seek(self, *args):
            return self.f.seek(*args)

        def read(self, n=-1):
            if self.f.tell() + max(n, 0) > self.fail_at:
                raise ConnectionResetError("connection reset by peer")
            return self.f.read(n)

        def close(self):
            self.f.close()

    def flaky_open(u, options=None):
        f = real_open(u, options)
        opened.append(u)
        # First two opens fail after ~1/3 and ~2/3 of the shard; the third reads through.
        size = (tmp_path / "shard-000000.tar").stat().st_size
        return Flaky(f, size * len(opened) // 3) if len(opened) < 3 else f

    monkeypatch.setattr(storage, "open_stream", flaky_open)
    reader = ShardReader(url, batch_size=4, shuffle_buffer=5, retry_delay=0.0)
    got = epoch_batches(reader, 0)
    assert len(opened) == 3
    assert [b.keys for b in got] == [b.keys for b in reference]
    assert [b.images for b in got] == [b.images for b in reference]
    assert sum(reader.stats[r] for r in SKIP_REASONS) == 0


@pytest.mark.parametrize("validate", ["decode", False])
def test_validate_modes_on_the_bad_set(bad_set, validate):
    """``"decode"`` agrees with the cheap check here; ``False`` lets corrupt bytes through (for loaders
    that decode with their own fallback) but still skips missing/empty images and broken tars."""
    url, good, expected = bad_set
    reader = reader_for(url, validate=validate)
    keys = set(keys_of(epoch_batches(reader, 0)))
    if validate == "decode":
        assert keys == good and {r: reader.stats[r] for r in SKIP_REASONS} == expected
    else:
        let_through = {
            f"{i:09d}" for i, (reason, _) in DEFECTS.items() if reason not in ("missing_image", "empty_image")
        }
        assert keys == good | let_through
        assert reader.stats["corrupt_image"] == reader.stats["wrong_format"] == 0
        assert reader.stats["truncated_tar"] == 4 and reader.stats["unreadable_shard"] == 15


def test_worker_whose_whole_segment_is_unreadable_borrows_from_the_rank(tmp_path):
    """Two workers, one shard each; one shard is gone: its worker's batches are filled, no error."""
    url = make_shard_set(
        tmp_path, [[m for i in range(s, s + 8) for m in sample_members(i)] for s in (0, 8)], [8, 8]
    )
    (tmp_path / "shard-000001.tar").unlink()
    reader = ShardReader(url, batch_size=4, num_workers=2, retry_delay=0.0, max_open_retries=0)
    batches = epoch_batches(reader, 0)
    assert len(batches) == 4 and all(len(b.keys) == 4 for b in batches)
    assert {k for b in batches for k in b.keys} == {f"{i:09d}" for i in range(8)}
    assert reader.stats["unreadable_shard"] == 8 == reader.stats["filled"]
