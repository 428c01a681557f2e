"""The epoch plan of the shard reader: which samples each rank and loader worker reads, and in what
order. Pure functions of the shard sizes and ``(seed, epoch)``: no I/O, testable without data.
The policy they implement is the reader's contract (:mod:`pipeline.reader`, rules 1-5).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Span = tuple[int, int, int]
"""``(shard index in the manifest, first sample, stop sample)`` within that shard."""


def shard_order(num_shards: int, seed: int, epoch: int) -> np.ndarray:
    """The epoch's shard permutation; identical on every rank."""
    return np.random.default_rng([seed, epoch, 0]).permutation(num_shards)


def plan_epoch(
    shard_sample_counts: Sequence[int], rank: int, world_size: int, batch_size: int, seed: int, epoch: int
) -> list[Span]:
    """Rank ``rank``'s block of the epoch as ``[(shard, start, stop), ...]`` in reading order.

    The shards, permuted by :func:`shard_order`, form one sample sequence; the rank gets
    ``[rank*N, (rank+1)*N)`` with ``N = floor(total / world_size / batch_size) * batch_size``.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    per_rank = samples_per_rank(sum(shard_sample_counts), world_size, batch_size)
    lo, hi = rank * per_rank, (rank + 1) * per_rank
    spans: list[Span] = []
    offset = 0
    for shard in shard_order(len(shard_sample_counts), seed, epoch):
        count = int(shard_sample_counts[shard])
        start, stop = max(lo, offset), min(hi, offset + count)
        if start < stop:
            spans.append((int(shard), start - offset, stop - offset))
        offset += count
        if offset >= hi:
            break
    return spans


def samples_per_rank(total: int, world_size: int, batch_size: int) -> int:
    return (total // world_size // batch_size) * batch_size


def worker_batch_counts(num_batches: int, num_workers: int) -> list[int]:
    """Batches of each worker when batch ``b`` is served by worker ``b % num_workers``."""
    return [num_batches // num_workers + (w < num_batches % num_workers) for w in range(num_workers)]


def split_workers(spans: Sequence[Span], num_workers: int, batch_size: int) -> list[list[Span]]:
    """Cut a rank's block into ``num_workers`` contiguous segments of whole batches."""
    total = sum(stop - start for _, start, stop in spans)
    if total % batch_size:
        raise ValueError(f"block of {total} samples is not a multiple of batch_size {batch_size}")
    out: list[list[Span]] = []
    it = iter(spans)
    shard, start, stop = next(it, (0, 0, 0))
    for n_batches in worker_batch_counts(total // batch_size, num_workers):
        need, segment = n_batches * batch_size, []
        while need:
            if start == stop:
                shard, start, stop = next(it)
            take = min(need, stop - start)
            segment.append((shard, start, start + take))
            start += take
            need -= take
        out.append(segment)
    return out


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
