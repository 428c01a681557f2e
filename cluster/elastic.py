"""Elastic worker groups that only take the sizes the data order allows.

Ray Train's elastic mode (``ScalingConfig(num_workers=(min, max))``, Ray 2.60's
``ElasticScalingPolicy``) sizes the worker group by the resources the cluster has ready: any number
between min and max. A run here may only use a number of workers that divides its data partitions
(``pipeline.plan``: then every global step holds the same samples at every size), so
:class:`DivisibleScalingPolicy` takes the largest allowed number that the resources hold, and waits
(as Ray does below min) while none fits. Ray 2.60 builds the policy inside ``TorchTrainer.fit`` from
its ``create_scaling_policy``; :func:`divisible_sizes` makes it build this one for the duration of a
``fit`` call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from ray.train.v2._internal.execution.scaling_policy import ElasticScalingPolicy


class DivisibleScalingPolicy(ElasticScalingPolicy):
    """Ray's elastic policy, capped by the nodes alive now and rounded down to the largest allowed
    group size. The cap matters right after a node is lost: Ray's view of reserved resources still
    counts the lost node for a while, and a group sized by it would wait for its placement group
    (``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S``) instead of going on with the workers that fit."""

    def __init__(self, scaling_config: Any, allowed: Sequence[int]) -> None:
        super().__init__(scaling_config)
        self.allowed = sorted(allowed)

    def _count_possible_workers(self, reserved_resources: Any) -> int:
        possible = min(super()._count_possible_workers(reserved_resources), self._alive_capacity())
        return max((w for w in self.allowed if w <= possible), default=0)

    def _alive_capacity(self) -> int:
        """Workers the nodes alive now hold, by their total resources."""
        import ray

        need = {k: v for k, v in self.scaling_config._resources_per_worker_not_none.items() if v > 0}
        if not need:
            return self.scaling_config.max_workers
        return sum(
            int(min(node["Resources"].get(k, 0.0) // v for k, v in need.items()))
            for node in ray.nodes()
            if node["Alive"]
        )


@contextlib.contextmanager
def divisible_sizes(allowed: Sequence[int]) -> Iterator[None]:
    """Within the block, elastic ``TorchTrainer.fit`` calls size their groups to ``allowed`` only."""
    from ray.train.v2.api import data_parallel_trainer

    original = data_parallel_trainer.create_scaling_policy

    def create(scaling_config: Any) -> Any:
        if scaling_config.elasticity_enabled:
            return DivisibleScalingPolicy(scaling_config, allowed)
        return original(scaling_config)

    data_parallel_trainer.create_scaling_policy = create
    try:
        yield
    finally:
        data_parallel_trainer.create_scaling_policy = original
