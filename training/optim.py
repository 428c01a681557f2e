"""Optimisers (LARS, SGD, AdamW) and the per-step schedules (learning rate, EMA momentum)."""

from __future__ import annotations

import math

import torch
from torch import nn

from training.config import OptimConfig, ScheduleConfig


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017, arXiv 1708.03888).

    For each parameter w with gradient g, in a group with ``lars_adapt`` (the default)::

        d = g + weight_decay * w
        d = trust_coefficient * ||w|| / ||d|| * d      (unchanged when ||w|| or ||d|| is 0)
        v = momentum * v + d
        w = w - lr * v

    Groups with ``lars_adapt=False`` (biases and normalisation parameters, as in BYOL/SimCLR) skip the
    weight decay and the trust ratio: ``v = momentum * v + g``. Default trust coefficient 0.001 (You et
    al. 2017).
    """

    def __init__(
        self,
        params,
        lr: float,
        *,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        lars_adapt: bool = True,
    ) -> None:
        if lr < 0:
            raise ValueError(f"LARS: lr must be >= 0, got {lr}")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            trust_coefficient=trust_coefficient,
            lars_adapt=lars_adapt,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if group["lars_adapt"]:
                    if group["weight_decay"]:
                        d = d.add(p, alpha=group["weight_decay"])
                    w_norm = torch.linalg.vector_norm(p)
                    d_norm = torch.linalg.vector_norm(d)
                    trust = torch.where(
                        (w_norm > 0) & (d_norm > 0),
                        group["trust_coefficient"] * w_norm / d_norm,
                        torch.ones_like(w_norm),
                    )
                    d = d * trust
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(d)
                p.add_(buf, alpha=-group["lr"])
        return loss


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: weights (decayed, LARS-adapted) and biases + normalisation parameters (neither).

    A parameter with at most one dimension is a bias or a norm scale/shift in every supported network.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": weight_decay, "lars_adapt": True},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lars_adapt": False},
    ]


def peak_lr(cfg: OptimConfig, global_batch: int) -> float:
    """Linear scaling rule: ``base_lr * global_batch / 256`` (Goyal et al. 2017, arXiv 1706.02677)."""
    if global_batch < 1:
        raise ValueError(f"global_batch must be >= 1, got {global_batch}")
    return cfg.base_lr * global_batch / 256


def build_optimizer(model: nn.Module, cfg: OptimConfig, global_batch: int) -> torch.optim.Optimizer:
    """The optimiser named by ``cfg.name`` at the peak learning rate; the schedule sets ``lr`` every step."""
    groups = parameter_groups(model, cfg.weight_decay)
    lr = peak_lr(cfg, global_batch)
    if cfg.name == "lars":
        return LARS(groups, lr, momentum=cfg.momentum, trust_coefficient=cfg.trust_coefficient)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr, momentum=cfg.momentum)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr, betas=(cfg.momentum, cfg.beta2))
    raise ValueError(f"optim.name: expected one of lars, sgd, adamw, got {cfg.name!r}")


def lr_schedule(
    optim: OptimConfig, schedule: ScheduleConfig, *, steps_per_epoch: int, global_batch: int
) -> torch.Tensor:
    """Learning rate of every step [epochs * steps_per_epoch]: linear warm-up to the peak, then cosine.

    Warm-up step k (0-based) uses ``peak * (k + 1) / warmup_steps``; the cosine (Loshchilov & Hutter
    2017, arXiv 1608.03983) then falls from the peak to ``final_lr_fraction * peak`` at the last step.
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    total = schedule.epochs * steps_per_epoch
    warmup = min(total, round(schedule.warmup_epochs * steps_per_epoch))
    peak = peak_lr(optim, global_batch)
    ramp = peak * torch.arange(1, warmup + 1, dtype=torch.float64) / max(warmup, 1)
    decay = cosine_schedule(peak, schedule.final_lr_fraction * peak, total - warmup)
    lrs = torch.cat([ramp, decay])
    assert lrs.shape == (total,), f"lr schedule has {lrs.shape[0]} steps, expected {total}"
    return lrs


def momentum_schedule(base: float, final: float, total_steps: int) -> torch.Tensor:
    """EMA momentum of every step: ``final - (final - base) * (cos(pi k / (K - 1)) + 1) / 2``.

    BYOL (Grill et al. 2020, sec. 3.2) with k/K; here k/(K-1) so step 0 uses ``base`` and the last
    step exactly ``final``.
    """
    m = cosine_schedule(base, final, total_steps)
    assert m.shape == (total_steps,), f"momentum schedule has {m.shape[0]} steps, expected {total_steps}"
    return m


def cosine_schedule(start: float, end: float, steps: int) -> torch.Tensor:
    """``steps`` values from ``start`` (first) to ``end`` (last) along half a cosine, float64."""
    if steps <= 1:
        return torch.full((max(steps, 0),), float(start), dtype=torch.float64)
    k = torch.arange(steps, dtype=torch.float64)
    return end + (start - end) * (torch.cos(math.pi * k / (steps - 1)) + 1) / 2
