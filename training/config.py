"""Configuration of the training components: one small config section per component.

Every config section of the project (here, in ``pipeline.augment`` and in ``cluster.config``) follows
one convention: a keyword-only pydantic dataclass with :data:`SECTION_CONFIG`, a docstring on every
field, value constraints as pydantic constraints and cross-field constraints as field validators, so
that each error is located at the field it concerns. Constructing a section with a bad value raises
``pydantic.ValidationError`` (a ``ValueError``) naming the field, the value and what was expected.

The cluster layer composes these sections into its experiment config; every field has a default
taken from BYOL / ReLICv2 practice (Grill et al. 2020, arXiv 2006.07733; Tomasev et al. 2022, arXiv
2201.05119).
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import (
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationInfo,
    field_validator,
)
from pydantic.dataclasses import dataclass

#: The pydantic config of every config section: unknown keys are errors, each field's docstring is
#: its description, and defaults are validated like given values (so cross-field checks see them).
#: ``pipeline.augment`` holds an identical copy (pipeline may not import training).
SECTION_CONFIG = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_default=True)

Architecture = Literal[
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "wide_resnet50_2",
    "wide_resnet101_2",
]
ARCHITECTURES: tuple[str, ...] = get_args(Architecture)

#: A value in [0, 1].
UnitInterval = Annotated[float, Field(ge=0.0, le=1.0)]


def valid_width(width: object) -> bool:
    """Whether ``width`` is a usable ResNet width multiplier: > 0 and ``64 * width`` a whole number."""
    if isinstance(width, bool) or not isinstance(width, (int, float)) or not width > 0:
        return False
    return abs(64 * width - round(64 * width)) < 1e-9


@dataclass(kw_only=True, config=SECTION_CONFIG)
class ModelConfig:
    """Encoder f and critic (projector) g."""

    arch: Architecture = "resnet50"
    """torchvision ResNet name, one of ``ARCHITECTURES``; built with ``weights=None``."""
    small_stem: bool = False
    """3x3 stride-1 first convolution and no max-pool, for 32x32 images (CIFAR-style stem)."""
    width: float = 1.0
    """Multiplier of the ResNet's channel counts (stem 64 and stages 64/128/256/512, times width; the
    width multipliers of SimCLR's and BYOL's ResNet-50 (2x), (4x), there to widen, here to narrow a
    network for CPU). 1.0 is torchvision's network; ``64 * width`` must be a whole number."""
    projector_hidden_dim: PositiveInt = 4096
    """Hidden width of the critic MLP Linear-BN-ReLU-Linear (BYOL: 4096)."""
    projector_out_dim: PositiveInt = 256
    """Output width of the critic MLP (BYOL: 256)."""
    sync_batchnorm: bool = False
    """Convert BatchNorm to SyncBatchNorm (statistics over the global batch; needs a process group).
    The ImageNet configs turn it on for GPUs: SyncBatchNorm across workers is BYOL's cross-replica
    BatchNorm (Grill et al. 2020, arXiv 2006.07733). PyTorch synchronises only on CUDA devices."""
    batchnorm: Literal["shared", "per_view"] = "shared"
    """How the views meet BatchNorm. "shared": consecutive views of one size go through encoder and
    projector as one concatenated batch (statistics over those views together; fewer, larger kernels).
    "per_view": every view is forwarded on its own, so each view's BatchNorm uses that view's batch
    statistics only, as BYOL does (Grill et al. 2020, arXiv 2006.07733; the per-view forward, with
    cross-replica BatchNorm, is an implementation detail of BYOL's released JAX code, not stated in
    the paper). The EMA target network, a copy of the online one, forwards the same way."""
    channels_last: bool = False
    """Use the channels_last memory format for the encoder and its inputs (faster convolutions on GPU)."""
    bf16: bool = True
    """bf16 autocast for the forward pass on CUDA devices; ignored on CPU."""

    @field_validator("width")
    @classmethod
    def _whole_channel_counts(cls, width: float) -> float:
        if not valid_width(width):
            raise ValueError("expected a value > 0 with 64 * width a whole number (e.g. 0.25, 0.5, 2)")
        return width


