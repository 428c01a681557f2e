"""One ReLIC (or SemPPL) training step on a ``TrainState``, and the state's exact save/restore.

Batches are anything with the attributes of :class:`Batch` (``pipeline.loader.ViewBatch`` in
production): the views, the large ones first, how many are large, and (SemPPL only) the labels.
The cluster layer may replace ``state.model`` by ``DistributedDataParallel(state.model)``: the
online forward then goes through the wrapper (one forward per backward, so DDP's gradient averaging
applies), while the EMA update, the optimiser and checkpoints use the unwrapped module
(``state.online``).

Single process::

    state = build_train_state(ModelConfig(arch="resnet18", small_stem=True), ObjectiveConfig(),
                              OptimConfig(), ScheduleConfig(epochs=10), steps_per_epoch=len(loader),
                              global_batch=256, device="cpu")
    for epoch in range(state.epoch, 10):
        for batch in loader.epoch(epoch, start_batch=state.batch_in_epoch):
            metrics = train_step(state, batch)
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from training import distributed
from training.config import ModelConfig, ObjectiveConfig, OptimConfig, ScheduleConfig
from training.loss import LossTerms, relic_loss
from training.model import EMATarget, build_model
from training.optim import build_optimizer, lr_schedule, momentum_schedule
from training.semppl import SemPPLTerms, draw_semantic_positives, knn_pseudo_labels, semppl_loss


class Batch(Protocol):
    """What ``train_step`` needs of a batch."""

    views: Sequence[torch.Tensor]
    """``[B, 3, H_v, W_v]`` per view; the first ``num_large`` are the large (target) views, all of one
    shape."""
    num_large: int
    labels: torch.Tensor
    """``[B]`` integer labels, -1 = unlabelled (``ViewBatch.labels``). Read by the SemPPL objective
    only (``objective.name == "semppl"``, which refuses a batch without them); ReLIC ignores them."""


Objective = Callable[[list[torch.Tensor], list[torch.Tensor]], LossTerms]
"""Replacement objective for baselines and benchmarks: (online projections, local target projections)."""


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; training stops instead of corrupting the weights."""


