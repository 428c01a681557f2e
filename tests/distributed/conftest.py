"""Fixtures of the multi-process and Ray tests."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest


@pytest.fixture(scope="module")
def val_shards(tmp_path_factory):
    """builtin:digits validation split (179 labelled images) in shards of 64, with DALI index files."""
    from pipeline.shards.build import build_shards

    out = tmp_path_factory.mktemp("val_shards")
    build_shards("builtin:digits?split=val", str(out), max_samples=64, index=True, progress=False)
    return str(out)


@dataclass
class TwoNodes:
    cluster: Any
    """The ``ray.cluster_utils.Cluster``: a head and one more node, one CPU each, on 127.0.0.1."""
    node: Any
    """The second node (to remove)."""
    node_args: dict[str, Any]
    """What a node like it is added with."""


@pytest.fixture(scope="module")
def two_nodes():
    """A simulated two-node Ray cluster, connected; shut down at the module's end."""
    import ray
    import ray._private.ray_constants as ray_constants
    from ray.cluster_utils import Cluster

    # Ray resolves "127.0.0.1" in a cluster address to the host's external IP unless clusters are
    # "disabled"; the nodes here listen on loopback only, so keep loopback addresses as they are.
    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    node_args = {"num_cpus": 1, "node_ip_address": "127.0.0.1"}
    cluster = Cluster(initialize_head=True, head_node_args={**node_args, "include_dashboard": False})
    try:
        node = cluster.add_node(**node_args)
        cluster.wait_for_nodes(timeout=120)
        ray.init(address=cluster.address, _node_ip_address="127.0.0.1", log_to_driver=False)
        try:
            yield TwoNodes(cluster, node, node_args)
        finally:
            ray.shutdown()
    finally:
        cluster.shutdown()
        ray_constants.ENABLE_RAY_CLUSTER = saved
