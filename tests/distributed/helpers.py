"""Shared by the Ray tests here: the cluster tests' worker hooks, the elastic tests' config and how
they read their records."""

from __future__ import annotations

import importlib.util
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType

from cluster.config import load_config

TINY = Path(__file__).resolve().parents[1] / "cluster" / "tiny.yaml"
GLOBAL = 24  # divisible by 1, 2 and 3 workers, and by the 6 data partitions
STEPS_PER_EPOCH = 179 // GLOBAL  # the digits validation split: 7 steps of 24


def ray_hooks() -> ModuleType:
    """tests/cluster/ray_hooks.py, loaded once (Ray ships it to the workers by value)."""
    if "ray_hooks" not in sys.modules:
        spec = importlib.util.spec_from_file_location("ray_hooks", TINY.with_name("ray_hooks.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules["ray_hooks"] = module
        spec.loader.exec_module(module)
    return sys.modules["ray_hooks"]


def elastic_config(shards: str, root: Path, name: str, *overrides: str):
    """tiny.yaml with a global batch of 24 over 6 data partitions (1, 2, 3 or 6 workers)."""
    return load_config(
        TINY,
        [
            f"data.train={shards}",
            f"run.storage={root}",
            f"run.name={name}",
            f"data.global_batch_size={GLOBAL}",
            "data.partitions=6",
            "data.shuffle_buffer=16",
            "run.checkpoint_every=3",
            "run.report_every=1",
            "run.tensorboard=false",
            "schedule.epochs=3",
            *overrides,
        ],
    )


def steps_of(records: list[dict]) -> dict[int, list[dict]]:
    """Per step, the records of every rank of the attempt that trained it last. An attempt is known by
    the checkpoint step it started from (``restored_step``), which grows from one attempt to the next."""

    def attempt(r: dict) -> int:
        return -1 if r["restored_step"] is None else r["restored_step"]

    steps = [r for r in records if r["event"] == "step"]
    last = {}
    for r in steps:
        last[r["step"]] = max(last.get(r["step"], -1), attempt(r))
    return {s: [r for r in steps if r["step"] == s and attempt(r) == last[s]] for s in sorted(last)}


def assert_each_epoch_once(steps: dict[int, list[dict]], epochs: int) -> None:
    """Every epoch's steps trained on ``STEPS_PER_EPOCH * GLOBAL`` samples, no sample twice."""
    for epoch in range(epochs):
        keys = [
            k
            for step in range(epoch * STEPS_PER_EPOCH + 1, (epoch + 1) * STEPS_PER_EPOCH + 1)
            for r in steps[step]
            for k in r["keys"]
        ]
        assert len(keys) == STEPS_PER_EPOCH * GLOBAL, epoch
        duplicated = [k for k, n in Counter(keys).items() if n > 1]
        assert not duplicated, (epoch, duplicated[:5])