@dataclass(kw_only=True, config=SECTION_CONFIG)
class ObjectiveConfig:
    """The ReLIC objective (DESIGN.md, "The objective") and its target network, or SemPPL on top of it."""

    name: Literal["relic", "semppl"] = "relic"
    """"relic": ReLIC / ReLICv2 (``training.loss.relic_loss``). "semppl": SemPPL (Bosnjak et al., ICLR
    2023, arXiv 2301.05158; ``training.semppl``): ReLIC plus a contrastive term towards *semantic
    positives*, rows of the batch or of a queue of labelled target projections that share the
    anchor's label or kNN pseudo-label (verified from the paper's Figure 1 and Appendix C: semantic
    positives queried from a queue of projected labelled data, used in the contrastive loss along the
    augmentation positives, pseudo-labels by a k-NN over projected labelled data; every number and
    the exact form of the term are our design). Needs the batch's labels (-1 = unlabelled) and
    ``negatives`` None."""
    temperature: PositiveFloat = 0.1
    """Softmax temperature tau of the cosine logits (ReLICv2: 0.1)."""
    alpha: NonNegativeFloat = 1.0
    """Weight of the KL invariance term; 0 gives plain InfoNCE against target-network negatives."""
    kl_stop_grad: bool = True
    """Stop the gradient through the second argument of each KL term."""
    target: Literal["ema", "online"] = "ema"
    """"ema": target network = moving average of the online network (BYOL); "online": the online
    network itself, gradients flow through the gathered contrast set."""
    base_momentum: UnitInterval = 0.996
    """EMA momentum at step 0; it follows a cosine schedule to ``final_momentum`` (BYOL, eq. in sec. 3.2)."""
    final_momentum: UnitInterval = 1.0
    """EMA momentum at the last step; at least ``base_momentum``."""
    queue_size: NonNegativeInt = 0
    """Number of earlier target projections kept per large view (MoCo-style FIFO) to extend the
    contrast set beyond the global batch; 0 disables the queue."""
    pairs: Literal["distinct", "all"] = "distinct"
    """Which (online view, target view) pairs the loss sums over (``training.loss.relic_loss``).
    "distinct": every online view against every *other* large target view (ReLIC, DESIGN.md).
    "all": every online view, large or small, against every large target view including its own, the
    sum normalised by (L + S) * L: Algorithm 1 of ReLICv2 (Tomasev et al. 2022, arXiv 2201.05119).
    The invariance term is the mean KL over ordered pairs of distinct elements of either set."""
    negatives: PositiveInt | None = None
    """ReLICv2's n_e (Tomasev et al. 2022, arXiv 2201.05119, Algorithm 1): each anchor's softmax runs
    over its positive and this many negatives drawn uniformly without replacement from the other rows
    of the contrast set (gathered global batch and queue), one draw per anchor and step shared by all
    view pairs; at most the contrast set's size minus one (with a queue, the rows filled so far: the
    first step has only the global batch). None uses every row of the contrast set."""
    semppl_queue_size: PositiveInt = 2560
    """SemPPL only: rows of the FIFO of labelled target projections (one row set per large view, with
    their labels) that pseudo-labels are voted from and semantic positives drawn from, filled with
    every labelled row of each gathered batch. Assumed, not from the paper: 2560 keeps ~2.5 rows per
    ImageNet class while holding only recent projections of the moving target; small runs want far
    fewer."""
    semppl_knn_k: PositiveInt = 1
    """SemPPL only: k of the k-NN vote that pseudo-labels an unlabelled sample from the labelled queue
    (cosine similarity, per large view, votes pooled over the views). Assumed, not from the paper:
    1, the nearest labelled row per view."""
    semppl_positives: PositiveInt = 3
    """SemPPL only: n_s, semantic positives drawn per anchor, uniformly without replacement, from the
    batch and labelled-queue rows sharing its (pseudo-)label (fewer when fewer exist). Assumed, not
    from the paper: a few, small beside the |P| augmentation pairs."""
    semppl_weight: NonNegativeFloat = 0.2
    """SemPPL only: weight of the semantic term, ``total = contrastive + semppl_weight * semantic +
    alpha * invariance``. Assumed, not from the paper: 0.2, the value a third-party reimplementation
    uses; 0 keeps the pseudo-labels (for monitoring) without their loss."""

    @field_validator("negatives")
    @classmethod
    def _no_subsampling_with_semppl(cls, negatives: int | None, info: ValidationInfo) -> int | None:
        if negatives is not None and info.data.get("name") == "semppl":
            raise ValueError(
                "expected None with name='semppl' (semantic positives must stay in every anchor's "
                "softmax, which a subsampled candidate set would not guarantee)"
            )
        return negatives

    @field_validator("final_momentum")
    @classmethod
    def _not_below_base(cls, final: float, info: ValidationInfo) -> float:
        base = info.data.get("base_momentum")
        if base is not None and final < base:
            raise ValueError(f"expected >= base_momentum ({base})")
        return final


@dataclass(kw_only=True, config=SECTION_CONFIG)
class OptimConfig:
    """Optimiser. The peak learning rate is ``base_lr * global_batch / 256`` (Goyal et al. 2017)."""

    name: Literal["lars", "sgd", "adamw"] = "lars"
    """lars (You et al. 2017, arXiv 1708.03888), sgd or adamw."""
    base_lr: PositiveFloat = 0.2
    """Learning rate per 256 samples of global batch (ReLICv2/BYOL: 0.2 with LARS)."""
    weight_decay: NonNegativeFloat = 1.5e-6
    """Weight decay; biases and normalisation parameters are excluded (BYOL: 1.5e-6)."""
    momentum: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.9
    """Momentum of LARS and SGD; beta1 of AdamW."""
    beta2: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.999
    """AdamW's second-moment decay."""
    trust_coefficient: PositiveFloat = 0.001
    """LARS trust coefficient eta (You et al. 2017)."""
    grad_clip: PositiveFloat | None = None
    """Clip the global gradient norm to this value before the update; None disables clipping."""


@dataclass(kw_only=True, config=SECTION_CONFIG)
class ScheduleConfig:
    """Length of training and the learning-rate schedule: linear warm-up, then cosine decay."""

    epochs: PositiveInt = 100
    """Number of passes over the data."""
    warmup_epochs: NonNegativeFloat = 10.0
    """Linear warm-up length in epochs (BYOL: 10); may be fractional, at most ``epochs``."""
    final_lr_fraction: UnitInterval = 0.0
    """Learning rate at the last step as a fraction of the peak."""

    @field_validator("warmup_epochs")
    @classmethod
    def _within_training(cls, warmup: float, info: ValidationInfo) -> float:
        epochs = info.data.get("epochs")
        if epochs is not None and warmup > epochs:
            raise ValueError(f"expected a value in [0, epochs={epochs}]")
        return warmup
