"""Config validation messages, and the collectives' single-process behaviour."""

from __future__ import annotations

import pytest
import torch

from training import distributed
from training.config import ModelConfig, ObjectiveConfig, ScheduleConfig


def test_defaults_are_the_design_defaults():
    model, objective, schedule = ModelConfig(), ObjectiveConfig(), ScheduleConfig()
    assert (model.arch, model.projector_hidden_dim, model.projector_out_dim) == ("resnet50", 4096, 256)
    assert (objective.temperature, objective.alpha, objective.base_momentum) == (0.1, 1.0, 0.996)
    assert (objective.target, objective.final_momentum, objective.queue_size) == ("ema", 1.0, 0)
    assert schedule.warmup_epochs == 10


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (ModelConfig, dict(arch="resnet9"), r"model.arch: expected one of resnet18, .*, got 'resnet9'"),
        (ModelConfig, dict(projector_out_dim=0), "model.projector_out_dim: expected an integer >= 1, got 0"),
        (
            ModelConfig,
            dict(width=0.3),
            r"model.width: expected a value > 0 with 64 \* width a whole .*, got 0.3",
        ),
        (ModelConfig, dict(width=0), "model.width: expected a value > 0"),
        (ObjectiveConfig, dict(temperature=0), "objective.temperature: expected a value > 0, got 0"),
        (ObjectiveConfig, dict(target="self"), "objective.target: expected one of ema, online, got 'self'"),
        (ObjectiveConfig, dict(base_momentum=1.5), r"objective.base_momentum: expected a value in \[0, 1\]"),
        (ObjectiveConfig, dict(queue_size=-1), "objective.queue_size: expected an integer >= 0, got -1"),
        (
            ScheduleConfig,
            dict(epochs=5, warmup_epochs=6),
            r"schedule.warmup_epochs: expected a value in \[0, epochs=5\], got 6",
        ),
    ],
)
def test_bad_values_name_field_expected_actual(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


def test_collectives_without_a_process_group():
    assert (distributed.rank(), distributed.world_size()) == (0, 1)
    x = torch.randn(3, 2, requires_grad=True)
    assert torch.equal(distributed.gather(x), x) and not distributed.gather(x).requires_grad
    distributed.gather_with_grad(x).sum().backward()
    assert torch.equal(x.grad, torch.ones(3, 2))
    assert torch.equal(distributed.all_reduce_mean(x), x.detach())
