"""Shard building: round trips through tarfile, webdataset, GNU tar and DALI; bad inputs; determinism."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image
from shards_helpers import (
    BAD_INPUTS,
    GOOD_INPUTS,
    gnu_tar_list,
    image_bytes,
    read_dali,
    read_tarfile,
    read_webdataset,
    write_folder,
)

from pipeline.shards.build import build_shards, prepare_image
from pipeline.shards.dali_index import write_dali_index
from pipeline.shards.manifest import load_manifest
from pipeline.shards.sources import (
    DIGITS_SPLIT_FRACTIONS,
    DigitsReader,
    SourceError,
    digits_split_indices,
    load_digits_arrays,
    open_source,
)


def tar_paths(m):
    return [m.shard_url(i) for i in range(len(m.shards))]


@pytest.fixture(scope="module")
def folder_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    written = write_folder(root)
    out = tmp_path_factory.mktemp("folder_shards")
    m = build_shards(str(root), str(out), max_samples=5, max_side=128, index=True, seed=3, progress=False)
    return root, written, m


def test_folder_round_trip_tarfile(folder_build):
    _, written, m = folder_build
    samples = read_tarfile(tar_paths(m))
    assert len(samples) == len(written) == m.total_samples
    assert m.classes == ["cat", "dog"]
    assert m.class_counts == {"cat": len(GOOD_INPUTS), "dog": len(GOOD_INPUTS)}
    keys = [k for k, *_ in samples]
    assert len(set(keys)) == len(keys)
    seen = set()
    for _key, jpg, label, meta in samples:
        rel = meta["source"]
        seen.add(rel)
        assert label == ["cat", "dog"].index(rel.split("/")[0])
        original = Image.open(io.BytesIO(written[rel]))
        assert meta["original_size"] == list(original.size)
        name = rel.split("_", 1)[1]
        passthrough = GOOD_INPUTS[name][1]
        if passthrough:
            assert jpg == written[rel]  # byte for byte, no lossy re-encode
            continue
        assert jpg != written[rel]
        img = Image.open(io.BytesIO(jpg))
        assert img.format == "JPEG" and img.mode == "RGB"
        assert not img.info.get("progressive") and not img.info.get("progression")
        assert max(img.size) <= 128
        if name in ("photo.png", "progressive.jpg", "picture.webp"):
            # pixels survive the conversion (JPEG q95 of noise: mean error stays small)
            ref = np.asarray(original.convert("RGB"), float)
            assert np.abs(np.asarray(img, float) - ref).mean() < 25
    assert seen == set(written)


def test_bad_inputs_rejected_with_reasons(folder_build):
    _, _, m = folder_build
    reasons = {r.input.rsplit("/", 1)[-1]: r.reason for r in m.rejected}
    assert set(reasons) == set(BAD_INPUTS)
    for name, (_, expected) in BAD_INPUTS.items():
        assert expected in reasons[name], (name, reasons[name])


def test_same_bytes_through_webdataset_gnu_tar_and_dali(folder_build):
    *_, m = folder_build
    reference = read_tarfile(tar_paths(m))
    by_wds = read_webdataset(tar_paths(m))
    assert [(k, j, lab) for k, j, lab, _ in reference] == by_wds
    for path in tar_paths(m):
        keys = [k for k, *_ in read_tarfile([path])]
        assert gnu_tar_list(path) == [f"{k}.{e}" for k in keys for e in ("jpg", "cls", "json")]
    idxs = [os.path.join(os.path.dirname(m.url), s.index) for s in m.shards]
    by_dali = read_dali(tar_paths(m), idxs)
    assert by_dali == [(j, lab) for _, j, lab, _ in reference]


def test_dali_index_matches_dalis_own_tool(folder_build, tmp_path):
    """Our .idx files are what DALI's wds2idx writes for the same tar."""
    wds2idx = pytest.importorskip("wds2idx")
    _, _, m = folder_build
    for i, s in enumerate(m.shards):
        theirs = tmp_path / f"{i}.idx"
        with wds2idx.IndexCreator(m.shard_url(i), str(theirs), verbose=False) as creator:
            creator.create_index()
        ours = os.path.join(os.path.dirname(m.url), s.index)
        with open(ours) as f:
            assert f.read() == theirs.read_text()
        rescanned = io.StringIO()
        with open(m.shard_url(i), "rb") as f:
            assert write_dali_index(f, rescanned) == s.samples
        assert rescanned.getvalue() == theirs.read_text()


