"""train_step: exact resume, non-finite stop, the queue, counters, and the step against its parts."""

from __future__ import annotations

import copy
import io
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from training.config import ModelConfig, ObjectiveConfig, OptimConfig, ScheduleConfig
from training.loop import (
    NonFiniteLossError,
    TrainState,
    build_train_state,
    check_views,
    enqueue,
    train_step,
)
from training.loss import relic_loss
from training.model import Projector, ReLICModel

BATCH = 4


@dataclass
class Batch:
    views: list[torch.Tensor]
    labels: torch.Tensor
    num_large: int = 2


def tiny_model() -> ReLICModel:
    """A ResNet-shaped toy (conv-BN-ReLU-pool encoder, BYOL critic): every mechanism, a fraction of the time."""
    encoder = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    return ReLICModel(encoder, Projector(8, 32, 16))


def small_state(target="ema", queue_size=0, seed=0, steps_per_epoch=3, optimizer="lars") -> TrainState:
    torch.manual_seed(seed)
    return build_train_state(
        ModelConfig(arch="resnet18"),
        ObjectiveConfig(target=target, queue_size=queue_size, base_momentum=0.9),
        OptimConfig(name=optimizer, base_lr=0.5),
        ScheduleConfig(epochs=2, warmup_epochs=1),
        steps_per_epoch=steps_per_epoch,
        global_batch=BATCH,
        model=tiny_model(),
    )


def batches(count, seed=0, small_views=1):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        views = [torch.randn(BATCH, 3, 8, 8, generator=g) for _ in range(2)]
        views += [torch.randn(BATCH, 3, 4, 4, generator=g) for _ in range(small_views)]
        out.append(Batch(views, torch.zeros(BATCH, dtype=torch.long)))
    return out


def snapshot(state: TrainState) -> bytes:
    buffer = io.BytesIO()
    torch.save(state.state_dict(), buffer)
    return buffer.getvalue()


def tensors_of(state: TrainState) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v for k, v in state.online.state_dict().items()}
    out |= {f"target.{k}": v for k, v in state.target.state_dict().items()}
    for i, s in enumerate(state.optimizer.state.values()):
        out[f"optim.{i}"] = s["momentum_buffer"]
    out["queue"] = state.queue
    return out


def test_save_load_next_step_is_bit_identical():
    data = batches(3)
    run = small_state(queue_size=6)
    train_step(run, data[0])
    train_step(run, data[1])
    saved = snapshot(run)
    expected_noise = torch.randn(3)  # the RNG state travels with the checkpoint too
    expected = train_step(run, data[2])

    resumed = small_state(
        queue_size=6, seed=123
    )  # different initial weights: everything must come from the file
    resumed.load_state_dict(torch.load(io.BytesIO(saved), weights_only=True))
    assert torch.equal(torch.randn(3), expected_noise)
    assert (resumed.step, resumed.queue_len, resumed.samples_seen) == (2, 6, 2 * BATCH)
    assert train_step(resumed, data[2]) == expected
    got, want = tensors_of(resumed), tensors_of(run)
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_resume_rejects_a_different_schedule():
    saved = torch.load(io.BytesIO(snapshot(small_state())), weights_only=True)
    with pytest.raises(ValueError, match="checkpoint steps_per_epoch is 3, this run's is 5"):
        small_state(steps_per_epoch=5).load_state_dict(saved)


def test_non_finite_loss_names_step_and_term_and_leaves_parameters():
    state = small_state()
    data = batches(2)
    train_step(state, data[0])
    before = copy.deepcopy(dict(state.online.named_parameters()))
    data[1].views[0][0, 0, 0, 0] = float("nan")
    with pytest.raises(
        NonFiniteLossError, match=r"non-finite contrastive loss \(nan\) at step 1 \(epoch 0, batch 1\)"
    ):
        train_step(state, data[1])
    assert state.step == 1
    for key, value in state.online.named_parameters():
        assert torch.equal(value, before[key]), key


