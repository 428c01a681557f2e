"""Saliency masks in shards: the one owner of what a mask member is, how it is checked, converted and
computed.

ReLICv2 (Tomasev et al. 2022, arXiv 2201.05119, section 3) takes each large crop, with some
probability, from a background-removed image, using an unsupervised saliency mask (theirs come from
DeepUSPS). Users bring their own masks (``relic shards build --masks DIR``) or compute the baseline
here (``relic shards masks``, :func:`spectral_residual_mask`).

The member. A sample's mask is the tar member ``{key}.mask.png`` (extension ``MASK_EXT``) beside its
image, in the same sample (members adjacent, like every member): an 8-bit single-channel PNG (PIL
mode ``L``; PNG colour type 0, bit depth 8), 255 = foreground (keep), 0 = background (remove), values
between = partial. A mask may have any size — consumers resize it to its image — but must have its
image's aspect ratio within rounding (:func:`aspect_mismatch`) and follows the image *as displayed*
(EXIF orientation applied). ``FULL_MASK`` is the "keep everything" mask fed to DALI for samples
without a usable one. The manifest says whether a set has masks (``Manifest.masks``).

Checks (:func:`mask_problem`, the reader's ``validate`` levels as in
:mod:`pipeline.shards.images`): ``False`` refuses only empty members; ``True``/``"cheap"`` walks the
PNG chunks (signature, IHDR, every CRC up to IEND: truncation and corruption), requires 8-bit
greyscale and checks the aspect ratio against the image's header size; ``"decode"`` also decodes it
fully. Every refusal has the reason ``"bad_mask"``.

Conversion of user masks (:func:`mask_from_file`): the mask file is decoded by PIL, its own EXIF
orientation applied, and made 8-bit greyscale — ``L`` as is; ``1`` (1-bit) as 0/255; 16-bit and
32-bit integer or float greyscale scaled by their depth to 0..255 (:func:`pipeline.shards.images.to_8bit`,
the images' rule: 65535 -> 255); an image with an alpha channel (RGBA, LA, palette with transparency)
by its **alpha** when any pixel is not fully opaque (cut-outs of background-removal tools), else by its
luminance; RGB, palette and other colour modes by their luminance (ITU-R 601-2, PIL's ``convert("L")``).
"""

from __future__ import annotations

import functools
import io
import os
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline import storage
from pipeline.shards.images import (
    EXIF_ORIENTATION,
    decode_problem,
    image_problem,
    orient,
    png_header,
    sniff_format,
    to_8bit,
)

MASK_EXT = "mask.png"
"""The tar member extension of a sample's saliency mask: ``{key}.mask.png``."""
MASK_METHOD_SPECTRAL_RESIDUAL = "spectral_residual"
"""``Manifest.masks["method"]`` of masks computed by :func:`spectral_residual_mask`."""
MASK_FILE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
"""File suffixes a user's mask file may have (``build --masks``), ``.png`` preferred."""


class BadMask(ValueError):
    """A mask that cannot be used; ``str(e)`` says why."""


def encode_mask(mask: np.ndarray) -> bytes:
    """The PNG bytes of a ``uint8 [H, W]`` mask (8-bit greyscale; deterministic: PIL's encoder at
    fixed settings, no time stamp)."""
    arr = np.asarray(mask)
    if arr.dtype != np.uint8 or arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"a mask is a non-empty uint8 [H, W] array, got {arr.dtype} {arr.shape}")
    buf = io.BytesIO()
    Image.fromarray(arr, mode="L").save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


FULL_MASK: bytes = encode_mask(np.full((1, 1), 255, dtype=np.uint8))
"""A 1x1 mask of value 255: "keep everything", for samples without a usable mask."""


def aspect_mismatch(mask_size: tuple[int, int], image_size: tuple[int, int]) -> str | None:
    """``None`` when a mask of ``(width, height)`` ``mask_size`` has the aspect ratio of an image of
    ``image_size`` within rounding, else what differs. Within rounding: the larger of the two, scaled
    to the smaller one's width (or height), lands within one pixel of the smaller one's height (or
    width) — what resizing either one with its sides rounded gives."""
    (mw, mh), (iw, ih) = mask_size, image_size
    if _same_aspect(mask_size, image_size):
        return None
    detail = f"mask {mw}x{mh} does not have the aspect ratio of its image ({iw}x{ih} as displayed)"
    if _same_aspect((mh, mw), image_size):
        detail += "; it matches the image turned a quarter: masks follow the image as displayed (EXIF orientation applied)"
    return detail


