"""Simulated multi-node training: a two-node ``ray.cluster_utils.Cluster`` (one CPU each, 127.0.0.1),
one Ray Train worker per node (STRICT_SPREAD). The workers must read disjoint data, and the contrast
set each one's loss sees must hold the gathered targets of both: 2 x B entries, offset rank x B.
"""

from __future__ import annotations

import json

import pytest
from helpers import TINY, ray_hooks

from cluster.config import load_config

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(400)]


def test_one_worker_per_node_disjoint_data_and_gathered_contrast_set(two_nodes, digits_shards, tmp_path):
    import ray

    from cluster.trainer import fit

    hooks = ray_hooks()
    hooks.by_value()
    assert len([n for n in ray.nodes() if n["Alive"]]) == 2
    records = tmp_path / "records"
    records.mkdir()
    cfg = load_config(
        TINY,
        [
            f"data.train={digits_shards}",
            f"run.storage={tmp_path / 'runs'}",
            "run.name=multinode",
            "run.max_steps=3",
            "run.report_every=1",
            "run.tensorboard=false",
            "scaling.placement_strategy=STRICT_SPREAD",
        ],
    )
    batch = cfg.per_worker_batch_size
    result = fit(cfg, progress=False, hooks=[hooks.Recorder(records), hooks.ContrastProbe(records)])
    assert [m["step"] for m in result.metrics] == [1, 2, 3]

    steps = [r for r in hooks.read_records(records) if r["event"] == "step"]
    nodes = {r["rank"]: r["node"] for r in steps}
    assert sorted(nodes) == [0, 1] and nodes[0] != nodes[1], "both workers ran on the same node"
    keys = {rank: [k for r in steps if r["rank"] == rank for k in r["keys"]] for rank in (0, 1)}
    assert len(keys[0]) == len(keys[1]) == 3 * batch
    assert not set(keys[0]) & set(keys[1]), "the two nodes read the same samples"

    for rank in (0, 1):
        calls = [json.loads(line) for line in (records / f"contrast{rank}.jsonl").read_text().splitlines()]
        assert len(calls) == 3
        for call in calls:
            assert call == {"batch": batch, "contrast": 2 * batch, "offset": rank * batch}
