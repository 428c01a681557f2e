"""What ``relic shards build`` makes of images that are not plain 8-bit RGB: EXIF orientations with
``--max-side``, 16- and 32-bit samples, images too large to decode (pipeline/shards/images.py)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from pipeline.shards.build import DEFAULT_MAX_PIXELS, RejectedInput, build_shards, prepare_image
from pipeline.shards.format import samples, tar_members
from pipeline.shards.images import jpeg_info


def _decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"), dtype=np.float64)


def _asymmetric(width: int = 400, height: int = 200) -> Image.Image:
    """A picture whose every flip and turn looks different: a bright block in one corner, a ramp."""
    yy, xx = np.mgrid[0:height, 0:width]
    pixels = np.stack([xx * 255 // width, yy * 255 // height, np.zeros_like(xx)], -1).astype(np.uint8)
    pixels[: height // 4, : width // 8] = 255
    return Image.fromarray(pixels)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientations_with_max_side_keep_their_proportions(orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    _asymmetric().save(buf, format="JPEG", quality=95, exif=exif.tobytes())
    jpeg, original, reencoded = prepare_image(buf.getvalue(), max_side=100)
    assert reencoded and original == (400, 200)
    out = _decode(jpeg)
    turned = orientation >= 5  # transpose, quarter turns, transverse
    assert out.shape[:2] == ((100, 50) if turned else (50, 100))
    with Image.open(io.BytesIO(buf.getvalue())) as img:
        reference = (
            ImageOps.exif_transpose(img).convert("RGB").resize(out.shape[1::-1], Image.Resampling.LANCZOS)
        )
    assert np.abs(out - np.asarray(reference, dtype=np.float64)).mean() < 4
    assert jpeg_info(jpeg).orientation == 1


def _ramp(dtype, top: float, size: int = 128) -> np.ndarray:
    """A ramp over the whole range [0, top] whose mean is top / 2."""
    return np.linspace(0, top, size * size).reshape(size, size).astype(dtype)


def _tiff(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="TIFF")
    return buf.getvalue()


def _pgm16(array: np.ndarray) -> bytes:
    return b"P5\n%d %d\n65535\n" % (array.shape[1], array.shape[0]) + array.astype(">u2").tobytes()


@pytest.mark.parametrize(
    ("name", "data"),
    [
        ("16-bit PGM", _pgm16(_ramp(np.uint16, 65535))),
        ("16-bit TIFF", _tiff(_ramp(np.uint16, 65535))),
        ("32-bit signed TIFF", _tiff(_ramp(np.int32, 2**31 - 1))),
        ("32-bit float TIFF in 0..1", _tiff(_ramp(np.float32, 1.0))),
    ],
)
def test_high_bit_depths_are_scaled_not_clipped(name, data):
    jpeg, _, reencoded = prepare_image(data)
    out = _decode(jpeg)
    assert reencoded
    assert out.mean() == pytest.approx(127.5, abs=1.5), name  # clipping gave ~254
    assert out.min() < 5 and out.max() > 250, name


def test_the_pixel_limit_rejects_before_decoding(tmp_path):
    big = io.BytesIO()
    Image.new("L", (6400, 6400)).save(big, format="PNG")  # 41 megapixels, a few kB of PNG
    with pytest.raises(RejectedInput, match=r"6400x6400 = 41\.0 megapixels, more than --max-pixels 40 M"):
        prepare_image(big.getvalue())
    assert DEFAULT_MAX_PIXELS == 40_000_000
    small = io.BytesIO()
    _asymmetric(40, 30).save(small, format="JPEG")
    with pytest.raises(RejectedInput, match="max-pixels"):
        prepare_image(small.getvalue(), max_pixels=1000)  # a JPEG is checked from its header too
    prepare_image(small.getvalue(), max_pixels=1200)

    src = tmp_path / "src"
    src.mkdir()
    (src / "big.png").write_bytes(big.getvalue())
    (src / "small.jpg").write_bytes(small.getvalue())
    m = build_shards(str(src), str(tmp_path / "out"), progress=False)
    assert m.total_samples == 1 and m.encoding["max_pixels"] == DEFAULT_MAX_PIXELS
    (rejected,) = m.rejected
    assert rejected.input.endswith("big.png") and "megapixels" in rejected.reason
    with open(m.shard_url(0), "rb") as f:
        (sample,) = list(samples(tar_members(f), {"json"}))
    assert b"small.jpg" in sample.parts["json"]
