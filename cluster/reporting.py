"""Metrics of a training run: when they are reported, what they hold, and where they go.

:class:`MetricsReporter` owns the report cadence (every ``run.report_every`` steps and at every
segment end: epoch ends, checkpoints, the last step), this rank's data-wait timing, the cross-rank
aggregation (loss terms of the step; images/s summed; data-wait fraction averaged; skipped samples
by reason summed) and rank 0's TensorBoard event files.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank (a list of one without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def aggregate(per_rank: list[dict[str, Any]], skip_reasons: tuple[str, ...]) -> dict[str, float]:
    """Cross-rank report values: throughput summed, wait fraction averaged, skip and kept-sample
    counters summed."""
    out: dict[str, float] = {}
    out["images_per_s"] = float(sum(r["images"] / r["elapsed"] for r in per_rank))
    out["data_wait_fraction"] = float(np.mean([r["wait"] / r["elapsed"] for r in per_rank]))
    total = 0
    for reason in skip_reasons:
        count = int(sum(r["stats"].get(reason, 0) for r in per_rank))
        out[f"skipped/{reason}"] = count
        total += count
    out["skipped_total"] = total
    # samples delivered despite something (KEPT_COUNTERS of pipeline.reader): a label read as -1, a
    # bad saliency mask or none (the sample trains unmasked); and the slots filled from good samples
    for name in ("filled", "bad_label", "bad_mask", "unmasked"):
        out[name] = int(sum(r["stats"].get(name, 0) for r in per_rank))
    seen = sum(r["stats"].get("pseudo_seen", 0) for r in per_rank)
    if seen:  # SemPPL's monitor (cluster.monitor.PseudoLabelMonitor), over the report's window
        out["pseudo_label_accuracy"] = sum(r["stats"].get("pseudo_right", 0) for r in per_rank) / seen
    return out


class TensorBoard:
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


class MetricsReporter:
    """Report cadence, timing and aggregation of one rank (module doc).

    ``timed(batches)`` wraps the batch iterator to measure how long the step waited for data;
    ``due(step, segment_end)`` says whether to report after ``step``; ``collect(...)`` (a collective:
    every rank calls it at the same steps) returns the report's metrics and restarts the timing."""

    def __init__(
        self,
        *,
        report_every: int,
        total_steps: int,
        batch_size: int,
        skip_reasons: tuple[str, ...],
        restored_step: int | None,
        tensorboard: TensorBoard | None,
    ) -> None:
        self.report_every, self.total_steps, self.batch_size = report_every, total_steps, batch_size
        self.skip_reasons, self.restored_step = skip_reasons, restored_step
        self.tensorboard = tensorboard
        self._restart()

    def _restart(self) -> None:
        self.wait, self.images, self.started = 0.0, 0, time.perf_counter()

    def timed(self, batches: Iterable[T]) -> Iterator[T]:
        it = iter(batches)
        while True:
            t0 = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.wait += time.perf_counter() - t0
            self.images += self.batch_size
            yield batch

    def due(self, step: int, segment_end: int) -> bool:
        return step % self.report_every == 0 or step == segment_end

    def collect(
        self, state: Any, last: dict[str, float], data_stats: dict[str, int], *, epoch: int, knn: float | None
    ) -> dict[str, Any]:
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        per_rank = gather_objects(
            {"wait": self.wait, "elapsed": elapsed, "images": self.images, "stats": data_stats}
        )
        metrics: dict[str, Any] = {
            "step": state.step,
            "epoch": epoch,
            "total_steps": self.total_steps,
            "world_size": len(per_rank),
            "samples_seen": state.samples_seen,
            **{k: last[k] for k in ("loss", "contrastive", "invariance", "lr", "momentum")},
            **({"semantic": last["semantic"]} if state.objective.name == "semppl" else {}),
            **aggregate(per_rank, self.skip_reasons),
            "restored_step": -1 if self.restored_step is None else self.restored_step,
        }
        if knn is not None:
            metrics["knn_accuracy"] = knn
        if self.tensorboard is not None:
            self.tensorboard.scalars(
                {k: v for k, v in metrics.items() if k not in ("step", "total_steps")}, state.step
            )
        self._restart()
        return metrics

    def sync(self) -> None:
        """Upload the event files (before a checkpoint, so that both are in storage together)."""
        if self.tensorboard is not None:
            self.tensorboard.sync()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
