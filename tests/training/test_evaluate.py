"""Evaluation: kNN, linear probe, corruptions, robustness and export, against independent references
(naive loops, scikit-learn, scikit-image, PIL, torchvision)."""

from __future__ import annotations

import io
import itertools
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from training import evaluate as ev


def _blobs(n_per_class: int, num_classes: int, dim: int, spread: float, seed: int, sample_seed: int = 0):
    """Gaussian blobs around class centres fixed by ``seed``; ``sample_seed`` draws new points."""
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(seed)) * 5
    g = torch.Generator().manual_seed(10_000 + sample_seed)
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    feats = centres[labels] + spread * torch.randn(len(labels), dim, generator=g)
    perm = torch.randperm(len(labels), generator=g)
    return feats[perm], labels[perm]


def _natural_images(n: int = 8, size: int = 32, seed: int = 0) -> torch.Tensor:
    """Smooth random images with edges (low-pass noise plus a bright square), uint8 [n, 3, size, size]."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, size // 4, size // 4, generator=g)
    x = torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    x = 0.15 + 0.6 * x
    x[:, :, size // 4 : size // 2, size // 4 : size // 2] += 0.25
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.float() - b.float()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


# ---------------------------------------------------------------------------------------------- kNN


def test_knn_linearly_separable_is_perfect():
    train_x, train_y = _blobs(30, 4, 16, spread=0.1, seed=0)
    test_x, test_y = _blobs(10, 4, 16, spread=0.1, seed=0, sample_seed=1)
    assert ev.knn_classify(train_x, train_y, test_x, test_y, k=20, temperature=0.07) == 1.0


def _naive_knn(train_x, train_y, test_x, k, temperature, num_classes):
    preds = []
    for q in test_x:
        sims = [float(torch.dot(q, t) / (q.norm() * t.norm())) for t in train_x]
        order = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * num_classes
        for i in order:
            votes[int(train_y[i])] += math.exp(sims[i] / temperature)
        preds.append(max(range(num_classes), key=lambda c: (votes[c], -c)))
    return torch.tensor(preds)


@pytest.mark.parametrize(("k", "temperature"), [(1, 0.07), (5, 0.5), (20, 0.07), (200, 1.0)])
def test_knn_equals_naive_loop(k, temperature):
    g = torch.Generator().manual_seed(k)
    train_x, train_y = torch.randn(120, 8, generator=g), torch.randint(0, 5, (120,), generator=g)
    test_x = torch.randn(40, 8, generator=g)
    clf = ev.KNNClassifier(train_x, train_y, k=k, temperature=temperature, num_classes=5, chunk_size=7)
    expected = _naive_knn(train_x, train_y, test_x, min(k, 120), temperature, 5)
    assert torch.equal(clf.predict(test_x), expected)


def test_knn_rejects_bad_arguments():
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    with pytest.raises(ValueError, match="temperature"):
        ev.KNNClassifier(x, y, temperature=0.0)
    with pytest.raises(ValueError, match="k"):
        ev.KNNClassifier(x, y, k=0)
    with pytest.raises(ValueError, match="dimension 3"):
        ev.KNNClassifier(x, y).predict(torch.randn(2, 5))


# ------------------------------------------------------------------------------------- linear probe


def test_linear_probe_separable_is_near_perfect():
    train_x, train_y = _blobs(50, 5, 32, spread=1.0, seed=1)
    test_x, test_y = _blobs(20, 5, 32, spread=1.0, seed=1, sample_seed=1)
    assert ev.linear_probe(train_x, train_y, test_x, test_y) >= 0.99


def test_linear_probe_matches_sklearn_on_a_hard_problem():
    """Same model and penalty as sklearn's L-BFGS multinomial LogisticRegression on standardised
    features: the optimum is unique in probabilities, so both must predict the same probabilities on
    overlapping classes (accuracy well below 100%)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    train_x, train_y = _blobs(80, 4, 10, spread=6.0, seed=2)
    test_x, test_y = _blobs(80, 4, 10, spread=6.0, seed=2, sample_seed=1)
    l2 = 1e-2
    probe = ev.fit_linear_probe(train_x, train_y, l2=l2)
    scaler = StandardScaler().fit(train_x.numpy())
    # sklearn minimises C * sum CE + 0.5 ||W||^2  ==  N*C * (mean CE + 0.5 / (N*C) ||W||^2)
    sk = LogisticRegression(C=1.0 / (l2 * len(train_y)), tol=1e-8, max_iter=5000).fit(
        scaler.transform(train_x.numpy()), train_y.numpy()
    )
    theirs = sk.predict_proba(scaler.transform(test_x.numpy()))
    ours = probe.logits(test_x).softmax(1).numpy()
    assert np.abs(ours - theirs).max() < 2e-3
    accuracy = probe.accuracy(test_x, test_y)
    assert 0.4 < accuracy < 0.99
    assert accuracy == pytest.approx(float((theirs.argmax(1) == test_y.numpy()).mean()), abs=1 / 320)


