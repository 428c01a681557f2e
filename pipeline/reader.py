"""Streaming shard reader: WebDataset tar shards -> fixed-size batches of encoded image bytes + labels.

Epoch policy (the contract every rank relies on)
------------------------------------------------
1. **Order.** The epoch's global steps, which samples each holds and which rank reads which of them
   are :mod:`pipeline.plan`'s: shards permuted with ``(seed, epoch)``, cut into ``partitions``
   contiguous partitions, each emitted through its own shuffle buffer; global step ``k`` takes
   ``global_batch / partitions`` samples of every partition; rank ``r`` of ``world_size`` reads the
   partitions ``r * P / W ..`` and trains on their part of each step. Nothing of it depends on the
   number of ranks, so a run resumed at any world size that divides the number of partitions
   continues the epoch exactly. A rank opens only the shards of its partitions and starts each at its
   offset without decoding: with the shard's DALI ``.idx`` it seeks straight to the first sample
   (nothing before it is transferred), otherwise it steps over the tar headers before it.
2. **Threads.** ``num_workers`` threads (worth it for remote shards, where they overlap request
   latency) read the rank's partitions, partition ``i`` of the rank by thread ``i % num_workers``.
   They change neither the order nor the samples. By default a run has ``world_size * num_workers``
   partitions: one per thread.
3. **Memory.** One shuffle buffer per partition, at most ``shuffle_buffer + 1`` encoded images each.
   The buffer mixes only nearby samples: shards must hold their samples in random order (``relic
   shards build`` shuffles its inputs; a class-sorted foreign set would give single-class batches).
4. **Batches.** Every epoch yields exactly ``batches_per_epoch`` full batches on every rank, never a
   short one.
5. **Bad samples** leave an empty slot, *filled* (:func:`fill_batch`, the one place that fills) with a
   duplicate of a good sample of the same batch, cycling through them in slot order; a batch without
   any good sample borrows the good samples of the rank's next batch that has some (at the epoch's
   end, of the previous one); only a rank without a single readable sample from ``start_batch`` on
   raises. Each fill is counted in ``stats["filled"]``: equal batch counts on every rank (all-gather
   of the contrast set needs equal shapes) at the cost of rare in-batch duplicates.
6. **Resume** at ``(epoch, start_batch)``: the orders are recomputed, samples of consumed batches are
   never read nor decoded (only the ones still in the shuffle buffers at that point are read), and
   batches ``start_batch..`` equal those of an uninterrupted epoch — also with bad samples, because a
   batch's content depends only on its own slots and later ones (except rule 5's epoch-end
   borrowing, when every later batch is bad as well).

Stages
------
Each partition's stream is a chain of generators with one job each, composed in
:meth:`ShardReader.epoch`: plan (:mod:`pipeline.plan`) -> open with retry and seek (:class:`ShardSource`)
-> samples of a span (:func:`read_span`, shards parsed by :mod:`pipeline.shards.format`) -> validate
(:func:`validated`) -> order (:func:`shuffled`) -> chunk per step (:func:`batched`); the rank's
partitions are read in step with each other (:func:`pipeline.prefetch.lockstep`, one thread each
``num_workers``), joined into batches, then filled (:func:`filled`).

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

Saliency masks (:mod:`pipeline.shards.masks`), when the manifest says the set has them
(``Manifest.has_masks``) and the reader is asked for them (``masks=True``, the default): each good sample's ``{key}.mask.png`` member comes with it (``Good.mask``,
``RawBatch.masks``) when it passes :func:`~pipeline.shards.masks.mask_problem` at the reader's
``validate`` level, its aspect ratio checked against the image's header size. A bad mask is counted
as ``bad_mask`` (logged once) and its sample kept without it; a sample without a mask member is
counted as ``unmasked`` and kept. Neither is a skip reason. A filled slot carries its donor's mask. A
mask member without an image is a sample without an image (``missing_image``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any, TypeVar

import numpy as np

from pipeline import storage
from pipeline.plan import EpochPlan, Span, rank_partitions
from pipeline.prefetch import lockstep
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
from pipeline.shards.images import image_problem, image_size
from pipeline.shards.manifest import Manifest, load_manifest
from pipeline.shards.masks import MASK_EXT, mask_problem

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
    masks: list[bytes | None] | None = None
    """Encoded saliency masks (``pipeline.shards.masks``), one per image, None for an image without a
    usable mask; None altogether when the shard set has no masks."""


@dataclass
class Good:
    """A sample that passed validation."""

    key: str
    image: bytes
    label: int
    mask: bytes | None = None
    """The sample's encoded saliency mask, when it has a usable one."""


