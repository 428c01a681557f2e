"""Saliency masks through the shard tools: ``build --masks`` on real photos (alignment after EXIF
rotation and ``--max-side``, conversions, rejects), index, verify, inspect, the reader (every mask with
its sample, bad masks counted, filled slots), and ``relic shards masks`` (deterministic, in place or
not, local and on S3)."""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_reader import encode, make_shard_set, write_tar

from commands.shards import add_arguments
from commands.shards import run as cli_run
from pipeline.reader import SKIP_REASONS, ShardReader
from pipeline.shards import masks as M
from pipeline.shards.build import MASK_REJECTED, BuildError, add_masks, build_shards
from pipeline.shards.index import index_shards
from pipeline.shards.inspect import inspect_shards
from pipeline.shards.manifest import load_manifest, save_manifest
from pipeline.shards.sources import photo_files
from pipeline.shards.verify import verify_shards

MAX_SIDE = 160
MAGENTA = (255, 0, 255)


# --- inputs: real photos, each with a magenta rectangle where its mask is foreground ----------------


def photo(i: int, size: tuple[int, int]) -> np.ndarray:
    """A scikit-image photograph, desaturated (so nothing in it looks magenta), resized to ``size``."""
    with Image.open(photo_files()[i % len(photo_files())]) as img:
        grey = img.convert("L").resize(size, Image.Resampling.BICUBIC)
    return np.asarray(grey.convert("RGB")).copy()


