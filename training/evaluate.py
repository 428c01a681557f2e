"""What a pretrained encoder is worth: frozen-feature probes, robustness to corruptions, export.

Everything here works on plain tensors — images ``[N, 3, H, W]`` with values in ``[0, 1]`` (float) or
``0..255`` (uint8) and integer labels ``[N]`` — so it runs without Ray, DALI or the shard pipeline
(``commands.evaluate`` decodes labelled shards into such tensors).

- :func:`extract_features`: the encoder in eval mode, no gradient, batch by batch; images are
  normalised with the training recipe's mean/std first.
- :class:`KNNClassifier` / :func:`knn_classify`: the weighted k-nearest-neighbour classifier of Wu et
  al. 2018 ("Unsupervised Feature Learning via Non-Parametric Instance Discrimination", arXiv
  1805.01978, sec. 3.4) with the defaults DINO uses for its k-NN evaluation (Caron et al. 2021, arXiv
  2104.14294: cosine similarity, k = 20, temperature 0.07).
- :class:`LinearProbe` / :func:`linear_probe`: multinomial logistic regression on standardised frozen
  features, fitted full-batch with L-BFGS and an L2 penalty — the linear-probe protocol of CLIP
  (Radford et al. 2021, arXiv 2103.00020, sec. 3.2 / appendix A.3), which also fits L-BFGS logistic
  regression on frozen features.
- :data:`CORRUPTIONS` / :func:`corrupt` / :func:`robustness`: the same probes (fitted on clean
  training features) applied to test images under six corruptions of ImageNet-C (Hendrycks &
  Dietterich 2019, arXiv 1903.12261) at five severities each.
- :func:`export_encoder`: the encoder as a plain torchvision ResNet state dict (``strict=True``
  loadable) and the critic/projector in a separate file.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

__all__ = [
    "CORRUPTIONS",
    "SEVERITIES",
    "EncoderEvaluation",
    "KNNClassifier",
    "LinearProbe",
    "corrupt",
    "corruption_parameter",
    "evaluate_encoder",
    "export_encoder",
    "extract_features",
    "fit_linear_probe",
    "knn_classify",
    "linear_probe",
    "load_exported_encoder",
    "robustness",
    "torchvision_resnet",
]

# --------------------------------------------------------------------------------------------------
# Frozen features
# --------------------------------------------------------------------------------------------------


def _to_unit_float(images: Tensor) -> Tensor:
    """uint8 0..255 or float 0..1 -> float32 in [0, 1]."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


