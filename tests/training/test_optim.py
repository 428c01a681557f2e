"""LARS against a hand computation; parameter groups; the learning-rate schedule."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from training.config import OptimConfig, ScheduleConfig
from training.optim import LARS, build_optimizer, lr_schedule, parameter_groups


def test_lars_two_steps_equal_hand_computation():
    weight = nn.Parameter(torch.tensor([[3.0, 4.0]], dtype=torch.float64))  # ||w|| = 5
    bias = nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    optimizer = LARS(
        [
            {"params": [weight], "weight_decay": 0.5, "lars_adapt": True},
            {"params": [bias], "weight_decay": 0.0, "lars_adapt": False},
        ],
        lr=0.1,
        momentum=0.9,
        trust_coefficient=0.001,
    )
    w, b, v_w, v_b = [3.0, 4.0], 1.0, [0.0, 0.0], 0.0
    for grad_w, grad_b in (([1.0, -2.0], 0.5), ([0.5, 0.5], -1.0)):
        weight.grad = torch.tensor([grad_w], dtype=torch.float64)
        bias.grad = torch.tensor([grad_b], dtype=torch.float64)
        optimizer.step()
        # By hand: d = g + wd w; d *= eta ||w|| / ||d||; v = mu v + d; w -= lr v. Bias: plain momentum SGD.
        d = [g + 0.5 * x for g, x in zip(grad_w, w)]
        ratio = 0.001 * math.hypot(*w) / math.hypot(*d)
        v_w = [0.9 * v + ratio * x for v, x in zip(v_w, d)]
        w = [x - 0.1 * v for x, v in zip(w, v_w)]
        v_b = 0.9 * v_b + grad_b
        b = b - 0.1 * v_b
        torch.testing.assert_close(
            weight.detach(), torch.tensor([w], dtype=torch.float64), rtol=1e-14, atol=0
        )
        torch.testing.assert_close(bias.detach(), torch.tensor([b], dtype=torch.float64), rtol=1e-14, atol=0)


def test_lars_zero_weight_uses_plain_gradient():
    weight = nn.Parameter(torch.zeros(2, 2))
    optimizer = LARS([weight], lr=1.0, momentum=0.0, weight_decay=0.1)
    weight.grad = torch.ones(2, 2)
    optimizer.step()
    assert torch.equal(weight.detach(), -torch.ones(2, 2))


def test_biases_and_norms_are_excluded_from_decay_and_adaptation():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 2))
    decayed, excluded = parameter_groups(model, weight_decay=1e-4)
    assert {id(p) for p in decayed["params"]} == {id(model[0].weight), id(model[3].weight)}
    assert {id(p) for p in excluded["params"]} == {
        id(model[0].bias),
        id(model[1].weight),
        id(model[1].bias),
        id(model[3].bias),
    }
    assert excluded["weight_decay"] == 0.0 and excluded["lars_adapt"] is False
    assert decayed["weight_decay"] == 1e-4 and decayed["lars_adapt"] is True


@pytest.mark.parametrize(
    ("name", "cls"), [("lars", LARS), ("sgd", torch.optim.SGD), ("adamw", torch.optim.AdamW)]
)
def test_build_optimizer_scales_lr_with_global_batch(name, cls):
    optimizer = build_optimizer(nn.Linear(2, 2), OptimConfig(name=name, base_lr=0.2), global_batch=4096)
    assert isinstance(optimizer, cls)
    assert all(group["lr"] == pytest.approx(0.2 * 4096 / 256) for group in optimizer.param_groups)


def test_lr_schedule_warmup_then_cosine():
    lrs = lr_schedule(
        OptimConfig(base_lr=0.4),
        ScheduleConfig(epochs=10, warmup_epochs=2, final_lr_fraction=0.1),
        steps_per_epoch=5,
        global_batch=512,
    )
    peak = 0.4 * 512 / 256
    assert lrs.shape == (50,)
    torch.testing.assert_close(lrs[:10], peak * torch.arange(1, 11, dtype=torch.float64) / 10)
    assert lrs[9].item() == pytest.approx(peak) and lrs[10].item() == pytest.approx(peak)
    assert lrs[-1].item() == pytest.approx(0.1 * peak)
    assert torch.all(lrs[11:] <= lrs[10:-1])
    mid = 10 + 39 / 2  # half-way through the cosine: (peak + final) / 2
    assert float(lrs[int(mid)] + lrs[int(mid) + 1]) / 2 == pytest.approx(0.55 * peak, rel=1e-3)


@pytest.mark.parametrize(
    ("cfg", "field", "value", "expected"),
    [
        (dict(name="adam"), "name", "adam", "'lars', 'sgd' or 'adamw'"),
        (dict(base_lr=0), "base_lr", 0, "greater than 0"),
        (dict(momentum=1.0), "momentum", 1.0, "less than 1"),
    ],
)
def test_config_errors_name_field_expected_actual(cfg, field, value, expected):
    with pytest.raises(ValidationError) as info:
        OptimConfig(**cfg)
    error = info.value.errors()[0]
    assert (info.value.title, error["loc"], error["input"]) == ("OptimConfig", (field,), value)
    assert expected in error["msg"], error["msg"]