@dataclass(eq=False)
class TrainState:
    """Everything a training run needs to continue exactly where it stopped."""

    model: nn.Module
    """Online network (``ReLICModel``), possibly wrapped in DDP by the cluster layer."""
    target: EMATarget | None
    """EMA target network; None when the target is the online network itself."""
    optimizer: torch.optim.Optimizer
    objective: ObjectiveConfig
    lr_schedule: torch.Tensor
    """Learning rate per step, [total_steps]."""
    momentum_schedule: torch.Tensor
    """EMA momentum per step, [total_steps]."""
    steps_per_epoch: int
    device: torch.device
    bf16: bool = False
    """bf16 autocast of the forward pass (CUDA only)."""
    grad_clip: float | None = None
    seed: int = 0
    """The run's seed (``build_train_state``'s); with the step and rank it seeds the negatives' draw,
    with the step alone SemPPL's draw of semantic positives."""
    step: int = 0
    """Optimiser steps taken (global, across epochs)."""
    samples_seen: int = 0
    """Samples consumed over the whole run (global batch, all ranks)."""
    samples_in_epoch: int = 0
    """Samples consumed in the current epoch (all ranks)."""
    queue: torch.Tensor | None = None
    """FIFO of earlier gathered target projections, L2-normalised, [Vt, queue_size, D] ring buffer
    (allocated on first use). Inside training it is a view of ``contrast``'s tail."""
    contrast: torch.Tensor | None = None
    """[Vt, N + queue_size, D] buffer of the normalised contrast set (N = gathered batch rows first,
    then the queue), so the queue is neither copied nor re-normalised at every step. Not saved:
    rebuilt from ``queue``."""
    queue_len: int = 0
    """Valid rows of ``queue`` (grows to queue_size)."""
    queue_ptr: int = 0
    """Next row of ``queue`` to overwrite."""
    semppl_queue: torch.Tensor | None = None
    """SemPPL's labelled queue: FIFO ring buffer [Vt, semppl_queue_size, D] of the L2-normalised
    target projections of earlier labelled rows (every rank's, in gathered order: identical on every
    rank); allocated on first use. Its filled rows are the first ``semppl_len``."""
    semppl_labels: torch.Tensor | None = None
    """[semppl_queue_size] int64 labels of ``semppl_queue``'s rows, -1 for an empty slot."""
    semppl_len: int = 0
    """Filled rows of ``semppl_queue`` (grows to semppl_queue_size)."""
    semppl_ptr: int = 0
    """Next row of ``semppl_queue`` to overwrite."""
    pseudo_labels: torch.Tensor | None = None
    """SemPPL: the last step's (pseudo-)labels of this rank's B samples, [B] int64 (the label of a
    labelled sample, the kNN vote of an unlabelled one, -1 where the labelled queue was still
    empty), for monitoring; None before a SemPPL step. Not saved (a function of the step)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Caller-owned values saved with the state (e.g. the cluster's data-loader position)."""

    @property
    def online(self) -> nn.Module:
        """The online network without its DDP wrapper."""
        return self.model.module if isinstance(self.model, DistributedDataParallel) else self.model

    @property
    def total_steps(self) -> int:
        return int(self.lr_schedule.shape[0])

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    @property
    def batch_in_epoch(self) -> int:
        """Batches of the current epoch already consumed (where the data loader resumes)."""
        return self.step % self.steps_per_epoch

    def state_dict(self) -> dict[str, Any]:
        """A checkpoint (tensors are references: ``torch.save`` it or deep-copy it)."""
        return {
            "model": self.online.state_dict(),
            "target": None if self.target is None else self.target.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": self.step,
            "samples_seen": self.samples_seen,
            "samples_in_epoch": self.samples_in_epoch,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "queue": None if self.queue is None else self.queue.clone(),  # not the whole contrast buffer
            "queue_len": self.queue_len,
            "queue_ptr": self.queue_ptr,
            "semppl_queue": None if self.semppl_queue is None else self.semppl_queue.clone(),
            "semppl_labels": None if self.semppl_labels is None else self.semppl_labels.clone(),
            "semppl_len": self.semppl_len,
            "semppl_ptr": self.semppl_ptr,
            "extra": self.extra,
            "rng": rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict()``; the next ``train_step`` is bit-identical to the uninterrupted run."""
        for key, expected in (("steps_per_epoch", self.steps_per_epoch), ("total_steps", self.total_steps)):
            if state[key] != expected:
                raise ValueError(
                    f"checkpoint {key} is {state[key]}, this run's is {expected}: the data or schedule "
                    f"changed, so the run cannot resume exactly"
                )
        if (state["target"] is None) != (self.target is None):
            raise ValueError(
                f"checkpoint target network is {'absent' if state['target'] is None else 'an EMA'}, "
                f"this run's objective.target is {self.objective.target!r}"
            )
        self.online.load_state_dict(state["model"])
        if self.target is not None:
            self.target.load_state_dict(state["target"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = state["step"]
        self.samples_seen = state["samples_seen"]
        self.samples_in_epoch = state["samples_in_epoch"]
        self.queue = None if state["queue"] is None else state["queue"].to(self.device, copy=True)
        self.contrast = None
        self.queue_len = state["queue_len"]
        self.queue_ptr = state["queue_ptr"]
        # .get: checkpoints written before SemPPL existed hold no labelled queue
        sem_queue, sem_labels = state.get("semppl_queue"), state.get("semppl_labels")
        self.semppl_queue = None if sem_queue is None else sem_queue.to(self.device, copy=True)
        self.semppl_labels = None if sem_labels is None else sem_labels.to(self.device, copy=True)
        self.semppl_len = state.get("semppl_len", 0)
        self.semppl_ptr = state.get("semppl_ptr", 0)
        self.pseudo_labels = None
        self.extra = dict(state["extra"])
        set_rng_state(state["rng"])


def rng_state() -> dict[str, Any]:
    """Every random generator a step or a data pipeline in this process may draw from, as tensors and
    plain Python values only, so that a checkpoint loads with ``torch.load(weights_only=True)``."""
    kind, key, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": {
            "kind": str(kind),
            "key": torch.from_numpy(key.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    legacy = state["numpy"]
    np.random.set_state(
        (
            legacy["kind"],
            legacy["key"].numpy().astype(np.uint32),
            legacy["pos"],
            legacy["has_gauss"],
            legacy["cached_gaussian"],
        )
    )
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def build_train_state(
    model_cfg: ModelConfig,
    objective_cfg: ObjectiveConfig,
    optim_cfg: OptimConfig,
    schedule_cfg: ScheduleConfig,
    *,
    steps_per_epoch: int,
    global_batch: int,
    device: str | torch.device = "cpu",
    seed: int | None = None,
    model: nn.Module | None = None,
) -> TrainState:
    """A fresh state: online network, EMA target (if ``objective_cfg.target == "ema"``), optimiser and
    the per-step schedules for ``schedule_cfg.epochs * steps_per_epoch`` steps.

    ``global_batch`` is the batch summed over all ranks (for the learning-rate scaling). ``seed``, if
    given, seeds torch before the weights are initialised (every rank must build identical weights).
    ``model`` replaces the network ``model_cfg`` describes (any module mapping a list of views to a
    list of projections, e.g. a custom encoder in a ``ReLICModel``); the other ``model_cfg`` fields
    still apply.
    SyncBatchNorm conversion (``model_cfg.sync_batchnorm``) happens here, before the optimiser sees
    the parameters; wrap ``state.model`` in DDP afterwards.
    """
    if seed is not None:
        torch.manual_seed(seed)
    device = torch.device(device)
    if model is None:
        model = build_model(model_cfg)
    if model_cfg.sync_batchnorm:
        if device.type == "cpu" and distributed.world_size() > 1:
            raise ValueError(
                "model.sync_batchnorm: expected a CUDA device (PyTorch synchronises BatchNorm only on "
                f"GPUs), got device {device} with {distributed.world_size()} processes; set it to false"
            )
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    target = EMATarget(model) if objective_cfg.target == "ema" else None
    lrs = lr_schedule(optim_cfg, schedule_cfg, steps_per_epoch=steps_per_epoch, global_batch=global_batch)
    return TrainState(
        model=model,
        target=target,
        optimizer=build_optimizer(model, optim_cfg, global_batch),
        objective=objective_cfg,
        lr_schedule=lrs,
        momentum_schedule=momentum_schedule(
            objective_cfg.base_momentum, objective_cfg.final_momentum, lrs.shape[0]
        ),
        steps_per_epoch=steps_per_epoch,
        device=device,
        bf16=model_cfg.bf16,
        grad_clip=optim_cfg.grad_clip,
        seed=0 if seed is None else seed,
    )


def relic_objective(
    state: TrainState, online: list[torch.Tensor], target: list[torch.Tensor]
) -> tuple[LossTerms, torch.Tensor]:
    """Gather the targets from every rank, extend them by the queue and apply ``relic_loss``.

    Returns the loss terms and the gathered targets [Vt, B * world, D] (detached, for the queue).
    With the online network as target the gather carries gradient (``gather_with_grad``).
    ``state.objective.pairs`` and ``.negatives`` go to ``relic_loss``. The negatives are drawn from a
    generator seeded by (``state.seed``, step, rank) — a function of the position alone, so a resumed
    run draws what the uninterrupted one drew, and the ranks draw independently (their global
    generators are identical: every rank seeds the same weights) — out of the gathered batch plus the
    queue rows filled so far; while the queue fills, an ``n_e`` above those rows minus one uses them all.
    """
    cfg = state.objective
    gathered = _gather_targets(state, target)
    contrast = _contrast_set(state, gathered)
    terms = relic_loss(
        online,
        contrast,
        temperature=cfg.temperature,
        alpha=cfg.alpha,
        offset=distributed.rank() * online[0].shape[0],
        kl_stop_grad=cfg.kl_stop_grad,
        target_normalized=True,
        pairs=cfg.pairs,
        negatives=None if cfg.negatives is None else min(cfg.negatives, contrast.shape[1] - 1),
        generator=None if cfg.negatives is None else _negatives_generator(state, contrast.device),
    )
    return terms, contrast[:, : gathered.shape[1]].detach()


def _gather_targets(state: TrainState, target: list[torch.Tensor]) -> torch.Tensor:
    """[Vt, N, D] target projections of every rank (with gradient when the target is the online network)."""
    local = torch.stack(target, dim=1)  # [B, Vt, D]: one collective for all target views
    gathered = distributed.gather(local) if state.target is not None else distributed.gather_with_grad(local)
    return gathered.transpose(0, 1)  # [Vt, N, D]


def _contrast_set(state: TrainState, gathered: torch.Tensor) -> torch.Tensor:
    """The normalised gathered batch [Vt, N, D], followed by the queue's filled rows if there is a queue."""
    if not state.objective.queue_size:
        return F.normalize(gathered, dim=-1)
    # The normalised batch goes in front of the (normalised) queue in one buffer: no per-step copy or
    # normalisation of the queue. The buffer is used through a fresh detached alias, so this step's
    # autograd history (the in-place copy) never sticks to ``state.contrast``.
    buffer = _contrast_buffer(state, gathered).detach()
    rows = gathered.shape[1]
    buffer[:, :rows] = F.normalize(gathered, dim=-1)
    return buffer[:, : rows + state.queue_len]


def semppl_objective(
    state: TrainState, online: list[torch.Tensor], target: list[torch.Tensor], labels: torch.Tensor
) -> tuple[SemPPLTerms, torch.Tensor, torch.Tensor]:
    """SemPPL (``training.semppl``): gather targets and labels, pseudo-label, draw, ``semppl_loss``.

    Returns the terms, the gathered normalised targets [Vt, N, D] (detached, for both queues) and the
    gathered labels [N]; sets ``state.pseudo_labels`` to this rank's slice of the pseudo-labels.

    1. Gather the targets (as ``relic_objective``) and the labels ``labels`` [B] (one more collective).
    2. Contrast set: the normalised gathered batch, the MoCo queue's filled rows (``queue_size`` > 0),
       then the labelled queue's ``semppl_len`` filled rows (none while it is empty, so that without
       labels the contrast set, hence the loss, is ReLIC's exactly).
    3. Pseudo-labels of the N gathered rows: ``knn_pseudo_labels`` against the labelled queue with
       ``semppl_knn_k``; identical on every rank.
    4. Semantic positives of the N gathered rows: ``draw_semantic_positives`` with ``semppl_positives``
       from a generator seeded by (``state.seed``, step) alone — not the rank — so every rank draws
       the same [N, n_s] and takes its own anchors' rows ``[rank * B, (rank + 1) * B)``: the
       selection does not depend on the number of ranks.
    5. ``semppl_loss`` with ``semantic_denominator`` = (anchors with a positive among all N) / world,
       so the mean over ranks is the global batch's mean.
    """
    cfg = state.objective
    if cfg.negatives is not None:
        raise ValueError(
            "objective.negatives must be None with objective.name='semppl' (semantic positives must "
            f"stay in every anchor's softmax), got {cfg.negatives}"
        )
    batch = online[0].shape[0]
    gathered = _gather_targets(state, target)
    all_labels = distributed.gather(labels.to(gathered.device, torch.long))  # [N]
    contrast = _contrast_set(state, gathered)
    rows = gathered.shape[1]
    queue_offset = contrast.shape[1]
    if state.semppl_queue is not None and state.semppl_len > 0:
        sem_rows = state.semppl_queue[:, : state.semppl_len]
        sem_labels = state.semppl_labels[: state.semppl_len]
        contrast = torch.cat([contrast, sem_rows.to(contrast.dtype)], dim=1)
    else:
        dim = gathered.shape[2]
        sem_rows = gathered.new_zeros(gathered.shape[0], 0, dim)
        sem_labels = all_labels.new_zeros(0)
    with torch.no_grad():
        pseudo = knn_pseudo_labels(
            contrast[:, :rows].detach(), all_labels, sem_rows, sem_labels, cfg.semppl_knn_k
        )
        positives = draw_semantic_positives(
            pseudo,
            sem_labels,
            cfg.semppl_positives,
            queue_offset=queue_offset,
            generator=_semppl_generator(state, contrast.device),
        )
    offset = distributed.rank() * batch
    anchors_with_positives = int((positives >= 0).any(1).sum())
    terms = semppl_loss(
        online,
        contrast,
        positives=positives[offset : offset + batch],
        temperature=cfg.temperature,
        alpha=cfg.alpha,
        weight=cfg.semppl_weight,
        offset=offset,
        kl_stop_grad=cfg.kl_stop_grad,
        target_normalized=True,
        pairs=cfg.pairs,
        semantic_denominator=max(anchors_with_positives, 1) / distributed.world_size(),
    )
    state.pseudo_labels = pseudo[offset : offset + batch].clone()
    return terms, contrast[:, :rows].detach(), all_labels


def _semppl_generator(state: TrainState, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded by (run seed, step) alone, identical on every rank: the
    negatives' seed (``_negatives_generator``) with the rank slot 1_000_002, which no rank uses."""
    seed = ((state.seed * 1_000_003 + state.step) * 1_000_003 + 1_000_002) % (1 << 63)
    return torch.Generator(device=device).manual_seed(seed)


def _negatives_generator(state: TrainState, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded by (run seed, step, rank)."""
    seed = ((state.seed * 1_000_003 + state.step) * 1_000_003 + distributed.rank()) % (1 << 63)
    return torch.Generator(device=device).manual_seed(seed)


def _contrast_buffer(state: TrainState, gathered: torch.Tensor) -> torch.Tensor:
    """``state.contrast`` for this batch shape, with ``state.queue`` living in its tail (copied in
    when the queue was set from elsewhere: a checkpoint, a test; its rows are normalised already)."""
    views, rows, dim = gathered.shape
    size = state.objective.queue_size
    buffer = state.contrast
    if (
        buffer is not None
        and buffer.shape == (views, rows + size, dim)
        and state.queue is not None
        and state.queue.data_ptr() == buffer[:, rows:].data_ptr()
        and state.queue.shape == (views, size, dim)
    ):
        return buffer
    buffer = torch.zeros(views, rows + size, dim, dtype=torch.float32, device=gathered.device)
    if state.queue is not None:
        if tuple(state.queue.shape) != (views, size, dim):
            raise ValueError(
                f"queue has shape {list(state.queue.shape)}, expected [Vt, queue_size, D] = "
                f"{[views, size, dim]}"
            )
        buffer[:, rows:] = state.queue
    state.contrast, state.queue = buffer, buffer[:, rows:]
    return buffer


def enqueue(state: TrainState, gathered: torch.Tensor) -> None:
    """Write [Vt, N, D] (normalised target rows, as ``relic_objective`` returns them) into the FIFO
    ring buffer, overwriting the oldest rows."""
    size = state.objective.queue_size
    if size == 0:
        return
    if state.queue is None:
        views, _, dim = gathered.shape
        state.queue = torch.zeros(views, size, dim, dtype=torch.float32, device=gathered.device)
    gathered = gathered[:, -size:]
    rows = (state.queue_ptr + torch.arange(gathered.shape[1], device=gathered.device)) % size
    state.queue.index_copy_(1, rows, gathered.to(state.queue.dtype))
    state.queue_len = min(size, state.queue_len + gathered.shape[1])
    state.queue_ptr = (state.queue_ptr + gathered.shape[1]) % size


def enqueue_labelled(state: TrainState, gathered: torch.Tensor, labels: torch.Tensor) -> None:
    """Write the labelled rows (``labels`` [N] >= 0) of [Vt, N, D] (normalised target rows, as
    ``semppl_objective`` returns them) into SemPPL's labelled FIFO, in gathered order, overwriting
    the oldest rows; beyond ``semppl_queue_size`` labelled rows in one batch, the last ones are kept."""
    size = state.objective.semppl_queue_size
    if state.semppl_queue is None:
        views, _, dim = gathered.shape
        state.semppl_queue = torch.zeros(views, size, dim, dtype=torch.float32, device=gathered.device)
        state.semppl_labels = torch.full((size,), -1, dtype=torch.long, device=gathered.device)
    keep = labels >= 0
    rows, kept = gathered[:, keep][:, -size:], labels[keep][-size:]
    count = kept.shape[0]
    if count == 0:
        return
    slots = (state.semppl_ptr + torch.arange(count, device=gathered.device)) % size
    state.semppl_queue.index_copy_(1, slots, rows.to(state.semppl_queue.dtype))
    state.semppl_labels.index_copy_(0, slots, kept.to(state.semppl_labels.device))
    state.semppl_len = min(size, state.semppl_len + count)
    state.semppl_ptr = (state.semppl_ptr + count) % size


def batch_labels(batch: Batch, size: int, device: torch.device) -> torch.Tensor:
    """``batch.labels`` as an int64 tensor [B] on ``device``, after checking it is there and fits."""
    labels = getattr(batch, "labels", None)
    if labels is None:
        raise ValueError(
            "objective.name='semppl' needs the batch's labels: the batch has no 'labels' attribute "
            "(expected [B] integers, -1 = unlabelled, as pipeline.loader.ViewBatch carries them)"
        )
    labels = torch.as_tensor(labels)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"batch.labels must hold integers (-1 = unlabelled), got dtype {labels.dtype}")
    if tuple(labels.shape) != (size,):
        raise ValueError(f"batch.labels must have shape [B] = [{size}], got {list(labels.shape)}")
    return labels.to(device, torch.long, non_blocking=True)


def check_views(batch: Batch) -> int:
    """``batch.num_large``, after checking it against the views: at least one, at most all of them,
    and the large views of one shape (the target network sees them as one contrast set)."""
    large, views = int(batch.num_large), batch.views
    if not 1 <= large <= len(views):
        raise ValueError(f"batch.num_large is {large}, expected 1..{len(views)} (the number of views)")
    shapes = [tuple(v.shape) for v in views[:large]]
    if len(set(shapes)) != 1:
        raise ValueError(f"the {large} large views must share one shape, got {shapes}")
    return large


def train_step(state: TrainState, batch: Batch, *, objective: Objective | None = None) -> dict[str, float]:
    """Forward every view, ReLIC (or SemPPL) loss, backward, optimiser step, EMA update, queue update.

    Returns floats averaged over ranks: ``loss`` (= ``total``), ``contrastive``, ``invariance``,
    ``semantic`` (SemPPL's semantic term; 0.0 for ReLIC), and the step's ``lr`` and EMA ``momentum``
    (0.0 when the target is the online network). With ``objective.name == "semppl"`` the batch must
    carry ``labels``, the labelled queue is updated after the step, and ``state.pseudo_labels`` holds
    this rank's [B] pseudo-labels of the step (for monitoring; the objective never sees true labels
    of unlabelled samples). Raises
    ``NonFiniteLossError`` naming the step and the term when a loss term is NaN or infinite (on every
    rank together, before any parameter changes; BatchNorm running statistics may already hold the
    bad batch, so resume from a checkpoint). ``objective`` replaces the ReLIC objective (gather,
    queue, loss and EMA update) by a plain function of (online, local target) projections: for
    baselines and benchmarks.
    """
    if state.step >= state.total_steps:
        raise RuntimeError(
            f"step {state.step} is past the end of the schedule ({state.total_steps} steps = "
            f"epochs x {state.steps_per_epoch} steps per epoch)"
        )
    large = check_views(batch)
    semppl = objective is None and state.objective.name == "semppl"
    labels = batch_labels(batch, batch.views[0].shape[0], state.device) if semppl else None
    views: Sequence[torch.Tensor] = [v.to(state.device, non_blocking=True) for v in batch.views]
    state.model.train()
    autocast = torch.autocast(
        "cuda", dtype=torch.bfloat16, enabled=state.bf16 and state.device.type == "cuda"
    )
    with autocast:
        online = state.model(views)
        if state.target is None:
            target = online[:large]
        else:
            state.target.train()
            target = state.target(views[:large])
    online = [o.float() for o in online]
    target = [t.float() for t in target]

    gathered_labels = None
    if semppl:
        terms, gathered, gathered_labels = semppl_objective(state, online, target, labels)
    elif objective is None:
        terms, gathered = relic_objective(state, online, target)
    else:
        terms, gathered = objective(online, target), None
    values = distributed.all_reduce_mean(torch.stack([t.detach() for t in terms])).tolist()
    metrics = {"semantic": 0.0, **dict(zip(terms._fields, values))}
    for name in ("contrastive", "invariance", "semantic", "total"):
        if not np.isfinite(metrics[name]):
            raise NonFiniteLossError(
                f"non-finite {name} loss ({metrics[name]}) at step {state.step} (epoch {state.epoch}, "
                f"batch {state.batch_in_epoch}); check the input batch and lower the learning rate"
            )

    lr = float(state.lr_schedule[state.step])
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    state.optimizer.zero_grad(set_to_none=True)
    terms.total.backward()
    if state.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(state.online.parameters(), state.grad_clip)
    state.optimizer.step()

    momentum = 0.0
    if objective is None:
        if state.target is not None:
            momentum = float(state.momentum_schedule[state.step])
            state.target.update(state.online, momentum)
        enqueue(state, gathered)
        if semppl:
            enqueue_labelled(state, gathered, gathered_labels)

    global_batch = views[0].shape[0] * distributed.world_size()
    if state.batch_in_epoch == 0:
        state.samples_in_epoch = 0
    state.step += 1
    state.samples_seen += global_batch
    state.samples_in_epoch += global_batch
    return {
        "loss": metrics["total"],
        **{k: metrics[k] for k in (*LossTerms._fields, "semantic")},
        "lr": lr,
        "momentum": momentum,
    }
