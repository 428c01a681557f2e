"""``relic shards build``: images -> WebDataset tar shards + ``manifest.json`` (+ DALI ``.idx``).

How a build runs (every step deterministic in the inputs and ``seed``, never in ``workers``):

1. The source is listed (:mod:`pipeline.shards.sources`) and its items shuffled with ``seed``; item
   ``n`` of the shuffled order gets the key ``f"{n:09d}"``.
2. The shuffled list is cut into *chunks* of ``max_samples`` items. Each chunk is one task for a worker
   process, which reads, checks and (if needed) re-encodes its images one at a time and streams them
   into a tar file: memory holds one image per worker whatever the dataset size.
3. Without ``max_bytes`` chunk ``j`` becomes shard ``j`` and the worker publishes it itself (a chunk
   whose every input is rejected leaves a gap in the numbering; the manifest lists the real names).
   With ``max_bytes`` a chunk may become several shards; the main process numbers and publishes them
   in chunk order. Parallelism is across chunks, so a build needs >= 2 shards per worker to use them.
4. Publishing is atomic: a temporary name then ``os.replace`` locally; one whole-object upload on
   object stores. After each chunk a small *receipt* (its shards with sha256, its rejects, a digest of
   its inputs and settings) goes to ``OUT/.relic-build/``. ``manifest.json`` is written last, then the
   receipts are removed.
5. A re-run with the same arguments after an interruption (Ctrl-C, a killed worker, a lost node)
   reuses each chunk whose receipt digest matches and whose shards still hash to the recorded
   sha256, redoes the others, and ends with the same manifest as an uninterrupted run.

Images: an input that is already an RGB *baseline* JPEG within ``max_side`` (and without an EXIF
rotation) is stored byte for byte. Everything else — PNG, WebP, grayscale, CMYK, palette, alpha,
progressive JPEG — is decoded, EXIF-rotated, alpha-composited over white, downscaled (Lanczos) to
``max_side`` and written as an RGB baseline JPEG at ``quality``. Progressive JPEGs are re-encoded as
baseline because the hardware JPEG decoder of A100/H100 GPUs (nvJPEG's hardware backend, used by
DALI's ``decoders.image(device="mixed")``) accepts baseline only; progressive ones fall back to the
slower CUDA/CPU path (NVIDIA nvJPEG docs, "Hardware Decode").

Tar layout: members ``{key}.jpg``, ``{key}.mask.png`` (with ``masks``, when the input has one),
``{key}.cls`` (decimal class index, when labelled; ``-1`` for a sample left unlabelled by
``--label-fraction``/``--labelled-keys``), ``{key}.json`` (``{"source", "original_size", "label"}``), in
that order, USTAR headers with fixed metadata (mtime 0, uid/gid 0, mode 0444, no user
names) and no record padding, so the same inputs give byte-identical shards.

Saliency masks (``masks=DIR``, ``--masks DIR``; :mod:`pipeline.shards.masks`): DIR is listed once
(:func:`~pipeline.shards.masks.find_masks`); the mask of the input at relative path ``a/b/c.jpg`` is
``DIR/a/b/c.png``, else ``DIR/a/b/c.<another image suffix>`` (the input's own suffix first). Relative
path: below the SOURCE folder; for a list, the path as the list writes it when it is relative (inputs
a list names by absolute path or URL have none: they count as without a mask); built-in sources take
no ``--masks`` (compute masks with ``relic shards masks``). A mask follows its image *as displayed*
(EXIF orientation applied) and is converted to 8-bit greyscale
(:func:`~pipeline.shards.masks.mask_from_file`: alpha of cut-outs, luminance of colour, 16-bit scaled
by depth); one larger than the stored image (``max_side``) is shrunk to the stored image's size
(area average), so it stays aligned with the stored pixels. An input without a mask is stored without
one and counted (``Manifest.masks["missing"]``); a mask that cannot be read or whose aspect ratio is
not its image's is listed in the manifest's ``rejected`` (its path, and the reason starting with
``MASK_REJECTED``) and counted (``masks["rejected"]``), its image stored without a mask. The mask
listing, the masks directory and each input's mask path are part of the chunk digests, so resuming
stays exact.

Partly labelled sets (``label_fraction=F`` / ``labelled_keys=FILE``; :mod:`pipeline.shards.partial_labels`):
the labelled inputs are chosen from the listing in the main process before anything is written (so
workers and chunking cannot change the choice), every other input keeps its place and key but is
stored with label ``-1``; the options and each input's label are part of the chunk digests. Labels are
chosen among the listed inputs: one that is later rejected (unreadable, not an image) is simply not
stored, and ``Manifest.labelled`` counts the samples actually stored.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import gc
import hashlib
import io
import json
import multiprocessing as mp
import os
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline import storage
from pipeline.shards import dali_index, images, partial_labels
from pipeline.shards import format as shard_format
from pipeline.shards import masks as shard_masks
from pipeline.shards.format import TarShardWriter
from pipeline.shards.manifest import Manifest, Rejected, ShardInfo, load_manifest, save_manifest
from pipeline.shards.sources import FileReader, Item, Reader, open_source

RECEIPT_DIR = ".relic-build"
DEFAULT_MAX_PIXELS = 40_000_000
"""Inputs larger than this are rejected before decoding (``--max-pixels``): 40 megapixels is three
times the largest ImageNet photo and decodes to 115 MiB of RGB; Pillow itself refuses only twice its
89.5-megapixel warning limit, at ~500 MiB per image per worker."""


MASK_REJECTED = "mask not stored, image kept without it"
"""How the reason of a rejected mask starts in the manifest's ``rejected`` list."""


