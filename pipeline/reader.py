"""Streaming shard reader: WebDataset tar shards -> fixed-size batches of encoded image bytes + labels.

Epoch policy (the contract every rank relies on; the plan is :mod:`pipeline.plan`)
-----------------------------------------------------------------------------------
1. **Shard order.** Each epoch permutes the manifest's shards with ``(seed, epoch)``; every rank
   computes the same permutation.
2. **Rank blocks.** The permuted shards are one sample sequence of ``total`` samples (counts from the
   manifest). With ``N = floor(total / world_size / batch_size) * batch_size``, rank ``r`` takes the
   contiguous block ``[r*N, (r+1)*N)``: ranks are disjoint and equal; the ``total - world_size*N``
   samples at the tail are dropped, and as the shard order changes they rotate between epochs. A rank
   opens only the shards overlapping its block and starts at its offset without decoding: with the
   shard's DALI ``.idx`` it seeks straight to the first sample (nothing before it is transferred),
   otherwise it steps over the tar headers before it.
3. **Loader workers.** ``num_workers`` streams (threads; worth it for remote shards, where they overlap
   request latency) subdivide the rank's block into contiguous segments of whole batches; batch ``b``
   of the epoch comes from worker ``b % num_workers``. The number of workers changes the order, never
   the set of samples.
4. **Sample shuffle.** Within a worker's segment, a shuffle buffer of ``shuffle_buffer`` samples
   (WebDataset's ``shuffle`` stage, Breuel 2020) mixes samples, seeded from
   ``(seed, epoch, rank, worker)``. It is simulated on sample *positions*, so the output order is known
   before any byte is read: memory is that of a real buffer (at most ``shuffle_buffer + 1`` encoded
   images per worker), and resuming needs no data that was consumed. The buffer mixes only nearby
   samples: shards must hold their samples in random order (``relic shards build`` shuffles its
   inputs; a class-sorted foreign set would give single-class batches).
5. **Batches.** Slot ``j`` of a worker's shuffled order belongs to local batch ``j // batch_size``.
   Every epoch yields exactly ``batches_per_epoch`` full batches on every rank, never a short one.
6. **Bad samples** leave an empty slot, *filled* (:func:`fill_batch`, the one place that fills) with a
   duplicate of a good sample of the same batch, cycling through them in slot order; a batch without
   any good sample borrows the good samples of the rank's next batch that has some (at the epoch's
   end, of the previous one); only a rank without a single readable sample from ``start_batch`` on
   raises. Each fill is counted in ``stats["filled"]``: equal batch counts on every rank (all-gather
   of the contrast set needs equal shapes) at the cost of rare in-batch duplicates.
7. **Resume** at ``(epoch, start_batch)``: the shuffled order is recomputed, samples of consumed batches
   are never read nor decoded (only the ones still in the shuffle buffer at that point are read), and
   batches ``start_batch..`` equal those of an uninterrupted epoch — also with bad samples, because a
   batch's content depends only on its own slots and later ones (except rule 6's epoch-end borrowing,
   when every later batch is bad as well).

Stages
------
Each worker's stream is a chain of generators with one job each, composed in :meth:`ShardReader.epoch`:
plan (:mod:`pipeline.plan`) -> open with retry and seek (:class:`ShardSource`) -> samples of a span
(:func:`read_span`, shards parsed by :mod:`pipeline.shards.format`) -> validate (:func:`validated`)
-> order (:func:`shuffled`) -> batch (:func:`batched`); the workers' streams are merged by
:func:`pipeline.prefetch.round_robin`, then filled (:func:`filled`).

Bad data never stops the stream and is never silent. Each skipped sample is counted under one reason
(``SKIP_REASONS``) and logged once (reason, shard, key):

- ``missing_image``: a sample without a member of the manifest's ``image_ext``;
- ``empty_image``, ``wrong_format``, ``corrupt_image``, ``unsupported_image``: the image check of
  :func:`pipeline.shards.images.image_problem` at the reader's ``validate`` level;
- ``truncated_tar``: the tar ended (or broke) before the sample was complete, or is shorter than the
  manifest says; its good samples before the break are delivered;
- ``unreadable_shard``: the shard could not be opened after ``max_open_retries`` retries with
  exponential backoff, is not a tar at all, or scatters a sample's members over the file.

A storage error (``OSError``: connection reset, timeout) in the middle of a shard re-opens it, with
the same backoff, at the first sample not yet handed out. Labels that cannot be parsed (the manifest's
:class:`~pipeline.shards.format.LabelRule`) are counted as ``bad_label`` and delivered as -1.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any, TypeVar

import numpy as np

from pipeline import storage
from pipeline.plan import Span, plan_epoch, samples_per_rank, shuffle_order, split_workers
from pipeline.prefetch import round_robin
from pipeline.shards import dali_index
from pipeline.shards.format import (
    NonAdjacentMembers,
    Sample,
    TarFormatError,
    header_name,
    image_member,
    read_exact,
    samples,
    tar_members,
)
from pipeline.shards.images import image_problem
from pipeline.shards.manifest import Manifest, load_manifest

log = logging.getLogger(__name__)

SKIP_REASONS = (
    "missing_image",
    "empty_image",
    "wrong_format",
    "corrupt_image",
    "unsupported_image",
    "truncated_tar",
    "unreadable_shard",
)
VALIDATE_LEVELS = (True, False, "cheap", "decode")


@dataclass
class RawBatch:
    images: list[bytes]
    """Encoded image bytes, ``len == batch_size``."""
    labels: np.ndarray
    """int64 ``[batch_size]``, -1 when unlabelled."""
    keys: list[str]
    """Sample keys (unique within a shard set); a repeated key marks a filled slot."""


@dataclass
class Good:
    """A sample that passed validation."""

    key: str
    image: bytes
    label: int


class Tally:
    """The reader's counters, shared by its threads: skipped samples per reason, ``bad_label``,
    ``filled`` slots and good ``samples``; each (reason, shard, key) is logged once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = dict.fromkeys((*SKIP_REASONS, "bad_label", "filled", "samples"), 0)
        self._logged: set[tuple[str, str, str]] = set()

    def count(self, reason: str, shard: str, key: str, detail: str, n: int = 1) -> None:
        self.add(reason, n)
        self.note(reason, shard, key, detail)

    def add(self, name: str, n: int) -> None:
        with self._lock:
            self._counts[name] += n

    def note(self, reason: str, shard: str, key: str, detail: str) -> None:
        with self._lock:
            if (reason, shard, key) in self._logged:
                return
            self._logged.add((reason, shard, key))
        log.warning("skipping %s: shard %s key %s: %s", reason, shard, key, detail)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


