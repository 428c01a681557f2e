"""The per-worker training loop that Ray Train runs on every rank (``train_loop``).

Each worker reads its rank, world size and device from its session (``cluster.session``), streams
its share of the shards through its ``ShardReader`` and ``ViewLoader`` (``build_data``), builds the
``TrainState`` (same seed on every rank: identical initial weights), resumes it from the session's
checkpoint when there is one, wraps the online network in DDP (gloo on CPU, nccl on GPU) and trains.

The loop trains in *segments* that end at epoch ends, checkpoints and the last step. Each segment is
one ``loader.epoch(epoch, start_batch)`` call, so a run resumed from a checkpoint asks the loader for
exactly the segment the uninterrupted run did: the same samples (the reader's resume contract) and
the same augmentations (the loader seeds DALI from (seed, rank, epoch, start_batch)); the next
segment is set up in the background meanwhile. Every cadence lives in the component that owns it:
checkpoints and segments in ``cluster.checkpoint.Checkpointer``, reports in
``cluster.reporting.MetricsReporter``, the kNN monitor in ``cluster.monitor.KNNMonitor``, the
checkpoint on a termination notice in ``cluster.preemption.PreemptionMonitor``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from cluster.config import ExperimentConfig

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class DataOptions:
    """Storage options (endpoint, profile; never credentials) of each shard set a worker reads,
    resolved on the driver so that workers see the endpoints the user configured."""

    train: dict[str, Any] = field(default_factory=dict)
    knn_train: dict[str, Any] = field(default_factory=dict)
    knn_val: dict[str, Any] = field(default_factory=dict)
    true_labels: dict[str, Any] = field(default_factory=dict)


@dataclass
class WorkerSpec:
    """Everything a worker receives from the driver (``cluster.trainer.worker_spec``)."""

    config: ExperimentConfig
    run_dir: str
    """The experiment directory (local path or URL) checkpoints and TensorBoard files go to."""
    run_storage_options: dict[str, Any]
    data_options: DataOptions
    git_sha: str = "unknown"
    hooks: Sequence[Any] = ()
    """Objects with ``on_start(info)`` and/or ``on_step(info)`` (:class:`StepInfo`), run on every
    worker: fault-injection drills and tests."""
    sink: Any = None
    """The driver's report sink (an actor handle), or None."""


@dataclass
class StepInfo:
    """What a hook sees after each step (``on_step``) and before the first (``on_start``, with
    ``metrics`` and ``batch`` None)."""

    rank: int
    world_size: int
    local_rank: int
    node_id: str
    step: int
    epoch: int
    batch_in_epoch: int
    metrics: dict[str, float] | None
    keys: list[str] | None
    """Sample keys of the batch just trained on (this rank)."""
    restored_step: int | None
    """Step of the checkpoint this attempt started from, None for a fresh start."""
    state: Any
    batch: Any


class Hooks:
    """The spec's hooks, called with a :class:`StepInfo`."""

    def __init__(self, hooks: Sequence[Any], session: Any, restored_step: int | None) -> None:
        self.hooks, self.session, self.restored_step = list(hooks), session, restored_step

    def _info(self, state: Any, metrics: dict[str, float] | None, batch: Any) -> StepInfo:
        s = self.session
        return StepInfo(
            rank=s.rank,
            world_size=s.world_size,
            local_rank=s.local_rank,
            node_id=s.node_id,
            step=state.step,
            epoch=state.epoch if metrics is None else (state.step - 1) // state.steps_per_epoch,
            batch_in_epoch=state.batch_in_epoch,
            metrics=metrics,
            keys=None if batch is None else list(batch.keys),
            restored_step=self.restored_step,
            state=state,
            batch=batch,
        )

    def start(self, state: Any) -> None:
        for hook in self.hooks:
            if hasattr(hook, "on_start"):
                hook.on_start(self._info(state, None, None))

    def step(self, state: Any, metrics: dict[str, float], batch: Any) -> None:
        if self.hooks:
            info = self._info(state, metrics, batch)
            for hook in self.hooks:
                if hasattr(hook, "on_step"):
                    hook.on_step(info)


def build_data(spec: WorkerSpec, rank: int, world: int, device: torch.device) -> tuple[Any, Any, Any]:
    """``(reader, recipe, loader)`` of this rank: its partitions of the training shards, the view recipe
    and the DALI loader on its device. The global batch is split over the ranks actually running."""
    from pipeline.loader import ViewLoader
    from pipeline.reader import ShardReader

    cfg = spec.config
    if world not in cfg.world_sizes:
        raise RuntimeError(
            f"started with {world} workers, but this run can only use {cfg.world_sizes} (the numbers of "
            f"workers in scaling.num_workers={cfg.scaling.num_workers} that divide the "
            f"{cfg.partitions} data partitions)"
        )
    recipe = cfg.views.recipe()
    reader = ShardReader(
        cfg.data.train,
        batch_size=cfg.data.global_batch_size // world,
        rank=rank,
        world_size=world,
        num_workers=cfg.data.reader_workers,
        partitions=cfg.partitions,
        seed=cfg.run.seed,
        shuffle_buffer=cfg.data.shuffle_buffer,
        storage_options=spec.data_options.train,
        masks=recipe.mask_prob > 0,  # a recipe without masked views never reads a mask member
    )
    loader = ViewLoader(
        reader,
        recipe,
        device=device,
        seed=cfg.run.seed,
        num_threads=cfg.views.num_threads,
        dtype=_DTYPES[cfg.views.dtype],
        channels_last=cfg.model.channels_last,
        prefetch=cfg.views.prefetch,
    )
    return reader, recipe, loader


