"""Networks: the encoder f (a torchvision ResNet), the critic g (projector MLP) and the EMA target.

Nothing here knows about parallelism: the cluster layer wraps the online ``ReLICModel`` in DDP.
No pretrained weights are ever downloaded (``weights=None``).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torchvision
from torch import nn

from training.config import ARCHITECTURES, ModelConfig, valid_width

# torchvision's ResNet builders: (block, blocks per stage, extra constructor arguments).
_RESNET_SPECS = {
    "resnet18": ("BasicBlock", [2, 2, 2, 2], {}),
    "resnet34": ("BasicBlock", [3, 4, 6, 3], {}),
    "resnet50": ("Bottleneck", [3, 4, 6, 3], {}),
    "resnet101": ("Bottleneck", [3, 4, 23, 3], {}),
    "resnet152": ("Bottleneck", [3, 8, 36, 3], {}),
    "wide_resnet50_2": ("Bottleneck", [3, 4, 6, 3], {"width_per_group": 128}),
    "wide_resnet101_2": ("Bottleneck", [3, 4, 23, 3], {"width_per_group": 128}),
}


class ScaledResNet(torchvision.models.ResNet):
    """torchvision's ``ResNet`` with every channel count multiplied by ``width``.

    Only the widths change: ``_make_layer`` builds each stage with ``planes * width`` planes (the stem
    and layer1 get ``64 * width`` channels), and ``conv1``, ``bn1`` and ``fc`` are rebuilt to match and
    initialised as torchvision initialises them. Module names, block structure, strides and the
    forward pass are torchvision's, so a state dict of this network has torchvision's keys with
    narrower (or wider) tensors.
    """

    def __init__(
        self, block: type, layers: list[int], *, width: float, num_classes: int = 1000, **kwargs
    ) -> None:
        self.__dict__["_width"] = width  # read by _make_layer, which runs inside ResNet.__init__
        super().__init__(block, layers, num_classes=num_classes, **kwargs)
        stem = round(64 * width)
        self.conv1 = nn.Conv2d(3, stem, kernel_size=7, stride=2, padding=3, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.bn1 = nn.BatchNorm2d(stem)
        self.fc = nn.Linear(round(512 * width) * block.expansion, num_classes)
        self.width = width

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
        if planes == 64:  # layer1 starts from the stem's output
            self.inplanes = round(64 * self._width)
        return super()._make_layer(block, round(planes * self._width), blocks, stride, dilate)


def resnet(arch: str, *, width: float = 1.0, small_stem: bool = False, num_classes: int = 1000) -> nn.Module:
    """``torchvision.models.<arch>(weights=None, num_classes=...)``, optionally scaled and with the small stem.

    ``width == 1`` is torchvision's own builder (identical parameters and initialisation);
    other widths are :class:`ScaledResNet`. ``small_stem`` replaces the 7x7 stride-2 ``conv1`` by a
    3x3 stride-1 convolution and ``maxpool`` by identity (CIFAR-style, He et al. 2016, sec. 4.2).
    Exported encoders load with ``strict=True`` into the network this function builds with the same
    arguments; with ``width == 1`` and no small stem that is plain ``torchvision.models.<arch>()``.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch: expected one of {', '.join(ARCHITECTURES)}, got {arch!r}")
    if not valid_width(width):
        raise ValueError(f"width: expected a value > 0 with 64 * width a whole number, got {width!r}")
    if width == 1:
        model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    else:
        block_name, layers, kwargs = _RESNET_SPECS[arch]
        block = getattr(torchvision.models.resnet, block_name)
        model = ScaledResNet(block, list(layers), width=width, num_classes=num_classes, **kwargs)
    if small_stem:
        model.conv1 = nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision
        model.maxpool = nn.Identity()
    return model


def build_encoder(arch: str, small_stem: bool = False, width: float = 1.0) -> nn.Module:
    """A torchvision ResNet without its classifier (``fc`` is the identity): images -> [N, feature_dim].

    ``small_stem`` replaces the 7x7 stride-2 convolution and the max-pool by a 3x3 stride-1 convolution
    and no pooling, the usual stem for 32x32 images (He et al. 2016, sec. 4.2, CIFAR-10 networks).
    ``width`` multiplies every channel count (see :func:`resnet`).
    Parameter names stay torchvision's, so the state dict (plus an ``fc``) loads into
    ``resnet(arch, width=..., small_stem=...)`` — ``torchvision.models.<arch>()`` at width 1 with the
    standard stem. The encoder's output width is stored in ``encoder.feature_dim``.
    """
    encoder = resnet(arch, width=width, small_stem=small_stem)
    feature_dim = encoder.fc.in_features
    encoder.fc = nn.Identity()
    encoder.feature_dim = feature_dim
    return encoder