class BuildError(RuntimeError):
    """The build cannot start or cannot finish; the message says what to do."""


class RejectedInput(Exception):
    """One input cannot become a sample; ``str(e)`` is the reason recorded in the manifest."""


# ---------------------------------------------------------------- images


def prepare_image(
    data: bytes | Image.Image,
    *,
    max_side: int | None = None,
    quality: int = 95,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> tuple[bytes, tuple[int, int], bool]:
    """``(jpeg_bytes, original_size, reencoded)`` for one input; raises :class:`RejectedInput`.

    Kept byte for byte: an 8-bit, 3-component, baseline (SOF0) JPEG within ``max_side``, without EXIF
    rotation, that passes the training reader's check (:func:`~pipeline.shards.images.image_problem`).
    Anything else is decoded by PIL and re-encoded (:func:`~pipeline.shards.images.encode_jpeg`).
    Inputs of more than ``max_pixels`` pixels are rejected from their header, before decoding."""
    if isinstance(data, Image.Image):
        original = tuple(data.info.get("original_size", data.size))
        _check_pixels(original, max_pixels)
        return images.encode_jpeg(data, max_side=max_side, quality=quality), original, True  # type: ignore[return-value]
    if not data:
        raise RejectedInput("empty file (0 bytes)")
    info = images.jpeg_info(data)
    if info is not None:
        _check_pixels((info.width, info.height), max_pixels)
    if (
        info is not None
        and info.sof == 0xC0
        and info.precision == 8
        and info.components == 3
        and info.orientation == 1
        and (max_side is None or max(info.width, info.height) <= max_side)
        and images.image_problem(data, "jpg") is None
    ):
        return data, (info.width, info.height), False
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise RejectedInput("not an image (unrecognised format)") from None
    except Image.DecompressionBombError as e:
        raise RejectedInput(f"too many pixels for Pillow: {e}") from None
    except Exception as e:
        raise RejectedInput(f"unreadable image header: {e}") from None
    w, h = img.size
    if w == 0 or h == 0:
        raise RejectedInput(f"image has zero size {w}x{h}")
    _check_pixels((w, h), max_pixels)
    if img.format == "JPEG" and max_side is not None and max(w, h) > max_side:
        scale = max_side / max(w, h)
        img.draft("RGB", (max(1, round(w * scale)), max(1, round(h * scale))))  # DCT-domain pre-shrink
    try:
        img.load()
    except Exception as e:
        raise RejectedInput(f"truncated or corrupt image: {e}") from None
    img.info["original_size"] = (w, h)
    return images.encode_jpeg(img, max_side=max_side, quality=quality), (w, h), True


def _check_pixels(size: tuple[int, int], max_pixels: int | None) -> None:
    if max_pixels is not None and size[0] * size[1] > max_pixels:
        raise RejectedInput(
            f"{size[0]}x{size[1]} = {size[0] * size[1] / 1e6:.1f} megapixels, more than --max-pixels "
            f"{max_pixels / 1e6:g} M (decoding it would take {3 * size[0] * size[1] / 2**20:,.0f} MiB)"
        )


# ---------------------------------------------------------------- workers


@dataclass
class Job:
    """What every chunk task shares (pickled once per task; small)."""

    out: str
    options: dict[str, Any]
    prefix: str
    max_samples: int
    max_bytes: int | None
    quality: int
    max_side: int | None
    max_pixels: int | None
    index: bool
    reader: Reader
    labelled: bool
    mask_reader: FileReader | None = None
    """Reads mask files by their path relative to the masks directory; None without ``masks``."""
    masks_dir: str = ""
    """The masks directory as the user gave it (credentials removed), for the rejected list."""


@dataclass
class Task:
    chunk: int
    items: list[tuple[int, Item]]  # (position in the shuffled order, item)
    plan: str  # digest of the settings and these items
    receipt: dict | None = None  # from an earlier, interrupted run
    masks: list[str | None] | None = None  # each item's mask path relative to the masks directory


@dataclass
class Part:
    """One finished shard of a chunk: its info, and where it lies until published."""

    info: ShardInfo
    tmp_path: str
    idx_text: str | None
    class_counts: dict[int, int] = field(default_factory=dict)


_counters: tuple[Any, Any] | None = None  # (samples, bytes) shared with the main process's progress bar


def _init_worker(counters: tuple[Any, Any] | None, environ: dict[str, str] | None = None) -> None:
    """A pool worker's set-up: the shared progress counters and the parent's environment as it is
    now. A ``forkserver`` hands its children the environment the server started with, which may be
    older than the caller's (credentials or an endpoint set since, e.g. in a notebook or a test)."""
    global _counters
    _counters = counters
    if environ is not None:
        os.environ.clear()
        os.environ.update(environ)


_pending = [0, 0, 0.0]  # samples and bytes not yet added to the shared counters, time of last flush


def _count(samples: int, nbytes: int, flush: bool = False) -> None:
    """Add to the shared progress counters, at most every 0.2 s (cross-process locks are not free)."""
    if _counters is None:
        return
    _pending[0] += samples
    _pending[1] += nbytes
    now = time.monotonic()
    if flush or now - _pending[2] > 0.2:
        with _counters[0].get_lock():
            _counters[0].value += _pending[0]
        with _counters[1].get_lock():
            _counters[1].value += _pending[1]
        _pending[:] = [0, 0, now]


def shard_name(prefix: str, i: int) -> str:
    return f"{prefix}-{i:06d}.tar"


def _tmp_path(job: Job, label: str) -> str:
    if storage.is_remote(job.out):
        fd, path = tempfile.mkstemp(prefix="relic-shard-", suffix=".tar")
        os.close(fd)
        return path
    return os.path.join(job.out, f".{label}.tmp-{uuid.uuid4().hex[:8]}")


def _publish(job: Job, part: Part) -> None:
    """Move a finished part to its final name atomically (index file first, shard last)."""
    if part.idx_text is not None and part.info.index:
        storage.write_atomic(storage.join(job.out, part.info.index), part.idx_text.encode(), job.options)
    storage.publish_file(part.tmp_path, storage.join(job.out, part.info.name), job.options)


def _sha256_of(job: Job, name: str) -> tuple[str, int] | None:
    url = storage.join(job.out, name)
    fs, path = storage.filesystem(url, job.options)
    try:
        h = hashlib.sha256()
        n = 0
        with fs.open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
                n += len(chunk)
        return h.hexdigest(), n
    except FileNotFoundError:
        return None


def _reusable(job: Job, task: Task) -> bool:
    r = task.receipt
    if not r or r.get("plan") != task.plan:
        return False
    for s in r["shards"]:
        if _sha256_of(job, s["name"]) != (s["sha256"], s["bytes"]):
            return False
        if job.index and (not s.get("index") or _sha256_of(job, s["index"]) is None):
            return False
    return True


def prepare_mask(job: Job, rel: str, jpeg: bytes) -> bytes:
    """The ``mask.png`` member for the stored image ``jpeg`` from the mask file ``rel`` (module doc);
    raises :class:`RejectedInput` with the reason."""
    assert job.mask_reader is not None
    try:
        raw = job.mask_reader(rel)
    except FileNotFoundError:
        raise RejectedInput("mask file not found") from None
    except OSError as e:
        raise RejectedInput(f"unreadable mask file: {e.strerror or e}") from None
    except Exception as e:  # a store's client error: this mask is lost, not the build
        raise RejectedInput(f"unreadable mask file: {type(e).__name__}: {e}") from None
    size = images.image_size(jpeg)
    if size is None:  # our own baseline JPEG: cannot happen
        raise RejectedInput("the stored image has no readable size")
    try:
        mask = shard_masks.mask_from_file(raw, max_pixels=job.max_pixels)
        return shard_masks.encode_mask(shard_masks.fit_mask(mask, size))
    except shard_masks.BadMask as e:
        raise RejectedInput(str(e)) from None


def run_chunk(job: Job, task: Task, first_shard: int | None) -> dict:
    """Build one chunk (or reuse it). Publishes its shard itself when ``first_shard`` is known;
    otherwise leaves the parts at temporary paths for the main process to number and publish."""
    if _reusable(job, task):
        assert task.receipt is not None
        _count(len(task.items), sum(s["bytes"] for s in task.receipt["shards"]), flush=True)
        return {**task.receipt, "reused": True}
    parts: list[Part] = []
    rejected: list[list[str]] = []
    stats = {"passthrough": 0, "reencoded": 0}
    mask_stats = {"samples": 0, "rejected": 0, "missing": 0}
    writer: TarShardWriter | None = None
    fileobj: IO[bytes] | None = None
    counts: dict[int, int] = {}

    def close_part() -> None:
        nonlocal writer, fileobj, counts
        assert writer is not None and fileobj is not None
        writer.close()
        fileobj.close()
        n = len(parts) if first_shard is None else first_shard + len(parts)
        name = shard_name(job.prefix, n)
        idx_name = name[: -len(".tar")] + ".idx" if job.index else None
        info = ShardInfo(name, writer.samples, writer.bytes, writer.sha256.hexdigest(), idx_name)
        idx_text = dali_index.format_dali_index(writer.index) if job.index else None
        parts.append(Part(info, fileobj.name, idx_text, counts))
        writer, fileobj, counts = None, None, {}

    try:
        for n, (position, item) in enumerate(task.items):
            try:
                raw = job.reader(item.ref)
            except FileNotFoundError:
                rejected.append([item.input, "file not found"])
                continue
            except PermissionError:
                rejected.append([item.input, "unreadable: permission denied"])
                continue
            except IsADirectoryError:
                rejected.append([item.input, "is a directory, not a file"])
                continue
            except OSError as e:
                rejected.append([item.input, f"unreadable: {e.strerror or e}"])
                continue
            except Exception as e:  # e.g. a store's client error: this input is lost, not the build
                rejected.append([item.input, f"unreadable: {type(e).__name__}: {e}"])
                continue
            try:
                jpeg, original, reencoded = prepare_image(
                    raw, max_side=job.max_side, quality=job.quality, max_pixels=job.max_pixels
                )
            except RejectedInput as e:
                rejected.append([item.input, str(e)])
                continue
            stats["reencoded" if reencoded else "passthrough"] += 1
            mask = None
            if job.mask_reader is not None:
                rel = task.masks[n] if task.masks is not None else None
                if rel is None:
                    mask_stats["missing"] += 1
                else:
                    try:
                        mask = prepare_mask(job, rel, jpeg)
                        mask_stats["samples"] += 1
                    except RejectedInput as e:
                        rejected.append([storage.join(job.masks_dir, rel), f"{MASK_REJECTED}: {e}"])
                        mask_stats["rejected"] += 1
            members = shard_format.sample_members(
                jpeg,
                label=item.label if job.labelled else None,
                source=item.input,
                original_size=original,
                mask=mask,
            )
            size = TarShardWriter.sample_size(members)
            if writer is not None and job.max_bytes is not None and writer.size_with(size) > job.max_bytes:
                close_part()
            if writer is None:
                fileobj = open(_tmp_path(job, f"chunk-{task.chunk:06d}-{len(parts)}"), "wb")  # noqa: SIM115
                writer = TarShardWriter(fileobj)
            writer.add(shard_format.sample_key(position), members)
            if item.label is not None:
                counts[item.label] = counts.get(item.label, 0) + 1
            _count(1, size)
        if writer is not None:
            close_part()
        _count(0, 0, flush=True)
    except BaseException:
        if fileobj is not None:
            fileobj.close()
            os.unlink(fileobj.name)
        for p in parts:
            if os.path.exists(p.tmp_path):
                os.unlink(p.tmp_path)
        raise
    if first_shard is not None:
        for p in parts:
            _publish(job, p)
    return {
        "chunk": task.chunk,
        "plan": task.plan,
        "shards": [dataclasses.asdict(p.info) for p in parts],
        "class_counts": [{str(k): v for k, v in p.class_counts.items()} for p in parts],
        "rejected": rejected,
        "stats": stats,
        "mask_stats": mask_stats,
        "published": first_shard is not None,
        "_parts": [(p.tmp_path, p.idx_text) for p in parts] if first_shard is None else [],
    }


# ---------------------------------------------------------------- the build


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _options_for(
    url: str, given: dict[str, Any] | None, sibling: str, sibling_options: dict[str, Any]
) -> dict[str, Any]:
    """The storage options for ``url``: ``given`` when the caller gave them; else ``sibling``'s when
    both are remote with the same protocol (one endpoint and profile for a whole build); else the
    defaults for ``url`` (``storage.storage_options``)."""
    if given is not None:
        return dict(given)
    if storage.is_remote(url) and storage.protocol(url) == storage.protocol(sibling):
        return sibling_options
    return storage.storage_options(url)


def _check_writable(out: str, options: dict[str, Any]) -> None:
    """Fail at once, naming OUT, when shards could not be written there."""
    probe_name = f"{RECEIPT_DIR}/probe-{uuid.uuid4().hex[:8]}"
    try:
        fs, path = storage.filesystem(out, options)
        if storage.is_remote(out):
            fs.pipe_file(f"{path.rstrip('/')}/{probe_name}", b"")
            fs.rm_file(f"{path.rstrip('/')}/{probe_name}")
        else:
            if os.path.exists(out) and not os.path.isdir(out):
                raise BuildError(f"OUT {out} exists and is not a directory")
            os.makedirs(os.path.join(out, RECEIPT_DIR), exist_ok=True)
            probe = os.path.join(out, probe_name)
            with open(probe, "wb"):
                pass
            os.unlink(probe)
    except BuildError:
        raise
    except Exception as e:
        raise BuildError(f"OUT {out} is not writable: {type(e).__name__}: {e}") from e


def _load_receipts(out: str, options: dict[str, Any]) -> dict[int, dict]:
    receipts: dict[int, dict] = {}
    url = storage.join(out, RECEIPT_DIR)
    fs, path = storage.filesystem(url, options)
    try:
        fs.invalidate_cache()
        names = [n for n in fs.ls(path, detail=False) if n.rsplit("/", 1)[-1].startswith("chunk-")]
    except FileNotFoundError:
        return receipts
    for n in names:
        try:
            r = json.loads(fs.cat_file(n))
            receipts[int(r["chunk"])] = r
        except (ValueError, KeyError, OSError):
            continue  # a damaged receipt only means that chunk is rebuilt
    return receipts


def _clean_stale_tmp(out: str) -> None:
    if storage.is_remote(out) or not os.path.isdir(out):
        return
    for name in os.listdir(out):
        if name.startswith(".") and ".tmp-" in name:
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(out, name))


