"""The spectral residual baseline (Hou & Zhang, CVPR 2007) against a reference written independently:
explicit loops for the 3x3 mean of the log spectrum, scipy's Gaussian filter for the smoothing."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from pipeline.shards import masks as M
from pipeline.shards.sources import photo_files


def reference_saliency(grey: np.ndarray, sigma: float) -> np.ndarray:
    """The paper's eqs. 5-9 step by step: loops for h_3 * L with replicated borders (the authors'
    ``imfilter(..., 'replicate')``), ``scipy.ndimage.gaussian_filter`` for g * |.|^2."""
    f = np.fft.fft2(grey)
    amplitude = np.sqrt(f.real**2 + f.imag**2)
    log_amp = np.log(amplitude)
    phase = np.arctan2(f.imag, f.real)
    h, w = log_amp.shape
    local = np.empty_like(log_amp)
    for y in range(h):
        for x in range(w):
            total = 0.0
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    total += log_amp[min(max(y + dy, 0), h - 1), min(max(x + dx, 0), w - 1)]
            local[y, x] = total / 9.0
    residual = log_amp - local
    back = np.fft.ifft2(np.exp(residual) * (np.cos(phase) + 1j * np.sin(phase)))
    return ndimage.gaussian_filter(np.abs(back) ** 2, sigma, mode="nearest", truncate=4.0)


def photos(n: int = 6) -> list[np.ndarray]:
    files = photo_files()
    assert len(files) >= n, "scikit-image's bundled photos are missing"
    return [np.asarray(Image.open(f).convert("RGB")) for f in files[:n]]


@pytest.mark.parametrize("sigma", [M.SR_SIGMA, 2.5])
def test_saliency_matches_the_reference_on_real_photos(sigma):
    for rgb in photos():
        grey = M.downscale_grey(rgb)
        ours = M.spectral_residual_saliency(grey, sigma)
        ref = reference_saliency(grey, sigma)
        np.testing.assert_allclose(ours, ref, rtol=1e-8, atol=1e-12 * ref.max())
        # the object map and the returned mask follow
        mask = M.spectral_residual_mask(rgb, sigma=sigma)
        objects = ref > M.SR_THRESHOLD * ref.mean()
        expected = np.where(objects, 255, 0) if objects.any() else np.full(objects.shape, 255)
        assert np.array_equal(mask, expected.astype(np.uint8))


def test_mask_has_the_working_width_and_the_image_aspect():
    for rgb in photos():
        mask = M.spectral_residual_mask(rgb)
        h, w = rgb.shape[:2]
        assert mask.dtype == np.uint8 and mask.shape == (round(64 * h / w), 64)
        assert set(np.unique(mask)) <= {0, 255}
        assert M.mask_problem(M.encode_mask(mask), (w, h), "decode") is None
    tiny = np.zeros((10, 20, 3), np.uint8)
    assert M.spectral_residual_mask(tiny).shape == (32, 64)  # small images are upscaled to 64 wide


def test_constants_are_the_papers():
    assert (M.SR_WIDTH, M.SR_AVERAGE, M.SR_SIGMA, M.SR_THRESHOLD) == (64, 3, 8.0, 3.0)


def test_downscale_uses_itu_601_luma():
    rgb = np.zeros((64, 128, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 200, 100, 50
    grey = M.downscale_grey(rgb)
    assert grey.shape == (32, 64)
    np.testing.assert_allclose(grey, (0.2989 * 200 + 0.5870 * 100 + 0.1140 * 50) / 255, rtol=1e-5)


@pytest.mark.parametrize(("cx", "cy", "r"), [(200, 90, 20), (100, 150, 30), (250, 190, 16)])
def test_single_blob_on_a_noisy_flat_background_is_found(cx, cy, r):
    h, w = 240, 320
    rng = np.random.default_rng(cx)
    img = np.full((h, w, 3), 110.0) + rng.normal(0, 2, (h, w, 3))
    yy, xx = np.mgrid[:h, :w]
    blob = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    img[blob] = [230, 40, 40]
    mask = M.spectral_residual_mask(np.clip(img, 0, 255).astype(np.uint8))
    mw = mask.shape[1]
    scale = w / mw
    fg = mask == 255
    assert 0 < fg.mean() < 0.2  # found something, and not everything
    assert mask[int(cy / scale), int(cx / scale)] == 255  # the blob's centre is foreground
    ys, xs = np.nonzero(fg)
    assert abs(xs.mean() * scale + scale / 2 - cx) < 8 and abs(ys.mean() * scale + scale / 2 - cy) < 8
    # every foreground pixel lies near the blob (within the smoothing's reach: 2 sigma at 64 px)
    dist = np.hypot((xs + 0.5) * scale - cx, (ys + 0.5) * scale - cy)
    assert dist.max() < r + 2 * M.SR_SIGMA * scale


def test_flat_image_keeps_everything():
    mask = M.spectral_residual_mask(np.full((48, 64, 3), 77, np.uint8))
    assert mask.shape == (48, 64) and (mask == 255).all()
