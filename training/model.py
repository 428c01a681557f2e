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

from training.config import ARCHITECTURES, ModelConfig


def build_encoder(arch: str, small_stem: bool = False) -> nn.Module:
    """A torchvision ResNet without its classifier (``fc`` is the identity): images -> [N, feature_dim].

    ``small_stem`` replaces the 7x7 stride-2 convolution and the max-pool by a 3x3 stride-1 convolution
    and no pooling, the usual stem for 32x32 images (He et al. 2016, sec. 4.2, CIFAR-10 networks).
    Parameter names stay torchvision's, so the state dict (plus an ``fc``) loads into
    ``torchvision.models.<arch>()``. The encoder's output width is stored in ``encoder.feature_dim``.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"build_encoder: arch must be one of {', '.join(ARCHITECTURES)}, got {arch!r}")
    encoder = torchvision.models.get_model(arch, weights=None)
    feature_dim = encoder.fc.in_features
    encoder.fc = nn.Identity()
    if small_stem:
        encoder.conv1 = nn.Conv2d(
            3, encoder.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False
        )
        nn.init.kaiming_normal_(encoder.conv1.weight, mode="fan_out", nonlinearity="relu")  # as torchvision
        encoder.maxpool = nn.Identity()
    encoder.feature_dim = feature_dim
    return encoder


class Projector(nn.Sequential):
    """Critic g: Linear(in -> hidden) - BatchNorm - ReLU - Linear(hidden -> out).

    BYOL (Grill et al. 2020, arXiv 2006.07733, sec. 3.3): "a multi-layer perceptron (MLP) consisting
    in a linear layer with output size 4096 followed by batch normalization, rectified linear units
    (ReLU), and a final linear layer with output dimension 256"; ReLIC uses the same critic.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 4096, out_dim: int = 256) -> None:
        super().__init__(
            nn.Linear(in_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )


class ReLICModel(nn.Module):
    """Encoder f followed by critic g, applied to a list of views: ``[V x [B,3,H,W]] -> [V x [B, out]]``.

    Consecutive views of the same size go through the networks as one concatenated batch (fewer,
    larger kernels; BatchNorm statistics over those views together, as one batch of the same size).
    One call covers every view, so under DDP there is exactly one forward per backward.
    """

    def __init__(self, encoder: nn.Module, projector: nn.Module, *, channels_last: bool = False) -> None:
        super().__init__()
        self.encoder = encoder
        self.projector = projector
        self.channels_last = channels_last

    def forward(self, views: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        outputs: list[torch.Tensor] = []
        start = 0
        while start < len(views):
            stop = start + 1
            while stop < len(views) and views[stop].shape == views[start].shape:
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
    encoder = build_encoder(cfg.arch, cfg.small_stem)
    projector = Projector(encoder.feature_dim, cfg.projector_hidden_dim, cfg.projector_out_dim)
    model = ReLICModel(encoder, projector, channels_last=cfg.channels_last)
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
