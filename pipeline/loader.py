"""Batches of augmented views as torch tensors: raw JPEG batches -> one DALI graph -> ``ViewBatch``.

``ViewLoader`` takes any *reader* with ``.epoch(epoch, start_batch) -> Iterator[RawBatch]`` (a
``pipeline.reader.ShardReader`` in production; anything giving ``RawBatch``es in tests) and a
:class:`~pipeline.augment.ViewRecipe`; each ``ViewBatch`` it yields carries the views, labels and
sample keys of one raw batch and the recipe's number of large views.

Overlap: a background thread pulls raw batches from the reader (Python: tar streaming, S3) into a
bounded queue of ``prefetch`` batches, while DALI's worker threads (native code, no GIL) decode and
augment the batches that ``fn.external_source`` already took, ``prefetch`` batches ahead. On the CPU
the threads are split into independent single-threaded pipelines dealt the batches round robin
(``num_pipelines``), so that no thread waits for another at the end of each operator.

Reproducibility: the DALI pipeline is rebuilt for every ``epoch()`` call with its seed derived from
(seed, reader rank, epoch, start_batch), so the same reader data and the same arguments give the
same views. (A resumed epoch therefore draws different augmentations from the uninterrupted one;
the samples are the same.) The rebuild and the first batches of a new epoch cost a pause that short
epochs feel; ``prepare(epoch, start_batch)`` announces the next call, which is then set up in the
background (reading, pipeline build, first run) once the current segment has been read, giving the
same batches as without it.

Corrupt data: the reader validates images cheaply, but DALI's decoder raises on anything it cannot
decode. When a batch fails, the loader rebuilds the pipeline, fully decodes every sample of the
batches that were in flight with PIL, fills the slot of each undecodable sample with a decodable one
of the same batch (``pipeline.reader.fill_batch``; the batch size is fixed: training gathers equal
shapes), counts it in
``stats["decode_fallback"]`` and logs its key once, then re-feeds those batches.

Masks: with a recipe whose ``mask_prob > 0`` the loader feeds DALI each sample's encoded saliency
mask beside its image (``RawBatch.masks``; ``pipeline.shards.masks.FULL_MASK``, "keep everything",
for a sample without one, and for every sample of a set without masks, which it logs once). A
filled slot takes its donor's mask with its image; a mask that cannot be decoded is replaced by
``FULL_MASK`` (its sample's views are then unmasked), counted in ``stats["mask_fallback"]``.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.augment import ViewRecipe, build_pipeline, derive_seed
from pipeline.prefetch import Prefetcher
from pipeline.reader import fill_batch
from pipeline.shards.images import decode_problem
from pipeline.shards.images import reencode as reencode_jpeg

log = logging.getLogger(__name__)

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: The most DALI pipelines ``ViewLoader`` runs on the CPU by default (each holds its own buffers).
MAX_CPU_PIPELINES = 4


def pipeline_threads(num_threads: int, num_pipelines: int | None = None) -> list[int]:
    """DALI threads of each pipeline: ``num_threads`` shared out over ``num_pipelines`` (default: one
    per thread, at most ``MAX_CPU_PIPELINES``), the remainder to the first ones."""
    if num_threads < 1:
        raise ValueError(f"ViewLoader num_threads: expected >= 1, got {num_threads}")
    if num_pipelines is None:
        num_pipelines = min(num_threads, MAX_CPU_PIPELINES)
    if not 1 <= num_pipelines <= num_threads:
        raise ValueError(
            f"ViewLoader num_pipelines: expected 1..num_threads ({num_threads}), got {num_pipelines}"
        )
    share, extra = divmod(num_threads, num_pipelines)
    return [share + (k < extra) for k in range(num_pipelines)]


@dataclass
class ViewBatch:
    """One training batch: everything ``training.loop.train_step`` needs, nothing to re-derive."""

    views: list[torch.Tensor]
    """``views[v]``: ``[B, 3, H_v, W_v]`` on the training device, the large views first."""
    labels: torch.Tensor
    """``[B]`` int64 on the same device, -1 when unlabelled."""
    keys: list[str]
    """The ``B`` sample keys; a repeated key marks a filled slot (``pipeline.reader.fill_batch``)."""
    num_large: int
    """How many of ``views`` are large (target) views: the recipe's ``num_large``."""