def _public_source(spec: str) -> str:
    """SOURCE without any ``user:secret@`` part a URL might carry."""
    if "://" in spec and "@" in spec.split("://", 1)[1].split("/", 1)[0]:
        scheme, rest = spec.split("://", 1)
        return f"{scheme}://{rest.split('@', 1)[1]}"
    return spec


def build_shards(
    source: str,
    out: str,
    *,
    max_samples: int = 10000,
    max_bytes: int | None = None,
    workers: int = 1,
    seed: int = 0,
    max_side: int | None = None,
    quality: int = 95,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    index: bool = False,
    prefix: str = "shard",
    storage_options: dict[str, Any] | None = None,
    progress: bool | None = None,
    digits_size: int = 32,
    photos_count: int | None = None,
    split: str | None = None,
    source_storage_options: dict[str, Any] | None = None,
    masks: str | None = None,
    masks_storage_options: dict[str, Any] | None = None,
    label_fraction: float | None = None,
    labelled_keys: str | None = None,
    labelled_keys_storage_options: dict[str, Any] | None = None,
) -> Manifest:
    """Build shards from SOURCE into OUT (local dir or fsspec URL) and return the saved manifest.

    ``masks``: a directory (local or fsspec URL) of saliency masks for the inputs (module doc), read
    with ``masks_storage_options`` (default: from its URL, like SOURCE's).

    ``label_fraction`` (0 < F <= 1) or ``labelled_keys`` (a text file, local or fsspec URL, read with
    ``labelled_keys_storage_options``), not both: a partly labelled set
    (:mod:`pipeline.shards.partial_labels`); every other sample is stored with label -1, and the
    manifest's ``labelled`` records the choice. Bad values raise
    :class:`~pipeline.shards.partial_labels.LabelSubsetError` before OUT is touched.

    ``progress``: a tqdm bar on stderr; ``None`` shows it when stderr is a terminal. Raises
    :class:`~pipeline.shards.sources.SourceError` for an unusable SOURCE, :class:`BuildError` for an
    unwritable OUT or a build that died (re-run the same call to resume). ``storage_options`` are for
    OUT, and for SOURCE too when both use the same protocol, unless ``source_storage_options`` is given."""
    for name, value, low in (("max_samples", max_samples, 1), ("workers", workers, 1)):
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if max_bytes is not None and max_bytes < 2048:
        raise ValueError(f"max_bytes must be >= 2048 (one small sample), got {max_bytes}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")
    if max_side is not None and max_side < 1:
        raise ValueError(f"max_side must be >= 1, got {max_side}")
    if max_pixels is not None and max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
    if not prefix or "/" in prefix or any(c.isspace() for c in prefix):
        raise ValueError(f"prefix must be a non-empty name without '/' or spaces, got {prefix!r}")
    if label_fraction is not None and labelled_keys is not None:
        raise partial_labels.LabelSubsetError(
            "--label-fraction and --labelled-keys exclude each other: choose the labelled samples by "
            "one of them"
        )
    if label_fraction is not None:
        partial_labels.check_fraction(label_fraction)

    options = dict(storage_options) if storage_options is not None else storage.storage_options(out)
    src_options = _options_for(source, source_storage_options, out, options)
    src = open_source(
        source,
        storage_options=src_options,
        digits_size=digits_size,
        photos_count=photos_count,
        split=split,
    )
    mask_dir = None
    if masks is not None:
        if src.kind == "builtin":
            raise BuildError(
                f"--masks needs a folder or list SOURCE (masks are matched by relative path); {source} "
                f"is built in: compute masks for it with `relic shards masks`"
            )
        mask_options = _options_for(masks, masks_storage_options, source, src_options)
        try:
            mask_dir = shard_masks.find_masks(masks, mask_options)
        except FileNotFoundError as e:
            raise BuildError(str(e)) from None

    order = np.random.default_rng(seed).permutation(len(src.items))
    items = src.items
    subset = None
    if label_fraction is not None or labelled_keys is not None:
        option = "--label-fraction" if label_fraction is not None else "--labelled-keys"
        if src.classes is None:
            raise partial_labels.LabelSubsetError(
                f"{option} needs a labelled SOURCE; {source} has no labels (a folder without class "
                f"sub-folders, a list without a label column, or builtin:photos)"
            )
        if label_fraction is not None:
            subset = partial_labels.fraction_subset(src.items, label_fraction, seed)
        else:
            assert labelled_keys is not None
            keys_options = _options_for(labelled_keys, labelled_keys_storage_options, source, src_options)
            entries = partial_labels.read_keys_file(labelled_keys, keys_options)
            subset = partial_labels.keys_subset(
                src.items, entries, order.tolist(), _public_source(labelled_keys)
            )
        items = partial_labels.apply_subset(src.items, subset)
    _check_writable(out, options)
    _clean_stale_tmp(out)

    shuffled = [(int(p), items[int(i)]) for p, i in enumerate(order)]
    encoding = {
        "format": "jpeg",
        "progressive": False,
        "quality": quality,
        "max_side": max_side,
        "max_pixels": max_pixels,
        "seed": seed,
        "max_samples": max_samples,
        "max_bytes": max_bytes,
        "prefix": prefix,
        **src.settings,
    }
    job = Job(
        out=out,
        options=options,
        prefix=prefix,
        max_samples=max_samples,
        max_bytes=max_bytes,
        quality=quality,
        max_side=max_side,
        max_pixels=max_pixels,
        index=index,
        reader=src.reader,
        labelled=src.classes is not None,
        mask_reader=None if mask_dir is None else FileReader(mask_options, mask_dir.base),
        masks_dir="" if masks is None else _public_source(masks),
    )
    plan_facts: dict[str, Any] = {"encoding": encoding, "classes": src.classes, "index": index, "version": 1}
    if masks is not None:
        plan_facts["masks"] = {"dir": _public_source(masks), "version": 1}
    if subset is not None:  # the per-input labels below carry the choice too
        plan_facts["labelled"] = {**subset.settings(), "version": 1}
    base = _digest(plan_facts)
    receipts = _load_receipts(out, options)
    tasks = []
    for j, start in enumerate(range(0, len(shuffled), max_samples)):
        chunk_items = shuffled[start : start + max_samples]
        chunk_masks = (
            None if mask_dir is None else [_mask_of(mask_dir, src.kind, it) for _, it in chunk_items]
        )
        facts: list[Any] = [(p, it.input, it.label, str(it.ref)) for p, it in chunk_items]
        plan = _digest([base, facts] if chunk_masks is None else [base, facts, chunk_masks])
        tasks.append(Task(j, chunk_items, plan, receipts.get(j), chunk_masks))

    direct = max_bytes is None  # chunk j is shard j: workers publish themselves
    results = _run_tasks(job, tasks, direct, workers, progress, len(shuffled))

    shards: list[ShardInfo] = []
    rejected = [Rejected(i, r) for i, r in src.rejected]
    counts: dict[int, int] = {}
    stats = {"passthrough": 0, "reencoded": 0}
    mask_stats = {"samples": 0, "rejected": 0, "missing": 0}
    for task in tasks:
        r = results[task.chunk]
        for k in mask_stats:
            mask_stats[k] += r.get("mask_stats", {}).get(k, 0)
        shards.extend(ShardInfo(**s) for s in r["shards"])
        rejected.extend(Rejected(i, reason) for i, reason in r["rejected"])
        for cc in r["class_counts"]:
            for k, v in cc.items():
                counts[int(k)] = counts.get(int(k), 0) + v
        for k in stats:
            stats[k] += r["stats"][k]
    if not shards:
        raise BuildError(f"no input of {source} could be used: all {len(rejected)} were rejected")
    manifest = Manifest(
        shards=shards,
        image_ext="jpg",
        label_ext="cls" if src.classes is not None else None,
        classes=src.classes,
        class_counts={c: counts.get(i, 0) for i, c in enumerate(src.classes)} if src.classes else None,
        labelled=None
        if subset is None
        else partial_labels.manifest_record(subset, counts, src.classes or []),
        encoding={**encoding, **stats},
        source=_public_source(source),
        rejected=rejected,
        masks=None
        if masks is None
        else {"member": shard_masks.MASK_EXT, "method": f"given:{_public_source(masks)}", **mask_stats},
    )
    save_manifest(manifest, out, options)
    try:
        fs, path = storage.filesystem(storage.join(out, RECEIPT_DIR), options)
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass
    return manifest


