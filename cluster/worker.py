"""The per-worker training loop that Ray Train runs on every rank (``train_loop``).

Each worker:

1. reads its world rank, world size and local rank from ``ray.train.get_context()``;
2. builds its ``ShardReader`` on its share of the shards (``pipeline.reader``: rank ``r`` of ``world``
   takes a disjoint, equal block of each epoch) and its ``ViewLoader`` (DALI, on its device);
3. builds the ``TrainState`` (same seed on every rank -> identical initial weights), restores it from
   ``ray.train.get_checkpoint()`` when Ray hands one over (a restart after a failure, or a new run
   with the name of an existing one), then wraps the online network in DDP (gloo on CPU, nccl on GPU);
4. trains. The epoch is consumed in *segments* that end at epoch ends, every
   ``run.checkpoint_every`` steps and at the last step; checkpoints are written at segment ends
   (every ``run.checkpoint_every`` steps, every ``run.checkpoint_every_epochs``-th epoch end, the
   last step), so every checkpoint is the start of a segment. Each segment is one
   ``loader.epoch(epoch, start_batch)`` call, so a run resumed from a checkpoint asks the loader for
   exactly the same segment as the uninterrupted run did: same samples (the reader's resume
   contract) and same augmentations (the loader seeds DALI from (seed, rank, epoch, start_batch)).
   The cost is a pipeline rebuild per segment (per epoch, and per checkpoint within one).
5. every ``run.report_every`` steps and at every segment end the ranks report metrics, aggregated
   across ranks first: loss terms (mean), lr, EMA momentum, images/s (sum), data-wait fraction
   (mean), skipped samples by reason (sum); rank 0 writes TensorBoard events. Under ``fit`` the
   metrics go from rank 0 straight to the driver's report sink (one fire-and-forget actor call), and
   ``ray.train.report`` — a barrier across ranks plus a hand-over to the controller's next poll — is
   called at segment ends only (epoch ends, checkpoints, the last step), by every rank the same
   number of times, as Ray requires; rank 0 attaches the checkpoint there. Without a sink (the loop
   run by some other TorchTrainer) every metrics point is a ``ray.train.report``. The checkpoint
   uploads in the background (``CheckpointUploadMode.ASYNC``) while training goes on; rank 0 waits
   for its commit before its next ``ray.train.report`` (see ``RaySession.report``).
6. at the end of every ``run.knn_every``-th epoch, when ``data.knn_val`` is set, rank 0 runs the
   online kNN monitor (frozen encoder features, weighted kNN; ``training.evaluate``).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

#: How long rank 0 waits for Ray Train to commit a checkpoint it reported before training goes on.
COMMIT_TIMEOUT_S = 600.0

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class StepInfo:
    """What a worker hook sees after each step (``hook.on_step(info)``) and before the first one
    (``hook.on_start(info)``, with ``metrics`` None)."""

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


class _KeyTap:
    """Wraps a reader and queues the sample keys of every raw batch it hands to the loader, so that
    each trained ``ViewBatch`` (1:1, in order) can be matched with its keys."""

    def __init__(self, reader: Any) -> None:
        self._reader = reader
        # per segment: the loader reads the next segment ahead while this one is being trained
        self.pending: dict[tuple[int, int], collections.deque[list[str]]] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reader, name)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Any]:
        keys = self.pending[(epoch, start_batch)] = collections.deque()
        for raw in self._reader.epoch(epoch, start_batch):
            keys.append(list(raw.keys))
            yield raw

    def take(self, epoch: int, start_batch: int) -> list[str] | None:
        """The keys of the next batch trained from segment ``(epoch, start_batch)``."""
        keys = self.pending.get((epoch, start_batch))
        return keys.popleft() if keys else None


def segment_end(step: int, *, steps_per_epoch: int, checkpoint_every: int, end_step: int) -> int:
    """The first segment boundary after ``step``: the epoch end, the next multiple of
    ``checkpoint_every`` (0: none) or ``end_step``, whichever comes first."""
    stop = min((step // steps_per_epoch + 1) * steps_per_epoch, end_step)
    if checkpoint_every:
        stop = min(stop, (step // checkpoint_every + 1) * checkpoint_every)
    return stop


def checkpoint_due(
    step: int, *, steps_per_epoch: int, checkpoint_every: int, checkpoint_every_epochs: int, end_step: int
) -> bool:
    """Whether a checkpoint is written after ``step`` steps: at ``end_step``, at multiples of
    ``checkpoint_every`` and at the end of every ``checkpoint_every_epochs``-th epoch (0: none)."""
    if step == end_step or (checkpoint_every and step % checkpoint_every == 0):
        return True
    epochs, within = divmod(step, steps_per_epoch)
    return within == 0 and bool(checkpoint_every_epochs) and epochs % checkpoint_every_epochs == 0


class _Meter:
    """Time and images since the last report on this rank."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.wait = 0.0
        self.busy = 0.0
        self.images = 0
        self.started = time.perf_counter()

    def local(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        return {"wait": self.wait, "busy": self.busy, "elapsed": elapsed, "images": self.images}


def _gather_objects(obj: Any) -> list[Any]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def aggregate(per_rank: list[dict[str, Any]], skip_reasons: tuple[str, ...]) -> dict[str, float]:
    """Cross-rank report values: throughput summed, wait fraction averaged, skip counters summed."""
    out: dict[str, float] = {}
    out["images_per_s"] = float(sum(r["images"] / r["elapsed"] for r in per_rank))
    out["data_wait_fraction"] = float(np.mean([r["wait"] / r["elapsed"] for r in per_rank]))
    total = 0
    for reason in skip_reasons:
        count = int(sum(r["stats"].get(reason, 0) for r in per_rank))
        out[f"skipped/{reason}"] = count
        total += count
    out["skipped_total"] = total
    out["filled"] = int(sum(r["stats"].get("filled", 0) for r in per_rank))
    return out


# --------------------------------------------------------------------------------------------------
# kNN monitor


class KNNMonitor:
    """Weighted kNN accuracy of the frozen encoder: bank = ``knn_train``, queries = ``knn_val``."""

    def __init__(
        self, cfg: Any, recipe: Any, options: dict[str, dict[str, Any]], device: torch.device
    ) -> None:
        view = recipe.views[0]
        self.size, self.mean, self.std = view.size, view.mean, view.std
        self.cfg, self.options, self.device = cfg, options, device
        self._data: tuple | None = None

    def _load(self) -> tuple:
        from cluster.labelled import load_labelled_images

        if self._data is None:
            d = self.cfg.data
            kw = {"size": self.size, "max_samples": d.knn_max_samples}
            bank = load_labelled_images(
                d.knn_train or d.train, storage_options=self.options["knn_train"], **kw
            )
            query = load_labelled_images(d.knn_val, storage_options=self.options["knn_val"], **kw)
            self._data = (*bank, *query)
        return self._data

    def accuracy(self, encoder: torch.nn.Module) -> float:
        from training.evaluate import extract_features, knn_classify

        bank_x, bank_y, query_x, query_y = self._load()
        kw = {"device": self.device, "batch_size": 256, "mean": self.mean, "std": self.std}
        bank_f, _ = extract_features(encoder, bank_x, **kw)
        query_f, _ = extract_features(encoder, query_x, **kw)
        return knn_classify(
            bank_f, bank_y, query_f, query_y, k=self.cfg.run.knn_k, temperature=self.cfg.run.knn_temperature
        )


# --------------------------------------------------------------------------------------------------
# TensorBoard


class _TensorBoard:
    """Rank 0's event files: written straight into the run directory when it is local, else into a
    local directory that is uploaded to ``<run_dir>/tensorboard`` at every checkpoint and at the end."""

    def __init__(self, run_dir: str, storage_options: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        from cluster.storage import RunStorage
        from pipeline import storage as fsutil

        self.remote = fsutil.is_remote(run_dir)
        self.target = fsutil.join(run_dir, "tensorboard")
        self.storage = RunStorage(url=run_dir, options=storage_options)
        self.local = tempfile.mkdtemp(prefix="relic-tb-") if self.remote else self.target
        self.writer = SummaryWriter(self.local)

    def scalars(self, metrics: dict[str, Any], step: int) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def sync(self) -> None:
        if self.remote:
            self.writer.flush()
            self.storage.upload_dir(self.local, self.target)

    def close(self) -> None:
        self.writer.close()
        self.sync()
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Where the loop runs: inside Ray Train, or directly in this process (benchmarks, debugging)


class RaySession:
    """The loop's view of Ray Train: rank/world/device from the context, the checkpoint to resume
    from, and ``report`` (every rank, at the same points; a checkpoint directory from rank 0, which
    the session then owns and deletes once it is uploaded).

    ``sink``: the driver's report sink (an actor handle, ``cluster.trainer.fit``). With one, the
    metrics of every report go from rank 0 to the sink, and only segment ends become
    ``ray.train.report`` calls (see the module doc); without one, every report is one."""

    def __init__(self, use_gpu: bool, sink: Any = None) -> None:
        import ray
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world_size, self.local_rank = (
            ctx.get_world_rank(),
            ctx.get_world_size(),
            ctx.get_local_rank(),
        )
        self.node_id = ray.get_runtime_context().get_node_id()
        if use_gpu:
            import ray.train.torch

            self.device = ray.train.torch.get_device()
        else:
            self.device = torch.device("cpu")
        self.sink = sink
        self._uncommitted = False

    @contextlib.contextmanager
    def checkpoint_dir(self) -> Iterator[tuple[str, str] | tuple[None, None]]:
        """``(local directory, description)`` of the checkpoint to resume from, or ``(None, None)``."""
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None, None
            return
        with checkpoint.as_directory() as directory:
            yield directory, checkpoint.path

    def report(
        self,
        metrics: dict[str, Any],
        checkpoint_dir: str | None = None,
        name: str | None = None,
        *,
        at_segment_end: bool = True,
    ) -> None:
        import ray.train

        if self.sink is not None:
            if self.rank == 0:
                # fire and forget; calls from one caller run in order, so the driver sees every step
                self.sink.push.remote({"kind": "report", "metrics": metrics})
            if not at_segment_end:
                return
        if self._uncommitted:
            # A checkpoint is committed once its upload has finished and the controller has polled
            # the report that carries it (a worker that dies before that restarts from the checkpoint
            # before). Before its next ray.train.report — the next segment end — rank 0 waits for that
            # commit, so that at most one checkpoint is in flight however slow the storage. Waiting
            # at the next metrics report instead stalled training whenever that came sooner than
            # upload + poll: in benchmarks/ray_overhead.py, where it comes two steps (0.3 s) after the
            # checkpoint, 20 ms per checkpoint in the median and up to 1.1 s. (The other ranks wait
            # at the barrier inside ray.train.report.)
            ray.train.get_all_reported_checkpoints(
                consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=COMMIT_TIMEOUT_S
            )
            self._uncommitted = False
        if name is None:
            ray.train.report(metrics)
            return
        if checkpoint_dir is None:
            ray.train.report(metrics, checkpoint_dir_name=name)
            return
        # ASYNC: Ray copies the directory to storage in a background thread and deletes it after,
        # so training goes on while a checkpoint uploads (to S3 that is most of its cost). The
        # commit wait above holds before the next ray.train.report, and Ray flushes the uploads
        # when the training function returns.
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir),
            checkpoint_dir_name=name,
            checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
            delete_local_checkpoint_after_upload=True,
        )
        self._uncommitted = True


