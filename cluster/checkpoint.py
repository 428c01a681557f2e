"""Checkpoints of a run: the full ``TrainState``, the data position and the config, as a Ray Checkpoint.

A checkpoint is a directory ``checkpoint-<step:08d>`` inside the run directory (local or s3://)::

    train_state.pt   TrainState.state_dict() of rank 0: online network, EMA target, optimiser, step
                     (which fixes epoch and batch within the epoch), samples seen, queue, RNG states,
                     and under ``extra["data"]`` the loader position (epoch, batch, world size, batch)
    config.yaml      the resolved ExperimentConfig the run was started with
    meta.json        step, epoch, batch_in_epoch, git SHA, time — readable without torch

Only rank 0 writes files: every rank holds the same weights (DDP) and the data position is the same
on every rank (all ranks step in lockstep); the other ranks report the checkpoint's name without a
directory at the same call, which Ray Train's ``report`` requires of every rank.

:class:`Checkpointer` is the worker loop's component for all of it: the cadence (every
``run.checkpoint_every`` steps, every ``run.checkpoint_every_epochs``-th epoch end, the last step),
the segments the loop trains in (a checkpoint is always the start of a segment, so a resumed run asks
the data path for exactly the segment the uninterrupted run did), writing, and restoring.

Resume is exact: ``restore`` loads the state, after which the worker continues the same epoch at
``state.batch_in_epoch``; ``ShardReader.epoch(epoch, start_batch)`` skips the consumed batches without
reading them, so within the epoch no sample is seen twice or skipped.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from cluster.config import ExperimentConfig, config_from_dict
from cluster.session import PendingCheckpoint
from pipeline import storage as fsutil

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"
CONFIG_FILE = "config.yaml"
META_FILE = "meta.json"
_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint-{step:08d}"


def write_checkpoint(
    directory: str | os.PathLike, state: Any, cfg: ExperimentConfig, meta: dict[str, Any]
) -> None:
    """Write the three files of a checkpoint into the local ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state.state_dict(), directory / STATE_FILE)
    (directory / CONFIG_FILE).write_text(cfg.to_yaml())
    (directory / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(directory) / META_FILE).read_text())


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and why."""


def load_state_file(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """``train_state.pt`` as data: tensors, numbers, strings and containers only.

    Loaded with ``torch.load(weights_only=True)``, PyTorch's restricted unpickler, so a file that
    carries anything else (a pickled callable, an arbitrary class) is refused before any of it runs.
    ``TrainState.state_dict`` writes only such values (RNG states included)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()
        raise CheckpointError(
            f"{path}: refused to load: the file holds objects other than tensors and plain values, "
            f"and checkpoints are loaded as data only, never as code ({reason[-1] if reason else e})"
        ) from None


def restore(state: Any, directory: str | os.PathLike) -> dict[str, Any]:
    """Load ``train_state.pt`` from the local ``directory`` into ``state`` (before DDP wrapping or not:
    ``TrainState`` loads into the unwrapped module). Returns the checkpoint's meta."""
    directory = Path(directory)
    state.load_state_dict(load_state_file(directory / STATE_FILE, state.device))
    return read_meta(directory)


# --------------------------------------------------------------------------------------------------
# Evaluation side: find a checkpoint, load its model.


def latest_checkpoint(run_dir: str, storage_options: dict[str, Any] | None = None) -> str | None:
    """The newest complete ``checkpoint-*`` directory under ``run_dir`` (local or URL), or None."""
    fs, path = fsutil.filesystem(run_dir, storage_options)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return None
    steps = []
    for entry in entries:
        m = _CHECKPOINT_DIR.match(entry.rstrip("/").rsplit("/", 1)[-1])
        if m and fs.exists(f"{entry.rstrip('/')}/{STATE_FILE}"):
            steps.append((int(m.group(1)), entry.rstrip("/").rsplit("/", 1)[-1]))
    if not steps:
        return None
    return fsutil.join(run_dir, max(steps)[1])


def resolve_checkpoint(path: str, storage_options: dict[str, Any] | None = None) -> str:
    """``path`` itself if it is a checkpoint directory, else the latest checkpoint of the run at ``path``."""
    fs, fspath = fsutil.filesystem(path, storage_options)
    if fs.exists(f"{fspath.rstrip('/')}/{STATE_FILE}"):
        return path
    found = latest_checkpoint(path, storage_options)
    if found is None:
        raise FileNotFoundError(
            f"{path}: neither a checkpoint directory (no {STATE_FILE}) nor a run directory with checkpoint-* in it"
        )
    return found


@dataclass
class LoadedCheckpoint:
    """A checkpoint's networks and config, ready for evaluation."""

    path: str
    config: ExperimentConfig
    model: torch.nn.Module
    """The online ``ReLICModel`` (``.encoder`` is the torchvision ResNet without ``fc``, ``.projector``
    the critic), in eval mode."""
    target: torch.nn.Module | None
    """The EMA target network (a ``ReLICModel``), or None when the objective used the online network."""
    meta: dict[str, Any]

    @property
    def encoder(self) -> torch.nn.Module:
        return self.model.encoder

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @property
    def epoch(self) -> int:
        return int(self.meta["epoch"])