KEPT_COUNTERS = ("bad_label", "bad_mask", "unmasked")
"""Counters of samples delivered despite something: an unparseable label (as -1), a bad mask and no
mask (without one)."""


class Tally:
    """The reader's counters, shared by its threads: skipped samples per reason, ``KEPT_COUNTERS``,
    ``filled`` slots and good ``samples``; each (reason, shard, key) is logged once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = dict.fromkeys((*SKIP_REASONS, *KEPT_COUNTERS, "filled", "samples"), 0)
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
        action = (
            "skipping "
            if reason in SKIP_REASONS
            else "keeping a sample with "
            if reason in KEPT_COUNTERS
            else ""
        )
        log.warning("%s%s: shard %s key %s: %s", action, reason, shard, key, detail)

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
    masked: bool = False,
) -> Iterator[tuple[int, Good | None]]:
    """Each sample as :class:`Good`, or None when it has no image or the image fails the check; with
    its mask when ``masked`` (the reader reads masks) and the sample has a good one (module doc)."""
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
        mask = None
        if masked:
            mask = sample.parts.get(MASK_EXT)
            if mask is None:
                tally.add("unmasked", 1)
            else:
                bad = mask_problem(mask, image_size(sample.parts[ext]) if level else None, level)
                if bad is not None:
                    tally.count(bad[0], shard, sample.key, bad[1])
                    mask = None
        yield ordinal, Good(sample.key, sample.parts[ext], label, mask)


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


def filled(
    batches: Iterator[list[Good | None]], tally: Tally, describe: str, masks: bool = False
) -> Iterator[RawBatch]:
    """Rule 6 over a rank's batches in order: fill each batch from its own good samples, a batch
    without any from the next batch that has some (at the end, from the previous one). ``masks``:
    the set has masks, so each batch carries ``masks`` (a filled slot its donor's)."""
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
            masks=[s.mask for s in full] if masks else None,
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
    ``batch_size``: this rank's batch (the global batch is ``batch_size * world_size``);
    ``partitions``: how many partitions the epoch is cut into (default ``world_size * num_workers``;
    ``world_size`` must divide it, and it must divide the global batch); ``storage_options``: fsspec
    options for remote shards (endpoint, profile); ``num_workers``: reading threads; ``shuffle_buffer``:
    samples per partition's buffer; ``prefetch``: steps each thread reads ahead; ``validate``:
    ``True``/``"cheap"``, ``"decode"`` or ``False`` (:mod:`pipeline.shards.images`); ``masks``: deliver
    the set's saliency masks (``RawBatch.masks``), if it has any; a shard that fails
    to open is retried ``max_open_retries`` times, waiting ``retry_delay`` seconds, doubled each time.
    ``stats`` is cumulative over the reader's life; see ``SKIP_REASONS``.
    """

    def __init__(
        self,
        manifest_url: str,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 1,
        partitions: int | None = None,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        storage_options: dict[str, Any] | None = None,
        validate: bool | str = True,
        masks: bool = True,
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
        if validate not in VALIDATE_LEVELS:
            raise ValueError(f'validate must be True, False, "cheap" or "decode", got {validate!r}')
        self.manifest = load_manifest(manifest_url, storage_options)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.validate, self.prefetch = validate, prefetch
        self.partitions = world_size * num_workers if partitions is None else partitions
        self.global_batch = batch_size * world_size
        self._owned = list(rank_partitions(self.partitions, world_size, rank))
        self.num_workers = min(num_workers, len(self._owned))
        """Reading threads actually used: at most one per partition of this rank."""
        self._counts = tuple(s.samples for s in self.manifest.shards)
        self.batches_per_epoch = self.plan(0).steps
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{self.manifest.url}: {sum(self._counts)} samples cannot give one global batch of "
                f"{self.global_batch} ({world_size} ranks x {batch_size})"
            )
        self.samples_per_rank = self.batches_per_epoch * batch_size
        self._tally = Tally()
        self._source = ShardSource(
            self.manifest, storage_options, self._tally, retries=max_open_retries, delay=retry_delay
        )
        self.masks = masks and self.manifest.has_masks
        """Whether batches carry masks: asked for (``masks``) and the set has them. A reader for a
        recipe without masked views passes ``masks=False`` and never reads or checks a mask member."""
        rule = self.manifest.labels
        self._exts = frozenset(
            ({"jpg", "jpeg"} if self.manifest.image_ext in ("jpg", "jpeg") else {self.manifest.image_ext})
            | ({rule.ext} if rule.ext else set())
            | ({MASK_EXT} if self.masks else set())
        )

    def __len__(self) -> int:
        return self.batches_per_epoch

    @property
    def stats(self) -> dict[str, int]:
        """Cumulative counters: samples skipped per reason, ``bad_label``, ``bad_mask`` and
        ``unmasked`` (samples delivered without a mask in a set with masks), ``filled`` slots,
        ``samples`` (good samples delivered, fills excluded)."""
        return self._tally.snapshot()

    @property
    def owned_partitions(self) -> list[int]:
        """The partitions this rank reads (``pipeline.plan.rank_partitions``)."""
        return list(self._owned)

    @property
    def order_facts(self) -> dict[str, int | str]:
        """What the samples of every global step depend on (``pipeline.plan``), to compare across
        restarts: the shard set (a digest of the manifest's shard names, sample counts and sha256),
        the global batch, the partitions, the seed and the shuffle buffer. Not the world size."""
        listed = [[s.name, s.samples, s.sha256] for s in self.manifest.shards]
        return {
            "shards": hashlib.sha256(json.dumps(listed).encode()).hexdigest()[:16],
            "global_batch": self.global_batch,
            "partitions": self.partitions,
            "seed": self.seed,
            "shuffle_buffer": self.shuffle_buffer,
        }

    def plan(self, epoch: int) -> EpochPlan:
        """The order of ``epoch``, the same on every rank and at every world size."""
        return EpochPlan(self._counts, self.global_batch, self.partitions, self.seed, epoch)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[RawBatch]:
        """Batches ``start_batch .. batches_per_epoch-1`` of ``epoch`` on this rank."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch must be in [0, {self.batches_per_epoch}], got {start_batch}")
        plan = self.plan(epoch)
        threads = self.num_workers
        groups = [self._owned[t::threads] for t in range(threads)]
        streams = [_joined([self._partition_chunks(plan, p, start_batch) for p in group]) for group in groups]
        merged = streams[0] if threads == 1 else _flattened(lockstep(streams, self.prefetch, "shard-reader"))
        read_order = [p for group in groups for p in group]  # the order of the chunks in a merged step
        order = [read_order.index(p) for p in self._owned]
        batches = ([slot for i in order for slot in chunks[i]] for chunks in merged)
        expected = self.batches_per_epoch - start_batch
        count = 0
        try:
            for batch in filled(
                batches,
                self._tally,
                f"rank {self.rank}, epoch {epoch}, from batch {start_batch}",
                self.masks,
            ):
                count += 1
                yield batch
        finally:
            merged.close()  # stops the threads; each closes the shards it is reading
        if count != expected:
            raise RuntimeError(
                f"rank {self.rank} epoch {epoch}: {count} batches from the readers, expected {expected}"
            )

    def _partition_chunks(
        self, plan: EpochPlan, partition: int, start_batch: int
    ) -> Iterator[list[Good | None]]:
        """Partition ``partition``'s part of each global step from ``start_batch`` on: lists of
        ``plan.partition_batch`` slots (None for a bad sample)."""
        b = plan.partition_batch
        order = plan.order(partition, self.shuffle_buffer)[start_batch * b :]
        needed = np.zeros(plan.partition_length, dtype=bool)
        needed[order] = True
        return batched(shuffled(self._positions(plan.spans(partition), needed), order), b)

    def _positions(self, spans: list[Span], needed: np.ndarray) -> Iterator[tuple[int, Good | None]]:
        """``(position in the partition, sample)`` for every needed position, in order."""
        base = 0
        for shard, start, stop in spans:
            ordinals = (np.flatnonzero(needed[base : base + stop - start]) + start).tolist()
            if ordinals:
                name = self._source.name(shard)
                items = read_span(self._source, shard, ordinals, self._exts)
                for ordinal, good in validated(
                    items, self.manifest, name, self.validate, self._tally, self.masks
                ):
                    yield base + ordinal - start, good
            base += stop - start


def _flattened(steps: Iterator[tuple[tuple[T, ...], ...]]) -> Iterator[tuple[T, ...]]:
    """Each step's tuple of per-thread tuples as one tuple; closes ``steps`` when closed."""
    try:
        for parts in steps:
            yield sum(parts, ())
    finally:
        steps.close()


def _joined(chunk_streams: list[Iterator[list[Good | None]]]) -> Iterator[tuple[list[Good | None], ...]]:
    """The chunks of several partitions, one of each per step; closes them all when closed."""
    try:
        yield from zip(*chunk_streams)
    finally:
        for stream in chunk_streams:
            stream.close()