# --- open and seek -------------------------------------------------------------------------------


class ShardSource:
    """Opens the shards of a manifest: retries with exponential backoff, seeks with DALI indexes."""

    def __init__(
        self,
        manifest: Manifest,
        options: dict[str, Any] | None,
        tally: Tally,
        *,
        retries: int = 3,
        delay: float = 0.5,
    ) -> None:
        self.manifest, self.options, self.tally = manifest, options, tally
        self.retries, self.delay = retries, delay

    def name(self, shard: int) -> str:
        return self.manifest.shards[shard].name

    def open(self, shard: int) -> IO[bytes]:
        """The shard's byte stream; the last error after ``retries`` retries."""
        url = self.manifest.shard_url(shard)
        for attempt in range(self.retries + 1):
            try:
                return storage.open_stream(url, self.options)
            except Exception as e:  # any backend error: retry, then the caller skips the shard
                if attempt == self.retries:
                    raise
                self.backoff(attempt, f"retrying {url}", e)
        raise AssertionError("unreachable")

    def backoff(self, attempt: int, what: str, error: BaseException) -> None:
        delay = self.delay * 2**attempt
        log.info("%s in %.1fs after %s: %s", what, delay, type(error).__name__, error)
        time.sleep(delay)

    def seek(self, stream: IO[bytes], shard: int, ordinal: int) -> int:
        """Move ``stream`` to sample ``ordinal`` with the shard's DALI index and return ``ordinal``; or
        leave it at the start and return 0 (no index, a stream that cannot seek, or an index out of
        date: the header found there is not the member it names)."""
        index = self.manifest.shards[shard].index
        if ordinal == 0 or not index or not _seekable(stream):
            return 0
        idx_url = storage.join(storage.dirname(self.manifest.url or ""), index)
        try:
            with storage.open_url(idx_url, "rb", self.options) as f:
                location = dali_index.sample_location(f, ordinal)
            if location is None:
                return 0
            header_offset = location[0] - 512
            stream.seek(header_offset)
            found = header_name(read_exact(stream, 512))
            stream.seek(header_offset)
        except (OSError, ValueError) as e:
            self.tally.note("index_unusable", self.name(shard), index, f"{type(e).__name__}: {e}")
            stream.seek(0)
            return 0
        if found != location[1]:
            stream.seek(0)
            return 0
        return ordinal