def _batches(
    images: Tensor | Iterable[tuple[Tensor, Tensor]], labels: Tensor | None, batch_size: int
) -> Iterable[tuple[Tensor, Tensor | None]]:
    if isinstance(images, Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images: expected a tensor [N, 3, H, W], got shape {tuple(images.shape)}")
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"labels: expected {len(images)} labels (one per image), got {len(labels)}")
        for start in range(0, len(images), batch_size):
            stop = start + batch_size
            yield images[start:stop], None if labels is None else labels[start:stop]
    else:
        for item in images:
            x, y = (item.views[0], item.labels) if hasattr(item, "views") else item
            yield x, y


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    images: Tensor | Iterable[tuple[Tensor, Tensor]],
    labels: Tensor | None = None,
    *,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Frozen features of ``images`` -> ``(features [N, F] float32 on CPU, labels [N] int64 or None)``.

    ``images`` is a tensor ``[N, 3, H, W]`` (uint8 0..255 or float 0..1; ``labels`` beside it) or an
    iterable of ``(images, labels)`` batches (or ``ViewBatch``-like objects, whose first view is used).
    Each batch is scaled to [0, 1], normalised with ``(x - mean) / std`` when given, and run through
    ``encoder`` in eval mode without gradient (BatchNorm uses its running statistics); the encoder's
    previous train/eval mode is restored afterwards. Multi-dimensional outputs are flattened.
    """
    device = torch.device(device)
    mean_t = None if mean is None else torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std_t = None if std is None else torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    was_training = encoder.training
    encoder.eval()
    feats, labs = [], []
    try:
        for x, y in _batches(images, labels, batch_size):
            x = _to_unit_float(x.to(device, non_blocking=True))
            if mean_t is not None:
                x = x - mean_t
            if std_t is not None:
                x = x / std_t
            out = encoder(x)
            feats.append(out.flatten(1).float().cpu())
            if y is not None:
                labs.append(torch.as_tensor(y).long().cpu())
    finally:
        encoder.train(was_training)
    if not feats:
        raise ValueError("extract_features: no images given")
    return torch.cat(feats), (torch.cat(labs) if labs else None)


def _accuracy(pred: Tensor, labels: Tensor) -> float:
    if len(pred) != len(labels):
        raise ValueError(f"expected one prediction per label: {len(pred)} predictions, {len(labels)} labels")
    if len(labels) == 0:
        raise ValueError("accuracy of an empty set is undefined")
    return float((pred.cpu() == labels.cpu()).float().mean())


# --------------------------------------------------------------------------------------------------
# Weighted kNN
# --------------------------------------------------------------------------------------------------


@dataclass
class KNNClassifier:
    """Weighted k-NN on cosine similarity (Wu et al. 2018, arXiv 1805.01978, sec. 3.4; DINO's k-NN eval).

    For a query q with L2-normalised feature, take its k most cosine-similar training features s_i
    (labels c_i); each neighbour votes for its class with weight ``exp(s_i / temperature)``; the
    prediction is ``argmax_c sum_{i in top-k, c_i = c} exp(s_i / temperature)`` (ties -> lowest class).
    DINO's defaults: k = 20, temperature = 0.07. k larger than the training set uses all of it.
    """

    train_features: Tensor
    train_labels: Tensor
    k: int = 20
    temperature: float = 0.07
    num_classes: int | None = None
    chunk_size: int = 1024

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k: expected >= 1, got {self.k}")
        if not self.temperature > 0:
            raise ValueError(f"temperature: expected > 0, got {self.temperature}")
        if len(self.train_features) != len(self.train_labels) or len(self.train_labels) == 0:
            raise ValueError(
                f"train_features/train_labels: expected the same non-zero length, got "
                f"{len(self.train_features)} and {len(self.train_labels)}"
            )
        self.train_features = F.normalize(self.train_features.float(), dim=1)
        self.train_labels = self.train_labels.long()
        if self.num_classes is None:
            self.num_classes = int(self.train_labels.max()) + 1

    def predict(self, features: Tensor) -> Tensor:
        """Predicted class per row of ``features [Q, F]`` -> ``[Q]`` int64."""
        if features.shape[1] != self.train_features.shape[1]:
            raise ValueError(
                f"features: expected dimension {self.train_features.shape[1]} (as the training features), "
                f"got {features.shape[1]}"
            )
        k = min(self.k, len(self.train_labels))
        preds = []
        for q in F.normalize(features.float(), dim=1).split(self.chunk_size):
            sims, idx = (q @ self.train_features.T).topk(k, dim=1)
            votes = torch.zeros(len(q), self.num_classes, dtype=torch.float32)
            votes.scatter_add_(1, self.train_labels[idx], (sims / self.temperature).exp())
            preds.append(votes.argmax(dim=1))
        return torch.cat(preds)

    def accuracy(self, features: Tensor, labels: Tensor) -> float:
        return _accuracy(self.predict(features), labels)


def knn_classify(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
) -> float:
    """Top-1 accuracy of the weighted k-NN classifier (:class:`KNNClassifier`) on the test set."""
    return KNNClassifier(train_features, train_labels, k=k, temperature=temperature).accuracy(
        test_features, test_labels
    )


# --------------------------------------------------------------------------------------------------
# Linear probe
# --------------------------------------------------------------------------------------------------


@dataclass
class LinearProbe:
    """Multinomial logistic regression on standardised features: ``logits = W (x - mean) / std + b``."""

    mean: Tensor  # [F]
    std: Tensor  # [F]
    weight: Tensor  # [C, F]
    bias: Tensor  # [C]

    def logits(self, features: Tensor) -> Tensor:
        return ((features.float() - self.mean) / self.std) @ self.weight.T + self.bias

    def predict(self, features: Tensor) -> Tensor:
        return self.logits(features).argmax(dim=1)

    def accuracy(self, features: Tensor, labels: Tensor) -> float:
        return _accuracy(self.predict(features), labels)

    def as_linear(self) -> nn.Linear:
        """The probe with the standardisation folded in: one ``nn.Linear`` on raw features."""
        w = self.weight / self.std
        layer = nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            layer.weight.copy_(w)
            layer.bias.copy_(self.bias - w @ self.mean)
        return layer


def fit_linear_probe(
    features: Tensor,
    labels: Tensor,
    *,
    num_classes: int | None = None,
    l2: float = 1e-4,
    max_iter: int = 300,
) -> LinearProbe:
    """Fit a :class:`LinearProbe`: minimise ``mean CE + (l2 / 2) * ||W||^2`` with full-batch L-BFGS.

    Features are standardised per dimension with the training mean/std (constant dimensions get
    std 1). L-BFGS on the convex logistic loss, as in CLIP's linear-probe evaluation (Radford et al.
    2021, arXiv 2103.00020, appendix A.3, which sweeps the L2 strength on a validation split). The fit
    is deterministic (zero initialisation).
    """
    if len(features) != len(labels) or len(labels) == 0:
        raise ValueError(
            f"features/labels: expected the same non-zero length, got {len(features)} and {len(labels)}"
        )
    if l2 < 0:
        raise ValueError(f"l2: expected >= 0, got {l2}")
    x = features.float()
    y = labels.long()
    num_classes = int(y.max()) + 1 if num_classes is None else num_classes
    mean = x.mean(0)
    std = x.std(0, unbiased=False)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))
    z = (x - mean) / std
    weight = torch.zeros(num_classes, x.shape[1], requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS(
        [weight, bias], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ weight.T + bias, y) + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return LinearProbe(mean=mean, std=std, weight=weight.detach(), bias=bias.detach())


def linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    *,
    l2: float = 1e-4,
    max_iter: int = 300,
) -> float:
    """Test accuracy of a :class:`LinearProbe` fitted on the training features."""
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    probe = fit_linear_probe(train_features, train_labels, num_classes=num_classes, l2=l2, max_iter=max_iter)
    return probe.accuracy(test_features, test_labels)


# --------------------------------------------------------------------------------------------------
# Corruptions (ImageNet-C, Hendrycks & Dietterich 2019)
# --------------------------------------------------------------------------------------------------

CORRUPTIONS: tuple[str, ...] = (
    "gaussian_noise",
    "gaussian_blur",
    "contrast",
    "brightness",
    "jpeg",
    "pixelate",
)
SEVERITIES: tuple[int, ...] = (1, 2, 3, 4, 5)

# Severity parameters, 1..5. ImageNet-C's table is for 224-pixel images; for small images we use the
# authors' own adaptation, the CIFAR-10-C table (same functions, parameters rescaled for 32 pixels).
# Meaning: noise std on [0, 1] pixels; blur sigma in pixels; contrast factor; brightness V offset
# (HSV); JPEG quality; pixelate downscale factor.
_IMAGENET_C: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.08, 0.12, 0.18, 0.26, 0.38),
    "gaussian_blur": (1.0, 2.0, 3.0, 4.0, 6.0),
    "contrast": (0.4, 0.3, 0.2, 0.1, 0.05),
    "brightness": (0.1, 0.2, 0.3, 0.4, 0.5),
    "jpeg": (25, 18, 15, 10, 7),
    "pixelate": (0.6, 0.5, 0.4, 0.3, 0.25),
}
_CIFAR_10_C: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "gaussian_blur": (0.4, 0.6, 0.7, 0.8, 1.0),
    "contrast": (0.75, 0.5, 0.4, 0.3, 0.15),
    "brightness": (0.05, 0.1, 0.15, 0.2, 0.3),
    "jpeg": (80, 65, 58, 50, 40),
    "pixelate": (0.95, 0.9, 0.85, 0.75, 0.65),
}
#: images whose shorter side is at most this many pixels use the CIFAR-10-C parameters.
SMALL_IMAGE_MAX_SIDE = 64


def corruption_parameter(name: str, severity: int, image_size: int) -> float:
    """The parameter of corruption ``name`` at ``severity`` (1..5) for images of side ``image_size``."""
    if name not in CORRUPTIONS:
        raise ValueError(f"corruption: expected one of {', '.join(CORRUPTIONS)}, got {name!r}")
    if severity not in SEVERITIES:
        raise ValueError(f"severity: expected one of {SEVERITIES}, got {severity!r}")
    table = _CIFAR_10_C if image_size <= SMALL_IMAGE_MAX_SIDE else _IMAGENET_C
    return table[name][severity - 1]


def _quantize(x: Tensor) -> Tensor:
    """Corrupted images are stored as 8-bit images in ImageNet-C: round to the 1/255 grid."""
    return x.clamp(0.0, 1.0).mul(255.0).round().div(255.0)


def _to_pil(image: Tensor) -> Image.Image:
    arr = image.mul(255.0).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(arr), mode="RGB")


def _from_pil(img: Image.Image) -> Tensor:
    return (
        torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
    )


def _gaussian_noise(x: Tensor, std: float, generator: torch.Generator) -> Tensor:
    """x + N(0, std^2) per pixel and channel, clipped (ImageNet-C ``gaussian_noise``)."""
    return x + std * torch.randn(x.shape, generator=generator, dtype=x.dtype)


def _gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur, per channel: kernel truncated at 4 sigma and edge pixels repeated
    (``skimage.filters.gaussian`` defaults, which ImageNet-C ``gaussian_blur`` calls)."""
    radius = int(4.0 * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    n, c, h, w = x.shape
    y = x.reshape(n * c, 1, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return y.reshape(n, c, h, w)


def _contrast(x: Tensor, factor: float) -> Tensor:
    """(x - m) * factor + m with m the per-image, per-channel mean (ImageNet-C ``contrast``)."""
    m = x.mean(dim=(2, 3), keepdim=True)
    return (x - m) * factor + m


def _brightness(x: Tensor, offset: float) -> Tensor:
    """Add ``offset`` to the HSV value channel, clipped to [0, 1] (ImageNet-C ``brightness``).

    With hue and saturation fixed, HSV -> RGB is linear in V, so the result is ``rgb * V'/V`` where
    V = max(r, g, b) > 0; black pixels (V = 0, saturation 0 by convention) become grey ``V'``.
    """
    v = x.amax(dim=1, keepdim=True)
    v_new = (v + offset).clamp(0.0, 1.0)
    scale = v_new / v.clamp_min(1e-12)
    return torch.where(v > 0, x * scale, v_new.expand_as(x))


def _jpeg(x: Tensor, quality: int) -> Tensor:
    """Encode as JPEG with PIL at ``quality`` and decode again (ImageNet-C ``jpeg_compression``)."""
    out = []
    for image in x:
        buf = io.BytesIO()
        _to_pil(image).save(buf, format="JPEG", quality=int(quality))
        buf.seek(0)
        with Image.open(buf) as decoded:
            out.append(_from_pil(decoded))
    return torch.stack(out)


def _pixelate(x: Tensor, factor: float) -> Tensor:
    """Box-downscale to ``int(side * factor)`` and box-upscale back with PIL (ImageNet-C ``pixelate``)."""
    out = []
    for image in x:
        pil = _to_pil(image)
        w, h = pil.size
        small = pil.resize((max(1, int(w * factor)), max(1, int(h * factor))), Image.Resampling.BOX)
        out.append(_from_pil(small.resize((w, h), Image.Resampling.BOX)))
    return torch.stack(out)


def corrupt(images: Tensor, name: str, severity: int, *, seed: int = 0) -> Tensor:
    """``images`` [N, 3, H, W] (uint8 or float in [0, 1]) under corruption ``name`` at ``severity``.

    Returns float32 in [0, 1], rounded to 8-bit levels like the released ImageNet-C/CIFAR-10-C
    images. Parameters come from :func:`corruption_parameter` (CIFAR-10-C's table for images of side
    <= 64 px, ImageNet-C's otherwise). Gaussian noise is drawn from a generator seeded with
    ``(seed, severity)``, so the same call gives the same images.
    """
    x = _to_unit_float(images.cpu())
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"images: expected a tensor [N, 3, H, W], got shape {tuple(x.shape)}")
    p = corruption_parameter(name, severity, min(x.shape[2], x.shape[3]))
    if name == "gaussian_noise":
        generator = torch.Generator().manual_seed(int(seed) * 1000 + severity)
        y = _gaussian_noise(x, p, generator)
    elif name == "gaussian_blur":
        y = _gaussian_blur(x, p)
    elif name == "contrast":
        y = _contrast(x, p)
    elif name == "brightness":
        y = _brightness(x, p)
    elif name == "jpeg":
        y = _jpeg(x, int(p))
    else:  # pixelate (corruption_parameter validated the name)
        y = _pixelate(x, p)
    return _quantize(y)


# --------------------------------------------------------------------------------------------------
# Robustness and the whole evaluation
# --------------------------------------------------------------------------------------------------


class _Predictor:  # the protocol robustness() needs: KNNClassifier and LinearProbe satisfy it
    def predict(self, features: Tensor) -> Tensor: ...


def robustness(
    encoder: nn.Module,
    images: Tensor,
    labels: Tensor,
    probes: Mapping[str, _Predictor],
    *,
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
    seed: int = 0,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, dict[str, dict[int, float]]]:
    """Accuracy of each already-fitted probe on ``images`` under every corruption and severity.

    Returns ``{probe_name: {corruption: {severity: accuracy}}}``. The probes are fitted on clean
    training features (ImageNet-C protocol: no corrupted data at training time); only the test images
    are corrupted, and features are extracted once per (corruption, severity) for all probes.
    """
    result: dict[str, dict[str, dict[int, float]]] = {name: {} for name in probes}
    for corruption in corruptions:
        for name in probes:
            result[name][corruption] = {}
        for severity in severities:
            corrupted = corrupt(images, corruption, severity, seed=seed)
            feats, _ = extract_features(
                encoder, corrupted, device=device, batch_size=batch_size, mean=mean, std=std
            )
            for name, probe in probes.items():
                result[name][corruption][int(severity)] = _accuracy(probe.predict(feats), labels)
        if log is not None:
            summary = ", ".join(
                f"{name} {sum(result[name][corruption].values()) / len(severities):.3f}" for name in probes
            )
            log(f"robustness {corruption}: mean over severities {summary}")
    return result


@dataclass
class EncoderEvaluation:
    """Accuracies of one encoder: clean kNN and linear probe, and both under every corruption."""

    knn: float
    linear: float
    robustness: dict[str, dict[str, dict[int, float]]] = field(default_factory=dict)
    num_train: int = 0
    num_test: int = 0
    feature_dim: int = 0

    def per_corruption(self, probe: str) -> dict[str, float]:
        """``{corruption: accuracy averaged over severities}`` for ``probe`` ("knn" or "linear")."""
        return {c: sum(s.values()) / len(s) for c, s in self.robustness.get(probe, {}).items()}

    def corrupted_mean(self, probe: str) -> float:
        """Accuracy averaged over every corruption and severity (NaN without robustness results)."""
        per = self.per_corruption(probe)
        return sum(per.values()) / len(per) if per else math.nan

    def to_dict(self) -> dict:
        return {
            "knn": self.knn,
            "linear": self.linear,
            "knn_corrupted": self.corrupted_mean("knn"),
            "linear_corrupted": self.corrupted_mean("linear"),
            "knn_per_corruption": self.per_corruption("knn"),
            "linear_per_corruption": self.per_corruption("linear"),
            "robustness": {
                p: {c: {str(s): a for s, a in sev.items()} for c, sev in per.items()}
                for p, per in self.robustness.items()
            },
            "num_train": self.num_train,
            "num_test": self.num_test,
            "feature_dim": self.feature_dim,
        }


def evaluate_encoder(
    encoder: nn.Module,
    train_images: Tensor,
    train_labels: Tensor,
    test_images: Tensor,
    test_labels: Tensor,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    knn_k: int = 20,
    knn_temperature: float = 0.07,
    probe_l2: float = 1e-4,
    corruptions: Sequence[str] = CORRUPTIONS,
    severities: Sequence[int] = SEVERITIES,
    seed: int = 0,
    device: str | torch.device = "cpu",
    batch_size: int = 256,
    log: Callable[[str], None] | None = None,
) -> EncoderEvaluation:
    """kNN and linear probe fitted on clean training features, scored on the clean test images and,
    unless ``corruptions`` is empty, on the test images under every corruption and severity."""
    common = {"device": device, "batch_size": batch_size, "mean": mean, "std": std}
    train_feats, _ = extract_features(encoder, train_images, **common)
    test_feats, _ = extract_features(encoder, test_images, **common)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    knn = KNNClassifier(
        train_feats, train_labels, k=knn_k, temperature=knn_temperature, num_classes=num_classes
    )
    probe = fit_linear_probe(train_feats, train_labels, num_classes=num_classes, l2=probe_l2)
    result = EncoderEvaluation(
        knn=knn.accuracy(test_feats, test_labels),
        linear=probe.accuracy(test_feats, test_labels),
        num_train=len(train_labels),
        num_test=len(test_labels),
        feature_dim=train_feats.shape[1],
    )
    if log is not None:
        log(f"clean: knn {result.knn:.3f}, linear {result.linear:.3f}")
    if corruptions:
        result.robustness = robustness(
            encoder,
            test_images,
            test_labels,
            {"knn": knn, "linear": probe},
            corruptions=corruptions,
            severities=severities,
            seed=seed,
            log=log,
            **common,
        )
    return result


# --------------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------------

_PREFIXES = ("module.", "_orig_mod.")


def _plain_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """State dict without DDP (``module.``) / torch.compile (``_orig_mod.``) prefixes, on CPU."""
    out = {}
    for key, value in module.state_dict().items():
        changed = True
        while changed:
            changed = False
            for prefix in _PREFIXES:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        out[key] = value.detach().cpu().clone()
    return out


def torchvision_resnet(
    arch: str, *, small_stem: bool = False, num_classes: int = 1000, width: float = 1.0
) -> nn.Module:
    """``torchvision.models.<arch>(num_classes=...)``, with the small-image stem and width when asked.

    The small stem (CIFAR-style ResNets, as in SimCLR's CIFAR-10 experiments, Chen et al. 2020, arXiv
    2002.05709, appendix B.9) replaces ``conv1`` by a 3x3, stride-1, padding-1 convolution and
    ``maxpool`` by identity; ``width`` multiplies every channel count (``training.model.ScaledResNet``,
    a subclass of torchvision's ``ResNet``). Every other parameter keeps torchvision's name and shape,
    so an exported state dict loads with ``strict=True`` into the model this function builds.
    """
    from training.model import resnet

    return resnet(arch, width=width, small_stem=small_stem, num_classes=num_classes)


def export_encoder(
    model: nn.Module,
    out_dir: str | Path,
    *,
    arch: str,
    small_stem: bool = False,
    width: float = 1.0,
    probe: LinearProbe | None = None,
    extra: Mapping[str, object] | None = None,
) -> dict[str, str]:
    """Write the encoder as a torchvision state dict, the critic separately, and a JSON description.

    ``model`` is a ``ReLICModel``-like module with ``.encoder`` (a torchvision ResNet whose ``fc`` may
    be ``Identity``) and optionally ``.projector`` (the critic g), or a bare encoder; DDP/compile
    wrappers are unwrapped. Files in ``out_dir``:

    - ``encoder.pt``: the state dict with torchvision key names and shapes. Its ``fc`` is the linear
      probe when ``probe`` is given (standardisation folded in, so
      ``torchvision.models.<arch>(num_classes=C)`` is a ready classifier); otherwise ``fc`` is a zero
      1000-way head, so plain ``torchvision.models.<arch>()`` loads it with ``strict=True`` — replace
      ``fc`` or set it to ``nn.Identity()`` to get features.
      With ``small_stem`` the ``conv1.weight`` is ``[64, 3, 3, 3]``: load into
      ``torchvision_resnet(arch, small_stem=True)`` (torchvision's model with that conv1 and no
      max-pool), or :func:`load_exported_encoder`.
      With ``width != 1`` every channel count is scaled (``model.width``): load into
      ``torchvision_resnet(arch, width=width, small_stem=...)`` (torchvision's ``ResNet`` class, built
      by ``training.model.resnet``), or :func:`load_exported_encoder`.
    - ``projector.pt``: the critic's state dict (when the model has one).
    - ``export.json``: arch, small_stem, width, num_classes, head, feature_dim and ``extra``.
    Returns ``{"encoder": path, "projector": path?, "metadata": path}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    while hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP
        model = model.module
    encoder = getattr(model, "encoder", model)
    projector = getattr(model, "projector", None)
    state = {k: v for k, v in _plain_state_dict(encoder).items() if not k.startswith("fc.")}
    reference = torchvision_resnet(arch, small_stem=small_stem, width=width)
    feature_dim = reference.fc.in_features
    if probe is not None:
        head = probe.as_linear()
        if head.in_features != feature_dim:
            raise ValueError(
                f"probe: expected {feature_dim} input features for {arch}, got {head.in_features}"
            )
        state["fc.weight"], state["fc.bias"] = head.weight.detach().clone(), head.bias.detach().clone()
    else:
        state["fc.weight"] = torch.zeros_like(reference.fc.weight)
        state["fc.bias"] = torch.zeros_like(reference.fc.bias)
    num_classes = state["fc.weight"].shape[0]
    # Fail here, not in the user's hands: the file must load strictly into torchvision.
    check = torchvision_resnet(arch, small_stem=small_stem, num_classes=num_classes, width=width)
    try:
        check.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(
            f"encoder is not a torchvision {arch} (small_stem={small_stem}, width={width:g}): {err}"
        ) from None
    paths = {"encoder": str(out / "encoder.pt"), "metadata": str(out / "export.json")}
    torch.save(state, paths["encoder"])
    if projector is not None:
        paths["projector"] = str(out / "projector.pt")
        torch.save(_plain_state_dict(projector), paths["projector"])
    meta = {
        "arch": arch,
        "small_stem": small_stem,
        "width": width,
        "num_classes": num_classes,
        "head": "linear_probe" if probe is not None else "zeros",
        "feature_dim": feature_dim,
        "load": _load_note(arch, small_stem, width, num_classes),
        **dict(extra or {}),
    }
    Path(paths["metadata"]).write_text(json.dumps(meta, indent=2) + "\n")
    return paths


def _load_note(arch: str, small_stem: bool, width: float, num_classes: int) -> str:
    """How to load ``encoder.pt`` by hand (``export.json``'s ``load``)."""
    load = "m.load_state_dict(torch.load('encoder.pt'), strict=True)"
    if width != 1:
        return (
            f"from training.model import resnet; m = resnet('{arch}', width={width!r}, "
            f"small_stem={small_stem}, num_classes={num_classes}); {load}"
        )
    stem = (
        "m.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False); m.maxpool = torch.nn.Identity(); "
        if small_stem
        else ""
    )
    return f"m = torchvision.models.{arch}(num_classes={num_classes}); {stem}{load}"


def load_exported_encoder(out_dir: str | Path) -> nn.Module:
    """The torchvision model described by ``export.json`` in ``out_dir``, loaded strictly, eval mode."""
    out = Path(out_dir)
    meta = json.loads((out / "export.json").read_text())
    model = torchvision_resnet(
        meta["arch"],
        small_stem=meta["small_stem"],
        num_classes=meta["num_classes"],
        width=meta.get("width", 1.0),  # exports written before model.width existed are width 1
    )
    model.load_state_dict(torch.load(out / "encoder.pt", map_location="cpu", weights_only=True), strict=True)
    return model.eval()