def test_probe_folded_into_linear_layer_gives_same_logits():
    x, y = _blobs(20, 3, 6, spread=1.0, seed=4)
    probe = ev.fit_linear_probe(x * 3 + 1, y)
    layer = probe.as_linear()
    torch.testing.assert_close(layer(x * 3 + 1), probe.logits(x * 3 + 1), rtol=1e-4, atol=1e-4)


# -------------------------------------------------------------------------------------- corruptions


@pytest.mark.parametrize("name", ev.CORRUPTIONS)
def test_each_corruption_changes_images_and_severity_is_monotonic(name):
    """PSNR against the clean images falls with every severity step. Measured on full-resolution
    detail (per-pixel random images): on smooth images CIFAR-10-C's pixelate factors (0.95 ... 0.65
    of 32 px) are not monotone in PSNR because some factors align with the image's own pixel grid —
    the resolution kept still falls with severity, which is what the definition promises."""
    g = torch.Generator().manual_seed(0)
    detailed = ((0.1 + 0.8 * torch.rand(8, 3, 32, 32, generator=g)) * 255).round().to(torch.uint8)
    for images in (detailed, _natural_images()):
        clean = images.float() / 255
        psnrs = []
        for severity in ev.SEVERITIES:
            out = ev.corrupt(images, name, severity, seed=0)
            assert out.shape == clean.shape and out.dtype == torch.float32
            assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
            assert not torch.equal(out, clean), f"{name} severity {severity} left the images unchanged"
            psnrs.append(_psnr(out, clean))
        if images is detailed:
            assert all(a > b for a, b in itertools.pairwise(psnrs)), f"{name}: PSNR by severity {psnrs}"


def test_corruption_is_deterministic_and_seeded():
    images = _natural_images()
    a = ev.corrupt(images, "gaussian_noise", 3, seed=1)
    assert torch.equal(a, ev.corrupt(images, "gaussian_noise", 3, seed=1))
    assert not torch.equal(a, ev.corrupt(images, "gaussian_noise", 3, seed=2))


def test_gaussian_noise_has_the_table_std():
    grey = torch.full((4, 3, 32, 32), 0.5)
    for severity in ev.SEVERITIES:
        diff = ev.corrupt(grey, "gaussian_noise", severity) - 0.5
        expected = ev.corruption_parameter("gaussian_noise", severity, 32)
        assert abs(float(diff.std()) - expected) < 0.05 * expected + 2 / 255


def test_jpeg_really_round_trips_through_jpeg():
    images = _natural_images(n=3)
    for severity in (1, 5):
        quality = int(ev.corruption_parameter("jpeg", severity, 32))
        out = ev.corrupt(images, "jpeg", severity)
        for img, got in zip(images, out):
            buf = io.BytesIO()
            Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, format="JPEG", quality=quality)
            assert buf.getvalue()[:2] == b"\xff\xd8"
            expected = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
            assert np.array_equal((got.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), expected)


def test_gaussian_blur_matches_skimage():
    from skimage.filters import gaussian

    images = _natural_images(n=2)
    for severity in ev.SEVERITIES:
        sigma = ev.corruption_parameter("gaussian_blur", severity, 32)
        out = ev.corrupt(images, "gaussian_blur", severity)
        for img, got in zip(images, out):
            ref = gaussian(img.permute(1, 2, 0).numpy() / 255.0, sigma=sigma, channel_axis=-1)
            ref = np.round(np.clip(ref, 0, 1) * 255) / 255
            assert np.abs(got.permute(1, 2, 0).numpy() - ref).max() <= 1.01 / 255


