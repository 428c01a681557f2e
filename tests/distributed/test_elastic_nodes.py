"""An elastic run (``scaling.num_workers: [1, 2]``) on a simulated two-node cluster that loses a node
mid-run and gets it back: Ray Train shrinks the worker group to one worker, then grows it to two
again; the run finishes, the resizes are reported, and every epoch trains on its samples once."""

from __future__ import annotations

import threading
import time

import pytest
from helpers import STEPS_PER_EPOCH, assert_each_epoch_once, elastic_config, ray_hooks, steps_of

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout} s for {what}")
        time.sleep(0.2)


def test_a_lost_node_shrinks_the_group_and_a_new_one_grows_it(two_nodes, val_shards, tmp_path):
    from cluster.trainer import fit

    cluster, node, common = two_nodes.cluster, two_nodes.node, two_nodes.node_args
    rh = ray_hooks()
    rh.by_value()
    records = tmp_path / "records"
    records.mkdir()
    end = 3 * STEPS_PER_EPOCH
    cfg = elastic_config(
        val_shards,
        tmp_path / "runs",
        "elastic",
        f"run.max_steps={end}",
        "scaling.num_workers=[1, 2]",
        "scaling.resize_check_s=2",
        "run.max_failures=4",
        "run.checkpoint_every=2",
    )
    lines: list[str] = []
    outcome: dict = {}

    def train() -> None:
        try:
            outcome["result"] = fit(
                cfg, progress=lines.append, hooks=[rh.Recorder(records), rh.SlowSteps(1.0)]
            )
        except BaseException as e:  # handed to the test's thread
            outcome["error"] = e

    trainer = threading.Thread(target=train, daemon=True)
    trainer.start()

    def reached(step: int, world: int | None = None) -> bool:
        done = [r for r in rh.read_records(records) if r["event"] == "step" and r["step"] >= step]
        return any(world is None or r.get("world_size") == world for r in done)

    _wait_for(lambda: reached(4, world=2) or "error" in outcome, 240, "step 4 on two workers")
    cluster.remove_node(node)
    _wait_for(lambda: reached(8, world=1) or "error" in outcome, 240, "training on with one worker")
    cluster.add_node(**common)
    cluster.wait_for_nodes(timeout=120)
    trainer.join(timeout=400)
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    story = "\n".join([*lines, *map(str, result.failures)])
    assert max(m["step"] for m in result.metrics) == end, story
    assert "worker group resized: 2 -> 1 workers" in story, story
    assert "worker group resized: 1 -> 2 workers" in story, story
    assert result.metrics[-1]["world_size"] == 2, story
    assert_each_epoch_once(steps_of(rh.read_records(records)), 3)