class _Batch:
    """A raw batch as DALI's external source takes it: uint8 arrays (no copy of the bytes); ``masks``
    (one encoded mask per image) only when the recipe uses masks."""

    __slots__ = ("arrays", "keys", "labels", "masks")

    def __init__(
        self, images: list[bytes], labels: Any, keys: list[str], masks: list[bytes] | None = None
    ) -> None:
        self.arrays = [np.frombuffer(b, dtype=np.uint8) for b in images]
        self.labels = np.asarray(labels, dtype=np.int64).reshape(len(images))
        self.keys = list(keys)
        if len(self.keys) != len(self.arrays):
            raise ValueError(f"raw batch: {len(self.arrays)} images but {len(self.keys)} keys")
        self.masks = None if masks is None else [np.frombuffer(m, dtype=np.uint8) for m in masks]
        if self.masks is not None and len(self.masks) != len(self.arrays):
            raise ValueError(f"raw batch: {len(self.arrays)} images but {len(self.masks)} masks")

    def feed(self) -> tuple:
        """What the pipeline's external source takes: ``(images, labels[, masks])``."""
        if self.masks is None:
            return self.arrays, self.labels
        return self.arrays, self.labels, self.masks


class _Lane:
    """One DALI pipeline of a segment: the batches it holds (``inflight``) or must see again after a
    repair (``replay``). Lane ``k`` of ``P`` processes the segment's batches ``k, k + P, ...``."""

    def __init__(self, segment: _Segment, index: int) -> None:
        self.segment, self.index = segment, index
        self.pending: collections.deque[_Batch] = collections.deque()  # dealt to this lane, not yet taken
        self.inflight: collections.deque[_Batch] = collections.deque()
        self.replay: collections.deque[_Batch] = collections.deque()
        self.pipe: Any = None

    def source(self):
        batch = self.replay.popleft() if self.replay else self.segment.deal(self)
        self.inflight.append(batch)
        return batch.feed()

    def seed(self, *extra: int) -> int:
        loader, segment = self.segment.loader, self.segment
        rank = int(getattr(loader.reader, "rank", 0))
        lane = (self.index,) if len(segment.lanes) > 1 else ()  # one lane: the seeds of one pipeline
        return derive_seed(loader.seed, rank, *segment.key, *extra, *lane)