def test_brightness_matches_skimage_hsv():
    from skimage.color import hsv2rgb, rgb2hsv

    g = torch.Generator().manual_seed(5)
    images = (torch.rand(2, 3, 16, 16, generator=g) * 255).round().to(torch.uint8)
    images[0, :, :2, :2] = 0  # black pixels: saturation 0 by convention
    for severity in ev.SEVERITIES:
        c = ev.corruption_parameter("brightness", severity, 16)
        out = ev.corrupt(images, "brightness", severity)
        for img, got in zip(images, out):
            hsv = rgb2hsv(img.permute(1, 2, 0).numpy() / 255.0)
            hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
            ref = np.round(np.clip(hsv2rgb(hsv), 0, 1) * 255) / 255
            assert np.abs(got.permute(1, 2, 0).numpy() - ref).max() <= 1.01 / 255


def test_contrast_and_pixelate_match_their_definitions():
    images = _natural_images(n=2)
    x = images.float().numpy() / 255
    for severity in ev.SEVERITIES:
        c = ev.corruption_parameter("contrast", severity, 32)
        means = x.mean(axis=(2, 3), keepdims=True)
        ref = np.round(np.clip((x - means) * c + means, 0, 1) * 255) / 255
        assert np.abs(ev.corrupt(images, "contrast", severity).numpy() - ref).max() <= 1.01 / 255

        f = ev.corruption_parameter("pixelate", severity, 32)
        got = ev.corrupt(images, "pixelate", severity)
        for img, out in zip(images, got):
            pil = Image.fromarray(img.permute(1, 2, 0).numpy())
            ref_img = pil.resize((int(32 * f), int(32 * f)), Image.Resampling.BOX).resize(
                (32, 32), Image.Resampling.BOX
            )
            assert np.array_equal(
                (out.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), np.asarray(ref_img)
            )


def test_large_images_use_imagenet_c_parameters():
    assert ev.corruption_parameter("gaussian_blur", 5, 224) == 6.0
    assert ev.corruption_parameter("gaussian_blur", 5, 32) == 1.0
    with pytest.raises(ValueError, match="corruption"):
        ev.corruption_parameter("fog", 1, 32)
    with pytest.raises(ValueError, match="severity"):
        ev.corruption_parameter("jpeg", 6, 32)


# ------------------------------------------------------------------------------ features & robustness