def _mask_of(mask_dir: shard_masks.MaskDir, kind: str, item: Item) -> str | None:
    """The mask path (relative to the masks directory) of ``item``, or None (module doc)."""
    rel = item.input
    if kind != "folder" and ("://" in rel or os.path.isabs(rel)):
        return None
    return mask_dir.lookup(rel.removeprefix("./"))


def _run_tasks(
    job: Job, tasks: list[Task], direct: bool, workers: int, progress: bool | None, total: int
) -> dict[int, dict]:
    """Run every chunk task, writing receipts as chunks finish; returns ``{chunk: receipt}``."""
    show = sys.stderr.isatty() if progress is None else progress
    bar = None

    def open_bar() -> Any:
        if not show:
            return None
        from tqdm import tqdm

        return tqdm(total=total, unit="img", desc="shards", file=sys.stderr)

    results: dict[int, dict] = {}
    next_publish = 0  # spool mode: chunks are numbered and published in order
    next_shard = 0

    def finished(r: dict) -> None:
        nonlocal next_publish, next_shard
        results[r["chunk"]] = r
        if direct:
            _save_receipt(job, r)
            return
        while next_publish in results:  # number and publish the parts of chunks in order
            rr = results[next_publish]
            if rr.get("reused"):
                if rr["shards"] and rr["shards"][0]["name"] != shard_name(job.prefix, next_shard):
                    raise BuildError(f"receipt of chunk {next_publish} does not continue the numbering")
            else:
                for s, (tmp, idx_text) in zip(rr["shards"], rr.pop("_parts")):
                    name = shard_name(job.prefix, next_shard)
                    s["name"] = name
                    s["index"] = name[: -len(".tar")] + ".idx" if job.index else None
                    _publish(job, Part(ShardInfo(**s), tmp, idx_text))
                    next_shard += 1
                _save_receipt(job, rr)
                next_publish += 1
                continue
            next_shard += len(rr["shards"])
            next_publish += 1

    start = time.perf_counter()
    try:
        if workers == 1:
            _init_worker(None)
            bar = open_bar()
            done_bytes = 0
            for t in tasks:
                r = run_chunk(job, t, t.chunk if direct else None)
                finished(r)
                done_bytes += sum(s["bytes"] for s in r["shards"])
                if bar is not None:
                    bar.update(len(t.items))
                    _postfix(bar, done_bytes, start)
        else:
            calls = [(run_chunk, (job, t, t.chunk if direct else None)) for t in tasks]
            _in_pool(workers, calls, lambda _i, r: finished(r), open_bar, total, start)
    except BrokenProcessPool as e:
        raise BuildError(
            f"a worker process died ({e}); {len(results)} of {len(tasks)} chunks finished and were "
            f"kept in {job.out}. Re-run the same command to resume."
        ) from e
    finally:
        if bar is not None:
            bar.close()
    return results