def test_counters_follow_epochs_and_the_schedule_ends():
    state = small_state(steps_per_epoch=2)
    metrics = [train_step(state, b) for b in batches(3)]
    assert (state.step, state.epoch, state.batch_in_epoch) == (3, 1, 1)
    assert (state.samples_seen, state.samples_in_epoch) == (3 * BATCH, BATCH)
    assert [m["lr"] for m in metrics[:2]] == pytest.approx([0.5 * BATCH / 256 * k / 2 for k in (1, 2)])
    assert metrics[0]["momentum"] == pytest.approx(0.9) and metrics[0]["loss"] == metrics[0]["total"]
    train_step(state, batches(1)[0])
    with pytest.raises(RuntimeError, match="step 4 is past the end of the schedule"):
        train_step(state, batches(1)[0])


def test_queue_is_a_fifo_of_the_latest_rows():
    state = small_state(queue_size=5)
    rows = [torch.full((2, 3, 4), float(i)) + torch.arange(3.0)[None, :, None] * 0.1 for i in range(3)]
    for r in rows:
        enqueue(state, r)
    assert (state.queue_len, state.queue_ptr) == (5, 4)
    kept = sorted(state.queue[0, :, 0].tolist())
    assert kept == pytest.approx([1.1, 1.2, 2.0, 2.1, 2.2])  # 0.x and 1.0 were overwritten, oldest first
    assert torch.equal(state.queue[0], state.queue[1])


@pytest.mark.parametrize("target", ["ema", "online"])
def test_step_equals_its_parts(target):
    """Gradients of train_step == relic_loss on the model outputs, with the queue as extra negatives."""
    state = small_state(target=target, queue_size=8, optimizer="sgd")
    data = batches(2, small_views=2)
    train_step(state, data[0])  # fills 4 of the 8 queue rows
    model = copy.deepcopy(state.online)
    ema = copy.deepcopy(state.target)
    queue = state.queue[:, : state.queue_len].clone()
    # stored normalised (the loss does not normalise the queue again)
    torch.testing.assert_close(queue.norm(dim=-1), torch.ones(queue.shape[:2]))

    online = model(data[1].views)
    targets = online[:2] if target == "online" else ema(data[1].views[:2])
    contrast = [torch.cat([t, q]) for t, q in zip(targets, queue)]
    cfg = state.objective
    reference = relic_loss(online, contrast, temperature=cfg.temperature, alpha=cfg.alpha)
    reference.total.backward()
    metrics = train_step(state, data[1])
    assert metrics["total"] == pytest.approx(reference.total.item(), rel=1e-6)
    assert metrics["invariance"] == pytest.approx(reference.invariance.item(), rel=1e-6)
    for (name, p), q in zip(state.online.named_parameters(), model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_the_batch_says_how_many_views_are_large():
    """``num_large`` comes from the batch, never from the shapes: small crops of the large size stay
    small, four large views are four targets, and large views of unequal shape are refused."""
    g = torch.Generator().manual_seed(0)

    def views(*sizes):
        return [torch.randn(BATCH, 3, s, s, generator=g) for s in sizes]

    labels = torch.zeros(BATCH, dtype=torch.long)
    assert check_views(Batch(views(8, 8, 8, 8), labels, num_large=2)) == 2  # small crops of the large size
    assert check_views(Batch(views(8, 8, 8, 8), labels, num_large=4)) == 4
    with pytest.raises(
        ValueError, match=r"large views must share one shape, got \[\(4, 3, 8, 8\), \(4, 3, 4, 4\)\]"
    ):
        check_views(Batch(views(8, 4, 4), labels, num_large=2))
    with pytest.raises(ValueError, match=r"num_large is 3, expected 1\.\.2"):
        check_views(Batch(views(8, 8), labels, num_large=3))

    # four large views of one shape: the target network sees all four (a shape heuristic would too,
    # but with num_large=2 and four equal views it must see only the first two)
    state = small_state()
    seen = []
    forward = state.target.forward
    state.target.forward = lambda v: seen.append(len(v)) or forward(v)
    train_step(state, Batch(views(8, 8, 8, 8), labels, num_large=4))
    train_step(state, Batch(views(8, 8, 8, 8), labels, num_large=2))
    assert seen == [4, 2]
