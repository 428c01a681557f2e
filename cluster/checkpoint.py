"""Checkpoints of a run: the full ``TrainState``, the data position and the config, as a Ray Checkpoint.

A checkpoint is a directory ``checkpoint-<step:08d>`` inside the run directory (local or s3://)::

    train_state.pt   TrainState.state_dict() of rank 0: online network, EMA target, optimiser, step
                     (which fixes epoch and batch within the epoch), samples seen, queue, RNG states,
                     and under ``extra["data"]`` the loader position (epoch, batch, world size, batch)
    config.yaml      the resolved ExperimentConfig the run was started with
    meta.json        step, epoch, batch_in_epoch, git SHA, time, and under ``files`` the size and
                     sha256 of the two files above — readable without torch

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

A damaged checkpoint costs the steps since the one before it, not the run. ``verify_checkpoint``
checks a checkpoint against its ``meta.json``; one that fails is skipped, with a warning naming the
file and why, for the newest one before it that passes (``find_usable_checkpoint``): when the workers
resume (``Checkpointer.restore``), in ``relic eval`` on a run directory, and in Ray Train's run
snapshot, which ``cluster.trainer.fit`` repairs before Ray reads it (``repair_run_snapshot``). A
checkpoint named explicitly is never replaced: a damaged one is an error. A file that holds pickled
code is an error everywhere, never a damaged file to skip.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
import yaml

from cluster.config import ExperimentConfig, config_from_dict
from cluster.session import PendingCheckpoint
from pipeline import storage as fsutil

log = logging.getLogger(__name__)

STATE_FILE = "train_state.pt"
CONFIG_FILE = "config.yaml"
META_FILE = "meta.json"
RAY_SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"
"""Ray Train's record of the checkpoints a run reported, in the run directory (ray 2.60:
``ray.train.v2._internal.constants.CHECKPOINT_MANAGER_SNAPSHOT_FILENAME``)."""
_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
_CHECKSUMMED = (STATE_FILE, CONFIG_FILE)


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint-{step:08d}"


def write_checkpoint(
    directory: str | os.PathLike, state: Any, cfg: ExperimentConfig, meta: dict[str, Any]
) -> None:
    """Write the three files of a checkpoint into the local ``directory``; ``meta.json`` last, with
    ``meta`` and the ``{"bytes", "sha256"}`` of the other two under ``files``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state.state_dict(), directory / STATE_FILE)
    (directory / CONFIG_FILE).write_text(cfg.to_yaml())
    files = {}
    for name in _CHECKSUMMED:
        with open(directory / name, "rb") as f:
            files[name] = {"bytes": os.fstat(f.fileno()).st_size, "sha256": _sha256(f)}
    meta = {**meta, "files": files}
    (directory / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def _sha256(f: IO[bytes]) -> str:
    digest = hashlib.sha256()
    while chunk := f.read(1 << 20):
        digest.update(chunk)
    return digest.hexdigest()


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    return json.loads((Path(directory) / META_FILE).read_text())


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and why."""


class UnsafeCheckpointError(CheckpointError):
    """A ``train_state.pt`` that holds pickled code: refused, and never skipped as merely damaged."""


def load_state_file(
    path: str | os.PathLike | IO[bytes], map_location: Any = "cpu", *, shown_as: str | None = None
) -> dict[str, Any]:
    """``train_state.pt`` (a path or an open binary file, named ``shown_as`` in errors) as data:
    tensors, numbers, strings and containers only.

    Loaded with ``torch.load(weights_only=True)``, PyTorch's restricted unpickler, so a file that
    carries anything else (a pickled callable, an arbitrary class) is refused before any of it runs.
    ``TrainState.state_dict`` writes only such values (RNG states included)."""
    shown = shown_as or path
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()
        raise UnsafeCheckpointError(
            f"{shown}: refused to load: the file holds objects other than tensors and plain values, "
            f"and checkpoints are loaded as data only, never as code ({reason[-1] if reason else e})"
        ) from None
    except RuntimeError as e:
        if "PytorchStreamReader" not in str(e):
            raise
        raise CheckpointError(
            f"{shown}: not a complete PyTorch archive, truncated or damaged ({str(e).splitlines()[0]})"
        ) from None


def restore(
    state: Any, directory: str | os.PathLike, data_order: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Load ``train_state.pt`` from the local ``directory`` into ``state`` (before DDP wrapping or not:
    ``TrainState`` loads into the unwrapped module). Returns the checkpoint's meta.

    ``data_order``: this run's ``ShardReader.order_facts``; a checkpoint whose data position was taken
    under other facts (another shard set, global batch, number of partitions, seed or shuffle buffer)
    is refused with a ``CheckpointError`` naming each difference: resuming it could not continue the
    epoch exactly. Facts a checkpoint does not record are not compared."""
    directory = Path(directory)
    saved = load_state_file(directory / STATE_FILE, state.device)
    recorded = (saved.get("extra") or {}).get("data") or {}
    differences = [
        f"{key} {recorded[key]!r} there, {value!r} here"
        for key, value in (data_order or {}).items()
        if key in recorded and recorded[key] != value
    ]
    if differences:
        raise CheckpointError(
            f"{directory}: the checkpoint's data order differs from this run's ({'; '.join(differences)}): "
            "resuming could not continue its epoch exactly; train with the checkpoint's data settings, "
            "or start a new run (another run.name)"
        )
    state.load_state_dict(saved)
    return read_meta(directory)


# --------------------------------------------------------------------------------------------------
# Which checkpoint: verified against meta.json, the newest usable one of a run, Ray's run snapshot


def verify_checkpoint(
    path: str, storage_options: dict[str, Any] | None = None, *, shown_as: str | None = None
) -> None:
    """Check that the checkpoint directory ``path`` (local or URL) can be resumed from, or raise
    ``CheckpointError`` naming the file (under ``shown_as``, default ``path``) and what is wrong.

    ``meta.json`` must be readable JSON with a step; ``train_state.pt`` and ``config.yaml`` must exist
    with the size and sha256 it records. A checkpoint written before sizes and checksums were recorded
    is checked as far as it can be: its files exist and ``train_state.pt`` is a complete zip archive
    (``torch.save``'s format) whose members pass their CRC checks. A ``train_state.pt`` that fails its
    checksum and holds pickled code raises ``UnsafeCheckpointError``: crafted, not damaged."""
    shown = (shown_as or path).rstrip("/")
    fs, root = fsutil.filesystem(path, storage_options)
    root = root.rstrip("/")
    fs.invalidate_cache(root)

    def bad(name: str, why: str) -> CheckpointError:
        return CheckpointError(f"{fsutil.join(shown, name)}: {why}")

    try:
        meta = json.loads(fs.cat_file(f"{root}/{META_FILE}"))
    except FileNotFoundError:
        raise bad(META_FILE, "missing: the checkpoint was not completely written") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise bad(META_FILE, f"not readable JSON ({e})") from None
    if not isinstance(meta, dict) or "step" not in meta:
        raise bad(META_FILE, "holds no step")
    recorded = meta.get("files") or {}
    if not isinstance(recorded, dict):
        raise bad(META_FILE, "its files record is not a mapping")
    for name in _CHECKSUMMED:
        file = f"{root}/{name}"
        try:
            size = fs.size(file)
        except FileNotFoundError:
            raise bad(name, "missing") from None
        expected = recorded.get(name)
        if expected is None:
            continue
        if not isinstance(expected, dict) or not {"bytes", "sha256"} <= expected.keys():
            raise bad(META_FILE, f"its record of {name} is not {{'bytes': ..., 'sha256': ...}}")
        if size != expected["bytes"]:
            why = f"{size} bytes where meta.json records {expected['bytes']}"
            why += ": truncated" if size < expected["bytes"] else ""
        else:
            with fs.open(file, "rb") as f:
                digest = _sha256(f)
            if digest == expected["sha256"]:
                continue
            why = "its sha256 differs from the one meta.json records: changed after it was written"
        if name == STATE_FILE:
            _refuse_code(fs, file, fsutil.join(shown, name))
        raise bad(name, why)
    if STATE_FILE not in recorded:
        try:
            with fs.open(f"{root}/{STATE_FILE}", "rb") as f, zipfile.ZipFile(f) as archive:
                broken = archive.testzip()
        except zipfile.BadZipFile as e:
            raise bad(STATE_FILE, f"not a complete zip archive ({e}): truncated or damaged") from None
        if broken is not None:
            raise bad(STATE_FILE, f"archive member {broken} fails its CRC check: damaged")


def _refuse_code(fs: Any, file: str, shown: str) -> None:
    """Raise ``UnsafeCheckpointError`` if ``file``, which failed its checksum, holds pickled code."""
    with fs.open(file, "rb") as f:
        try:
            load_state_file(f, shown_as=shown)
        except UnsafeCheckpointError:
            raise
        except Exception:  # not loadable at all: damaged, which the caller reports
            pass


def checkpoint_problem(
    path: str, storage_options: dict[str, Any] | None = None, *, shown_as: str | None = None
) -> str | None:
    """Why the checkpoint at ``path`` cannot be resumed from (``verify_checkpoint``'s message, naming
    the file), or None when it can. A file holding pickled code raises ``UnsafeCheckpointError``."""
    try:
        verify_checkpoint(path, storage_options, shown_as=shown_as)
    except UnsafeCheckpointError:
        raise
    except CheckpointError as e:
        return str(e)
    return None


def _checkpoint_dirs(run_dir: str, storage_options: dict[str, Any] | None) -> list[tuple[int, str]]:
    """``(step, url)`` of every ``checkpoint-<step>`` directory under ``run_dir``, newest first."""
    fs, path = fsutil.filesystem(run_dir, storage_options)
    fs.invalidate_cache(path)
    try:
        entries = fs.ls(path, detail=False)
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        if m := _CHECKPOINT_DIR.match(name):
            found.append((int(m.group(1)), fsutil.join(run_dir, name)))
    return sorted(found, reverse=True)


def _dir_step(path: str) -> int | None:
    m = _CHECKPOINT_DIR.match(path.rstrip("/").rsplit("/", 1)[-1])
    return int(m.group(1)) if m else None


def latest_checkpoint(run_dir: str, storage_options: dict[str, Any] | None = None) -> str | None:
    """The newest ``checkpoint-*`` directory under ``run_dir`` (local or URL) that holds a
    ``train_state.pt``, unverified; None when there is none."""
    for _step, url in _checkpoint_dirs(run_dir, storage_options):
        fs, path = fsutil.filesystem(fsutil.join(url, STATE_FILE), storage_options)
        if fs.exists(path):
            return url
    return None


def find_usable_checkpoint(
    run_dir: str, storage_options: dict[str, Any] | None = None, *, before_step: int | None = None
) -> str | None:
    """The newest ``checkpoint-*`` directory of the run at ``run_dir`` (of those before
    ``before_step``) that passes ``verify_checkpoint``; each newer one that fails is skipped with a
    warning naming the file and why. None when none passes. Newest first by the step in the folder
    name: every caller that sees the same storage picks the same checkpoint."""
    for step, url in _checkpoint_dirs(run_dir, storage_options):
        if before_step is not None and step >= before_step:
            continue
        problem = checkpoint_problem(url, storage_options)
        if problem is None:
            return url
        log.warning("skipping a checkpoint that cannot be resumed from: %s", problem)
    return None


def resolve_checkpoint(path: str, storage_options: dict[str, Any] | None = None) -> str:
    """``path`` itself if it is a checkpoint directory (it holds ``train_state.pt`` or ``meta.json``),
    checked by ``verify_checkpoint``: a damaged one is an error naming the file. Otherwise the newest
    usable checkpoint of the run at ``path`` (``find_usable_checkpoint``)."""
    fs, fspath = fsutil.filesystem(path, storage_options)
    root = fspath.rstrip("/")
    fs.invalidate_cache(root)
    if fs.exists(f"{root}/{STATE_FILE}") or fs.exists(f"{root}/{META_FILE}"):
        verify_checkpoint(path, storage_options)
        return path
    found = find_usable_checkpoint(path, storage_options)
    if found is None:
        raise FileNotFoundError(
            f"{path}: neither a checkpoint directory (no {STATE_FILE}) nor a run directory with a usable "
            "checkpoint-* in it"
        )
    return found


def repair_run_snapshot(run_dir: str, storage_options: dict[str, Any] | None = None) -> dict[str, str]:
    """Make Ray Train's run snapshot in ``run_dir`` (``RAY_SNAPSHOT_FILE``) resumable: drop the
    checkpoints it names that cannot be resumed from, so that Ray hands the newest usable one to the
    workers. Returns ``{dropped folder name: why}``; warns when it drops any.

    Ray Train restores its checkpoint manager from the snapshot when a run of the same name starts.
    It refuses to start when a folder the snapshot names is gone, and it hands the workers the latest
    checkpoint the snapshot names whether or not it is intact. Dropped: every named folder that does
    not exist, and, newest report first, each checkpoint that fails ``verify_checkpoint`` until one
    passes (older ones are never resumed from, so they are not read). A damaged one is dropped rather
    than left to the workers' fallback because the resumed run writes that step's folder again, and
    Ray's ``num_to_keep`` pruning of the stale entry would then delete the new checkpoint. The rest of
    the snapshot stays as Ray wrote it; its latest checkpoint becomes the newest report left.

    Raises ``CheckpointError`` when named folders exist but none is usable (the snapshot untouched).
    A snapshot this code cannot read is left to Ray, which reports it."""
    fs, folder = fsutil.filesystem(run_dir, storage_options)
    folder = folder.rstrip("/")
    fs.invalidate_cache(folder)
    url, path = fsutil.join(run_dir, RAY_SNAPSHOT_FILE), f"{folder}/{RAY_SNAPSHOT_FILE}"
    if not fs.exists(path):
        return {}
    try:
        snapshot = json.loads(fs.cat_file(path))
        results, indices = snapshot["checkpoint_results"], snapshot["checkpoint_report_indices"]
        names = [r["checkpoint_dir_name"] for r in results]
    except (ValueError, KeyError, TypeError):
        return {}
    dropped = {n: "the folder does not exist" for n in names if not fs.exists(f"{folder}/{n}")}
    newest_first = sorted(((i, n) for i, n in zip(indices, names) if n not in dropped), reverse=True)
    for _index, name in newest_first:
        problem = checkpoint_problem(fsutil.join(run_dir, name), storage_options)
        if problem is None:
            resume = name
            break
        dropped[name] = problem
    else:
        if newest_first:
            raise CheckpointError(
                f"{run_dir}: no checkpoint in Ray Train's run snapshot can be resumed from: "
                + "; ".join(dropped.values())
                + f". Delete {run_dir} or choose another run.name"
            )
        resume = None
    if not dropped:
        return {}

    keep = [k for k, n in enumerate(names) if n not in dropped]
    snapshot["checkpoint_results"] = [results[k] for k in keep]
    snapshot["checkpoint_report_indices"] = [indices[k] for k in keep]
    latest = snapshot.get("latest_checkpoint_result")
    if latest is not None and latest["checkpoint_dir_name"] in dropped:
        snapshot["latest_checkpoint_result"] = results[max(keep, key=indices.__getitem__)] if keep else None
    if "pending_training_results" in snapshot:
        pending = [
            (r, spec)
            for r, spec in zip(snapshot["pending_training_results"], snapshot["pending_validation_specs"])
            if r["checkpoint_dir_name"] not in dropped
        ]
        snapshot["pending_training_results"] = [r for r, _ in pending]
        snapshot["pending_validation_specs"] = [spec for _, spec in pending]
    for key in (
        "validated_checkpoint_dir_names",
        "timed_out_validation_checkpoint_dir_names",
        "failed_validation_checkpoint_dir_names",
    ):
        if key in snapshot:
            snapshot[key] = [n for n in snapshot[key] if n not in dropped]
    fsutil.write_atomic(url, json.dumps(snapshot).encode(), storage_options)
    log.warning(
        "Ray Train's run snapshot %s named checkpoints that cannot be resumed from; dropped %s. %s",
        url,
        "; ".join(f"{name} ({why})" for name, why in sorted(dropped.items())),
        f"The run resumes from {resume}." if resume else "No checkpoint is left: the run starts afresh.",
    )
    return dropped


# --------------------------------------------------------------------------------------------------
# Evaluation side: load a checkpoint's model.


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
        run_dir: str,
        run_options: dict[str, Any],
        data_order: dict[str, Any] | None = None,
        steps_per_epoch: int,
        total_steps: int,
        batch_size: int,
        git_sha: str,
    ) -> None:
        self.cfg, self.session = cfg, session
        self.run_dir, self.run_options = run_dir, run_options
        """Where the run's checkpoints live (local or URL) and its storage options."""
        self.data_order = dict(data_order or {})
        """The reader's ``order_facts``: stored with each checkpoint, compared on restore."""
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
        """Load the session's checkpoint into ``state``; its step, or None for a fresh start.

        A checkpoint that fails ``verify_checkpoint`` is skipped, with a warning naming the file, for
        the newest usable one of the run before it (``find_usable_checkpoint``): every rank sees the
        same storage and walks it in the same order, so all ranks pick the same one. None usable:
        ``CheckpointError``."""
        with self.session.checkpoint_dir() as (directory, where):
            if directory is None:
                return None
            problem = checkpoint_problem(directory, shown_as=where)
            if problem is None:
                return self._resumed(restore(state, directory, self.data_order), where, state)
        fallback = find_usable_checkpoint(self.run_dir, self.run_options, before_step=_dir_step(where))
        if fallback is None:
            raise CheckpointError(
                f"{problem}; no checkpoint before it in {self.run_dir} is usable either: "
                "delete the run directory or choose another run.name"
            )
        log.warning("%s; resuming from the newest usable checkpoint before it, %s", problem, fallback)
        with _local_copy(fallback, self.run_options) as local:
            return self._resumed(restore(state, local, self.data_order), fallback, state)

    def _resumed(self, meta: dict[str, Any], where: str, state: Any) -> int:
        if self.session.rank == 0:
            log.warning(
                "resumed from %s at step %d (epoch %d, batch %d)",
                where,
                meta["step"],
                state.epoch,
                state.batch_in_epoch,
            )
            before = meta.get("world_size")
            if before is not None and before != self.session.world_size:
                log.warning(
                    "resized: the checkpoint was written by %d workers, training goes on with %d "
                    "(the same samples at every step)",
                    before,
                    self.session.world_size,
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
                **self.data_order,
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
