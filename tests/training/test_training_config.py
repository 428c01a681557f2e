"""Config validation messages, and the collectives' single-process behaviour."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from training import distributed
from training.config import ModelConfig, ObjectiveConfig, ScheduleConfig


def test_defaults_are_the_design_defaults():
    model, objective, schedule = ModelConfig(), ObjectiveConfig(), ScheduleConfig()
    assert (model.arch, model.projector_hidden_dim, model.projector_out_dim) == ("resnet50", 4096, 256)
    assert (objective.temperature, objective.alpha, objective.base_momentum) == (0.1, 1.0, 0.996)
    assert (objective.target, objective.final_momentum, objective.queue_size) == ("ema", 1.0, 0)
    assert schedule.warmup_epochs == 10
    assert (objective.pairs, objective.negatives, model.batchnorm) == ("distinct", None, "shared")


@pytest.mark.parametrize(
    ("cls", "kwargs", "field", "value", "expected"),
    [
        (ModelConfig, dict(arch="resnet9"), "arch", "resnet9", "'resnet18', 'resnet34'"),
        (ModelConfig, dict(projector_out_dim=0), "projector_out_dim", 0, "greater than 0"),
        (ModelConfig, dict(width=0.3), "width", 0.3, "expected a value > 0 with 64 * width a whole number"),
        (ModelConfig, dict(width=0), "width", 0, "expected a value > 0"),
        (ModelConfig, dict(bogus=1), "bogus", 1, "Unexpected keyword argument"),
        (ObjectiveConfig, dict(temperature=0), "temperature", 0, "greater than 0"),
        (ObjectiveConfig, dict(target="self"), "target", "self", "'ema' or 'online'"),
        (ObjectiveConfig, dict(base_momentum=1.5), "base_momentum", 1.5, "less than or equal to 1"),
        (
            ObjectiveConfig,
            dict(base_momentum=0.99, final_momentum=0.9),
            "final_momentum",
            0.9,
            "expected >= base_momentum (0.99)",
        ),
        (ObjectiveConfig, dict(queue_size=-1), "queue_size", -1, "greater than or equal to 0"),
        (ObjectiveConfig, dict(pairs="same"), "pairs", "same", "'distinct' or 'all'"),
        (ObjectiveConfig, dict(negatives=0), "negatives", 0, "greater than 0"),
        (ModelConfig, dict(batchnorm="sync"), "batchnorm", "sync", "'shared' or 'per_view'"),
        (
            ScheduleConfig,
            dict(epochs=5, warmup_epochs=6),
            "warmup_epochs",
            6,
            "expected a value in [0, epochs=5]",
        ),
        # defaults are validated too: the default warm-up (10 epochs) does not fit in 5 epochs
        (ScheduleConfig, dict(epochs=5), "warmup_epochs", 10.0, "expected a value in [0, epochs=5]"),
    ],
)
def test_bad_values_name_field_expected_actual(cls, kwargs, field, value, expected):
    with pytest.raises(ValidationError) as info:
        cls(**kwargs)
    error = info.value.errors()[0]
    assert (info.value.title, error["loc"], error["input"]) == (cls.__name__, (field,), value)
    assert expected in error["msg"], error["msg"]
    assert isinstance(info.value, ValueError)


def test_collectives_without_a_process_group():
    assert (distributed.rank(), distributed.world_size()) == (0, 1)
    x = torch.randn(3, 2, requires_grad=True)
    assert torch.equal(distributed.gather(x), x) and not distributed.gather(x).requires_grad
    distributed.gather_with_grad(x).sum().backward()
    assert torch.equal(x.grad, torch.ones(3, 2))
    assert torch.equal(distributed.all_reduce_mean(x), x.detach())
