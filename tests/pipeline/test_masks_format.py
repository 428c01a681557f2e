"""The mask member (pipeline.shards.masks): checks, encoding, conversion of user masks, aspect ratios."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline.shards import masks as M
from pipeline.shards.images import image_size, png_header


def png(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def rect_mask(w: int, h: int, box=(0.25, 0.25, 0.75, 0.75)) -> np.ndarray:
    m = np.zeros((h, w), np.uint8)
    m[int(box[1] * h) : int(box[3] * h), int(box[0] * w) : int(box[2] * w)] = 255
    return m


def with_idat(data: bytes, new_payload: bytes) -> bytes:
    """``data`` with its (single) IDAT chunk's payload replaced, CRC recomputed: structurally valid."""
    pos = data.index(b"IDAT") - 4
    (length,) = struct.unpack_from(">I", data, pos)
    chunk = b"IDAT" + new_payload
    new = struct.pack(">I", len(new_payload)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return data[:pos] + new + data[pos + 12 + length :]


def test_full_mask_is_a_1x1_grey_png_of_255():
    assert M.decode_mask(M.FULL_MASK).tolist() == [[255]]
    with Image.open(io.BytesIO(M.FULL_MASK)) as img:
        assert (img.mode, img.size, img.format) == ("L", (1, 1), "PNG")
    for size in ((640, 480), (1, 1000), (5000, 3)):  # fits any image
        assert M.mask_problem(M.FULL_MASK, size, "decode") is None


def test_encode_decode_round_trip_is_exact_and_deterministic():
    arr = np.random.default_rng(0).integers(0, 256, (37, 53), dtype=np.uint8)
    data = M.encode_mask(arr)
    assert data == M.encode_mask(arr.copy())
    assert np.array_equal(M.decode_mask(data), arr)
    assert png_header(data).describe() == "8-bit greyscale"
    with pytest.raises(ValueError):
        M.encode_mask(arr.astype(np.uint16))
    with pytest.raises(ValueError):
        M.encode_mask(np.zeros((4, 4, 3), np.uint8))


def test_mask_problem_refuses_each_kind_of_bad_mask():
    good = M.encode_mask(rect_mask(64, 48))
    assert M.mask_problem(good, (640, 480), True) is None
    assert M.mask_problem(good, (641, 480), "cheap") is None  # rounding
    assert M.mask_problem(good, None, "decode") is None

    rgb = png(np.dstack([rect_mask(64, 48)] * 3))
    assert M.mask_problem(rgb, (640, 480)) == ("bad_mask", "not 8-bit greyscale (mode L): 8-bit RGB PNG")
    sixteen = png(rect_mask(64, 48).astype(np.uint16) * 257)
    assert "16-bit greyscale" in M.mask_problem(sixteen, (640, 480))[1]
    rgba = png(np.dstack([rect_mask(64, 48)] * 4))
    assert "8-bit RGBA" in M.mask_problem(rgba, (640, 480))[1]

    reason, detail = M.mask_problem(good[: len(good) // 2], (640, 480))
    assert reason == "bad_mask" and "corrupt PNG" in detail and "truncated" in detail
    reason, detail = M.mask_problem(good, (480, 640))
    assert reason == "bad_mask" and "aspect ratio" in detail and "turned a quarter" in detail
    reason, detail = M.mask_problem(good, (100, 100))
    assert "does not have the aspect ratio" in detail and "turned" not in detail

    jpeg = io.BytesIO()
    Image.fromarray(rect_mask(64, 48)).save(jpeg, format="JPEG")
    assert M.mask_problem(jpeg.getvalue(), None) == ("bad_mask", "not a PNG: jpeg data")
    assert M.mask_problem(b"", None, False) == ("bad_mask", "empty mask member (0 bytes)")
    assert M.mask_problem(b"garbage", None, False) is None  # validation off: only empty refused
    assert M.mask_problem(b"garbage", None)[0] == "bad_mask"


def test_decode_level_catches_what_the_header_walk_cannot():
    good = M.encode_mask(rect_mask(64, 48))
    broken = with_idat(good, b"\x78\x9c" + bytes(range(40)))  # valid chunks and CRCs, bad zlib data
    assert M.mask_problem(broken, (64, 48), True) is None
    reason, detail = M.mask_problem(broken, (64, 48), "decode")
    assert reason == "bad_mask" and "full decode failed" in detail
    with pytest.raises(M.BadMask):
        M.decode_mask(broken)


@pytest.mark.parametrize(
    ("mask", "image", "ok"),
    [
        ((64, 48), (640, 480), True),
        ((64, 48), (4000, 3000), True),
        ((64, 43), (1000, 667), True),  # round(64 * 667 / 1000) = 43
        ((64, 42), (1000, 667), True),  # within one pixel
        ((64, 40), (1000, 667), False),
        ((100, 100), (640, 480), False),
        ((10, 100), (105, 1000), True),  # the shorter side rounded: compared along the longer one
        ((48, 64), (640, 480), False),
    ],
)
def test_aspect_mismatch(mask, image, ok):
    assert (M.aspect_mismatch(mask, image) is None) == ok
    assert (M.aspect_mismatch(image, mask) is None) == ok  # symmetric


def test_image_size_is_the_displayed_size():
    img = Image.fromarray(np.zeros((30, 40, 3), np.uint8))
    for fmt in ("JPEG", "PNG", "WEBP"):
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        assert image_size(buf.getvalue()) == (40, 30), fmt
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif.tobytes())
    assert image_size(buf.getvalue()) == (30, 40)
    assert image_size(b"not an image") is None


# --- user masks: conversion to 8-bit greyscale -----------------------------------------------------


def encoded(img: Image.Image, fmt: str = "PNG", **save) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **save)
    return buf.getvalue()


def test_mask_from_file_converts_every_mode():
    rect = rect_mask(40, 30)
    assert np.array_equal(M.mask_from_file(encoded(Image.fromarray(rect, "L"))), rect)
    # RGB: luminance (white 255, black 0)
    assert np.array_equal(M.mask_from_file(encoded(Image.fromarray(np.dstack([rect] * 3)))), rect)
    # 1-bit: 0/255
    assert np.array_equal(M.mask_from_file(encoded(Image.fromarray(rect, "L").convert("1"))), rect)
    # 16-bit: scaled by depth, 65535 -> 255 and 32896 -> 128
    sixteen = (rect.astype(np.uint16) * 257).astype(np.uint16)
    sixteen[0, 0] = 32896
    got = M.mask_from_file(encoded(Image.fromarray(sixteen)))
    assert got[0, 0] == 128 and np.array_equal(got[1:], rect[1:])
    # RGBA cut-out: the alpha channel, whatever the colour
    cutout = np.dstack([np.full_like(rect, 200)] * 3 + [rect])
    assert np.array_equal(M.mask_from_file(encoded(Image.fromarray(cutout, "RGBA"))), rect)
    # RGBA without any transparent pixel: its luminance
    opaque = np.dstack([rect] * 3 + [np.full_like(rect, 255)])
    assert np.array_equal(M.mask_from_file(encoded(Image.fromarray(opaque, "RGBA"))), rect)
    # partial values survive
    ramp = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (4, 1))
    assert np.array_equal(M.mask_from_file(encoded(Image.fromarray(ramp, "L"))), ramp)