def _seekable(stream: IO[bytes]) -> bool:
    try:
        return bool(stream.seekable())
    except (AttributeError, OSError, ValueError):
        return False


# --- samples of a span ---------------------------------------------------------------------------


def read_span(
    source: ShardSource, shard: int, ordinals: Sequence[int], exts: frozenset[str]
) -> Iterator[tuple[int, Sample | None]]:
    """``(ordinal, sample)`` for each of the sorted ``ordinals`` of one shard, streamed, with the members
    in ``exts`` read; ``None`` for a sample that could not be read (counted). A storage error mid-shard
    re-opens the shard, with backoff, at the first sample not yet handed out."""
    name, tally = source.name(shard), source.tally
    remaining = list(ordinals)
    attempt = 0
    while remaining:
        try:
            stream = source.open(shard)
        except Exception as e:
            detail = f"{type(e).__name__}: {e} (after {source.retries + 1} attempts)"
            tally.count("unreadable_shard", name, "*", detail, len(remaining))
            yield from ((o, None) for o in remaining)
            return
        wanted = set(remaining)
        seen = delivered = -1  # the highest ordinal the tar completed / handed out
        error: BaseException | None = None
        try:
            first = source.seek(stream, shard, remaining[0])
            for sample in samples(
                tar_members(stream),
                lambda o, ext, wanted=wanted: o in wanted and ext in exts,
                shard=name,
                first_ordinal=first,
                last_ordinal=remaining[-1],
            ):
                seen = sample.ordinal
                if sample.ordinal in wanted:
                    yield sample.ordinal, sample
                    delivered = sample.ordinal
        except (TarFormatError, OSError) as e:
            error = e
        finally:
            stream.close()
        remaining = [o for o in remaining if o > delivered]
        if isinstance(error, OSError) and not isinstance(error, TarFormatError) and attempt < source.retries:
            source.backoff(attempt, f"re-opening {name} at sample {delivered + 1}", error)
            attempt += 1
            continue
        if not remaining:
            return
        if error is None:
            detail = f"tar ends after sample {seen}, manifest lists {source.manifest.shards[shard].samples}"
            reason = "truncated_tar"
        elif isinstance(error, NonAdjacentMembers) or seen < 0:
            detail = f"not a readable tar: {type(error).__name__}: {error}"
            reason = "unreadable_shard"
        else:
            detail = f"{type(error).__name__}: {error}"
            reason = "truncated_tar"
        tally.count(reason, name, f"samples #{remaining[0]}..", detail, len(remaining))
        yield from ((o, None) for o in remaining)
        return


# --- validate, order, batch, fill ----------------------------------------------------------------