def _in_pool(
    workers: int,
    calls: Sequence[tuple[Callable[..., Any], tuple]],
    on_result: Callable[[int, Any], None],
    open_bar: Callable[[], Any],
    total: int,
    start: float,
) -> None:
    """Run ``calls`` (``(function, args)``) in ``workers`` processes; ``on_result(i, result)`` in this
    process as each call ``i`` finishes. The workers count their samples and bytes in shared counters
    (``_count``), which drive the progress bar ``open_bar()`` makes, opened once the workers exist
    (tqdm's monitor thread must not be forked) and closed here. Each worker starts from this process's
    environment as it is now (``_init_worker``). A worker that dies raises ``BrokenProcessPool``."""
    ctx = _pool_context()
    counters = (ctx.Value("q", 0), ctx.Value("q", 0))
    # Forked workers share the parent's heap copy-on-write; frozen objects are left out of their
    # garbage collections, which would otherwise touch (and so copy) every page of it.
    gc.freeze()
    bar = None
    try:
        with cf.ProcessPoolExecutor(
            workers, mp_context=ctx, initializer=_init_worker, initargs=(counters, dict(os.environ))
        ) as pool:
            pending = {pool.submit(fn, *args): i for i, (fn, args) in enumerate(calls)}
            gc.unfreeze()
            bar = open_bar()
            try:
                while pending:
                    done, _ = cf.wait(pending, timeout=0.25, return_when=cf.FIRST_COMPLETED)
                    for fut in done:
                        on_result(pending.pop(fut), fut.result())
                    if bar is not None:
                        bar.n = min(total, counters[0].value)
                        _postfix(bar, counters[1].value, start)
            except BaseException:
                for fut in pending:
                    fut.cancel()
                raise
    finally:
        gc.unfreeze()
        if bar is not None:
            bar.close()