class _Segment:
    """One ``epoch(epoch, start_batch)`` call's state: its reading thread and its lanes (DALI
    pipelines, ``ViewLoader.num_pipelines`` of them, dealt the batches round robin), built once the
    first batch gives the batch size — in the caller's thread, or ahead in a background thread
    (``ViewLoader.prepare``)."""

    def __init__(self, loader: ViewLoader, epoch: int, start_batch: int, background: bool = False) -> None:
        self.loader, self.key = loader, (epoch, start_batch)
        raw = loader.reader.epoch(epoch, start_batch)
        self.feeder = Prefetcher(
            (_Batch(b.images, b.labels, b.keys, loader._masks(b)) for b in raw),
            loader.prefetch,
            "ViewLoader-feeder",
        )
        self.lanes = [_Lane(self, k) for k in range(loader.num_pipelines)]
        self.batch_size = 0
        self.outputs = 0  # batches handed out so far: the next comes from lane outputs % P
        self._dealt = 0
        self._deal_lock = threading.Lock()
        self._error: BaseException | None = None
        self._first: Any = None  # the first run()'s outputs (or its exception), when set up ahead
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._setup, daemon=True, name="ViewLoader-prepare")
            self._thread.start()

    def deal(self, lane: _Lane) -> _Batch:
        """The next batch of ``lane``: the segment's batch ``j`` goes to lane ``j % P`` whatever order
        the lanes' DALI threads ask in (raises StopIteration when the reader has no more)."""
        with self._deal_lock:
            while not lane.pending:
                batch = self.feeder.get(self.loader.timeout)
                self.lanes[self._dealt % len(self.lanes)].pending.append(batch)
                self._dealt += 1
            return lane.pending.popleft()

    @property
    def lane(self) -> _Lane:
        """The lane the next batch comes from."""
        return self.lanes[self.outputs % len(self.lanes)]

    def _setup(self) -> None:
        try:
            first = self.feeder.get(self.loader.timeout)
        except StopIteration:
            return
        except BaseException as e:  # re-raised by ready() in the consumer's thread
            self._error = e
            return
        self.lanes[0].pending.append(first)
        self._dealt = 1
        self.batch_size = len(first.arrays)
        try:
            for lane in self.lanes:
                lane.pipe = self.loader._build(self.batch_size, lane.seed(), lane.source, lane.index)
        except BaseException as e:
            self._error = e
            return
        if self._thread is not None:  # set up ahead, in the background
            # The first run fills DALI's prefetch queue (several batches of work): do it ahead too.
            # Its outputs stay valid until the pipeline runs again, which only the consumer does.
            try:
                self._first = self.lanes[0].pipe.run()
            except (StopIteration, RuntimeError) as e:  # replayed by run(), in the consumer's thread
                self._first = e

    def run(self, lane: _Lane) -> Any:
        """``lane.pipe.run()`` (``lane``: ``self.lane``), or what the first run set up ahead returned
        or raised."""
        first, self._first = self._first, None
        if first is None:
            return lane.pipe.run()
        if isinstance(first, BaseException):
            raise first
        return first

    def ready(self) -> bool:
        """Set up (or wait for the background set-up); False for a segment without batches."""
        if self._thread is None:
            self._setup()
        else:
            self._thread.join()
        if self._error is not None:
            raise self._error
        return self.lanes[0].pipe is not None

    def close(self) -> None:
        self.feeder.close()
        if self._thread is not None:
            self._thread.join(timeout=30)
        for lane in self.lanes:
            lane.pipe = None


