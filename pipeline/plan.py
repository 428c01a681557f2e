"""The epoch order of the shard reader: which samples each global step trains on, and which rank reads
which of them. Pure functions of the shard sizes, ``(seed, epoch)``, the global batch ``G`` and the
number of partitions ``P``: no I/O, and nothing depends on the number of ranks.

1. **Shard order.** The manifest's shards, permuted with ``(seed, epoch)`` (:func:`shard_order`), form
   one sample sequence of ``T`` samples.
2. **Partitions.** The epoch has ``steps = T // G`` global steps. The sequence is cut into ``P``
   contiguous *partitions* of ``L = steps * b`` samples, ``b = G / P``; the ``T - P * L`` samples at the
   tail are left out, and as the shard order changes they rotate between epochs.
3. **Partition order.** Within partition ``p`` a shuffle buffer of ``shuffle_buffer`` samples
   (WebDataset's ``shuffle`` stage, Breuel 2020), seeded from ``(seed, epoch, p)``, emits the samples
   (:func:`shuffle_order`, simulated on positions, so the order is known before a byte is read).
4. **Global steps.** Global step ``k`` trains on slots ``[k*b, (k+1)*b)`` of every partition's order,
   partition 0's first, then partition 1's, ... (``EpochPlan.step_samples``).
5. **Ranks.** With ``W`` ranks (``W`` must divide ``P``: :func:`rank_partitions`), rank ``r`` reads the
   ``P / W`` consecutive partitions from ``r * P / W`` on: its slice of every global step, ``G / W``
   samples, in the order of rule 4. So the samples of global step ``k`` are the same at every world
   size that divides ``P``, and a run resumed at another size continues the epoch exactly: every
   sample of the interrupted epoch is trained on once across the resize.

A rank reads each of its partitions front to back, ``P / W`` contiguous stretches of few shards (read
amplification close to 1), and holds one shuffle buffer per partition.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

Span = tuple[int, int, int]
"""``(shard index in the manifest, first sample, stop sample)`` within that shard."""


def shard_order(num_shards: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's shard permutation; identical on every rank."""
    return np.random.default_rng([seed, epoch, 0]).permutation(num_shards)


def check_world_size(partitions: int, world_size: int) -> None:
    """``ValueError`` naming both numbers unless ``world_size`` ranks can share ``partitions``."""
    if world_size < 1 or partitions % world_size:
        raise ValueError(
            f"{world_size} ranks cannot share {partitions} data partitions equally: the number of ranks "
            f"must divide the number of partitions (data.partitions)"
        )


def rank_partitions(partitions: int, world_size: int, rank: int) -> range:
    """The partitions rank ``rank`` of ``world_size`` reads (rule 5)."""
    check_world_size(partitions, world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    share = partitions // world_size
    return range(rank * share, (rank + 1) * share)


def allowed_world_sizes(partitions: int, low: int, high: int) -> list[int]:
    """The world sizes in ``[low, high]`` that divide ``partitions``."""
    return [w for w in range(max(1, low), high + 1) if partitions % w == 0]


@dataclass(frozen=True)
class EpochPlan:
    """The order of epoch ``epoch`` (module doc)."""

    counts: tuple[int, ...]
    """Samples per shard, in manifest order."""
    global_batch: int
    partitions: int
    seed: int
    epoch: int

    def __post_init__(self) -> None:
        if self.partitions < 1 or self.global_batch % self.partitions:
            raise ValueError(
                f"the global batch {self.global_batch} does not split over {self.partitions} data "
                f"partitions (data.partitions must divide data.global_batch_size)"
            )

    @property
    def partition_batch(self) -> int:
        """``b``: the samples each partition gives every global step."""
        return self.global_batch // self.partitions

    @property
    def steps(self) -> int:
        """Global steps of the epoch."""
        return sum(self.counts) // self.global_batch

    @property
    def partition_length(self) -> int:
        return self.steps * self.partition_batch

    def spans(self, partition: int) -> list[Span]:
        """Partition ``partition``'s stretch of the shard sequence as ``[(shard, start, stop), ...]``."""
        if not 0 <= partition < self.partitions:
            raise ValueError(f"partition must be in [0, {self.partitions}), got {partition}")
        lo = partition * self.partition_length
        hi = lo + self.partition_length
        spans: list[Span] = []
        offset = 0
        for shard in shard_order(len(self.counts), self.seed, self.epoch):
            count = int(self.counts[shard])
            start, stop = max(lo, offset), min(hi, offset + count)
            if start < stop:
                spans.append((int(shard), start - offset, stop - offset))
            offset += count
            if offset >= hi:
                break
        return spans

    def order(self, partition: int, shuffle_buffer: int) -> np.ndarray:
        """Positions within partition ``partition`` in the order its shuffle buffer emits them."""
        rng = np.random.default_rng([self.seed, self.epoch, 1, partition, 0])
        return shuffle_order(self.partition_length, shuffle_buffer, rng)


def shuffle_order(n: int, buffer_size: int, rng: np.random.Generator) -> np.ndarray:
    """Output order of a shuffle buffer fed positions ``0..n-1``: ``order[j]`` = input emitted j-th.

    The buffer fills with the first ``buffer_size`` inputs; each further input replaces a uniformly
    chosen buffered one, which is emitted; the rest drains in random order. ``order[j] <= j + buffer_size``.
    """
    if buffer_size <= 1 or n <= 1:
        return np.arange(n, dtype=np.int64)
    size = min(buffer_size, n)
    buf = list(range(size))
    out = np.empty(n, dtype=np.int64)
    picks = rng.integers(0, size, n - size).tolist()
    for j, (k, incoming) in enumerate(zip(picks, range(size, n))):
        out[j] = buf[k]
        buf[k] = incoming
    rest = np.asarray(buf, dtype=np.int64)
    rng.shuffle(rest)
    out[n - size :] = rest
    return out