def test_mask_from_file_applies_its_own_exif_orientation():
    rect = rect_mask(40, 30, box=(0.0, 0.0, 0.5, 0.2))
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed turned 90 degrees clockwise
    got = M.mask_from_file(encoded(Image.fromarray(rect, "L"), "PNG", exif=exif.tobytes()))
    assert got.shape == (40, 30)
    assert np.array_equal(got, np.rot90(rect, k=-1))


def test_mask_from_file_refuses_non_images():
    for data, words in (
        (b"", "empty"),
        (b"hello, not an image", "not an image"),
        (encoded(Image.fromarray(rect_mask(64, 64)))[:80], "corrupt"),
    ):
        with pytest.raises(M.BadMask, match=words):
            M.mask_from_file(data)
    with pytest.raises(M.BadMask, match="max-pixels"):
        M.mask_from_file(encoded(Image.fromarray(rect_mask(64, 64))), max_pixels=100)


def test_fit_mask_shrinks_larger_masks_to_the_image_and_keeps_smaller_ones():
    box = (0.25, 0.2, 0.75, 0.8)  # edges on whole pixels of both sizes
    fitted = M.fit_mask(rect_mask(400, 300, box), (40, 30))
    assert fitted.shape == (30, 40)
    assert np.array_equal(fitted, rect_mask(40, 30, box))
    edge = M.fit_mask(rect_mask(400, 300, (0.25, 0.25, 0.75, 0.75)), (40, 30))
    assert 0 < edge[7, 20] < 255  # an edge across a pixel becomes a partial value
    small = rect_mask(16, 12)
    assert M.fit_mask(small, (640, 480)) is small
    with pytest.raises(M.BadMask, match="aspect ratio"):
        M.fit_mask(rect_mask(100, 100), (640, 480))


def test_find_masks_rule(tmp_path):
    root = tmp_path / "masks"
    (root / "cls" / "sub").mkdir(parents=True)
    for rel in ("cls/a.png", "cls/a.jpg", "cls/b.jpg", "cls/b.webp", "cls/sub/c.PNG", "cls/d.txt", "e.tif"):
        (root / rel).write_bytes(b"x")
    found = M.find_masks(str(root))
    assert found.lookup("cls/a.jpg") == "cls/a.png"  # .png first
    assert found.lookup("cls/b.webp") == "cls/b.webp"  # then the image's own suffix
    assert found.lookup("cls/b.png") == "cls/b.jpg"  # then MASK_FILE_SUFFIXES order
    assert found.lookup("cls/sub/c.jpeg") == "cls/sub/c.PNG"
    assert found.lookup("cls/d.jpg") is None  # .txt is not a mask file
    assert found.lookup("e.png") == "e.tif"
    assert found.lookup("missing.jpg") is None
    with pytest.raises(FileNotFoundError):
        M.find_masks(str(tmp_path / "nowhere"))