def _pool_context() -> Any:
    """``fork`` when this process runs no other Python thread (workers start in milliseconds and import
    nothing); otherwise ``forkserver``, because forking a process while another thread may hold a lock
    (an fsspec I/O loop, a progress-bar monitor) can deadlock the child."""
    if "fork" in mp.get_all_start_methods() and threading.active_count() == 1:
        return mp.get_context("fork")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["pipeline.shards.build"])
    return ctx


def _postfix(bar: Any, nbytes: int, start: float) -> None:
    elapsed = max(1e-9, time.perf_counter() - start)
    bar.set_postfix_str(f"{nbytes / elapsed / 1e6:.1f} MB/s", refresh=False)
    bar.refresh()


def _save_receipt(job: Job, r: dict) -> None:
    payload = {k: v for k, v in r.items() if not k.startswith("_") and k != "reused"}
    url = storage.join(job.out, RECEIPT_DIR, f"chunk-{r['chunk']:06d}.json")
    storage.write_atomic(url, json.dumps(payload).encode(), job.options)


# ---------------------------------------------------------------- relic shards masks


MASK_METHODS = {"spectral-residual": shard_masks.MASK_METHOD_SPECTRAL_RESIDUAL}
"""``relic shards masks --method`` -> ``Manifest.masks["method"]``."""