class LocalSession:
    """The same loop in this process, without Ray: one rank; checkpoints are copied into ``run_dir``
    (local), where the next LocalSession on the same directory resumes from the newest one."""

    def __init__(self, run_dir: str, device: str | torch.device = "cpu") -> None:
        self.rank, self.world_size, self.local_rank, self.node_id = 0, 1, 0, "local"
        self.device = torch.device(device)
        self.run_dir = run_dir
        self.reports: list[dict[str, Any]] = []

    @contextlib.contextmanager
    def checkpoint_dir(self) -> Iterator[tuple[str, str] | tuple[None, None]]:
        from cluster.checkpoint import latest_checkpoint

        found = latest_checkpoint(self.run_dir)
        yield (found, found) if found else (None, None)

    def report(
        self,
        metrics: dict[str, Any],
        checkpoint_dir: str | None = None,
        name: str | None = None,
        *,
        at_segment_end: bool = True,
    ) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir and name:
            # Owned by the session: moved into place (a rename on the same filesystem).
            target = os.path.join(self.run_dir, name)
            shutil.rmtree(target, ignore_errors=True)
            shutil.move(checkpoint_dir, target)


# --------------------------------------------------------------------------------------------------
# The loop


def train_loop(loop_config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker`` (see module doc). ``loop_config`` is built by
    ``cluster.trainer.make_loop_config``: the resolved config as a dict, the run directory, storage options."""
    from cluster.config import config_from_dict

    cfg = config_from_dict(loop_config["config"])
    run_loop(loop_config, RaySession(cfg.scaling.use_gpu, sink=loop_config.get("sink")))


def run_loop(loop_config: dict[str, Any], session: Any) -> None:
    """The training loop of one rank, given its session (``RaySession`` or ``LocalSession``)."""
    from torch.nn.parallel import DistributedDataParallel

    from cluster import checkpoint as ckpt
    from cluster.config import config_from_dict
    from pipeline.augment import preset
    from pipeline.loader import ViewLoader
    from pipeline.reader import SKIP_REASONS, ShardReader
    from training.loop import build_train_state, train_step

    cfg = config_from_dict(loop_config["config"])
    hooks = list(loop_config.get("hooks") or [])
    rank, world, local_rank, device = session.rank, session.world_size, session.local_rank, session.device
    if device.type == "cpu":
        torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    options = loop_config["data_storage_options"]
    # The global batch is split over the ranks actually running (the config's num_workers under Ray).
    batch_size = cfg.data.global_batch_size // world

    reader = ShardReader(
        cfg.data.train,
        batch_size=batch_size,
        rank=rank,
        world_size=world,
        num_workers=cfg.data.reader_workers,
        seed=cfg.run.seed,
        shuffle_buffer=cfg.data.shuffle_buffer,
        storage_options=options["train"],
    )
    source = _KeyTap(reader) if hooks else reader
    recipe = preset(cfg.views.preset, **cfg.views.options)
    loader = ViewLoader(
        source,
        recipe,
        device=device,
        seed=cfg.run.seed,
        num_threads=cfg.views.num_threads,
        dtype=_DTYPES[cfg.views.dtype],
        channels_last=cfg.model.channels_last,
        prefetch=cfg.views.prefetch,
    )
    state = build_train_state(
        cfg.model,
        cfg.objective,
        cfg.optim,
        cfg.schedule,
        steps_per_epoch=reader.batches_per_epoch,
        global_batch=cfg.data.global_batch_size,
        device=device,
        seed=cfg.run.seed,
    )
    restored_step = None
    with session.checkpoint_dir() as (directory, where):
        if directory is not None:
            meta = ckpt.restore(state, directory)
            restored_step = state.step
            if rank == 0:
                log.warning(
                    "resumed from %s at step %d (epoch %d, batch %d)",
                    where,
                    meta["step"],
                    state.epoch,
                    state.batch_in_epoch,
                )
    if world > 1:
        ids = [device.index] if device.type == "cuda" else None
        state.model = DistributedDataParallel(state.model, device_ids=ids)

    end_step = state.total_steps if cfg.run.max_steps is None else min(state.total_steps, cfg.run.max_steps)
    monitor = (
        KNNMonitor(cfg, recipe, options, device)
        if rank == 0 and cfg.data.knn_val and cfg.run.knn_every
        else None
    )
    tensorboard = (
        _TensorBoard(loop_config["run_dir"], loop_config["run_storage_options"])
        if (rank == 0 and cfg.run.tensorboard)
        else None
    )
    node_id = session.node_id

    def info(metrics: dict | None, keys: list[str] | None, batch: Any) -> StepInfo:
        return StepInfo(
            rank=rank,
            world_size=world,
            local_rank=local_rank,
            node_id=node_id,
            step=state.step,
            epoch=state.epoch if metrics is None else (state.step - 1) // state.steps_per_epoch,
            batch_in_epoch=state.batch_in_epoch,
            metrics=metrics,
            keys=keys,
            restored_step=restored_step,
            state=state,
            batch=batch,
        )

    for hook in hooks:
        if hasattr(hook, "on_start"):
            hook.on_start(info(None, None, None))

    meter = _Meter()
    last: dict[str, float] = {}
    try:
        while state.step < end_step:
            epoch, start = state.epoch, state.batch_in_epoch
            stop = segment_end(
                state.step,
                steps_per_epoch=state.steps_per_epoch,
                checkpoint_every=cfg.run.checkpoint_every,
                end_step=end_step,
            )
            batches = loader.epoch(epoch, start)
            if stop < end_step:  # the next segment is set up in the background meanwhile
                loader.prepare(stop // state.steps_per_epoch, stop % state.steps_per_epoch)
            try:
                while state.step < stop:
                    t0 = time.perf_counter()
                    batch = next(batches)
                    t1 = time.perf_counter()
                    last = train_step(state, batch)
                    meter.wait += t1 - t0
                    meter.busy += time.perf_counter() - t1
                    meter.images += batch_size
                    keys = source.take(epoch, start) if hooks else None
                    for hook in hooks:
                        hook.on_step(info(last, keys, batch))
                    at_checkpoint = state.step == stop and checkpoint_due(
                        state.step,
                        steps_per_epoch=state.steps_per_epoch,
                        checkpoint_every=cfg.run.checkpoint_every,
                        checkpoint_every_epochs=cfg.run.checkpoint_every_epochs,
                        end_step=end_step,
                    )
                    # Every segment end (epoch end, checkpoint, last step) is also a report.
                    if state.step % cfg.run.report_every == 0 or state.step == stop:
                        epoch_done = state.batch_in_epoch == 0
                        knn = None
                        if monitor is not None and epoch_done and state.epoch % cfg.run.knn_every == 0:
                            knn = monitor.accuracy(state.online.encoder)
                        _report(
                            session,
                            state,
                            last,
                            meter,
                            loader.stats,
                            cfg=cfg,
                            epoch=epoch,
                            checkpoint=at_checkpoint,
                            at_segment_end=state.step == stop,
                            knn=knn,
                            rank=rank,
                            world=world,
                            batch_size=batch_size,
                            git_sha=loop_config.get("git_sha", "unknown"),
                            tensorboard=tensorboard,
                            restored_step=restored_step,
                            skip_reasons=(*SKIP_REASONS, "decode_fallback"),
                        )
                        meter.reset()
            finally:
                batches.close()
                if hooks:
                    source.pending.pop((epoch, start), None)
    finally:
        loader.close()
        if tensorboard is not None:
            tensorboard.close()


def _report(
    session: Any,
    state: Any,
    last: dict[str, float],
    meter: _Meter,
    stats: dict[str, int],
    *,
    cfg: Any,
    epoch: int,
    checkpoint: bool,
    at_segment_end: bool,
    knn: float | None,
    rank: int,
    world: int,
    batch_size: int,
    git_sha: str,
    tensorboard: _TensorBoard | None,
    restored_step: int | None,
    skip_reasons: tuple[str, ...],
) -> None:
    """Aggregate across ranks, then ``report`` on every rank (rank 0 attaches the checkpoint)."""
    from cluster import checkpoint as ckpt

    per_rank = _gather_objects({**meter.local(), "stats": stats})
    metrics: dict[str, Any] = {
        "step": state.step,
        "epoch": epoch,
        "total_steps": state.total_steps
        if cfg.run.max_steps is None
        else min(state.total_steps, cfg.run.max_steps),
        "samples_seen": state.samples_seen,
        "loss": last["loss"],
        "contrastive": last["contrastive"],
        "invariance": last["invariance"],
        "lr": last["lr"],
        "momentum": last["momentum"],
        **aggregate(per_rank, skip_reasons),
        "restored_step": -1 if restored_step is None else restored_step,
    }
    if knn is not None:
        metrics["knn_accuracy"] = knn
    if tensorboard is not None:
        tensorboard.scalars(
            {k: v for k, v in metrics.items() if k not in ("step", "total_steps")}, state.step
        )
    name = ckpt.checkpoint_dir_name(state.step)
    if not checkpoint:
        session.report(metrics, at_segment_end=at_segment_end)
        return
    if rank != 0:
        session.report(metrics, None, name)  # a checkpoint is always at a segment end
        return
    if tensorboard is not None:
        tensorboard.sync()
    # The session takes ownership of the directory (uploads it in the background, or moves it).
    directory = tempfile.mkdtemp(prefix="relic-ckpt-")
    try:
        state.extra["data"] = {
            "epoch": state.epoch,
            "batch_in_epoch": state.batch_in_epoch,
            "world_size": world,
        }
        meta = ckpt.make_meta(state, git_sha=git_sha, world_size=world, batch_size=batch_size)
        ckpt.write_checkpoint(directory, state, cfg, meta)
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    session.report(metrics, directory, name)