def _reason(error: BaseException) -> str:
    """The informative line of a DALI error (the text after "encountered:"), not its whole traceback."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    for i, line in enumerate(lines[:-1]):
        if line.startswith("encountered"):
            return lines[i + 1]
    return lines[-1] if lines else type(error).__name__


def dali_to_torch(
    outputs: tuple, *, device: torch.device, dtype: torch.dtype = torch.float32, channels_last: bool = False
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """DALI outputs ``(view_0, ..., view_{V-1}, labels)`` -> ``(views, labels)`` on ``device``: one copy
    per view from DALI's buffer into torch memory, made before the pipeline runs again. The copy is
    needed: the CPU pipeline runs on DALI's classic executor, which reuses its output buffers at a
    later run (``pipeline.augment.build_pipeline``), so a tensor viewing them would change under the
    training loop."""
    from nvidia.dali.plugin.pytorch import feed_ndarray

    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    views = []
    for out in outputs[:-1]:
        dense = out.as_tensor()  # a view of DALI's contiguous batch buffer
        t = torch.empty(
            tuple(dense.shape()),
            dtype=torch.float16 if dtype == torch.float16 else torch.float32,
            device=device,
        )
        feed_ndarray(dense, t, cuda_stream=stream)
        if dtype == torch.bfloat16:
            t = t.to(torch.bfloat16)
        if channels_last:
            t = t.permute(0, 3, 1, 2)  # HWC storage -> NCHW view with channels-last strides
        views.append(t)
    labels = torch.from_numpy(
        np.array(outputs[-1].as_tensor()).reshape(len(outputs[-1]), -1)[:, 0].astype(np.int64)
    )
    return views, labels.to(device, non_blocking=True)


#: glibc malloc parameters (mallopt(3): M_MMAP_THRESHOLD = -3, M_TRIM_THRESHOLD = -1, M_TOP_PAD = -2).
MALLOPT = {-3: 256 << 20, -1: 1 << 30, -2: 64 << 20}
_malloc_tuned: bool | None = None


def tune_process_malloc() -> bool:
    """Have glibc keep freed large buffers for reuse instead of unmapping them (once per process).

    DALI's CPU executor allocates each operator's output batch (megabytes) at every iteration; with
    glibc's defaults those come from fresh ``mmap``s that the kernel must fault in and zero every
    time. Raising the mmap and trim
    thresholds (mallopt(3)) lets the heap reuse them; the cost is that the process keeps its peak
    heap instead of returning it to the kernel. Returns whether the parameters were applied (False
    off glibc). Equivalent to MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_/MALLOC_TOP_PAD_.
    """
    global _malloc_tuned
    if _malloc_tuned is None:
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6")
            _malloc_tuned = all(libc.mallopt(param, value) == 1 for param, value in MALLOPT.items())
        except (OSError, AttributeError):
            _malloc_tuned = False
    return _malloc_tuned


class ViewLoader:
    """Iterates ``ViewBatch``es of one epoch of ``reader`` augmented by ``recipe`` (see module doc).

    ``device``: "cpu" or a CUDA device (DALI's GPU graph, "mixed" decoder). ``dtype``: float32,
    float16 (produced by DALI) or bfloat16 (converted from float32). ``channels_last``: NCHW tensors
    with channels-last strides (DALI writes HWC; no extra copy). ``prefetch``: raw batches queued
    ahead by the reading thread and batches DALI processes ahead (per pipeline). ``tune_malloc``:
    apply ``tune_process_malloc()`` (process-wide; on by default).

    ``num_pipelines``: independent DALI pipelines sharing the ``num_threads`` threads, dealt the
    batches round robin (batch ``j`` of a segment to pipeline ``j % P``, each seeded apart, outputs
    in batch order; the threads shared out, the remainder to the first pipelines). Default: on the
    CPU one single-threaded pipeline per thread, at most ``MAX_CPU_PIPELINES``; on a GPU one. Why:
    DALI runs a pipeline's CPU operators one after another, each split over its threads, so threads
    wait at the end of every operator for the slowest sample; single-threaded pipelines never wait
    for each other. Each pipeline holds its own buffers, so more pipelines cost memory.
    """

    def __init__(
        self,
        reader: Any,
        recipe: ViewRecipe,
        *,
        device: str | torch.device = "cpu",
        seed: int = 0,
        num_threads: int = 2,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
        prefetch: int = 2,
        timeout: float = 600.0,
        max_attempts: int = 3,
        tune_malloc: bool = True,
        num_pipelines: int | None = None,
    ) -> None:
        if tune_malloc:
            tune_process_malloc()
        if dtype not in _DTYPES:
            raise ValueError(f"ViewLoader dtype: expected one of {_DTYPES}, got {dtype}")
        if prefetch < 1:
            raise ValueError(f"ViewLoader prefetch: expected >= 1, got {prefetch}")
        self.reader = reader
        self.recipe = recipe
        self.device = torch.device(device)
        if self.device.type not in ("cpu", "cuda"):
            raise ValueError(f"ViewLoader device: expected cpu or cuda, got {self.device}")
        self.seed = int(seed)
        self.num_threads = int(num_threads)
        if num_pipelines is None and self.device.type == "cuda":
            num_pipelines = 1
        self.threads = pipeline_threads(self.num_threads, num_pipelines)
        """DALI threads of each pipeline (``pipeline_threads``)."""
        self.num_pipelines = len(self.threads)
        self.dtype = dtype
        self.channels_last = bool(channels_last)
        self.prefetch = int(prefetch)
        self.timeout = float(timeout)
        self.max_attempts = int(max_attempts)
        self._counters: collections.Counter = collections.Counter()
        self._told_no_masks = False
        self._next: tuple[int, int] | None = None
        self._prepared: _Segment | None = None

    def __len__(self) -> int:
        return int(self.reader.batches_per_epoch)

    @property
    def stats(self) -> dict[str, int]:
        """The reader's counters plus this loader's: ``decode_fallback`` (samples DALI could not
        decode, replaced), ``mask_fallback`` (undecodable masks, replaced by ``FULL_MASK``) and
        ``pipeline_rebuilds``."""
        out: dict[str, int] = {}
        reader_stats = getattr(self.reader, "stats", None)
        if isinstance(reader_stats, Mapping):
            out.update(reader_stats)
        elif reader_stats is not None:
            as_dict = getattr(reader_stats, "as_dict", None) or getattr(reader_stats, "to_dict", None)
            out.update(as_dict() if as_dict else vars(reader_stats))
        for k in ("decode_fallback", "mask_fallback", "pipeline_rebuilds"):
            out[k] = out.get(k, 0) + self._counters[k]
        return out

    # --------------------------------------------------------------------------------------------

    def _masks(self, raw: Any) -> list[bytes] | None:
        """The encoded masks DALI takes for ``raw`` (a ``RawBatch``): None when the recipe uses none;
        else ``raw.masks`` with ``FULL_MASK`` for each sample without one, or for every sample when
        the set has no masks (logged once)."""
        if self.recipe.mask_prob <= 0:
            return None
        from pipeline.shards.masks import FULL_MASK

        masks = getattr(raw, "masks", None)
        if masks is None:
            if not self._told_no_masks:
                self._told_no_masks = True
                log.warning(
                    "ViewLoader: the recipe masks large views (mask_prob=%s) but the shard set has no "
                    "masks: every view is unmasked",
                    self.recipe.mask_prob,
                )
            return [FULL_MASK] * len(raw.images)
        return [FULL_MASK if m is None else m for m in masks]

    def _dali_device(self) -> tuple[str, int | None]:
        if self.device.type == "cuda":
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            return "gpu", index
        return "cpu", None

    def _build(self, batch_size: int, seed: int, source: Any, lane: int = 0):
        device, device_id = self._dali_device()
        pipe = build_pipeline(
            self.recipe,
            device=device,
            batch_size=batch_size,
            num_threads=self.threads[lane],
            seed=seed,
            device_id=device_id,
            source=source,
            prefetch_queue_depth=self.prefetch,
            fp16=self.dtype == torch.float16,
            layout="HWC" if self.channels_last else "CHW",
        )
        pipe.build()
        return pipe

    def _to_torch(self, outputs: tuple, batch: _Batch) -> ViewBatch:
        views, labels = dali_to_torch(
            outputs, device=self.device, dtype=self.dtype, channels_last=self.channels_last
        )
        return ViewBatch(views=views, labels=labels, keys=batch.keys, num_large=self.recipe.num_large)

    def _repair(self, batches: list[_Batch], reencode: bool) -> None:
        """Replace every sample PIL cannot decode by a decodable one of the same batch (in place, by the
        reader's fill rule); ``reencode``: also rewrite every image as a baseline JPEG."""
        for batch in batches:
            if batch.masks is not None:
                self._repair_masks(batch)
            masks = batch.masks if batch.masks is not None else [None] * len(batch.arrays)
            items = list(zip(batch.arrays, batch.labels.tolist(), batch.keys, masks))
            slots = [item if decode_problem(item[0].tobytes()) is None else None for item in items]
            donors = [s for s in slots if s is not None]
            if not donors:
                raise RuntimeError(
                    f"ViewLoader: no decodable image in a batch (keys {batch.keys[:4]}...); cannot fill it"
                )
            full, count = fill_batch(slots, donors)
            for bad, (_, _, key, _) in zip(slots, items):
                if bad is None:
                    log.warning("ViewLoader: DALI could not decode sample %r; its slot was filled", key)
            batch.arrays = [a for a, _, _, _ in full]
            batch.labels = np.asarray([label for _, label, _, _ in full], dtype=np.int64)
            batch.keys = [k for _, _, k, _ in full]
            if batch.masks is not None:  # each filled slot takes its donor's mask with its image
                batch.masks = [m for _, _, _, m in full]
            self._counters["decode_fallback"] += count
            if reencode:
                batch.arrays = [
                    np.frombuffer(reencode_jpeg(a.tobytes()), dtype=np.uint8) for a in batch.arrays
                ]

    def _repair_masks(self, batch: _Batch) -> None:
        """Replace each mask of ``batch`` that cannot be decoded by ``FULL_MASK`` (its views unmasked)."""
        from pipeline.shards.masks import FULL_MASK, mask_problem

        assert batch.masks is not None
        for i, mask in enumerate(batch.masks):
            problem = mask_problem(mask.tobytes(), None, "decode")
            if problem is not None:
                log.warning(
                    "ViewLoader: the mask of sample %r cannot be decoded (%s); its views are unmasked",
                    batch.keys[i],
                    problem[1],
                )
                batch.masks[i] = np.frombuffer(FULL_MASK, dtype=np.uint8)
                self._counters["mask_fallback"] += 1

    def prepare(self, epoch: int, start_batch: int = 0) -> None:
        """Announce the segment the next ``epoch()`` call will ask for. Once the segment being
        iterated now has been read to its end, the next one is set up in the background (reading,
        shuffle-buffer fill, first batch, DALI pipeline build), so that its first batch does not
        wait for it. A different next call discards it; two segments are never read in parallel."""
        self._next = (int(epoch), int(start_batch))

    def close(self) -> None:
        """Stop a segment set up ahead that no ``epoch()`` call took."""
        self._next = None
        if self._prepared is not None:
            self._prepared.close()
            self._prepared = None

    def _start_prepared(self) -> None:
        if self._next is not None and self._prepared is None:
            self._prepared = _Segment(self, *self._next, background=True)

    def _segment(self, epoch: int, start_batch: int) -> _Segment:
        key = (epoch, start_batch)
        if self._prepared is not None:
            if self._prepared.key == key:
                segment, self._prepared = self._prepared, None
                if self._next == key:
                    self._next = None
                return segment
            if self._next == self._prepared.key:  # a wrong guess: forget it
                self._next = None
            self._prepared.close()  # set up for a call that did not come
            self._prepared = None
        if self._next == key:
            self._next = None
        return _Segment(self, epoch, start_batch)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[ViewBatch]:
        """The views of ``reader.epoch(epoch, start_batch)``, one ``ViewBatch`` per raw batch."""
        segment = self._segment(epoch, start_batch)
        index = start_batch
        failures = 0
        try:
            if not segment.ready():
                return  # an empty segment
            while True:
                lane = segment.lane
                try:
                    outputs = segment.run(lane)
                except StopIteration:
                    return
                except RuntimeError as e:
                    if not lane.inflight or segment.feeder.error is not None:
                        raise  # nothing of ours in flight, or the reader itself failed
                    failures += 1
                    if failures > self.max_attempts:
                        raise RuntimeError(
                            f"ViewLoader: DALI failed {failures} times on batch {index} of epoch {epoch} "
                            f"(keys {lane.inflight[0].keys[:4]}...) even after replacing undecodable samples"
                        ) from e
                    log.warning(
                        "ViewLoader: DALI failed on batch %d of epoch %d (%s); recovering",
                        index,
                        epoch,
                        _reason(e),
                    )
                    lost = list(lane.inflight)
                    lane.inflight.clear()
                    lane.pipe = None
                    self._repair(lost, reencode=failures > 1)
                    lane.replay.extendleft(reversed(lost))
                    self._counters["pipeline_rebuilds"] += 1
                    lane.pipe = self._build(
                        segment.batch_size, lane.seed(index, failures), lane.source, lane.index
                    )
                    continue
                batch = lane.inflight.popleft()
                segment.outputs += 1
                failures = 0
                index += 1
                if segment.feeder.exhausted.is_set():
                    self._start_prepared()
                yield self._to_torch(outputs, batch)
        finally:
            segment.close()
