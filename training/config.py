"""Configuration of the training components: one small ``kw_only`` dataclass per component.

The cluster layer composes these into its experiment config; every field has a default taken from
BYOL / ReLICv2 practice (Grill et al. 2020, arXiv 2006.07733; Tomasev et al. 2022, arXiv 2201.05119)
and ``__post_init__`` rejects a bad value with a ``ValueError`` naming the field, what was expected
and what was given.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ARCHITECTURES = (
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "wide_resnet50_2",
    "wide_resnet101_2",
)
TARGET_MODES = ("ema", "online")
OPTIMIZERS = ("lars", "sgd", "adamw")


def valid_width(width: object) -> bool:
    """Whether ``width`` is a usable ResNet width multiplier: > 0 and ``64 * width`` a whole number."""
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
        return False
    return abs(64 * width - round(64 * width)) < 1e-9


def _bad(owner: str, name: str, expected: str, actual: Any) -> ValueError:
    return ValueError(f"{owner}.{name}: expected {expected}, got {actual!r}")


def _positive(owner: str, name: str, value: float) -> None:
    if not value > 0:
        raise _bad(owner, name, "a value > 0", value)


def _non_negative(owner: str, name: str, value: float) -> None:
    if not value >= 0:
        raise _bad(owner, name, "a value >= 0", value)


@dataclass(kw_only=True)
class ModelConfig:
    """Encoder f and critic (projector) g."""

    arch: str = "resnet50"
    """torchvision ResNet name, one of ``ARCHITECTURES``; built with ``weights=None``."""
    small_stem: bool = False
    """3x3 stride-1 first convolution and no max-pool, for 32x32 images (CIFAR-style stem)."""
    width: float = 1.0
    """Multiplier of the ResNet's channel counts (stem 64 and stages 64/128/256/512, times width; the
    width multipliers of SimCLR's and BYOL's ResNet-50 (2x), (4x), there to widen, here to narrow a
    network for CPU). 1.0 is torchvision's network; ``64 * width`` must be a whole number."""
    projector_hidden_dim: int = 4096
    """Hidden width of the critic MLP Linear-BN-ReLU-Linear (BYOL: 4096)."""
    projector_out_dim: int = 256
    """Output width of the critic MLP (BYOL: 256)."""
    sync_batchnorm: bool = False
    """Convert BatchNorm to SyncBatchNorm (statistics over the global batch; needs a process group)."""
    channels_last: bool = False
    """Use the channels_last memory format for the encoder and its inputs (faster convolutions on GPU)."""
    bf16: bool = True
    """bf16 autocast for the forward pass on CUDA devices; ignored on CPU."""

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise _bad("model", "arch", f"one of {', '.join(ARCHITECTURES)}", self.arch)
        if not valid_width(self.width):
            expected = "a value > 0 with 64 * width a whole number (e.g. 0.25, 0.5, 2)"
            raise _bad("model", "width", expected, self.width)
        for name in ("projector_hidden_dim", "projector_out_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise _bad("model", name, "an integer >= 1", value)


@dataclass(kw_only=True)
class ObjectiveConfig:
    """The ReLIC objective (DESIGN.md, "The objective") and its target network."""

    temperature: float = 0.1
    """Softmax temperature tau of the cosine logits (ReLICv2: 0.1)."""
    alpha: float = 1.0
    """Weight of the KL invariance term; 0 gives plain InfoNCE against target-network negatives."""
    kl_stop_grad: bool = True
    """Stop the gradient through the second argument of each KL term."""
    target: str = "ema"
    """"ema": target network = moving average of the online network (BYOL); "online": the online
    network itself, gradients flow through the gathered contrast set."""
    base_momentum: float = 0.996
    """EMA momentum at step 0; it follows a cosine schedule to ``final_momentum`` (BYOL, eq. in sec. 3.2)."""
    final_momentum: float = 1.0
    """EMA momentum at the last step."""
    queue_size: int = 0
    """Number of earlier target projections kept per large view (MoCo-style FIFO) to extend the
    contrast set beyond the global batch; 0 disables the queue."""

    def __post_init__(self) -> None:
        _positive("objective", "temperature", self.temperature)
        _non_negative("objective", "alpha", self.alpha)
        if self.target not in TARGET_MODES:
            raise _bad("objective", "target", f"one of {', '.join(TARGET_MODES)}", self.target)
        for name in ("base_momentum", "final_momentum"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise _bad("objective", name, "a value in [0, 1]", value)
        if self.final_momentum < self.base_momentum:
            raise _bad(
                "objective", "final_momentum", f">= base_momentum ({self.base_momentum})", self.final_momentum
            )
        if not isinstance(self.queue_size, int) or self.queue_size < 0:
            raise _bad("objective", "queue_size", "an integer >= 0", self.queue_size)


@dataclass(kw_only=True)
class OptimConfig:
    """Optimiser. The peak learning rate is ``base_lr * global_batch / 256`` (Goyal et al. 2017)."""

    name: str = "lars"
    """One of ``OPTIMIZERS``: lars (You et al. 2017, arXiv 1708.03888), sgd, adamw."""
    base_lr: float = 0.2
    """Learning rate per 256 samples of global batch (ReLICv2/BYOL: 0.2 with LARS)."""
    weight_decay: float = 1.5e-6
    """Weight decay; biases and normalisation parameters are excluded (BYOL: 1.5e-6)."""
    momentum: float = 0.9
    """Momentum of LARS and SGD; beta1 of AdamW."""
    beta2: float = 0.999
    """AdamW's second-moment decay."""
    trust_coefficient: float = 0.001
    """LARS trust coefficient eta (You et al. 2017)."""
    grad_clip: float | None = None
    """Clip the global gradient norm to this value before the update; None disables clipping."""

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise _bad("optim", "name", f"one of {', '.join(OPTIMIZERS)}", self.name)
        _positive("optim", "base_lr", self.base_lr)
        _non_negative("optim", "weight_decay", self.weight_decay)
        for name in ("momentum", "beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                raise _bad("optim", name, "a value in [0, 1)", value)
        _positive("optim", "trust_coefficient", self.trust_coefficient)
        if self.grad_clip is not None:
            _positive("optim", "grad_clip", self.grad_clip)


@dataclass(kw_only=True)
class ScheduleConfig:
    """Length of training and the learning-rate schedule: linear warm-up, then cosine decay."""

    epochs: int = 100
    """Number of passes over the data."""
    warmup_epochs: float = 10.0
    """Linear warm-up length in epochs (BYOL: 10); may be fractional."""
    final_lr_fraction: float = 0.0
    """Learning rate at the last step as a fraction of the peak."""

    def __post_init__(self) -> None:
        if not isinstance(self.epochs, int) or self.epochs < 1:
            raise _bad("schedule", "epochs", "an integer >= 1", self.epochs)
        if not 0.0 <= self.warmup_epochs <= self.epochs:
            raise _bad(
                "schedule", "warmup_epochs", f"a value in [0, epochs={self.epochs}]", self.warmup_epochs
            )
        if not 0.0 <= self.final_lr_fraction <= 1.0:
            raise _bad("schedule", "final_lr_fraction", "a value in [0, 1]", self.final_lr_fraction)