def with_rect(rgb: np.ndarray, box: tuple[float, float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """The image with a magenta rectangle over the fractional ``box``, and its 0/255 mask."""
    h, w = rgb.shape[:2]
    x0, y0, x1, y1 = round(box[0] * w), round(box[1] * h), round(box[2] * w), round(box[3] * h)
    out = rgb.copy()
    out[y0:y1, x0:x1] = MAGENTA
    mask = np.zeros((h, w), np.uint8)
    mask[y0:y1, x0:x1] = 255
    return out, mask


def save(img: Image.Image, path: Path, fmt: str, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt, **kw)


def magenta_box(rgb: np.ndarray) -> tuple[int, int, int, int]:
    r, g, b = (rgb[..., c].astype(int) for c in range(3))
    ys, xs = np.nonzero((r - g > 128) & (b - g > 128))  # half-way from grey to magenta
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


def mask_box(mask: np.ndarray, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The foreground box of ``mask`` resized to the image ``size``, as consumers resize it."""
    big = np.asarray(Image.fromarray(mask, "L").resize(size, Image.Resampling.BILINEAR))
    ys, xs = np.nonzero(big > 127)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


def write_inputs(root: Path) -> tuple[Path, Path, dict[str, str]]:
    """A folder of photos (class folder ``cls``) and a masks folder; {input: what its mask is}."""
    src, masks = root / "src", root / "masks"
    kinds: dict[str, str] = {}

    def add(name: str, size, box, i: int, fmt="JPEG", **kw):
        if fmt == "JPEG":  # sharp colour edges: full-resolution chroma
            kw = {"quality": 95, "subsampling": 0, **kw}
        img, mask = with_rect(photo(i, size), box)
        save(Image.fromarray(img), src / "cls" / name, fmt, **kw)
        return mask

    # L mask at full resolution; the image is downscaled by --max-side, the mask with it
    m = add("a.jpg", (240, 180), (0.1, 0.2, 0.5, 0.7), 0)
    save(Image.fromarray(m, "L"), masks / "cls/a.png", "PNG")
    kinds["cls/a.jpg"] = "L"
    # RGB mask: white rectangle on black -> luminance
    m = add("b.jpg", (200, 150), (0.3, 0.1, 0.9, 0.6), 1)
    save(Image.fromarray(np.dstack([m] * 3)), masks / "cls/b.png", "PNG")
    kinds["cls/b.jpg"] = "RGB"
    # 16-bit mask at half resolution for a PNG image (re-encoded): scaled by depth, kept smaller
    m = add("c.png", (180, 120), (0.2, 0.3, 0.6, 0.9), 2, fmt="PNG")
    half = np.asarray(Image.fromarray(m, "L").resize((90, 60), Image.Resampling.NEAREST))
    save(Image.fromarray(half.astype(np.uint16) * 257), masks / "cls/c.png", "PNG")
    kinds["cls/c.png"] = "16-bit"
    # stored byte for byte (baseline RGB JPEG within --max-side); its mask has the image's own name
    m = add("d.jpg", (150, 100), (0.5, 0.2, 0.8, 0.8), 3, subsampling=2)  # 4:2:0: DALI's favourite
    save(Image.fromarray(m, "L"), masks / "cls/d.jpg", "JPEG", quality=95)
    kinds["cls/d.jpg"] = "same name"
    # wrong aspect ratio -> rejected, image kept
    add("e.jpg", (200, 150), (0.1, 0.1, 0.4, 0.4), 4)
    save(Image.fromarray(np.zeros((100, 100), np.uint8)), masks / "cls/e.png", "PNG")
    kinds["cls/e.jpg"] = "wrong aspect"
    # corrupt mask -> rejected, image kept
    m = add("f.jpg", (200, 150), (0.1, 0.1, 0.4, 0.4), 5)
    buf = io.BytesIO()
    Image.fromarray(m, "L").save(buf, format="PNG")
    (masks / "cls/f.png").write_bytes(buf.getvalue()[:60])
    kinds["cls/f.jpg"] = "corrupt"
    # EXIF-rotated (orientation 6: turn 90 degrees clockwise to display) and downscaled; the mask
    # follows the displayed (portrait) image, at full resolution
    displayed, m = with_rect(photo(6, (200, 300)), (0.15, 0.55, 0.7, 0.9))
    raw = Image.fromarray(displayed).transpose(Image.Transpose.ROTATE_90)  # what the camera stored
    exif = Image.Exif()
    exif[0x0112] = 6
    save(raw, src / "cls/g.jpg", "JPEG", exif=exif.tobytes(), quality=95, subsampling=0)
    save(Image.fromarray(m, "L"), masks / "cls/g.png", "PNG")
    kinds["cls/g.jpg"] = "exif"
    # no mask at all
    add("h.jpg", (120, 90), (0.2, 0.2, 0.6, 0.6), 7)
    kinds["cls/h.jpg"] = "missing"
    # RGBA cut-out: the alpha channel is the mask
    m = add("i.jpg", (160, 120), (0.4, 0.3, 0.95, 0.85), 8)
    cutout = np.dstack([photo(8, (160, 120)), m])
    save(Image.fromarray(cutout, "RGBA"), masks / "cls/i.png", "PNG")
    kinds["cls/i.jpg"] = "RGBA"
    # nested path
    m = add("sub/j.jpg", (300, 200), (0.05, 0.5, 0.35, 0.95), 9)
    save(Image.fromarray(m, "L"), masks / "cls/sub/j.png", "PNG")
    kinds["cls/sub/j.jpg"] = "nested"
    # an input that is rejected itself: its mask is never looked at
    (src / "cls/bad.jpg").write_bytes(b"")
    save(Image.fromarray(np.zeros((10, 10), np.uint8)), masks / "cls/bad.png", "PNG")
    # a mask without an image is ignored; a non-image file in DIR too
    save(Image.fromarray(np.zeros((10, 10), np.uint8)), masks / "cls/orphan.png", "PNG")
    (masks / "README.txt").write_text("masks from DeepUSPS")
    return src, masks, kinds


def read_samples(m) -> dict[str, dict[str, bytes]]:
    """{source input: {extension: bytes}} of every sample, with the standard library's tarfile."""
    out = {}
    for i in range(len(m.shards)):
        with tarfile.open(m.shard_url(i)) as tar:
            by_key: dict[str, dict[str, bytes]] = {}
            order: list[str] = []
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                by_key.setdefault(key, {})[ext] = tar.extractfile(member).read()
                order.append(ext)
            for key, parts in by_key.items():
                parts["__key__"] = key.encode()
                out[json.loads(parts["json"])["source"]] = parts
    return out


@pytest.fixture(scope="module")
def masked_build(tmp_path_factory):
    root = tmp_path_factory.mktemp("masked")
    src, masks, kinds = write_inputs(root)
    out = root / "out"
    m = build_shards(
        str(src), str(out), masks=str(masks), max_side=MAX_SIDE, max_samples=4, index=True, progress=False
    )
    return root, src, masks, kinds, out, m


def test_build_counts_and_rejects(masked_build):
    _, _, masks_dir, kinds, _, m = masked_build
    assert m.total_samples == len(kinds) == 10
    assert m.masks == {
        "member": "mask.png",
        "method": f"given:{masks_dir}",
        "samples": 7,
        "rejected": 2,
        "missing": 1,
    }
    assert m.has_masks
    reasons = {r.input: r.reason for r in m.rejected}
    assert reasons["cls/bad.jpg"] == "empty file (0 bytes)"
    wrong, corrupt = reasons[f"{masks_dir}/cls/e.png"], reasons[f"{masks_dir}/cls/f.png"]
    assert wrong.startswith(MASK_REJECTED) and "aspect ratio" in wrong and "100x100" in wrong
    assert corrupt.startswith(MASK_REJECTED) and "corrupt" in corrupt
    assert len(m.rejected) == 3


def test_every_mask_is_stored_converted_and_aligned_with_its_stored_image(masked_build):
    _, _, _, kinds, _, m = masked_build
    samples = read_samples(m)
    assert set(samples) == set(kinds)
    for source, kind in kinds.items():
        parts = samples[source]
        has = "mask.png" in parts
        assert has == (kind not in ("wrong aspect", "corrupt", "missing")), source
        if not has:
            continue
        names = [e for e in parts if e != "__key__"]
        assert names[:2] == ["jpg", "mask.png"]  # the mask right after its image
        mask = M.decode_mask(parts["mask.png"])
        with Image.open(io.BytesIO(parts["jpg"])) as img:
            rgb = np.asarray(img.convert("RGB"))
            size = img.size
        assert M.mask_problem(parts["mask.png"], size, "decode") is None
        if max(size) == MAX_SIDE and kind != "16-bit":
            assert mask.shape == rgb.shape[:2], source  # shrunk with the image
        if kind == "16-bit":
            assert mask.shape == (60, 90)  # smaller than the image: kept at its resolution
        if kind == "RGB":
            assert set(np.unique(mask)) == {0, 255}  # white/black luminance, exactly
        expected = magenta_box(rgb)
        got = mask_box(mask, size)
        assert np.abs(np.subtract(got, expected)).max() <= 2, (source, got, expected)
    # the EXIF-rotated photo is stored as displayed (portrait), its mask with it
    g = samples["cls/g.jpg"]
    with Image.open(io.BytesIO(g["jpg"])) as img:
        assert img.size == (107, 160)
    assert M.decode_mask(g["mask.png"]).shape == (160, 107)
    assert json.loads(g["json"])["original_size"] == [300, 200]  # the file's own (unrotated) size
    # the passthrough JPEG is still byte for byte
    with open(masked_build[1] / "cls/d.jpg", "rb") as f:
        assert samples["cls/d.jpg"]["jpg"] == f.read()


def test_verify_inspect_and_index_see_the_masks(masked_build, tmp_path):
    _, _, _, _, out, m = masked_build
    assert verify_shards(str(out), decode=True) == []
    text = inspect_shards(str(out))
    assert "saliency masks   7 samples (70.0%)" in text
    # index: a copy of the shards without our manifest
    copy = tmp_path / "copy"
    copy.mkdir()
    for s in m.shards:
        shutil.copy(out / s.name, copy / s.name)
    indexed = index_shards(str(copy), write_idx=True, progress=False)
    assert indexed.masks == {
        "member": "mask.png",
        "samples": 7,
        "method": "indexed",
        "rejected": 0,
        "missing": 3,
    }
    assert [(s.sha256, s.samples) for s in indexed.shards] == [(s.sha256, s.samples) for s in m.shards]
    assert verify_shards(str(copy)) == []
    # a manifest that claims another number of masks is caught
    lying = load_manifest(str(copy))
    lying.masks = {**lying.masks, "samples": 8}
    save_manifest(lying, str(copy))
    problems = verify_shards(str(copy))
    assert [str(p) for p in problems] == [
        "manifest.json: 7 samples with an image carry a .mask.png member, manifest says 8"
    ]


def test_reader_delivers_each_mask_with_its_sample(masked_build):
    _, _, _, kinds, out, m = masked_build
    samples = read_samples(m)
    by_key = {p["__key__"].decode(): (src, p) for src, p in samples.items()}
    reader = ShardReader(str(out), batch_size=2, seed=5, shuffle_buffer=4)
    seen = {}
    for batch in reader.epoch(0):
        assert batch.masks is not None and len(batch.masks) == len(batch.images)
        for key, image, mask in zip(batch.keys, batch.images, batch.masks):
            src, parts = by_key[key]
            assert image == parts["jpg"]
            assert mask == parts.get("mask.png")
            seen[src] = mask
    assert set(seen) == set(kinds)
    stats = reader.stats
    assert stats["samples"] == 10 and stats["unmasked"] == 3 and stats["bad_mask"] == 0
    assert all(stats[r] == 0 for r in SKIP_REASONS)


def test_build_is_deterministic_with_masks(masked_build, tmp_path):
    _, src, masks, _, _, m = masked_build
    again = build_shards(
        str(src),
        str(tmp_path / "again"),
        masks=str(masks),
        max_side=MAX_SIDE,
        max_samples=4,
        index=True,
        workers=2,
        progress=False,
    )
    assert [(s.name, s.sha256) for s in again.shards] == [(s.name, s.sha256) for s in m.shards]
    assert again.to_json() == m.to_json()
    plain = build_shards(str(src), str(tmp_path / "plain"), max_side=MAX_SIDE, max_samples=4, progress=False)
    assert plain.masks is None and not plain.has_masks
    assert [s.sha256 for s in plain.shards] != [s.sha256 for s in m.shards]


def test_build_resume_redoes_chunks_when_the_masks_change(masked_build, tmp_path, monkeypatch):
    """The masks directory is part of every chunk's digest: the receipts an interrupted build without
    masks left behind are not reused by a build with masks."""
    from pipeline.shards import build as build_mod

    _, src, masks, _, _, m = masked_build
    out = tmp_path / "resume"

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(build_mod, "save_manifest", interrupted)  # every chunk done, receipts written
        with pytest.raises(KeyboardInterrupt):
            build_shards(str(src), str(out), max_side=MAX_SIDE, max_samples=4, progress=False)
    assert len(os.listdir(out / build_mod.RECEIPT_DIR)) == len(m.shards)
    resumed = build_shards(
        str(src), str(out), masks=str(masks), max_side=MAX_SIDE, max_samples=4, progress=False
    )
    assert [s.sha256 for s in resumed.shards] == [s.sha256 for s in m.shards]
    assert resumed.masks == m.masks


def test_list_source_matches_relative_paths(masked_build, tmp_path):
    _, src, masks, _, _, _ = masked_build
    listing = tmp_path / "list.csv"
    shutil.copytree(src / "cls", tmp_path / "cls")
    absolute = os.path.abspath(tmp_path / "cls" / "b.jpg")
    listing.write_text(f"path,label\ncls/a.jpg,x\n./cls/sub/j.jpg,x\n{absolute},y\ncls/h.jpg,y\n")
    m = build_shards(str(listing), str(tmp_path / "out"), masks=str(masks), max_side=MAX_SIDE, progress=False)
    assert m.masks["samples"] == 2 and m.masks["missing"] == 2  # the absolute path has no mask path
    samples = read_samples(m)
    assert "mask.png" in samples["cls/a.jpg"] and "mask.png" in samples["./cls/sub/j.jpg"]
    assert "mask.png" not in samples[absolute]


def test_build_masks_refusals(tmp_path):
    with pytest.raises(BuildError, match="built in"):
        build_shards("builtin:digits?split=val", str(tmp_path / "o"), masks=str(tmp_path), progress=False)
    src = tmp_path / "src"
    src.mkdir()
    Image.fromarray(photo(0, (40, 30))).save(src / "x.jpg")
    with pytest.raises(BuildError, match="not a directory"):
        build_shards(str(src), str(tmp_path / "o"), masks=str(tmp_path / "nowhere"), progress=False)


# --- the reader on bad masks written straight into a tar ------------------------------------------


def mask_for(index: int, size=(12, 8)) -> bytes:
    m = np.zeros((size[1], size[0]), np.uint8)
    m[2:6, 3 + index % 3 : 9] = 255
    return M.encode_mask(m)


def bad_mask_set(root: Path) -> tuple[str, dict[str, bytes | None], dict[str, str]]:
    """One shard of 9 samples (images 24x16): good masks, and each kind of bad one.
    Returns the manifest URL, the mask each key must arrive with, the bad ones' expected details."""
    good = {0: mask_for(0), 6: mask_for(6), 8: M.FULL_MASK}
    rgb = io.BytesIO()
    Image.fromarray(np.zeros((8, 12, 3), np.uint8)).save(rgb, format="PNG")
    jpeg = io.BytesIO()
    Image.fromarray(np.zeros((8, 12), np.uint8)).save(jpeg, format="JPEG")
    bad = {
        1: (mask_for(1, size=(8, 8)), "aspect ratio"),  # square mask, 3:2 image
        2: (rgb.getvalue(), "not 8-bit greyscale (mode L): 8-bit RGB PNG"),
        3: (mask_for(3)[:40], "corrupt PNG"),
        7: (jpeg.getvalue(), "not a PNG: jpeg data"),
    }
    members = []
    for i in range(9):
        key = f"{i:09d}"
        if i != 4:
            members.append((f"{key}.jpg", encode(i)))
        if i in good:
            members.append((f"{key}.mask.png", good[i]))
        elif i in bad:
            members.append((f"{key}.mask.png", bad[i][0]))
        elif i == 4:  # a mask without its image
            members.append((f"{key}.mask.png", mask_for(4)))
        members.append((f"{key}.cls", str(i % 10).encode()))
    url = make_shard_set(root, [members], [9])
    m = load_manifest(url)
    m.masks = {"member": "mask.png", "samples": 8, "method": "given:test", "rejected": 0, "missing": 1}
    save_manifest(m, url)
    expect = {f"{i:09d}": good.get(i) for i in range(9) if i != 4}
    return url, expect, {f"{i:09d}": detail for i, (_, detail) in bad.items()}


def test_reader_counts_bad_masks_and_keeps_their_samples(tmp_path, caplog):
    url, expect, bad = bad_mask_set(tmp_path / "bad")
    reader = ShardReader(url, batch_size=9, shuffle_buffer=0)
    with caplog.at_level(logging.WARNING, logger="pipeline.reader"):
        batches = list(reader.epoch(0))
    assert len(batches) == 1
    batch = batches[0]
    stats = reader.stats
    assert stats["bad_mask"] == 4 and stats["unmasked"] == 1 and stats["missing_image"] == 1
    assert stats["samples"] == 8 and stats["filled"] == 1
    delivered = {}
    for key, mask in zip(batch.keys, batch.masks):
        if key in delivered:  # the filled slot: a copy of its donor, mask included
            assert mask is delivered[key] or mask == delivered[key]
        delivered[key] = mask
    assert delivered == expect
    assert len(batch.keys) == 9 and len(set(batch.keys)) == 8
    for key, detail in bad.items():
        lines = [
            r.getMessage() for r in caplog.records if key in r.getMessage() and "bad_mask" in r.getMessage()
        ]
        assert len(lines) == 1 and detail in lines[0] and lines[0].startswith("keeping a sample with")
    assert any(
        "skipping missing_image" in r.getMessage() and "000000004" in r.getMessage() for r in caplog.records
    )
    # a second epoch: counted again, logged once
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pipeline.reader"):
        list(reader.epoch(1))
    assert reader.stats["bad_mask"] == 8 and not [r for r in caplog.records if "bad_mask" in r.getMessage()]


def test_a_reader_not_asked_for_masks_reads_none(tmp_path, monkeypatch):
    """``masks=False`` (a recipe without masked views): the same samples and labels, no mask member
    read or checked, nothing counted about masks."""
    import pipeline.reader as reader_module

    url, _, _ = bad_mask_set(tmp_path / "bad")
    checked = []
    real = reader_module.mask_problem
    monkeypatch.setattr(reader_module, "mask_problem", lambda *a, **k: checked.append(a) or real(*a, **k))
    with_masks = next(iter(ShardReader(url, batch_size=9, shuffle_buffer=0).epoch(0)))
    assert checked  # the spy sees the checks when masks are asked for
    checked.clear()
    plain = ShardReader(url, batch_size=9, shuffle_buffer=0, masks=False)
    batch = next(iter(plain.epoch(0)))
    assert batch.masks is None and not checked
    assert batch.keys == with_masks.keys and batch.labels.tolist() == with_masks.labels.tolist()
    assert plain.stats["bad_mask"] == plain.stats["unmasked"] == 0


def test_reader_decode_level_and_sets_without_masks(tmp_path):
    url, _, _ = bad_mask_set(tmp_path / "bad")
    # validation off: only empty masks refused, so every non-empty one arrives
    off = ShardReader(url, batch_size=8, shuffle_buffer=0, validate=False)
    batch = next(iter(off.epoch(0)))
    assert off.stats["bad_mask"] == 0 and sum(m is not None for m in batch.masks) == 7
    # a set whose manifest records no masks: masks are neither read nor delivered
    m = load_manifest(url)
    m.masks = None
    save_manifest(m, url)
    plain = ShardReader(url, batch_size=8, shuffle_buffer=0)
    batch = next(iter(plain.epoch(0)))
    assert batch.masks is None and plain.stats["unmasked"] == 0 and plain.stats["bad_mask"] == 0


def test_verify_reports_bad_masks_per_shard(tmp_path):
    _, _, bad = bad_mask_set(tmp_path / "bad")
    index_shards(str(tmp_path / "bad"), progress=False)  # real sizes and sha256
    problems = [str(p) for p in verify_shards(str(tmp_path / "bad"))]
    for key, detail in bad.items():
        assert any(
            p.startswith(f"shard-000000.tar: sample {key}: bad mask:") and detail in p for p in problems
        )
    assert "shard-000000.tar: sample 000000004 has no .jpg member" in problems
    assert len(problems) == len(bad) + 1


# --- relic shards masks ------------------------------------------------------------------------------


def files_of(d: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def digits_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits_src")
    build_shards("builtin:digits?split=val", str(out), max_samples=64, index=True, progress=False)
    return out


def test_masks_command_is_deterministic_and_keeps_samples(digits_set, tmp_path):
    before = files_of(digits_set)
    a = add_masks(str(digits_set), str(tmp_path / "a"), progress=False)
    add_masks(str(digits_set), str(tmp_path / "b"), workers=2, progress=False)
    assert files_of(digits_set) == before  # the source is untouched
    assert files_of(tmp_path / "a") == files_of(tmp_path / "b")
    assert a.masks == {
        "member": "mask.png",
        "samples": a.total_samples,
        "method": "spectral_residual",
        "rejected": 0,
        "missing": 0,
    }
    # in place, on a copy: the same bytes; and again over its own output (masks replaced): unchanged
    shutil.copytree(digits_set, tmp_path / "c")
    add_masks(str(tmp_path / "c"), progress=False)
    assert files_of(tmp_path / "c") == files_of(tmp_path / "a")
    add_masks(str(tmp_path / "c"), progress=False)
    assert files_of(tmp_path / "c") == files_of(tmp_path / "a")
    assert verify_shards(str(tmp_path / "a"), decode=True) == []
    # samples, labels and every other member unchanged, in order
    src, masked = load_manifest(str(digits_set)), load_manifest(str(tmp_path / "a"))
    assert masked.classes == src.classes and masked.class_counts == src.class_counts
    for i in range(len(src.shards)):
        with tarfile.open(src.shard_url(i)) as t0, tarfile.open(masked.shard_url(i)) as t1:
            old = [(m.name, t0.extractfile(m).read()) for m in t0.getmembers()]
            new = [(m.name, t1.extractfile(m).read()) for m in t1.getmembers()]
        assert [x for x in new if not x[0].endswith(".mask.png")] == old
        names = [n for n, _ in new]
        for n, _ in old:
            if n.endswith(".jpg"):
                assert names[names.index(n) + 1] == n[: -len("jpg")] + "mask.png"
    # the reader: same batches, keys and labels as the source, each with its mask
    r0, r1 = (
        ShardReader(str(digits_set), batch_size=30, seed=1),
        ShardReader(str(tmp_path / "a"), batch_size=30, seed=1),
    )
    for b0, b1 in zip(r0.epoch(0), r1.epoch(0)):
        assert b0.keys == b1.keys and b0.images == b1.images and (b0.labels == b1.labels).all()
        assert b0.masks is None and all(m is not None for m in b1.masks)
        for image, mask in zip(b1.images, b1.masks):
            with Image.open(io.BytesIO(image)) as img:
                assert M.decode_mask(mask).shape == (64, 64) and img.size == (32, 32)
    assert r1.stats["bad_mask"] == 0 and r1.stats["unmasked"] == 0


def test_masks_command_counts_bad_images_and_replaces_old_masks(tmp_path):
    members = []
    for i in range(5):
        key = f"{i:09d}"
        image = encode(i, size=(48, 32))
        if i == 1:
            image = image[: len(image) // 2]  # truncated: does not decode
        if i != 3:
            members.append((f"{key}.jpg", image))
        if i in (2, 3):
            members.append((f"{key}.mask.png", b"an old, broken mask"))
        members.append((f"{key}.cls", b"1"))
    d = tmp_path / "set"
    d.mkdir()
    write_tar(d / "shard-000000.tar", members)
    index_shards(str(d), progress=False)
    m = add_masks(str(d), progress=False)
    assert m.masks == {
        "member": "mask.png",
        "samples": 3,
        "method": "spectral_residual",
        "rejected": 1,
        "missing": 1,
    }
    assert [(r.input, r.reason.split(":")[0]) for r in m.rejected] == [
        (f"{d / 'shard-000000.tar'}:000000003", "sample has no image member"),  # index's entry
        ("shard-000000.tar:000000001", MASK_REJECTED),
    ]
    with tarfile.open(d / "shard-000000.tar") as tar:
        names = tar.getnames()
        data = {n: tar.extractfile(n).read() for n in names}
    assert "000000001.mask.png" not in names and "000000003.mask.png" not in names  # old one dropped
    assert M.mask_problem(data["000000002.mask.png"], (48, 32), "decode") is None
    assert names == [
        "000000000.jpg", "000000000.mask.png", "000000000.cls",
        "000000001.jpg", "000000001.cls",
        "000000002.jpg", "000000002.mask.png", "000000002.cls",
        "000000003.cls",
        "000000004.jpg", "000000004.mask.png", "000000004.cls",
    ]  # fmt: skip
    # re-running drops the previous run's mask rejections instead of piling them up
    again = add_masks(str(d), progress=False)
    assert again.rejected == m.rejected


def test_masks_cli(digits_set, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "cli"
    args = parser.parse_args(["masks", str(digits_set), "--out", str(out), "--no-progress", "--workers", "2"])
    assert cli_run(args) == 0
    text = capsys.readouterr().out
    assert "wrote 179 masks (spectral_residual) for 179 samples in 3 shards" in text
    assert load_manifest(str(out)).masks["samples"] == 179
    assert cli_run(parser.parse_args(["masks", str(tmp_path / "nothing")])) == 2
    assert "no shard manifest" in capsys.readouterr().err


@pytest.mark.s3
def test_masks_command_on_s3_matches_local(s3_bucket, s3_options, digits_set, tmp_path):
    url = f"{s3_bucket}/digits"
    build_shards(
        "builtin:digits?split=val",
        url,
        max_samples=64,
        index=True,
        storage_options=s3_options,
        progress=False,
    )
    remote = add_masks(url, storage_options=s3_options, progress=False)  # in place, on S3
    local = add_masks(str(digits_set), str(tmp_path / "local"), progress=False)
    assert [(s.name, s.sha256, s.bytes, s.index) for s in remote.shards] == [
        (s.name, s.sha256, s.bytes, s.index) for s in local.shards
    ]
    assert verify_shards(url, storage_options=s3_options) == []
    reader = ShardReader(url, batch_size=60, storage_options=s3_options)
    for batch in reader.epoch(0):
        assert all(m is not None for m in batch.masks)
    assert reader.stats["unmasked"] == 0
