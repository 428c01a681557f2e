"""Where a worker loop runs: inside Ray Train (:class:`RaySession`) or in this process without Ray
(:class:`LocalSession`, for benchmarks and tests). Both give the loop its rank, world size and device,
the checkpoint to resume from, and ``report(metrics, checkpoint, at_segment_end)``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

T = TypeVar("T")

#: How long rank 0 waits for Ray Train to commit a checkpoint it reported before training goes on.
COMMIT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class PendingCheckpoint:
    """A checkpoint handed to ``report``: its directory name in the run, and on rank 0 the local
    directory holding its files (the session owns it from then on); None on the other ranks."""

    name: str
    directory: str | None


class RaySession:
    """The loop's view of Ray Train: rank/world/device from the context, the checkpoint to resume
    from, and ``report`` (every rank, at the same points).

    ``sink``: the driver's report sink (an actor handle, ``cluster.trainer.fit``). With one, the
    metrics of every report go from rank 0 to the sink, and only segment ends become
    ``ray.train.report`` calls — each is a barrier across ranks plus a hand-over to the controller's
    next poll; without one, every report is one. A checkpoint uploads in the background
    (``CheckpointUploadMode.ASYNC``) while training goes on; before its next ``ray.train.report``
    rank 0 waits until Ray has committed it (upload done, report polled), so at most one checkpoint
    is in flight however slow the storage, and a worker that dies restarts from a committed one."""

    def __init__(self, use_gpu: bool, sink: Any = None) -> None:
        import ray
        import ray.train

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.local_rank = ctx.get_local_rank()
        self.node_id = ray.get_runtime_context().get_node_id()
        if use_gpu:
            import ray.train.torch

            self.device = ray.train.torch.get_device()
        else:
            self.device = torch.device("cpu")
        self.sink = sink
        self._uncommitted = False

    def on_main_thread(self, fn: Callable[[], T]) -> T:
        """``fn()`` on the worker process's main thread (Ray Train runs the loop in another thread):
        through the worker actor's own ``execute`` method, which Ray runs there."""
        import ray

        return ray.get(ray.get_runtime_context().current_actor.execute.remote(fn))

    def preemption_signalled(self) -> bool:
        """Whether Ray reports that a node of the worker group is being preempted (a barrier across
        the workers: every rank asks at the same steps)."""
        import ray.train

        return ray.train.get_preemption_info() is not None

    def wait_committed(self) -> None:
        """Return once Ray Train has committed every checkpoint this rank reported."""
        import ray.train

        if self._uncommitted:
            ray.train.get_all_reported_checkpoints(
                consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=COMMIT_TIMEOUT_S
            )
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
        self, metrics: dict[str, Any], checkpoint: PendingCheckpoint | None = None, *, at_segment_end: bool
    ) -> None:
        import ray.train

        if self.sink is not None:
            if self.rank == 0:
                # fire and forget; calls from one caller run in order, so the driver sees every step
                self.sink.push.remote({"kind": "report", "metrics": metrics})
            if not at_segment_end:
                return
        self.wait_committed()
        if checkpoint is None:
            ray.train.report(metrics)
        elif checkpoint.directory is None:
            ray.train.report(metrics, checkpoint_dir_name=checkpoint.name)
        else:
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(checkpoint.directory),
                checkpoint_dir_name=checkpoint.name,
                checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                delete_local_checkpoint_after_upload=True,
            )
            self._uncommitted = True


class LocalSession:
    """The same loop in this process, without Ray: one rank; checkpoints are moved into ``run_dir``
    (local), where the next LocalSession on the same directory resumes from the newest one."""

    def __init__(self, run_dir: str, device: str | torch.device = "cpu") -> None:
        self.rank, self.world_size, self.local_rank, self.node_id = 0, 1, 0, "local"
        self.device = torch.device(device)
        self.run_dir = run_dir
        self.reports: list[dict[str, Any]] = []

    def on_main_thread(self, fn: Callable[[], T]) -> T:
        return fn()

    def preemption_signalled(self) -> bool:
        return False

    def wait_committed(self) -> None:
        """Checkpoints are in place as soon as ``report`` returns."""

    @contextlib.contextmanager
    def checkpoint_dir(self) -> Iterator[tuple[str, str] | tuple[None, None]]:
        from cluster.checkpoint import latest_checkpoint

        found = latest_checkpoint(self.run_dir)
        yield (found, found) if found else (None, None)

    def report(
        self, metrics: dict[str, Any], checkpoint: PendingCheckpoint | None = None, *, at_segment_end: bool
    ) -> None:
        self.reports.append(dict(metrics))
        if checkpoint is not None and checkpoint.directory is not None:
            target = os.path.join(self.run_dir, checkpoint.name)
            shutil.rmtree(target, ignore_errors=True)
            shutil.move(checkpoint.directory, target)