def _same_aspect(a: tuple[int, int], b: tuple[int, int]) -> bool:
    (sw, sh), (lw, lh) = sorted((a, b), key=lambda s: s[0] * s[1])
    return abs(lh * sw / lw - sh) <= 1 + 1e-9 or abs(lw * sh / lh - sw) <= 1 + 1e-9


def mask_problem(
    data: bytes, image_size: tuple[int, int] | None, level: bool | str = True
) -> tuple[str, str] | None:
    """``None`` if ``data`` is a usable mask member, else ``("bad_mask", detail)`` (module doc).
    ``image_size``: its image's ``(width, height)`` as displayed
    (:func:`pipeline.shards.images.image_size`), or None to skip the aspect-ratio check."""
    if not data:
        return "bad_mask", "empty mask member (0 bytes)"
    if level is False:
        return None
    fmt = sniff_format(data)
    if fmt != "png":
        what = f"{fmt} data" if fmt else f"data starting with {data[:8].hex()}"
        return "bad_mask", f"not a PNG: {what}"
    problem = image_problem(data, "png", True)
    if problem is not None:
        return "bad_mask", f"corrupt PNG: {problem[1]}"
    header = png_header(data)
    if header is None:  # image_problem has checked IHDR; kept for the type checker
        return "bad_mask", "corrupt PNG: no IHDR"
    if (header.bit_depth, header.color_type) != (8, 0):
        return "bad_mask", f"not 8-bit greyscale (mode L): {header.describe()} PNG"
    if image_size is not None:
        mismatch = aspect_mismatch((header.width, header.height), image_size)
        if mismatch is not None:
            return "bad_mask", mismatch
    if level == "decode":
        failed = decode_problem(data)
        if failed is not None:
            return "bad_mask", f"full decode failed: {failed}"
    return None


def decode_mask(data: bytes) -> np.ndarray:
    """The ``uint8 [H, W]`` pixels of a mask member; raises :class:`BadMask` for anything
    :func:`mask_problem` refuses at the ``"decode"`` level."""
    problem = mask_problem(data, None, "decode")
    if problem is not None:
        raise BadMask(problem[1])
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img, dtype=np.uint8).copy()


# --------------------------------------------------------------------------------------------------
# User masks (``relic shards build --masks DIR``)