@dataclass
class MaskJob:
    """What every shard task of :func:`add_masks` shares."""

    manifest: Manifest
    options: dict[str, Any]
    out: str
    out_options: dict[str, Any]
    method: str


def saliency_rgb(data: bytes) -> np.ndarray:
    """The RGB pixels ``add_masks`` computes a mask from: the image as displayed (EXIF orientation
    applied, :func:`~pipeline.shards.images.to_rgb`); a JPEG decoded at a reduced scale (libjpeg's DCT
    scaling, ``draft``) that keeps both sides >= 4 x ``SR_WIDTH``, a fraction of a full decode's time
    for a result that is downscaled to ``SR_WIDTH`` anyway."""
    with Image.open(io.BytesIO(data)) as img:
        if img.format == "JPEG":
            side = 4 * shard_masks.SR_WIDTH
            img.draft("RGB", (min(img.width, side), min(img.height, side)))
        img.load()
        return np.asarray(images.to_rgb(img))


def _mask_shard(job: MaskJob, i: int) -> dict:
    """Rewrite shard ``i`` with a computed mask member after each sample's image (existing mask
    members dropped, every other member copied as it is); publish it (its index file first)."""
    info = job.manifest.shards[i]
    url = job.manifest.shard_url(i)
    target = storage.join(job.out, info.name)
    if storage.is_remote(job.out):
        fd, tmp = tempfile.mkstemp(prefix="relic-masks-", suffix=".tar")
        os.close(fd)
    else:
        tmp = os.path.join(job.out, f".{info.name}.tmp-{uuid.uuid4().hex[:8]}")
    counts = {"samples": 0, "masked": 0, "bad_image": 0, "no_image": 0}
    rejected: list[list[str]] = []
    try:
        with open(tmp, "wb") as fileobj, storage.open_stream(url, job.options) as stream:
            writer = TarShardWriter(fileobj)
            for sample in shard_format.samples(
                shard_format.tar_members(stream), lambda _o, _e: True, shard=url
            ):
                image_ext = shard_format.image_member(sample.parts, job.manifest.image_ext)
                mask = None
                if image_ext is None:
                    counts["no_image"] += 1
                else:
                    try:
                        rgb = saliency_rgb(sample.parts[image_ext])
                        mask = shard_masks.encode_mask(shard_masks.spectral_residual_mask(rgb))
                    except Exception as e:  # PIL raises many types for bad data
                        counts["bad_image"] += 1
                        rejected.append(
                            [f"{info.name}:{sample.key}", f"{MASK_REJECTED}: image does not decode: {e}"]
                        )
                members: list[tuple[str, bytes]] = []
                for member, ext in zip(sample.members, sample.exts):
                    if ext == shard_masks.MASK_EXT:
                        continue
                    if not member.was_read:
                        raise BuildError(
                            f"{url}: sample {sample.key} has two .{ext} members; cannot rewrite it"
                        )
                    members.append((member.name[len(sample.key) + 1 :], member.read()))
                    if mask is not None and ext == image_ext:
                        members.append((shard_masks.MASK_EXT, mask))
                writer.add(sample.key, members)
                counts["samples"] += 1
                counts["masked"] += mask is not None
                _count(1, TarShardWriter.sample_size(members))
            writer.close()
        if info.index and writer.samples:
            idx_text = dali_index.format_dali_index(writer.index)
            storage.write_atomic(storage.join(job.out, info.index), idx_text.encode(), job.out_options)
        storage.publish_file(tmp, target, job.out_options)
    except shard_format.TarFormatError as e:
        raise BuildError(f"{url} cannot be read: {e}; check it with `relic shards verify`") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    _count(0, 0, flush=True)
    new = ShardInfo(info.name, writer.samples, writer.bytes, writer.sha256.hexdigest(), info.index)
    return {"shard": dataclasses.asdict(new), "counts": counts, "rejected": rejected}