def load_model_from_checkpoint(
    path: str, *, storage_options: dict[str, Any] | None = None, device: str | torch.device = "cpu"
) -> LoadedCheckpoint:
    """Load the model of a checkpoint directory, or of the latest checkpoint of a run directory.

    ``path`` is local or a URL (s3://...; ``storage_options`` default to the environment's endpoint).
    """
    from training.model import build_model

    if storage_options is None:
        storage_options = fsutil.storage_options(path)
    path = resolve_checkpoint(path, storage_options)
    with _local_copy(path, storage_options) as local:
        cfg = config_from_dict(
            yaml.safe_load((Path(local) / CONFIG_FILE).read_text()), source=f"{path}/{CONFIG_FILE}"
        )
        saved = load_state_file(Path(local) / STATE_FILE, device)
        meta = read_meta(local)
    # SyncBatchNorm (model.sync_batchnorm) has BatchNorm's parameter names: it loads into plain BN.
    model = build_model(cfg.model)
    model.load_state_dict(saved["model"])
    model.to(device).eval()
    target = None
    if saved.get("target") is not None:
        target = build_model(cfg.model)
        target.load_state_dict({k.removeprefix("network."): v for k, v in saved["target"].items()})
        target.to(device).eval()
    return LoadedCheckpoint(path=path, config=cfg, model=model, target=target, meta=meta)


class _local_copy:
    """Context manager: a local directory with the checkpoint's files (downloaded when remote)."""

    def __init__(self, path: str, storage_options: dict[str, Any] | None) -> None:
        self.path = path
        self.options = storage_options
        self.tmp: tempfile.TemporaryDirectory | None = None

    def __enter__(self) -> str:
        if not fsutil.is_remote(self.path):
            return self.path
        self.tmp = tempfile.TemporaryDirectory(prefix="relic-ckpt-")
        fs, fspath = fsutil.filesystem(self.path, self.options)
        for name in (STATE_FILE, CONFIG_FILE, META_FILE):
            fs.get_file(f"{fspath.rstrip('/')}/{name}", os.path.join(self.tmp.name, name))
        return self.tmp.name

    def __exit__(self, *exc: Any) -> None:
        if self.tmp is not None:
            self.tmp.cleanup()


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


class Checkpointer:
    """Checkpoint cadence, segments, writing and restoring for one rank of a run (module doc)."""

    def __init__(
        self,
        cfg: ExperimentConfig,
        session: Any,
        *,
        steps_per_epoch: int,
        total_steps: int,
        batch_size: int,
        git_sha: str,
    ) -> None:
        self.cfg, self.session = cfg, session
        self.steps_per_epoch, self.batch_size, self.git_sha = steps_per_epoch, batch_size, git_sha
        max_steps = cfg.run.max_steps
        self.end_step = total_steps if max_steps is None else min(total_steps, max_steps)
        """The last step this run trains to (``run.max_steps`` truncates the schedule)."""

    def segment_end(self, step: int) -> int:
        return segment_end(
            step,
            steps_per_epoch=self.steps_per_epoch,
            checkpoint_every=self.cfg.run.checkpoint_every,
            end_step=self.end_step,
        )

    def due(self, step: int) -> bool:
        return checkpoint_due(
            step,
            steps_per_epoch=self.steps_per_epoch,
            checkpoint_every=self.cfg.run.checkpoint_every,
            checkpoint_every_epochs=self.cfg.run.checkpoint_every_epochs,
            end_step=self.end_step,
        )

    def restore(self, state: Any) -> int | None:
        """Load the session's checkpoint into ``state``; its step, or None for a fresh start."""
        with self.session.checkpoint_dir() as (directory, where):
            if directory is None:
                return None
            meta = restore(state, directory)
        if self.session.rank == 0:
            log.warning(
                "resumed from %s at step %d (epoch %d, batch %d)",
                where,
                meta["step"],
                state.epoch,
                state.batch_in_epoch,
            )
        return state.step

    def write(self, state: Any) -> PendingCheckpoint:
        """The checkpoint of ``state``: written to a new local directory on rank 0 (the session takes
        it over in ``report``), only named on the other ranks."""
        name = checkpoint_dir_name(state.step)
        if self.session.rank != 0:
            return PendingCheckpoint(name, None)
        directory = tempfile.mkdtemp(prefix="relic-ckpt-")
        try:
            world = self.session.world_size
            state.extra["data"] = {
                "epoch": state.epoch,
                "batch_in_epoch": state.batch_in_epoch,
                "world_size": world,
            }
            meta = make_meta(state, git_sha=self.git_sha, world_size=world, batch_size=self.batch_size)
            write_checkpoint(directory, state, self.cfg, meta)
        except BaseException:
            shutil.rmtree(directory, ignore_errors=True)
            raise
        return PendingCheckpoint(name, directory)


def make_meta(state: Any, *, git_sha: str, world_size: int, batch_size: int) -> dict[str, Any]:
    return {
        "step": state.step,
        "epoch": state.epoch,
        "batch_in_epoch": state.batch_in_epoch,
        "samples_seen": state.samples_seen,
        "world_size": world_size,
        "per_worker_batch_size": batch_size,
        "git_sha": git_sha,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