def validated(
    items: Iterator[tuple[int, Sample | None]],
    manifest: Manifest,
    shard: str,
    level: bool | str,
    tally: Tally,
) -> Iterator[tuple[int, Good | None]]:
    """Each sample as :class:`Good`, or None when it has no image or the image fails the check."""
    rule = manifest.labels
    for ordinal, sample in items:
        if sample is None:
            yield ordinal, None
            continue
        ext = image_member(sample.parts, manifest.image_ext)
        if ext is None:
            tally.count("missing_image", shard, sample.key, f"members {sorted(set(sample.exts))}")
            yield ordinal, None
            continue
        problem = image_problem(sample.parts[ext], manifest.image_ext, level)
        if problem is not None:
            tally.count(problem[0], shard, sample.key, problem[1])
            yield ordinal, None
            continue
        label = rule.parse(sample.parts)
        if label is None:
            tally.count("bad_label", shard, sample.key, f"unparseable or unknown label in .{rule.ext}")
            label = -1
        yield ordinal, Good(sample.key, sample.parts[ext], label)


T = TypeVar("T")


def shuffled(positions: Iterator[tuple[int, T]], order: np.ndarray) -> Iterator[T]:
    """The items of ``positions`` (``(position, item)`` in increasing position) in ``order``: a shuffle
    buffer's output (:func:`pipeline.plan.shuffle_order`), holding only the items it must."""
    held: dict[int, T] = {}
    for p in order.tolist():
        while p not in held:
            position, item = next(positions)
            held[position] = item
        yield held.pop(p)


def batched(items: Iterator[T], batch_size: int) -> Iterator[list[T]]:
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []


def fill_batch(slots: Sequence[T | None], donors: Sequence[T]) -> tuple[list[T], int]:
    """``slots`` with every ``None`` replaced by a donor, cycling through ``donors`` in slot order; and
    how many were filled. The one rule for filling bad samples (the reader's and the loader's)."""
    if not donors:
        raise ValueError("fill_batch: no good sample to fill the batch with")
    out, filled = [], 0
    for slot in slots:
        if slot is None:
            slot = donors[filled % len(donors)]
            filled += 1
        out.append(slot)
    return out, filled


def filled(batches: Iterator[list[Good | None]], tally: Tally, describe: str) -> Iterator[RawBatch]:
    """Rule 6 over a rank's batches in order: fill each batch from its own good samples, a batch
    without any from the next batch that has some (at the end, from the previous one)."""
    pending: list[list[Good | None]] = []
    last_goods: list[Good] = []

    def emit(slots: list[Good | None], donors: list[Good]) -> RawBatch:
        full, count = fill_batch(slots, donors)
        tally.add("filled", count)
        tally.add("samples", len(slots) - count)
        return RawBatch(
            images=[s.image for s in full],
            labels=np.fromiter((s.label for s in full), dtype=np.int64, count=len(full)),
            keys=[s.key for s in full],
        )

    for slots in batches:
        goods = [s for s in slots if s is not None]
        if not goods:
            pending.append(slots)
            continue
        for waiting in pending:
            yield emit(waiting, goods)
        pending.clear()
        last_goods = goods
        yield emit(slots, goods)
    if pending and not last_goods:
        raise RuntimeError(f"{describe}: no readable sample; see the logged errors")
    for waiting in pending:
        yield emit(waiting, last_goods)


# --- the reader ----------------------------------------------------------------------------------


