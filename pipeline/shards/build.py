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

Tar layout: members ``{key}.jpg``, ``{key}.cls`` (decimal class index, when labelled),
``{key}.json`` (``{"source", "original_size", "label"}``), in that order, USTAR headers with fixed
metadata (mtime 0, uid/gid 0, mode 0444, no user names) and no record padding, so the same inputs
give byte-identical shards.
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
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import IO, Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline import storage
from pipeline.shards import dali_index, images
from pipeline.shards import format as shard_format
from pipeline.shards.format import TarShardWriter
from pipeline.shards.manifest import Manifest, Rejected, ShardInfo, save_manifest
from pipeline.shards.sources import Item, Reader, open_source

RECEIPT_DIR = ".relic-build"
DEFAULT_MAX_PIXELS = 40_000_000
"""Inputs larger than this are rejected before decoding (``--max-pixels``): 40 megapixels is three
times the largest ImageNet photo and decodes to 115 MiB of RGB; Pillow itself refuses only twice its
89.5-megapixel warning limit, at ~500 MiB per image per worker."""


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


@dataclass
class Task:
    chunk: int
    items: list[tuple[int, Item]]  # (position in the shuffled order, item)
    plan: str  # digest of the settings and these items
    receipt: dict | None = None  # from an earlier, interrupted run


@dataclass
class Part:
    """One finished shard of a chunk: its info, and where it lies until published."""

    info: ShardInfo
    tmp_path: str
    idx_text: str | None
    class_counts: dict[int, int] = field(default_factory=dict)


_counters: tuple[Any, Any] | None = None  # (samples, bytes) shared with the main process's progress bar


def _init_worker(counters: tuple[Any, Any] | None) -> None:
    global _counters
    _counters = counters


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
        for position, item in task.items:
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
            members = shard_format.sample_members(
                jpeg, label=item.label if job.labelled else None, source=item.input, original_size=original
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
        "published": first_shard is not None,
        "_parts": [(p.tmp_path, p.idx_text) for p in parts] if first_shard is None else [],
    }


# ---------------------------------------------------------------- the build


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


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
) -> Manifest:
    """Build shards from SOURCE into OUT (local dir or fsspec URL) and return the saved manifest.

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

    options = dict(storage_options) if storage_options is not None else storage.storage_options(out)
    if source_storage_options is not None:
        src_options = dict(source_storage_options)
    elif storage.is_remote(source) and storage.protocol(source) == storage.protocol(out):
        src_options = options
    else:
        src_options = storage.storage_options(source)
    src = open_source(
        source,
        storage_options=src_options,
        digits_size=digits_size,
        photos_count=photos_count,
        split=split,
    )
    _check_writable(out, options)
    _clean_stale_tmp(out)

    order = np.random.default_rng(seed).permutation(len(src.items))
    shuffled = [(int(p), src.items[int(i)]) for p, i in enumerate(order)]
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
    )
    base = _digest({"encoding": encoding, "classes": src.classes, "index": index, "version": 1})
    receipts = _load_receipts(out, options)
    tasks = []
    for j, start in enumerate(range(0, len(shuffled), max_samples)):
        chunk_items = shuffled[start : start + max_samples]
        plan = _digest([base, [(p, it.input, it.label, str(it.ref)) for p, it in chunk_items]])
        tasks.append(Task(j, chunk_items, plan, receipts.get(j)))

    direct = max_bytes is None  # chunk j is shard j: workers publish themselves
    results = _run_tasks(job, tasks, direct, workers, progress, len(shuffled))

    shards: list[ShardInfo] = []
    rejected = [Rejected(i, r) for i, r in src.rejected]
    counts: dict[int, int] = {}
    stats = {"passthrough": 0, "reencoded": 0}
    for task in tasks:
        r = results[task.chunk]
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
        encoding={**encoding, **stats},
        source=_public_source(source),
        rejected=rejected,
    )
    save_manifest(manifest, out, options)
    try:
        fs, path = storage.filesystem(storage.join(out, RECEIPT_DIR), options)
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass
    return manifest


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
            ctx = _pool_context()
            counters = (ctx.Value("q", 0), ctx.Value("q", 0))
            # Forked workers share the parent's heap copy-on-write; frozen objects are left out of their
            # garbage collections, which would otherwise touch (and so copy) every page of it.
            gc.freeze()
            with cf.ProcessPoolExecutor(
                workers, mp_context=ctx, initializer=_init_worker, initargs=(counters,)
            ) as pool:
                pending = {pool.submit(run_chunk, job, t, t.chunk if direct else None) for t in tasks}
                gc.unfreeze()
                bar = open_bar()  # after the workers exist: tqdm's monitor thread must not be forked
                try:
                    while pending:
                        done, pending = cf.wait(pending, timeout=0.25, return_when=cf.FIRST_COMPLETED)
                        for fut in done:
                            finished(fut.result())
                        if bar is not None:
                            bar.n = min(total, counters[0].value)
                            _postfix(bar, counters[1].value, start)
                except BaseException:
                    for fut in pending:
                        fut.cancel()
                    raise
    except BrokenProcessPool as e:
        raise BuildError(
            f"a worker process died ({e}); {len(results)} of {len(tasks)} chunks finished and were "
            f"kept in {job.out}. Re-run the same command to resume."
        ) from e
    finally:
        if bar is not None:
            bar.close()
    return results


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