def mask_from_file(data: bytes, *, max_pixels: int | None = None) -> np.ndarray:
    """A user's mask file as ``uint8 [H, W]`` (conversion rules: module doc); raises :class:`BadMask`."""
    if not data:
        raise BadMask("empty mask file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise BadMask("mask file is not an image (unrecognised format)") from None
    except Exception as e:  # PIL raises many types for bad data (DecompressionBombError among them)
        raise BadMask(f"unreadable mask header: {type(e).__name__}: {e}") from None
    with img:
        w, h = img.size
        if max_pixels is not None and w * h > max_pixels:
            raise BadMask(f"mask of {w}x{h} pixels, more than --max-pixels {max_pixels:,}")
        try:
            img.load()
            return _to_grey(img)
        except Exception as e:
            raise BadMask(f"truncated or corrupt mask file: {type(e).__name__}: {e}") from None


def _to_grey(img: Image.Image) -> np.ndarray:
    orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        grey = Image.fromarray(to_8bit(img), mode="L")  # the depth comes from the TIFF tags
    else:
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        grey = None
        if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
            alpha = img.getchannel("A")
            if alpha.getextrema()[0] < 255:
                grey = alpha
        if grey is None:
            grey = img if img.mode == "L" else img.convert("L")
    return np.asarray(orient(grey, orientation), dtype=np.uint8).copy()


def fit_mask(mask: np.ndarray, image_size: tuple[int, int]) -> np.ndarray:
    """A user's mask made ready to store beside an image stored at ``image_size`` (``(width, height)``,
    after EXIF rotation and ``--max-side``): raises :class:`BadMask` when its aspect ratio differs from
    the image's beyond rounding; a mask larger than the image (in either side) is resized to the
    image's size with area averaging (PIL's BOX filter: edges become partial values), so it stays
    aligned with the stored pixels; a smaller one is kept at its resolution (consumers resize it)."""
    h, w = mask.shape
    mismatch = aspect_mismatch((w, h), image_size)
    if mismatch is not None:
        raise BadMask(mismatch)
    if w > image_size[0] or h > image_size[1]:
        resized = Image.fromarray(mask, "L").resize(image_size, Image.Resampling.BOX)
        return np.asarray(resized, dtype=np.uint8).copy()
    return mask


@dataclass
class MaskDir:
    """The mask files below ``--masks DIR``, listed once: ``lookup(relative image path)`` gives the
    relative path of its mask (the rule: :func:`find_masks`)."""

    base: str
    """DIR as a local path or URL, for :class:`pipeline.shards.sources.FileReader`."""
    by_stem: dict[str, list[str]] = field(default_factory=dict)
    """Relative path without suffix -> the mask files with that stem, in order of preference."""

    def lookup(self, image_path: str) -> str | None:
        stem, suffix = posixpath.splitext(posixpath.normpath(image_path))
        candidates = self.by_stem.get(stem)
        if not candidates:
            return None
        # .png first, then the image's own suffix, then the other suffixes in MASK_FILE_SUFFIXES order
        order = {s: i for i, s in enumerate(MASK_FILE_SUFFIXES)}
        return min(
            candidates,
            key=lambda rel: (
                posixpath.splitext(rel)[1].lower() != ".png",
                posixpath.splitext(rel)[1].lower() != suffix.lower(),
                order.get(posixpath.splitext(rel)[1].lower(), len(order)),
                rel,
            ),
        )

    def __len__(self) -> int:
        return sum(len(v) for v in self.by_stem.values())


def find_masks(mask_dir: str, options: dict[str, Any] | None = None) -> MaskDir:
    """List the mask files below ``mask_dir`` (local or fsspec URL). The mask of the image at relative
    path ``a/b/c.jpg`` is ``a/b/c.png`` below it, else a file of the same stem with another
    ``MASK_FILE_SUFFIXES`` suffix (any case), the image's own suffix first (``a/b/c.jpg``); other files
    are ignored. Local folders are walked following symbolic links, each real folder once."""
    fs, root = storage.filesystem(mask_dir, options or {})
    if not fs.isdir(root):
        raise FileNotFoundError(f"--masks {mask_dir} is not a directory")
    root = root.rstrip("/")
    if storage.is_remote(mask_dir):
        rels = [p[len(root) + 1 :] for p in fs.find(root)]
        base = mask_dir.split("://", 1)[0] + "://" + root
    else:
        rels = list(_walk_local(root))
        base = root
    out = MaskDir(base)
    for rel in sorted(rels):
        stem, suffix = posixpath.splitext(rel)
        if suffix.lower() in MASK_FILE_SUFFIXES:
            out.by_stem.setdefault(stem, []).append(rel)
    return out


def _walk_local(root: str) -> Iterable[str]:
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        rel_dir = os.path.relpath(dirpath, root).replace(os.sep, "/")
        for name in filenames:
            yield name if rel_dir == "." else f"{rel_dir}/{name}"


# --------------------------------------------------------------------------------------------------
# The built-in baseline: spectral residual saliency


SR_WIDTH = 64
"""Working width in pixels. Hou & Zhang (CVPR 2007) compute saliency on the image downsampled to 64 px
(the authors' MATLAB code: ``imresize(inImg, 64/size(inImg, 2))``, i.e. width 64, aspect kept)."""
SR_AVERAGE = 3
"""The local average ``h_n`` of the log spectrum is an n x n mean filter with n = 3 (paper, eq. 5 and
the text after it); borders replicated, as in the authors' code (``imfilter(..., 'replicate')``)."""
SR_SIGMA = 8.0
"""Standard deviation, in pixels of the 64-px map, of the Gaussian ``g(x)`` that smooths the saliency
map (paper, eq. 9: "g(x) is a gaussian filter (sigma = 8)"). The authors' published MATLAB code uses a
10x10 kernel of sigma 2.5 instead; this module follows the paper. Truncated at 4 sigma, borders
replicated."""
SR_THRESHOLD = 3.0
"""Object map threshold as a multiple of the saliency map's mean: O(x) = 1 where S(x) > 3 E(S(x))
(paper, section 2.4, "threshold = E(S(x)) x 3", chosen empirically by the authors)."""
_LUMA = np.array([0.2989, 0.5870, 0.1140])
"""ITU-R 601 luma, MATLAB's ``rgb2gray`` (the authors' code)."""


def spectral_residual_saliency(grey: np.ndarray, sigma: float = SR_SIGMA) -> np.ndarray:
    """The smoothed spectral-residual saliency map ``S`` (float64, same shape) of a 2-D grey image,
    at its own resolution (Hou & Zhang 2007, eqs. 5-9):

    ``L = log |FFT(I)|``, ``P = angle(FFT(I))``, ``R = L - mean3x3(L)``,
    ``S = g_sigma * |IFFT(exp(R + i P))|^2``."""
    spectrum = np.fft.fft2(np.asarray(grey, dtype=np.float64))
    amplitude = np.abs(spectrum)
    # log 0 = -inf: amplitudes are floored at 1e-9 of the largest (180 dB), which a photograph's
    # spectrum never reaches and which keeps exp(R) finite for flat and synthetic images
    log_amplitude = np.log(np.maximum(amplitude, 1e-9 * max(float(amplitude.max()), 1e-300)))
    phase = np.angle(spectrum)
    residual = log_amplitude - _box_mean(log_amplitude, SR_AVERAGE)
    raw = np.abs(np.fft.ifft2(np.exp(residual + 1j * phase))) ** 2
    rows = _gaussian_matrix(raw.shape[0], sigma)
    cols = _gaussian_matrix(raw.shape[1], sigma)
    return rows @ raw @ cols.T


def _box_mean(a: np.ndarray, n: int) -> np.ndarray:
    """n x n mean with replicated borders, as a sum of shifted copies."""
    r = n // 2
    padded = np.pad(a, r, mode="edge")
    h, w = a.shape
    total = np.zeros_like(a)
    for dy in range(n):
        for dx in range(n):
            total += padded[dy : dy + h, dx : dx + w]
    return total / (n * n)


@functools.lru_cache(maxsize=64)
def _gaussian_matrix(n: int, sigma: float) -> np.ndarray:
    """The ``n x n`` matrix of a 1-D Gaussian smoothing (kernel truncated at 4 sigma and normalised,
    borders replicated): ``M @ x`` smooths a column ``x``. Cached (one per map height); read-only."""
    radius = int(4.0 * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    m = np.zeros((n, n))
    rows = np.arange(n)
    for k, off in zip(kernel, offsets):
        np.add.at(m, (rows, np.clip(rows + off, 0, n - 1)), k)
    m.flags.writeable = False
    return m


def sr_size(width: int, height: int) -> tuple[int, int]:
    """The ``(width, height)`` of the spectral-residual map of an image of that size."""
    return SR_WIDTH, max(1, round(SR_WIDTH * height / width))


def downscale_grey(rgb: np.ndarray) -> np.ndarray:
    """The grey image (ITU-R 601 luma, 0..1) of an ``[H, W, 3]`` (or ``[H, W]``) uint8 image, resized
    to ``SR_WIDTH`` wide with PIL's bicubic filter (antialiased when shrinking, like MATLAB's
    ``imresize`` in the authors' code)."""
    arr = np.asarray(rgb)
    grey = (
        arr[..., :3].astype(np.float32) @ _LUMA.astype(np.float32)
        if arr.ndim == 3
        else arr.astype(np.float32)
    )
    size = sr_size(grey.shape[1], grey.shape[0])
    small = Image.fromarray(grey, mode="F").resize(size, Image.Resampling.BICUBIC)
    return np.asarray(small, dtype=np.float64) / 255.0


def spectral_residual_mask(rgb: np.ndarray, *, sigma: float = SR_SIGMA) -> np.ndarray:
    """The saliency mask of an RGB ``uint8 [H, W, 3]`` image by the spectral residual approach (Hou &
    Zhang, "Saliency Detection: A Spectral Residual Approach", CVPR 2007): the grey image downscaled
    to ``SR_WIDTH`` = 64 px wide (:func:`downscale_grey`), its saliency map
    (:func:`spectral_residual_saliency`: log amplitude spectrum minus its ``SR_AVERAGE`` = 3 x 3 local
    average, back with the original phase, squared magnitude, Gaussian of ``SR_SIGMA`` = 8 px), and the
    object map ``S > SR_THRESHOLD x mean(S)`` = 3 x the mean (the paper's threshold).

    Returns ``uint8 [h, 64]`` of 0/255 at the working resolution (``h = round(64 H / W)``); consumers
    resize it to the image. When no pixel passes the threshold (a flat image, or saliency spread
    evenly) the whole mask is 255: no salient object found, keep everything."""
    saliency = spectral_residual_saliency(downscale_grey(rgb), sigma)
    objects = saliency > SR_THRESHOLD * saliency.mean()
    if not objects.any() or not np.isfinite(saliency).all():
        return np.full(saliency.shape, 255, dtype=np.uint8)
    return np.where(objects, 255, 0).astype(np.uint8)


__all__ = [
    "FULL_MASK",
    "MASK_EXT",
    "MASK_FILE_SUFFIXES",
    "MASK_METHOD_SPECTRAL_RESIDUAL",
    "SR_AVERAGE",
    "SR_SIGMA",
    "SR_THRESHOLD",
    "SR_WIDTH",
    "BadMask",
    "MaskDir",
    "aspect_mismatch",
    "decode_mask",
    "downscale_grey",
    "encode_mask",
    "find_masks",
    "fit_mask",
    "mask_from_file",
    "mask_problem",
    "spectral_residual_mask",
    "spectral_residual_saliency",
    "sr_size",
]