class ShardReader:
    """Fixed-size batches of encoded images + labels for one rank of one epoch (policy: module doc).

    ``manifest_url``: ``manifest.json`` or its directory, local or any fsspec URL (s3:// ...);
    ``storage_options``: fsspec options for remote shards (endpoint, profile); ``num_workers``: reading
    threads, each with its own ``shuffle_buffer`` (in samples) and ``prefetch`` ready batches;
    ``validate``: ``True``/``"cheap"``, ``"decode"`` or ``False`` (:mod:`pipeline.shards.images`); a
    shard that fails to open is retried ``max_open_retries`` times, waiting ``retry_delay`` seconds,
    doubled each time. ``stats`` is cumulative over the reader's life; see ``SKIP_REASONS``.
    """

    def __init__(
        self,
        manifest_url: str,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        storage_options: dict[str, Any] | None = None,
        validate: bool | str = True,
        max_open_retries: int = 3,
        retry_delay: float = 0.5,
        prefetch: int = 2,
    ) -> None:
        for name, value, low in (
            ("batch_size", batch_size, 1),
            ("world_size", world_size, 1),
            ("num_workers", num_workers, 1),
        ):
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if validate not in VALIDATE_LEVELS:
            raise ValueError(f'validate must be True, False, "cheap" or "decode", got {validate!r}')
        self.manifest = load_manifest(manifest_url, storage_options)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.num_workers, self.seed, self.shuffle_buffer = num_workers, seed, shuffle_buffer
        self.validate, self.prefetch = validate, prefetch
        self._counts = [s.samples for s in self.manifest.shards]
        self.samples_per_rank = samples_per_rank(sum(self._counts), world_size, batch_size)
        if self.samples_per_rank == 0:
            raise ValueError(
                f"{self.manifest.url}: {sum(self._counts)} samples cannot give world_size={world_size} "
                f"ranks one batch of {batch_size} each"
            )
        self.batches_per_epoch = self.samples_per_rank // batch_size
        self._tally = Tally()
        self._source = ShardSource(
            self.manifest, storage_options, self._tally, retries=max_open_retries, delay=retry_delay
        )
        rule = self.manifest.labels
        self._exts = frozenset(
            ({"jpg", "jpeg"} if self.manifest.image_ext in ("jpg", "jpeg") else {self.manifest.image_ext})
            | ({rule.ext} if rule.ext else set())
        )

    def __len__(self) -> int:
        return self.batches_per_epoch

    @property
    def stats(self) -> dict[str, int]:
        """Cumulative counters: samples skipped per reason, ``bad_label``, ``filled`` slots, ``samples``
        (good samples delivered, fills excluded)."""
        return self._tally.snapshot()

    def plan(self, epoch: int) -> list[list[Span]]:
        """This rank's spans per loader worker for ``epoch``."""
        spans = plan_epoch(self._counts, self.rank, self.world_size, self.batch_size, self.seed, epoch)
        return split_workers(spans, self.num_workers, self.batch_size)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[RawBatch]:
        """Batches ``start_batch .. batches_per_epoch-1`` of ``epoch`` on this rank."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch must be in [0, {self.batches_per_epoch}], got {start_batch}")
        workers = self.num_workers
        streams = [
            self._worker_batches(epoch, w, spans, -(-max(0, start_batch - w) // workers))
            for w, spans in enumerate(self.plan(epoch))
        ]
        merged = (
            streams[0]
            if workers == 1
            else round_robin(streams, self.prefetch, "shard-reader", first=start_batch)
        )
        expected = self.batches_per_epoch - start_batch
        count = 0
        try:
            for batch in filled(
                merged, self._tally, f"rank {self.rank}, epoch {epoch}, from batch {start_batch}"
            ):
                count += 1
                yield batch
        finally:
            merged.close()
        if count != expected:
            raise RuntimeError(
                f"rank {self.rank} epoch {epoch}: {count} batches from the readers, expected {expected}"
            )

    def _worker_batches(
        self, epoch: int, worker: int, spans: list[Span], start_batch: int
    ) -> Iterator[list[Good | None]]:
        """One worker's batches as slot lists (None for a bad sample), from its ``start_batch`` on."""
        n = sum(stop - start for _, start, stop in spans)
        rng = np.random.default_rng([self.seed, epoch, 1, self.rank, worker])
        order = shuffle_order(n, self.shuffle_buffer, rng)[start_batch * self.batch_size :]
        needed = np.zeros(n, dtype=bool)
        needed[order] = True
        return batched(shuffled(self._positions(spans, needed), order), self.batch_size)

    def _positions(self, spans: list[Span], needed: np.ndarray) -> Iterator[tuple[int, Good | None]]:
        """``(position in the worker's segment, sample)`` for every needed position, in order."""
        base = 0
        for shard, start, stop in spans:
            ordinals = (np.flatnonzero(needed[base : base + stop - start]) + start).tolist()
            if ordinals:
                name = self._source.name(shard)
                items = read_span(self._source, shard, ordinals, self._exts)
                for ordinal, good in validated(items, self.manifest, name, self.validate, self._tally):
                    yield base + ordinal - start, good
            base += stop - start