def test_fixed_tar_metadata(folder_build):
    _, _, m = folder_build
    with tarfile.open(m.shard_url(0)) as tar:
        for info in tar.getmembers():
            assert (info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode) == (
                0,
                0,
                0,
                "",
                "",
                0o444,
            )


def test_same_seed_same_bytes_any_workers(tmp_path):
    src = "builtin:digits?split=val"
    a = build_shards(src, str(tmp_path / "a"), max_samples=40, seed=7, index=True, progress=False)
    b = build_shards(src, str(tmp_path / "b"), max_samples=40, seed=7, index=True, workers=2, progress=False)
    c = build_shards(src, str(tmp_path / "c"), max_samples=40, seed=8, progress=False)
    assert a.to_json() == b.to_json()
    for sa, sb in zip(a.shards, b.shards):
        da, db = ((tmp_path / d / sa.name).read_bytes() for d in "ab")
        assert da == db and hashlib.sha256(da).hexdigest() == sa.sha256 == sb.sha256
    assert [s.sha256 for s in a.shards] != [s.sha256 for s in c.shards]
    first = lambda m: [meta["source"] for *_, meta in read_tarfile([m.shard_url(0)])]  # noqa: E731
    assert first(a) != first(c)  # another seed, another order
    assert sorted(x for s in tar_paths(a) for x in first_all(s)) == sorted(
        x for s in tar_paths(c) for x in first_all(s)
    )


def first_all(path):
    return [meta["source"] for *_, meta in read_tarfile([path])]


def test_max_bytes_shards_numbered_and_bounded(tmp_path):
    limit = 60_000
    m = build_shards(
        "builtin:digits?split=val", str(tmp_path), max_samples=100, max_bytes=limit, workers=2, progress=False
    )
    assert [s.name for s in m.shards] == [f"shard-{i:06d}.tar" for i in range(len(m.shards))]
    assert all(s.bytes <= limit for s in m.shards) and len(m.shards) > 2
    assert all(os.path.getsize(p) == s.bytes for p, s in zip(tar_paths(m), m.shards))
    assert m.total_samples == len(digits_split_indices("val"))
    single = build_shards("builtin:digits?split=val", str(tmp_path / "one"), max_samples=100, max_bytes=limit)
    assert [s.sha256 for s in single.shards] == [s.sha256 for s in m.shards]


@pytest.mark.slow  # importing scikit-learn alone takes 5-25 s on a busy 2-core machine
def test_digits_are_sklearns_load_digits():
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, targets = load_digits_arrays()
    np.testing.assert_array_equal(images, digits.images)
    np.testing.assert_array_equal(targets, digits.target)


def test_digits_splits_are_stratified_and_disjoint():
    images, targets = load_digits_arrays()
    assert images.shape == (1797, 8, 8) and images.max() == 16 and sorted(set(targets)) == list(range(10))
    splits = {s: digits_split_indices(s) for s in DIGITS_SPLIT_FRACTIONS}
    assert sum(len(v) for v in splits.values()) == 1797
    assert set(np.concatenate(list(splits.values()))) == set(range(1797))
    for name, frac in DIGITS_SPLIT_FRACTIONS.items():
        counts = np.bincount(targets[splits[name]], minlength=10)
        expected = np.bincount(targets, minlength=10) * frac
        assert np.all(np.abs(counts - expected) <= 1), (name, counts, expected)
    # the upscaled image is the 8x8 digit, bicubic: its 4x4-block means track the original
    img = np.asarray(DigitsReader(32)(5).convert("L"), float)
    blocks = img.reshape(8, 4, 8, 4).mean(axis=(1, 3))
    assert np.corrcoef(blocks.ravel(), images[5].ravel())[0, 1] > 0.95


def test_csv_and_tsv_lists(tmp_path):
    for i, name in enumerate(["a.jpg", "b.png", "c.jpg"]):
        (tmp_path / name).write_bytes(image_bytes("JPEG" if name.endswith("jpg") else "PNG", seed=i))
    (tmp_path / "list.csv").write_text(
        "path,label\na.jpg,zebra\nb.png,ant\nmissing.jpg,ant\n,ant\nc.jpg,zebra\n"
    )
    m = build_shards(str(tmp_path / "list.csv"), str(tmp_path / "out"), progress=False)
    assert m.classes == ["ant", "zebra"] and m.class_counts == {"ant": 1, "zebra": 2}
    reasons = {r.input: r.reason for r in m.rejected}
    assert reasons["missing.jpg"] == "file not found"
    assert any("empty path" in r for r in reasons.values())
    labels = {meta["source"]: lab for _, _, lab, meta in read_tarfile(tar_paths(m))}
    assert labels == {"a.jpg": 1, "b.png": 0, "c.jpg": 1}
    (tmp_path / "list.tsv").write_text("path\tlabel\na.jpg\t3\nb.png\t0\n")
    m = build_shards(str(tmp_path / "list.tsv"), str(tmp_path / "out2"), progress=False)
    assert m.classes == ["0", "1", "2", "3"]
    assert sorted(lab for *_, lab, _ in read_tarfile(tar_paths(m))) == [0, 3]