class Projector(nn.Sequential):
    """Critic g: Linear(in -> hidden) - BatchNorm - ReLU - Linear(hidden -> out).

    BYOL (Grill et al. 2020, arXiv 2006.07733, sec. 3.3): "a multi-layer perceptron (MLP) consisting
    in a linear layer with output size 4096 followed by batch normalization, rectified linear units
    (ReLU), and a final linear layer with output dimension 256"; ReLIC uses the same critic.
    The first linear layer has no bias: the BatchNorm right after it subtracts the batch mean, so
    such a bias would have no effect on the output and a gradient that is exactly 0.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 4096, out_dim: int = 256) -> None:
        super().__init__(
            nn.Linear(in_dim, hidden_dim, bias=False),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )


class ReLICModel(nn.Module):
    """Encoder f followed by critic g, applied to a list of views: ``[V x [B,3,H,W]] -> [V x [B, out]]``.

    By default consecutive views of the same size go through the networks as one concatenated batch
    (fewer, larger kernels; BatchNorm statistics over those views together, as one batch of the same
    size). With ``per_view_batchnorm`` every view is forwarded on its own, so each view's BatchNorm
    layers normalise with that view's batch statistics, as BYOL does (Grill et al. 2020, arXiv
    2006.07733; the per-view forward is a detail of BYOL's released code). In training mode the two
    differ; in eval mode (running statistics) they agree. One call covers every view, so under DDP
    there is exactly one forward per backward. ``copy.deepcopy`` (the EMA target) keeps the mode.
    """

    def __init__(
        self,
        encoder: nn.Module,
        projector: nn.Module,
        *,
        channels_last: bool = False,
        per_view_batchnorm: bool = False,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = projector
        self.channels_last = channels_last
        self.per_view_batchnorm = per_view_batchnorm

    def forward(self, views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        outputs: list[torch.Tensor] = []
        start = 0
        while start < len(views):
            stop = start + 1
            while (
                not self.per_view_batchnorm and stop < len(views) and views[stop].shape == views[start].shape
            ):
                stop += 1
            images = torch.cat(list(views[start:stop])) if stop - start > 1 else views[start]
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            projections = self.projector(self.encoder(images))
            outputs.extend(projections.chunk(stop - start))
            start = stop
        return outputs


def build_model(cfg: ModelConfig) -> ReLICModel:
    """The online network described by ``cfg`` (SyncBatchNorm conversion is done by the caller's state)."""
    encoder = build_encoder(cfg.arch, cfg.small_stem, cfg.width)
    projector = Projector(encoder.feature_dim, cfg.projector_hidden_dim, cfg.projector_out_dim)
    model = ReLICModel(
        encoder,
        projector,
        channels_last=cfg.channels_last,
        per_view_batchnorm=cfg.batchnorm == "per_view",
    )
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


class EMATarget(nn.Module):
    """Target network: an exponential moving average of the online network's parameters (BYOL).

    After each optimiser step, ``xi <- m * xi + (1 - m) * theta`` for every parameter, with the momentum
    m following ``training.optim.momentum_schedule`` (cosine from base to 1.0; Grill et al. 2020,
    sec. 3.2). Buffers (BatchNorm running statistics) are copied from the online network. The target
    runs in training mode (batch statistics), as the online network does, and never carries gradient.
    """

    def __init__(self, online: nn.Module) -> None:
        super().__init__()
        self.network = copy.deepcopy(online)
        self.network.requires_grad_(False)

    @torch.no_grad()
    def forward(self, views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return self.network(views)

    @torch.no_grad()
    def update(self, online: nn.Module, momentum: float) -> None:
        """Move towards ``online`` (the unwrapped module, not its DDP wrapper)."""
        target_params = list(self.network.parameters())
        online_params = [p.detach() for p in online.parameters()]
        if len(target_params) != len(online_params):
            raise ValueError(
                f"EMATarget.update: online network has {len(online_params)} parameters, "
                f"target has {len(target_params)}; pass the unwrapped online module"
            )
        torch._foreach_lerp_(target_params, online_params, 1.0 - momentum)
        for target_buffer, online_buffer in zip(self.network.buffers(), online.buffers()):
            target_buffer.copy_(online_buffer)
