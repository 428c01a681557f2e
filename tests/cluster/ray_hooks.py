"""Worker hooks for the Ray tests (``cluster.trainer.fit(..., hooks=[...])``).

They run inside the Ray Train workers, so the tests register this module with
``cloudpickle.register_pickle_by_value`` (``by_value()``): Ray ships the classes' code with the config
instead of asking the workers to import a test module they cannot see.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path


def by_value() -> None:
    from ray import cloudpickle  # Ray serialises with its vendored copy, not the cloudpickle package

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _append(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


class Recorder:
    """One JSON line per worker start and per step, in ``<directory>/rank<r>.jsonl``."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = str(directory)

    def _path(self, rank: int) -> str:
        return os.path.join(self.directory, f"rank{rank}.jsonl")

    def on_start(self, info) -> None:
        _append(
            self._path(info.rank),
            {
                "event": "start",
                "rank": info.rank,
                "step": info.step,
                "restored_step": info.restored_step,
                "node": info.node_id,
                "world_size": info.world_size,
            },
        )

    def on_step(self, info) -> None:
        _append(
            self._path(info.rank),
            {
                "event": "step",
                "rank": info.rank,
                "world_size": info.world_size,
                "step": info.step,
                "epoch": info.epoch,
                "node": info.node_id,
                "keys": info.keys,
                "restored_step": info.restored_step,
                **{k: info.metrics[k] for k in ("loss", "contrastive", "invariance", "lr", "momentum")},
            },
        )


class SlowSteps:
    """``seconds`` of sleep after every step, so that a test can change the cluster while training
    goes on."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_step(self, info) -> None:
        import time

        time.sleep(self.seconds)


class TermOnce:
    """SIGTERM this worker process after ``step`` on ``rank`` (the termination notice a preempted node
    gets), once: while ``marker`` does not exist. Waits until the process has noted it (its handler
    runs on the main thread), so that the notice belongs to that step."""

    def __init__(self, step: int, marker: str | os.PathLike, rank: int = 0) -> None:
        self.step, self.marker, self.rank = step, str(marker), rank

    def on_step(self, info) -> None:
        import time

        from cluster import preemption

        if info.rank == self.rank and info.step == self.step and not os.path.exists(self.marker):
            Path(self.marker).write_text("sent")
            os.kill(os.getpid(), signal.SIGTERM)
            deadline = time.monotonic() + 30
            while not preemption._notice.is_set() and time.monotonic() < deadline:
                time.sleep(0.05)


class KillOnce:
    """SIGKILL this worker process after ``step`` on ``rank`` — only while ``marker`` does not exist,
    so the restarted attempt runs through. ``after_commit``: first wait until Ray Train has committed
    every checkpoint this worker reported, so the test knows which checkpoint the restart must use
    (the loop itself only waits for a commit at its next segment end)."""

    def __init__(
        self, step: int, marker: str | os.PathLike, rank: int = 0, *, after_commit: bool = False
    ) -> None:
        self.step, self.marker, self.rank, self.after_commit = step, str(marker), rank, after_commit

    def on_step(self, info) -> None:
        if info.rank == self.rank and info.step == self.step and not os.path.exists(self.marker):
            if self.after_commit:
                import ray.train

                ray.train.get_all_reported_checkpoints(
                    consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=120
                )
            Path(self.marker).write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)


class ContrastProbe:
    """Records, per call of the ReLIC loss, the local batch size, the contrast-set size and the offset
    (wraps ``training.loop.relic_loss`` in the worker process)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = str(directory)

    def on_start(self, info) -> None:
        import training.loop as loop

        original = loop.relic_loss
        path = os.path.join(self.directory, f"contrast{info.rank}.jsonl")

        def recording(online, target, **kwargs):
            _append(
                path,
                {
                    "batch": int(online[0].shape[0]),
                    "contrast": int(target[0].shape[0]),
                    "offset": kwargs.get("offset"),
                },
            )
            return original(online, target, **kwargs)

        loop.relic_loss = recording

    def on_step(self, info) -> None:
        pass


def commit_wait_probe(config: dict) -> None:
    """Ray Train worker function: one ``cluster.session.RaySession`` (with the driver's report sink)
    reports a checkpoint at a segment end, then metrics within a segment, then a segment end, and
    writes to ``config["out"]`` whether the session still owed the commit wait after the last two
    (``"waiting"``) and how many checkpoints the controller had committed after the segment end."""
    import tempfile

    import ray.train

    from cluster.session import PendingCheckpoint, RaySession

    session = RaySession(use_gpu=False, sink=config["sink"])

    def committed() -> int:
        reported = ray.train.get_all_reported_checkpoints(
            consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=0
        )
        return len(reported)

    directory = tempfile.mkdtemp()
    Path(directory, "state.txt").write_text("1")
    session.report({"step": 1}, PendingCheckpoint("checkpoint-1", directory), at_segment_end=True)
    after = {}
    session.report({"step": 2}, at_segment_end=False)
    after["metrics"] = {"waiting": session._uncommitted}
    session.report({"step": 3}, at_segment_end=True)
    after["segment_end"] = {"waiting": session._uncommitted, "committed": committed()}
    Path(config["out"]).write_text(json.dumps(after))


def read_records(directory: str | os.PathLike, pattern: str = "rank*.jsonl") -> list[dict]:
    out = []
    for path in sorted(Path(directory).glob(pattern)):
        out.extend(json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return out


def last_by_rank_step(records: list[dict]) -> dict[tuple[int, int], dict]:
    """The latest record of every (rank, step): after a restart, the re-run steps win."""
    return {(r["rank"], r["step"]): r for r in records if r["event"] == "step"}