def add_masks(
    shards: str,
    out: str | None = None,
    *,
    method: str = "spectral-residual",
    workers: int = 1,
    storage_options: dict[str, Any] | None = None,
    out_storage_options: dict[str, Any] | None = None,
    progress: bool | None = None,
) -> Manifest:
    """``relic shards masks``: compute a saliency mask for every sample of the shard set ``shards`` (a
    directory or manifest URL, local or fsspec) with ``method`` (``MASK_METHODS``) and write the set
    with the mask members (``{key}.mask.png`` after each image; existing mask members replaced, every
    other member copied byte for byte, samples in their order) to ``out``, or in place without it.

    Each shard is written to a temporary file and published atomically, its DALI index file (when the
    manifest lists one) regenerated first; ``manifest.json`` comes last, atomically, with the new
    sizes and sha256 and ``masks = {"method": "spectral_residual", ...}``. During an in-place run,
    readers of the set may see old and new shards side by side (each one whole); an interrupted run is
    finished by running it again (masks are recomputed; the result is the same). The output depends only
    on the input shards: byte-identical when run twice. Images that do not decode are counted, listed
    in the manifest's ``rejected`` (reason starting with ``MASK_REJECTED``) and their samples copied
    without a mask. Plain ``.tar`` shards only. Tar headers are rewritten with the writer's fixed
    metadata; tar members that are not sample data (no extension, hidden, ``__*__``) are not copied."""
    if method not in MASK_METHODS:
        raise ValueError(f"unknown mask method {method!r}; expected one of {sorted(MASK_METHODS)}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    options = dict(storage_options) if storage_options is not None else storage.storage_options(shards)
    manifest = load_manifest(shards, options)
    assert manifest.url is not None
    here = storage.dirname(manifest.url)
    if out is None:
        out, out_options = here, options
    elif out_storage_options is not None:
        out_options = dict(out_storage_options)
    elif storage.is_remote(out) and storage.protocol(out) == storage.protocol(shards):
        out_options = options
    else:
        out_options = storage.storage_options(out)
    compressed = [s.name for s in manifest.shards if not s.name.endswith(".tar")]
    if compressed:
        raise BuildError(
            f"relic shards masks rewrites plain .tar shards only; {compressed[0]} is compressed "
            f"({len(compressed)} such shards)"
        )
    _check_writable(out, out_options)
    job = MaskJob(manifest, options, out, out_options, MASK_METHODS[method])
    results = _run_mask_tasks(job, workers, progress)

    totals = {"samples": 0, "masked": 0, "bad_image": 0, "no_image": 0}
    rejected = [r for r in manifest.rejected if not r.reason.startswith(MASK_REJECTED)]
    for r in results:
        for k in totals:
            totals[k] += r["counts"][k]
        rejected.extend(Rejected(i, reason) for i, reason in r["rejected"])
    new = dataclasses.replace(
        manifest,
        shards=[ShardInfo(**r["shard"]) for r in results],
        rejected=rejected,
        masks={
            "member": shard_masks.MASK_EXT,
            "samples": totals["masked"],
            "method": job.method,
            "rejected": totals["bad_image"],
            "missing": totals["no_image"],
        },
        url=None,
    )
    save_manifest(new, out, out_options)
    if not storage.is_remote(out):  # the empty folder _check_writable made
        with contextlib.suppress(OSError):
            os.rmdir(os.path.join(out, RECEIPT_DIR))
    return new


def _run_mask_tasks(job: MaskJob, workers: int, progress: bool | None) -> list[dict]:
    """Every shard of ``job`` through :func:`_mask_shard`, ``workers`` processes; results in shard order."""
    n = len(job.manifest.shards)
    total = job.manifest.total_samples
    show = sys.stderr.isatty() if progress is None else progress
    bar = None
    results: list[dict | None] = [None] * n
    start = time.perf_counter()

    def open_bar() -> Any:
        if not show:
            return None
        from tqdm import tqdm

        return tqdm(total=total, unit="img", desc="masks", file=sys.stderr)

    try:
        if workers == 1 or n == 1:
            _init_worker(None)
            bar = open_bar()
            done_bytes = 0
            for i in range(n):
                results[i] = r = _mask_shard(job, i)
                done_bytes += r["shard"]["bytes"]
                if bar is not None:
                    bar.update(r["counts"]["samples"])
                    _postfix(bar, done_bytes, start)
        else:
            calls = [(_mask_shard, (job, i)) for i in range(n)]
            _in_pool(min(workers, n), calls, results.__setitem__, open_bar, total, start)
    except BrokenProcessPool as e:
        raise BuildError(f"a worker process died ({e}); run the same command again") from e
    finally:
        if bar is not None:
            bar.close()
    return [r for r in results if r is not None]