def segment(loader: Any, step: int, stop: int, steps_per_epoch: int, end_step: int) -> Iterator[Any]:
    """The batches of steps ``step .. stop-1`` (one loader segment); the segment after it is announced
    to the loader, which sets it up in the background."""
    batches = loader.epoch(step // steps_per_epoch, step % steps_per_epoch)
    if stop < end_step:
        loader.prepare(stop // steps_per_epoch, stop % steps_per_epoch)
    try:
        for _ in range(stop - step):
            yield next(batches)
    finally:
        batches.close()


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``: ``config["spec"]`` is the :class:`WorkerSpec`."""
    from cluster.session import RaySession

    spec: WorkerSpec = config["spec"]
    run_loop(spec, RaySession(spec.config.scaling.use_gpu, sink=spec.sink))


def run_loop(spec: WorkerSpec, session: Any) -> None:
    """The training loop of one rank, given its session (``RaySession`` or ``LocalSession``)."""
    from torch.nn.parallel import DistributedDataParallel

    from cluster.checkpoint import Checkpointer
    from cluster.monitor import KNNMonitor, PseudoLabelMonitor
    from cluster.preemption import PreemptionMonitor
    from cluster.reporting import MetricsReporter, TensorBoard
    from pipeline.reader import SKIP_REASONS
    from training.loop import build_train_state, train_step

    cfg, rank, world, device = spec.config, session.rank, session.world_size, session.device
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    reader, recipe, loader = build_data(spec, rank, world, device)
    per_epoch = reader.batches_per_epoch
    state = build_train_state(
        cfg.model,
        cfg.objective,
        cfg.optim,
        cfg.schedule,
        steps_per_epoch=per_epoch,
        global_batch=cfg.data.global_batch_size,
        device=device,
        seed=cfg.run.seed,
    )
    checkpointer = Checkpointer(
        cfg,
        session,
        run_dir=spec.run_dir,
        run_options=spec.run_storage_options,
        data_order=reader.order_facts,
        steps_per_epoch=per_epoch,
        total_steps=state.total_steps,
        batch_size=reader.batch_size,
        git_sha=spec.git_sha,
    )
    restored_step = checkpointer.restore(state)
    if world > 1:
        state.model = DistributedDataParallel(
            state.model, device_ids=[device.index] if device.type == "cuda" else None
        )
    end = checkpointer.end_step
    monitor = KNNMonitor.for_rank(
        rank,
        cfg,
        recipe,
        {"knn_train": spec.data_options.knn_train, "knn_val": spec.data_options.knn_val},
        device,
    )
    reporter = MetricsReporter(
        report_every=cfg.run.report_every,
        total_steps=end,
        batch_size=reader.batch_size,
        skip_reasons=(*SKIP_REASONS, "decode_fallback"),
        restored_step=restored_step,
        tensorboard=TensorBoard(spec.run_dir, spec.run_storage_options)
        if rank == 0 and cfg.run.tensorboard
        else None,
    )
    pseudo = PseudoLabelMonitor.for_config(cfg, spec.data_options.true_labels)
    hooks = Hooks(spec.hooks, session, restored_step)
    preemption = PreemptionMonitor(session)
    try:
        hooks.start(state)
        while state.step < end:
            epoch, stop = state.epoch, checkpointer.segment_end(state.step)
            for batch in reporter.timed(segment(loader, state.step, stop, per_epoch, end)):
                last = train_step(state, batch)
                if pseudo is not None:
                    pseudo.observe(state, batch)
                hooks.step(state, last, batch)
                reporting = reporter.due(state.step, stop)
                preempted = preemption.due(reporting)
                if not (reporting or preempted):
                    continue
                knn = (
                    monitor.accuracy(state.online.encoder)
                    if monitor and monitor.due(state.step, per_epoch)
                    else None
                )
                stats = {**loader.stats, **(pseudo.counts() if pseudo is not None else {})}
                metrics = reporter.collect(state, last, stats, epoch=epoch, knn=knn)
                checkpoint = None
                if preempted or (state.step == stop and checkpointer.due(state.step)):
                    reporter.sync()
                    checkpoint = checkpointer.write(state)
                session.report(metrics, checkpoint, at_segment_end=state.step == stop or preempted)
                if preempted:
                    preemption.stop(state.step)
    finally:
        preemption.close()
        loader.close()
        reporter.close()