def test_extract_features_normalises_uses_eval_mode_and_restores_mode():
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    enc.train()
    images = _natural_images(n=10, size=16)
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    feats, labels = ev.extract_features(enc, images, torch.arange(10), batch_size=3, mean=mean, std=std)
    assert enc.training, "the encoder's train mode must be restored"
    enc.eval()
    x = (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(feats, enc(x))
    assert torch.equal(labels, torch.arange(10))
    # an iterable of (images, labels) batches gives the same
    batches = [(images[:4], torch.arange(4)), (images[4:], torch.arange(4, 10))]
    feats2, labels2 = ev.extract_features(enc, batches, mean=mean, std=std)
    torch.testing.assert_close(feats2, feats)
    assert torch.equal(labels2, labels)


def _colour_dataset(n_per_class: int, seed: int):
    """Three classes of 16x16 images: a red, green or blue square on grey at a random position."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(3).repeat(n_per_class)
    images = torch.full((len(labels), 3, 16, 16), 0.4)
    for i, y in enumerate(labels):
        r, c = torch.randint(0, 8, (2,), generator=g)
        images[i, int(y), r : r + 8, c : c + 8] = 0.9
    return (images * 255).round().to(torch.uint8), labels


def test_evaluate_encoder_and_robustness_shapes_and_values():
    train_x, train_y = _colour_dataset(20, seed=0)
    test_x, test_y = _colour_dataset(8, seed=1)
    encoder = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten())  # deterministic, informative features
    result = ev.evaluate_encoder(
        encoder, train_x, train_y, test_x, test_y, corruptions=("contrast", "jpeg"), severities=(1, 5)
    )
    assert result.knn == 1.0 and result.linear == 1.0
    assert set(result.robustness) == {"knn", "linear"}
    for probe in ("knn", "linear"):
        assert set(result.robustness[probe]) == {"contrast", "jpeg"}
        for per_sev in result.robustness[probe].values():
            assert set(per_sev) == {1, 5} and all(0 <= a <= 1 for a in per_sev.values())
    d = result.to_dict()
    assert d["knn_per_corruption"]["jpeg"] == pytest.approx(
        sum(result.robustness["knn"]["jpeg"].values()) / 2
    )
    assert d["num_train"] == 60 and d["num_test"] == 24 and d["feature_dim"] == 48

    # the robustness numbers are computed from the corrupted images: a probe that always answers 0
    class Zero:
        def predict(self, f):
            return torch.zeros(len(f), dtype=torch.long)

    rob = ev.robustness(encoder, test_x, test_y, {"zero": Zero()}, corruptions=("pixelate",), severities=(2,))
    assert rob == {"zero": {"pixelate": {2: pytest.approx(1 / 3)}}}


# ------------------------------------------------------------------------------------------- export


class _ToyReLIC(nn.Module):
    """Stand-in for ReLICModel: a torchvision ResNet encoder with fc=Identity plus a projector."""

    def __init__(self, small_stem: bool):
        super().__init__()
        self.encoder = ev.torchvision_resnet("resnet18", small_stem=small_stem)
        self.encoder.fc = nn.Identity()
        self.projector = nn.Sequential(nn.Linear(512, 32), nn.ReLU(), nn.Linear(32, 8))


@pytest.mark.parametrize("small_stem", [False, True])
def test_export_loads_strictly_into_torchvision(tmp_path, small_stem):
    torch.manual_seed(0)
    model = _ToyReLIC(small_stem).eval()
    paths = ev.export_encoder(model, tmp_path, arch="resnet18", small_stem=small_stem)
    state = torch.load(paths["encoder"], weights_only=True)
    tv = torchvision.models.resnet18()
    if small_stem:
        assert state["conv1.weight"].shape == (64, 3, 3, 3)
        tv.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        tv.maxpool = nn.Identity()
    tv.load_state_dict(state, strict=True)  # raises on any missing/unexpected key or shape
    tv.fc = nn.Identity()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(tv.eval()(x), model.encoder(x))
    proj = torch.load(paths["projector"], weights_only=True)
    assert set(proj) == set(model.projector.state_dict())


def test_export_with_probe_head_is_a_classifier(tmp_path):
    torch.manual_seed(0)
    model = _ToyReLIC(small_stem=True).eval()
    x = torch.rand(12, 3, 32, 32)
    with torch.no_grad():
        feats = model.encoder(x)
    probe = ev.fit_linear_probe(feats, torch.arange(12) % 3)
    ev.export_encoder(model, tmp_path, arch="resnet18", small_stem=True, probe=probe)
    loaded = ev.load_exported_encoder(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), probe.logits(feats), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("small_stem", [False, True])
def test_export_of_a_narrow_encoder_round_trips_strictly(tmp_path, small_stem):
    from training.model import build_encoder

    torch.manual_seed(0)
    encoder = build_encoder("resnet18", small_stem=small_stem, width=0.25).eval()
    x = torch.rand(3, 3, 16, 16)
    paths = ev.export_encoder(encoder, tmp_path, arch="resnet18", small_stem=small_stem, width=0.25)
    meta = json.loads(Path(paths["metadata"]).read_text())
    assert meta["width"] == 0.25 and meta["feature_dim"] == 128
    state = torch.load(paths["encoder"], weights_only=True)
    assert state["layer4.1.conv2.weight"].shape == (128, 128, 3, 3)
    # the load note is runnable as written
    scope = {"torch": torch, "torchvision": torchvision}
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(meta["load"], scope)
    finally:
        os.chdir(cwd)
    loaded = ev.load_exported_encoder(tmp_path)
    loaded.fc = nn.Identity()
    scope["m"].fc = nn.Identity()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), encoder(x))
        torch.testing.assert_close(scope["m"].eval()(x), encoder(x))
    # the full-width torchvision network does not take it, and a wrong width is refused at export
    with pytest.raises(RuntimeError, match="size mismatch"):
        torchvision.models.resnet18().load_state_dict(state, strict=True)
    with pytest.raises(ValueError, match=r"width=0\.5"):
        ev.export_encoder(encoder, tmp_path / "bad", arch="resnet18", small_stem=small_stem, width=0.5)


def test_export_rejects_a_non_torchvision_encoder(tmp_path):
    with pytest.raises(ValueError, match="resnet18"):
        ev.export_encoder(nn.Linear(3, 3), tmp_path, arch="resnet18")