def test_photos_builtin_crops_are_imagenet_sized(tmp_path):
    src = open_source("builtin:photos?count=6")
    assert len(src.items) == 6 and src.classes is None
    for it in src.items:
        img = src.reader(it.ref)
        assert img.mode == "RGB" and 375 <= max(img.size) <= 500
    assert np.array_equal(np.asarray(src.reader(3)), np.asarray(open_source("builtin:photos").reader(3)))


def test_clear_errors_for_missing_source_and_unwritable_out(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        build_shards(str(tmp_path / "nope"), str(tmp_path / "out"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    from pipeline.shards.build import BuildError

    with pytest.raises(BuildError, match=r"not a directory|not writable"):
        build_shards("builtin:digits?split=val", str(blocker / "sub"))
    with pytest.raises(SourceError, match="split"):
        build_shards("builtin:digits?split=dev", str(tmp_path / "out"))


def test_prepare_image_keeps_exif_rotated_jpeg_upright():
    img = Image.fromarray(np.zeros((10, 20, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif)
    jpeg, size, reencoded = prepare_image(buf.getvalue())
    assert reencoded and size == (20, 10)
    assert Image.open(io.BytesIO(jpeg)).size == (10, 20)


def test_digits_fixture_reads_in_dali(digits_shards):
    m = load_manifest(digits_shards)
    assert len(m.shards) == 5 and m.total_samples == len(digits_split_indices("train"))
    idxs = [os.path.join(digits_shards, s.index) for s in m.shards]
    got = read_dali(tar_paths(m), idxs, batch_size=256)
    _, targets = load_digits_arrays()
    ref = read_tarfile(tar_paths(m))
    assert [lab for _, lab in got] == [int(targets[int(meta["source"].split("#")[1])]) for *_, meta in ref]
    meta = json.loads(json.dumps(ref[0][3]))
    assert meta["original_size"] == [8, 8]


def test_progress_bar_reports_rates(tmp_path, capsys):
    build_shards("builtin:digits?split=val", str(tmp_path), max_samples=60, progress=True)
    err = capsys.readouterr().err
    assert "img/s" in err and "MB/s" in err and "179/179" in err
    build_shards("builtin:digits?split=val", str(tmp_path / "quiet"), max_samples=60, progress=False)
    assert capsys.readouterr().err == ""


def test_jpeg_header_scan_agrees_with_pil():
    from pipeline.shards.images import jpeg_info

    exif = Image.Exif()
    exif[0x0112] = 3
    variants = [
        image_bytes("JPEG", seed=1),
        image_bytes("JPEG", size=(333, 77), seed=2, progressive=True),
        image_bytes("JPEG", mode="L", seed=3),
        image_bytes("JPEG", mode="CMYK", seed=4),
        image_bytes("JPEG", seed=5, optimize=True, subsampling=0, restart_marker_blocks=1),
        image_bytes("JPEG", size=(64, 48), seed=6, exif=exif.tobytes()),
        image_bytes("JPEG", seed=7, icc_profile=b"\0" * 3000),
    ]
    for data in variants:
        info = jpeg_info(data)
        with Image.open(io.BytesIO(data)) as img:
            assert info is not None
            assert (info.width, info.height) == img.size
            assert (info.sof == 0xC2) == bool(img.info.get("progressive"))
            assert {1: "L", 3: "RGB", 4: "CMYK"}[info.components] == img.mode
            assert info.orientation == img.getexif().get(0x0112, 1)
    assert jpeg_info(b"\x89PNG\r\n\x1a\n") is None
    assert jpeg_info(variants[0][:20]) is None  # headers cut short


def test_fast_ustar_header_is_tarfiles():
    from pipeline.shards.format import ustar_header

    for name, size in [("000000001.jpg", 941), ("000000001.json", 0), ("k" * 100, 512), ("x.cls", 8**11 - 1)]:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = (
            size,
            0,
            0o444,
            0,
            0,
            "",
            "",
        )
        assert ustar_header(name, size) == info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")
