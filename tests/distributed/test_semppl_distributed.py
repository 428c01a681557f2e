"""SemPPL: two gloo workers under DDP == one process holding the concatenated batch.

The harness is ``test_loss_distributed.py``'s: each worker runs the real ``train_step`` on its half of
every batch with ``state.model`` wrapped in DDP; the reference runs the same ``train_step`` without a
process group on the whole batch; EMA target and online target, three steps. Compared: every loss
term (``semantic`` included), the first step's gradients, the weights, both queues (MoCo and
labelled, with its labels) and each rank's pseudo-labels against its slice of the reference's.

The labels of the first step make anchor 0 of rank 0 (label 7) have one semantic positive only,
row 4 — on rank 1 — while the labelled queue is still empty: the semantic term of that step is
non-zero only because the positive on the other rank counts. No BatchNorm (see the ReLIC test).
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
LABELS = [
    [7, 1, -1, 2, 7, -1],  # anchor 0's only same-label row is row 4 (rank 1); labels 1 and 2 alone
    [-1, 1, -1, 7, -1, 2],
    [2, -1, -1, -1, 1, -1],
]


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
        ObjectiveConfig(
            name="semppl",
            target=target,
            queue_size=4,
            base_momentum=0.9,
            temperature=0.2,
            semppl_queue_size=5,
            semppl_knn_k=2,
            semppl_positives=2,
            semppl_weight=0.5,
        ),
        OptimConfig(name="lars", base_lr=50.0),
        ScheduleConfig(epochs=1, warmup_epochs=0),
        steps_per_epoch=STEPS,
        global_batch=WORLD * LOCAL_BATCH,
        model=ReLICModel(encoder, projector),
    )


def global_batches() -> list[Batch]:
    """Two large 8x8 views and one small 4x4 view of the whole global batch, and its labels, per step."""
    g = torch.Generator().manual_seed(1)
    n = WORLD * LOCAL_BATCH
    return [
        Batch(
            [torch.randn(n, 3, 8, 8, generator=g) for _ in range(2)] + [torch.randn(n, 3, 4, 4, generator=g)],
            torch.tensor(LABELS[step]),
        )
        for step in range(STEPS)
    ]


def run(state: TrainState, batches: list[Batch]) -> dict:
    metrics, first_grads, pseudo = [], None, []
    for batch in batches:
        metrics.append(train_step(state, batch))
        pseudo.append(state.pseudo_labels.clone())
        if first_grads is None:
            first_grads = {n: p.grad.clone() for n, p in state.online.named_parameters()}
    return {
        "metrics": metrics,
        "first_grads": first_grads,
        "params": {n: p.detach().clone() for n, p in state.online.named_parameters()},
        "queue": state.queue.clone(),
        "semppl_queue": state.semppl_queue.clone(),
        "semppl_labels": state.semppl_labels.clone(),
        "semppl_len_ptr": (state.semppl_len, state.semppl_ptr),
        "pseudo": pseudo,
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
    out_dir = tmp_path_factory.mktemp("semppl-ddp")
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
            for key in ("total", "contrastive", "invariance", "semantic", "lr", "momentum"):
                assert m[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), (rank, step, key)
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        for step, pseudo in enumerate(got["pseudo"]):
            assert torch.equal(pseudo, reference["pseudo"][step][rows]), (rank, step)
        for name, grad in reference["first_grads"].items():
            torch.testing.assert_close(
                got["first_grads"][name], grad, rtol=1e-4, atol=1e-6, msg=f"{rank} {name}"
            )
        for name, param in reference["params"].items():
            torch.testing.assert_close(got["params"][name], param, rtol=1e-4, atol=1e-6, msg=f"{rank} {name}")
        torch.testing.assert_close(got["queue"], reference["queue"], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(got["semppl_queue"], reference["semppl_queue"], rtol=1e-4, atol=1e-6)
        assert torch.equal(got["semppl_labels"], reference["semppl_labels"])
        assert got["semppl_len_ptr"] == reference["semppl_len_ptr"] == (5, 4)
    # every step had semantic positives; the later ones pseudo-labelled every unlabelled sample
    assert all(m["semantic"] > 0 for m in reference["metrics"])
    assert [p.tolist() for p in reference["pseudo"][:1]] == [[7, 1, -1, 2, 7, -1]]
    assert all(bool((p >= 0).all()) for p in reference["pseudo"][1:])


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_a_semantic_positive_on_the_other_rank_counts(distributed_results, mode):
    """Step 0: the labelled queue is empty and the only rows sharing a label are rows 0 (rank 0) and 4
    (rank 1), so each is the other's only semantic positive: the semantic term is the mean of
    -log p(4 | 0) and -log p(0 | 4) over the pairs, computed here from the reference's projections."""
    state = make_state(mode)
    batch = global_batches()[0]
    online = [o.detach() for o in state.model(batch.views)]
    target = online[:2] if state.target is None else state.target(batch.views[:2])
    contrast = torch.nn.functional.normalize(torch.stack([t.detach() for t in target]), dim=-1)  # [2, 6, D]
    anchors = [torch.nn.functional.normalize(o, dim=-1) for o in online]
    pairs = [(o, t) for t in range(2) for o in range(3) if o != t]
    nll = []
    for anchor, positive in ((0, 4), (4, 0)):
        for o, t in pairs:
            log_p = torch.log_softmax(anchors[o][anchor] @ contrast[t].T / 0.2, dim=0)
            nll.append(-log_p[positive])
    expected = torch.stack(nll).mean().item()
    assert expected > 0
    for rank in range(WORLD):
        got = distributed_results[mode, rank]["metrics"][0]["semantic"]
        assert got == pytest.approx(expected, rel=1e-5), rank
