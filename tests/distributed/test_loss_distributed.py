"""Two gloo workers under DDP == one process holding the concatenated batch (loss, gradients, weights).

Each worker runs the real ``train_step`` on its half of every batch with ``state.model`` wrapped in
DDP; the reference runs the same ``train_step`` without a process group on the whole batch. Both the
EMA target (gather without gradient) and the online network as target (``gather_with_grad``) are
checked, over three steps, so the queue, the EMA update and the optimiser are covered too.

The networks here have no BatchNorm on purpose: in training mode BatchNorm normalises over each
worker's local batch, so two workers and one process legitimately differ unless the statistics are
synchronised (SyncBatchNorm, which needs CUDA). Everything else in the step is equivalent up to
float32 summation order (losses are compared to 1e-6 absolute, gradients and weights to 1e-4 relative).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from support import gloo_group, spawn_workers
from torch import nn

from training.config import ModelConfig, ObjectiveConfig, OptimConfig, ScheduleConfig
from training.loop import TrainState, build_train_state, train_step
from training.model import ReLICModel

WORLD = 2
LOCAL_BATCH = 3
STEPS = 3
MODES = ("ema", "online")


@dataclass
class Batch:
    views: list[torch.Tensor]
    labels: torch.Tensor
    num_large: int = 2


def make_state(target: str) -> TrainState:
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    projector = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16))
    return build_train_state(
        ModelConfig(arch="resnet18"),
        ObjectiveConfig(target=target, queue_size=8, base_momentum=0.9, temperature=0.2),
        OptimConfig(name="lars", base_lr=50.0),
        ScheduleConfig(epochs=1, warmup_epochs=0),
        steps_per_epoch=STEPS,
        global_batch=WORLD * LOCAL_BATCH,
        model=ReLICModel(encoder, projector),
    )


def global_batches() -> list[Batch]:
    """Two large 8x8 views and one small 4x4 view (multi-crop) of the whole global batch, per step."""
    g = torch.Generator().manual_seed(1)
    n = WORLD * LOCAL_BATCH
    return [
        Batch(
            [torch.randn(n, 3, 8, 8, generator=g) for _ in range(2)] + [torch.randn(n, 3, 4, 4, generator=g)],
            torch.zeros(n),
        )
        for _ in range(STEPS)
    ]


def run(state: TrainState, batches: list[Batch]) -> dict:
    metrics, first_grads = [], None
    for batch in batches:
        metrics.append(train_step(state, batch))
        if first_grads is None:
            first_grads = {n: p.grad.clone() for n, p in state.online.named_parameters()}
    return {
        "metrics": metrics,
        "first_grads": first_grads,
        "params": {n: p.detach().clone() for n, p in state.online.named_parameters()},
        "queue": state.queue.clone(),
    }


def worker(rank: int, port: int, out_dir: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    with gloo_group(rank, WORLD, port):
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        local = [Batch([v[rows] for v in b.views], b.labels[rows]) for b in global_batches()]
        for mode in MODES:
            state = make_state(mode)
            state.model = DistributedDataParallel(state.model)
            torch.save(run(state, local), Path(out_dir) / f"{mode}-{rank}.pt")


@pytest.fixture(scope="module")
def distributed_results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ddp")
    spawn_workers(worker, WORLD, str(out_dir))
    return {
        (mode, rank): torch.load(out_dir / f"{mode}-{rank}.pt", weights_only=False)
        for mode in MODES
        for rank in range(WORLD)
    }


@pytest.mark.slow  # two spawned processes importing torch: ~15 s idle, more on a loaded machine
@pytest.mark.parametrize("mode", MODES)
def test_two_workers_equal_one_process_with_the_whole_batch(distributed_results, mode):
    torch.manual_seed(0)
    reference = run(make_state(mode), global_batches())
    for rank in range(WORLD):
        got = distributed_results[mode, rank]
        for step, (m, want) in enumerate(zip(got["metrics"], reference["metrics"])):
            for key in ("total", "contrastive", "invariance", "lr", "momentum"):
                assert m[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (rank, step, key)
        for name, grad in reference["first_grads"].items():
            torch.testing.assert_close(
                got["first_grads"][name], grad, rtol=1e-4, atol=1e-6, msg=f"{rank} {name}"
            )
        for name, param in reference["params"].items():
            torch.testing.assert_close(got["params"][name], param, rtol=1e-4, atol=1e-6, msg=f"{rank} {name}")
        torch.testing.assert_close(got["queue"], reference["queue"], rtol=1e-4, atol=1e-6)
    # The objective really depends on the other worker's half: gradients are not just the local ones.
    assert any(g.abs().sum() > 0 for g in reference["first_grads"].values())
