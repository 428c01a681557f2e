"""Streaming shard reader: WebDataset tar shards -> fixed-size batches of encoded image bytes + labels.

Epoch policy (the contract every rank relies on)
------------------------------------------------
1. **Shard order.** Each epoch permutes the manifest's shards with ``(seed, epoch)``; every rank
   computes the same permutation (:func:`shard_order`).
2. **Rank blocks.** The permuted shards are viewed as one concatenated sample sequence of ``total``
   samples (counts from the manifest). With ``N = floor(total / world_size / batch_size) * batch_size``,
   rank ``r`` takes the contiguous block ``[r*N, (r+1)*N)`` (:func:`plan_epoch`). Ranks are disjoint and
   equal; the ``total - world_size*N`` samples at the tail are dropped, and because the shard order
   changes, the dropped samples rotate between epochs. A rank opens only the shards overlapping its
   block and starts at its offset without decoding: with the shard's DALI ``.idx`` it seeks straight
   to the first sample (nothing before it is transferred), otherwise it steps over the tar headers
   before it with ``seek``.
3. **Loader workers.** ``num_workers`` streams (threads; worth it for remote shards, where they
   overlap request latency) subdivide the rank's block into contiguous segments of whole batches
   (:func:`split_workers`); batch ``b`` of the epoch comes from worker ``b % num_workers``. The
   number of workers is therefore part of the configuration: it changes the order, never the set of
   samples.
4. **Sample shuffle.** Within a worker's segment, a shuffle buffer of ``shuffle_buffer`` samples
   (WebDataset's ``shuffle`` stage, Breuel 2020) mixes samples, seeded from
   ``(seed, epoch, rank, worker)``. It is simulated on sample *positions* (:func:`shuffle_order`), so
   the output order is known before any byte is read: memory is the same as a real buffer (at most
   ``shuffle_buffer + 1`` encoded images per worker), and resuming needs no data that was consumed.
   The buffer mixes only nearby samples: shards must hold their samples in random order (``relic
   shards build`` shuffles its inputs; a class-sorted foreign set would give single-class batches).
5. **Batches.** Slot ``j`` of a worker's shuffled order belongs to local batch ``j // batch_size``.
   Every epoch yields exactly ``batches_per_epoch`` full batches on every rank, never a short one.
6. **Bad samples** (see below) leave an empty slot. It is *filled* with a duplicate of a good sample of
   the same batch (cycling through them in slot order); a batch with no good sample at all borrows
   the good samples of the rank's next batch that has some (at the epoch's end, of the previous
   one); only a rank without a single readable sample from ``start_batch`` on raises. Each fill is
   counted in ``stats["filled"]``. Filling keeps every rank's batch count equal (all-gather of the
   contrast set needs equal shapes) at the cost of rare in-batch duplicates.
7. **Resume** at ``(epoch, start_batch)``: the shuffled order is recomputed, samples of consumed batches
   are never read nor decoded (only the ones still in the shuffle buffer at that point are read), and
   batches ``start_batch..`` equal those of an uninterrupted epoch — also with bad samples, because a
   batch's content depends only on its own slots and later ones (the exception is the epoch-end
   borrowing of rule 6, when every later batch is bad as well).

Streaming: shards are opened with webdataset's ``gopen`` (s3:// and other fsspec URLs through the
opener :func:`pipeline.storage.register_webdataset_opener` installs, with the reader's storage
options) and read member by member (:func:`tar_members`), never whole: plain tars by a small header
parser that reads only the wanted members, compressed tars by webdataset's ``tar_file_iterator``.
Samples are grouped by key as webdataset does (``base_plus_ext``).

Bad data never stops the stream and is never silent. Each skipped sample is counted under one reason
(``SKIP_REASONS``) and logged once (reason, shard, key):

- ``missing_image``: a sample without an ``image_ext`` member;
- ``empty_image``: an image member of zero bytes;
- ``wrong_format``: a valid-looking image of another format than the manifest's ``image_ext``
  (e.g. PNG bytes in a ``.jpg``);
- ``corrupt_image``: fails validation (truncated, random bytes, broken headers);
- ``unsupported_image``: well-formed, but a kind DALI's decoders do not take (12-bit or lossless
  JPEG, arithmetic coding);
- ``truncated_tar``: the tar ended (or broke) before the sample was complete; its good samples before
  the break are delivered;
- ``unreadable_shard``: the shard could not be opened after ``max_open_retries`` retries with
  exponential backoff, or is not a tar at all: all its planned samples are skipped.

Labels that cannot be parsed are counted as ``bad_label`` and delivered as -1 (the sample is kept).

Validation (``validate``): DALI's image decoder raises on a corrupt image and stops the pipeline, so the
reader hands out only images that pass :func:`image_problem`:

- ``True``/``"cheap"`` (default): magic bytes consistent with ``image_ext``. JPEG: every marker
  segment up to the first scan (every scan of a progressive JPEG) checked where libjpeg-turbo, DALI's
  CPU decoder, fails: known markers, lengths inside the data, 8-bit frame of 1..65535 pixels a side,
  quantization tables defined, Huffman tables forming a valid prefix code and defined before use,
  scan parameters, blocks per MCU; then an EOI after the scan data. PNG: chunk walk with the CRC of
  every chunk up to IEND. WebP: RIFF size and the VP8/VP8L/VP8X header. Measured with DALI 2.4's CPU
  decoder: it raises on truncation, a missing EOI and broken headers (all caught here) and decodes,
  with warnings, corrupted entropy-coded data (garbage pixels, harmless for training). Random byte
  changes anywhere in baseline and progressive JPEGs found no accepted image that DALI rejects
  (tests/pipeline/test_reader_bad_data.py); this costs ~20 us per image, no decode.
- ``"decode"``: additionally a full PIL decode of every image: slow (a decode per sample on the
  reader thread), for data sets where the cheap check is not enough. A loader that still sees DALI
  raise on a batch can fall back to decoding that batch image by image (pipeline/loader.py does).
- ``False``: only missing/empty images are skipped.

Labels: ``manifest.label_ext == "cls"``: decimal text; ``"json"``: the field ``manifest.label_key``
(default: ``"label"``, then ``"cls"``), an integer or a class name listed in ``manifest.classes``;
``None``: every label is -1.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import queue
import re
import struct
import tarfile
import threading
import time
import zlib
from collections.abc import Generator, Iterator, Sequence
from dataclasses import dataclass
from importlib import import_module
from typing import Any

import numpy as np
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from pipeline import storage
from pipeline.shards.manifest import Manifest, load_manifest

wds_gopen = import_module("webdataset.gopen")  # the module; `from webdataset import gopen` is the function

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
Span = tuple[int, int, int]  # (shard index in the manifest, first sample, stop sample) within the shard


@dataclass
class RawBatch:
    images: list[bytes]  # encoded image bytes, len == batch_size
    labels: np.ndarray  # int64 [batch_size], -1 when unlabelled
    keys: list[str]  # sample keys (unique within a shard set); duplicates mark filled slots


# --- planning: pure functions, no I/O --------------------------------------------------------------


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


# --- validation -------------------------------------------------------------------------------------

_MAGIC = (
    (b"\xff\xd8\xff", "jpeg"),
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"RIFF", "webp"),  # confirmed by "WEBP" at offset 8 in _check_webp
)
_FORMAT_OF_EXT = {"jpg": "jpeg", "jpeg": "jpeg", "png": "png", "webp": "webp"}
# JPEG markers that may appear before the first SOS (ITU-T T.81, table B.1).
_SOF_SUPPORTED = {0xC0, 0xC1, 0xC2}  # baseline, extended sequential, progressive (Huffman, 8-bit)
_SOF_OTHER = {0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # lossless / arithmetic / hier.
_HEADER_MARKERS = {0xC4, 0xCC, 0xDB, 0xDD, 0xFE, *range(0xE0, 0xF0)}
_MAX_SIDE = 65535
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # not stuffing, restart or fill


class _Bad(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def sniff_format(data: bytes) -> str | None:
    """ "jpeg", "png", "webp" from the magic bytes, else None."""
    for magic, fmt in _MAGIC:
        if data.startswith(magic):
            if fmt == "webp" and data[8:12] != b"WEBP":
                return None
            return fmt
    return None


def image_problem(data: bytes, image_ext: str = "jpg", validate: bool | str = True) -> tuple[str, str] | None:
    """``None`` if ``data`` is an image DALI will decode, else ``(reason, detail)`` (see module doc)."""
    if not data:
        return "empty_image", "zero bytes"
    if validate is False:
        return None
    expected = _FORMAT_OF_EXT[image_ext]
    fmt = sniff_format(data)
    if fmt is None:
        return "corrupt_image", f"not a {expected} (starts with {data[:8].hex()})"
    if fmt != expected:
        return "wrong_format", f"{fmt} data in a .{image_ext} member"
    try:
        {"jpeg": _check_jpeg, "png": _check_png, "webp": _check_webp}[fmt](data)
        if validate == "decode":
            _decode_fully(data)
    except _Bad as e:
        return e.reason, str(e)
    return None


def _check_jpeg(data: bytes) -> None:
    """Marker segments from SOI to the first SOS (to every SOS of a progressive JPEG), checked where
    libjpeg-turbo, DALI's CPU decoder, would fail on them (ITU-T T.81 annex B; libjpeg-turbo
    jdmarker.c, jdhuff.c, jdphuff.c, jdinput.c), then an EOI after the scan data."""
    n, pos, length = len(data), 2, 0
    frame: tuple[int, dict[int, tuple[int, int]]] | None = None  # SOF marker, id -> (quant table, h*v)
    qtables: set[int] = set()
    htables: set[tuple[int, int]] = set()
    while True:
        if pos + 4 > n:
            raise _Bad("corrupt_image", f"jpeg headers end at byte {pos} of {n}")
        if data[pos] != 0xFF:
            raise _Bad("corrupt_image", f"jpeg: expected a marker at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        (length,) = struct.unpack_from(">H", data, pos + 2)
        body = data[pos + 4 : pos + 2 + length]
        if length < 2 or pos + 2 + length > n:
            raise _Bad("corrupt_image", f"jpeg: segment 0x{marker:02X} at {pos} overruns the data")
        if marker in _SOF_SUPPORTED:
            if frame is not None:
                raise _Bad("corrupt_image", "jpeg: two frame headers")
            frame = (marker, _check_sof(body))
        elif marker in _SOF_OTHER:
            raise _Bad("unsupported_image", f"jpeg: SOF 0x{marker:02X} (lossless/arithmetic/hierarchical)")
        elif marker == 0xDB:
            qtables |= _check_dqt(body)
        elif marker == 0xC4:
            htables |= _check_dht(body)
        elif marker == 0xDA:
            if frame is None:
                raise _Bad("corrupt_image", "jpeg: scan before frame header (no SOF)")
            missing = {q for q, _ in frame[1].values()} - qtables
            if missing:
                raise _Bad("corrupt_image", f"jpeg: quantization tables {sorted(missing)} not defined")
            _check_sos(body, frame[0], frame[1], htables)
            if frame[0] != 0xC2:
                break
            # Progressive: more table and scan headers follow the scan data; find the next marker
            # (entropy-coded data has only FF00 stuffing and RSTn) and keep checking.
            found = _NEXT_MARKER.search(data, pos + 2 + length)
            if found is None:
                raise _Bad("corrupt_image", f"jpeg: scan data runs to the end ({n} bytes; truncated?)")
            pos = found.start()
            if data[pos + 1] == 0xD9:
                return
            continue
        elif marker not in _HEADER_MARKERS:
            raise _Bad("corrupt_image", f"jpeg: invalid marker 0xFF{marker:02X} at byte {pos}")
        pos += 2 + length
    scan_start = pos + 2 + length
    # Entropy-coded data cannot contain FF D9 (FF is stuffed as FF 00), so the last EOI must follow it.
    # Bytes after EOI are ignored by decoders.
    if data.rfind(b"\xff\xd9") < scan_start:
        raise _Bad("corrupt_image", f"jpeg: no EOI after the scan data ({n} bytes; truncated?)")


def _check_sof(body: bytes) -> dict[int, tuple[int, int]]:
    if len(body) < 6:
        raise _Bad("corrupt_image", "jpeg: short SOF")
    precision, height, width, ncomp = struct.unpack_from(">BHHB", body)
    if precision != 8:
        raise _Bad("unsupported_image", f"jpeg: {precision}-bit samples")
    if not (1 <= width <= _MAX_SIDE and 1 <= height <= _MAX_SIDE):
        raise _Bad("corrupt_image", f"jpeg: size {width}x{height}")
    if ncomp not in (1, 3, 4) or len(body) != 6 + 3 * ncomp:
        raise _Bad("corrupt_image", f"jpeg: {ncomp} components in a {len(body)}-byte SOF")
    components = {}
    for c in range(ncomp):
        cid, sampling, qtable = body[6 + 3 * c : 9 + 3 * c]
        if not (1 <= sampling >> 4 <= 4 and 1 <= sampling & 15 <= 4) or qtable > 3 or cid in components:
            raise _Bad("corrupt_image", f"jpeg: component {cid} sampling 0x{sampling:02X} table {qtable}")
        components[cid] = (qtable, (sampling >> 4) * (sampling & 15))
    return components


def _check_dqt(body: bytes) -> set[int]:
    pos, defined = 0, set()
    while pos < len(body):
        pq, tq = body[pos] >> 4, body[pos] & 15
        if pq > 1 or tq > 3:
            raise _Bad("corrupt_image", f"jpeg: DQT precision {pq} table {tq}")
        defined.add(tq)
        pos += 1 + 64 * (1 + pq)
    if pos != len(body):
        raise _Bad("corrupt_image", "jpeg: DQT length mismatch")
    return defined


def _check_dht(body: bytes) -> frozenset[tuple[int, int]]:
    """Each table: class/id, 16 code-length counts that form a valid prefix code with the all-ones code
    unused (libjpeg's "Bogus Huffman table definition"), DC symbols <= 15."""
    result = _dht_tables(body)
    if isinstance(result, str):
        raise _Bad("corrupt_image", result)
    return result


@functools.lru_cache(maxsize=4096)
def _dht_tables(body: bytes) -> frozenset[tuple[int, int]] | str:
    """The tables a DHT body defines, or what is wrong with it. Cached: encoders mostly reuse tables."""
    try:
        return frozenset(_parse_dht(body))
    except _Bad as e:
        return str(e)


def _parse_dht(body: bytes) -> set[tuple[int, int]]:
    pos, defined = 0, set()
    while pos < len(body):
        tc, th = body[pos] >> 4, body[pos] & 15
        if tc > 1 or th > 3 or pos + 17 > len(body):
            raise _Bad("corrupt_image", f"jpeg: DHT class {tc} table {th}")
        counts = body[pos + 1 : pos + 17]
        total = sum(counts)
        if total > 256 or pos + 17 + total > len(body):
            raise _Bad("corrupt_image", f"jpeg: DHT with {total} codes")
        code = 0
        for bits, count in enumerate(counts, 1):
            code += count
            if count and code >= 1 << bits:
                raise _Bad("corrupt_image", f"jpeg: Huffman table {tc}/{th}: too many codes of length {bits}")
            code <<= 1
        if tc == 0 and max(body[pos + 17 : pos + 17 + total], default=0) > 15:
            raise _Bad("corrupt_image", f"jpeg: DC Huffman table {th} has a symbol > 15")
        defined.add((tc, th))
        pos += 17 + total
    if pos != len(body):
        raise _Bad("corrupt_image", "jpeg: DHT length mismatch")
    return defined


def _check_sos(
    body: bytes, sof: int, components: dict[int, tuple[int, int]], htables: set[tuple[int, int]]
) -> None:
    ns = body[0] if body else 0
    if not 1 <= ns <= 4 or len(body) != 4 + 2 * ns:
        raise _Bad("corrupt_image", f"jpeg: SOS with {ns} components in {len(body)} bytes")
    ss, se, ah, al = body[1 + 2 * ns], body[2 + 2 * ns], body[3 + 2 * ns] >> 4, body[3 + 2 * ns] & 15
    if sof == 0xC2:  # progressive: libjpeg-turbo jdphuff.c start_pass_phuff_decoder
        bad = se != 0 if ss == 0 else (ss > se or se > 63 or ns != 1)
        bad = bad or (ah != 0 and al != ah - 1) or al > 13
    else:
        bad = (ss, se, ah, al) != (0, 63, 0, 0)
    if bad:
        raise _Bad("corrupt_image", f"jpeg: scan parameters Ss={ss} Se={se} Ah={ah} Al={al}")
    if sof == 0xC2:  # the first scan needs the DC tables (DC scan) or the AC table (AC scan)
        uses = (0,) if ss == 0 and ah == 0 else (1,) if ss > 0 else ()
    else:
        uses = (0, 1)
    blocks = 0
    for c in range(ns):
        cid, tables = body[1 + 2 * c], body[2 + 2 * c]
        if cid not in components:
            raise _Bad("corrupt_image", f"jpeg: SOS component {cid} is not in the frame")
        blocks += components[cid][1]
        for table_class in uses:
            table = (table_class, tables >> 4 if table_class == 0 else tables & 15)
            if table not in htables:  # libjpeg-turbo: "Huffman table 0x.. was not defined"
                raise _Bad("corrupt_image", f"jpeg: SOS component {cid} uses undefined Huffman table {table}")
    if ns > 1 and blocks > 10:  # libjpeg's D_MAX_BLOCKS_IN_MCU
        raise _Bad("corrupt_image", f"jpeg: {blocks} blocks per MCU in an interleaved scan (max 10)")


def _check_png(data: bytes) -> None:
    pos, n, first = 8, len(data), True
    while True:
        if pos + 12 > n:
            raise _Bad("corrupt_image", f"png: chunk header past the end at byte {pos} of {n} (truncated?)")
        (length,) = struct.unpack_from(">I", data, pos)
        ctype = data[pos + 4 : pos + 8]
        end = pos + 12 + length
        if end > n:
            raise _Bad("corrupt_image", f"png: chunk {ctype!r} overruns the data (truncated?)")
        (crc,) = struct.unpack_from(">I", data, end - 4)
        if zlib.crc32(data[pos + 4 : end - 4]) != crc:
            raise _Bad("corrupt_image", f"png: bad CRC in chunk {ctype!r} at byte {pos}")
        if first:
            if ctype != b"IHDR" or length != 13:
                raise _Bad("corrupt_image", "png: first chunk is not IHDR")
            width, height = struct.unpack_from(">II", data, pos + 8)
            if not (1 <= width <= _MAX_SIDE and 1 <= height <= _MAX_SIDE):
                raise _Bad("corrupt_image", f"png: size {width}x{height}")
            first = False
        if ctype == b"IEND":
            return
        pos = end


def _check_webp(data: bytes) -> None:
    (riff_size,) = struct.unpack_from("<I", data, 4) if len(data) >= 8 else (0,)
    if len(data) < 30 or riff_size + 8 > len(data):
        raise _Bad("corrupt_image", f"webp: RIFF size {riff_size + 8} > {len(data)} bytes (truncated?)")
    chunk = data[12:16]
    (chunk_size,) = struct.unpack_from("<I", data, 16)
    if chunk not in (b"VP8 ", b"VP8L", b"VP8X") or 20 + chunk_size > len(data):
        raise _Bad("corrupt_image", f"webp: first chunk {chunk!r} of {chunk_size} bytes")
    if chunk == b"VP8 " and data[23:26] != b"\x9d\x01\x2a":
        raise _Bad("corrupt_image", "webp: VP8 key frame start code missing")
    if chunk == b"VP8L" and data[20] != 0x2F:
        raise _Bad("corrupt_image", "webp: VP8L signature missing")


def _decode_fully(data: bytes) -> None:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except Exception as e:  # PIL raises many types for bad data
        raise _Bad("corrupt_image", f"full decode failed: {e}") from None


# --- labels -----------------------------------------------------------------------------------------


def parse_label(data: bytes | None, manifest: Manifest) -> int | None:
    """The class index of one sample; -1 without labels; ``None`` when present but unparseable."""
    if manifest.label_ext is None:
        return -1
    if data is None:
        return None
    try:
        if manifest.label_ext == "cls":
            return int(data.decode("ascii").strip())
        obj = json.loads(data)
        keys = [manifest.label_key] if manifest.label_key else ["label", "cls"]
        value = next(obj[k] for k in keys if k in obj)
        if isinstance(value, str) and manifest.classes and value in manifest.classes:
            return manifest.classes.index(value)
        return int(value)
    except (ValueError, TypeError, StopIteration, UnicodeDecodeError, AttributeError):
        return None


# --- tar members ------------------------------------------------------------------------------------

_BLOCK = 512
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta: "__key__"-style members are not data
_COMPRESSED = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")


class TarFormatError(tarfile.TarError):
    """A tar header that is not a tar header (bad checksum, bad size field)."""


def tar_members(stream, select=None) -> Iterator[tuple[str, bytes]]:
    """``(name, data)`` of the regular-file members of a tar stream that ``select(name)`` accepts.

    Plain tars go through a small ustar/GNU/pax header parser that reads the wanted members with one
    ``read`` each and steps over the others with ``seek`` when the stream can (local files, s3fs:
    skipped members cost no transfer). Python's ``tarfile`` stream mode, which webdataset's
    ``tar_file_iterator`` uses, copies its 10 KiB buffer on every header and was ~5x slower on
    ImageNet-size JPEG shards. Compressed tars (gzip, bzip2, xz) go through webdataset's
    ``tar_file_iterator``. Same member semantics as webdataset: non-regular members and ``__*__``
    metadata are skipped. A truncated member raises ``tarfile.ReadError``; a tar ending at a member
    boundary without its end-of-archive blocks just ends (callers compare counts with the manifest).
    ``select`` may raise to stop reading early.
    """
    head = _read_exact(stream, _BLOCK)
    if head.startswith(_COMPRESSED):
        yield from _webdataset_members(_Prepended(head, stream), select)
    else:
        yield from _plain_tar_members(head, stream, select)


def _plain_tar_members(head: bytes, stream, select) -> Iterator[tuple[str, bytes]]:
    seekable = _seekable(stream)
    long_name: str | None = None
    pax: dict[str, str] = {}
    offset = 0
    while True:
        if len(head) < _BLOCK:
            if head:
                raise tarfile.ReadError(f"truncated header at byte {offset}")
            return  # ended at a member boundary
        if head == _ZERO_BLOCK:
            return  # end-of-archive marker
        (stored,) = struct.unpack_from("8s", head, 148)
        checksum = sum(head) - sum(stored) + 8 * 32
        expected = _octal(stored, offset)
        if expected != checksum and expected != checksum - 256 * sum(
            b > 127 for b in head[:148] + head[156:]
        ):
            raise TarFormatError(f"bad header checksum at byte {offset}")  # (the second: signed sum)
        size = int(pax["size"]) if "size" in pax else _octal(head[124:136], offset)
        kind = head[156:157]
        padded = size + (-size % _BLOCK)
        if kind in (b"L", b"x", b"g"):
            data = _read_exact(stream, padded)
            if len(data) < padded:
                raise tarfile.ReadError(f"truncated extended header at byte {offset}")
            if kind == b"L":
                long_name = data[:size].rstrip(b"\0").decode("utf-8", "surrogateescape")
            elif kind == b"x":
                pax = _pax_records(data[:size])
        else:
            if "path" in pax:
                name = pax["path"]
            elif long_name is not None:
                name = long_name
            else:
                name = head[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                if head[257:265] == b"ustar\x0000" and head[345] != 0:  # POSIX prefix (not GNU's atime)
                    prefix = head[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                    name = f"{prefix}/{name}"
            long_name, pax = None, {}
            if kind in (b"0", b"\0", b"7") and not _META.match(name) and (select is None or select(name)):
                data = _read_exact(stream, size)
                if len(data) < size:
                    raise tarfile.ReadError(f"unexpected end of data in {name} at byte {offset}")
                _skip(stream, padded - size, seekable)
                yield name, data
            else:
                _skip(stream, padded, seekable)
        offset += _BLOCK + padded
        head = _read_exact(stream, _BLOCK)


def _webdataset_members(stream, select) -> Iterator[tuple[str, bytes]]:
    errors: list[BaseException] = []

    def keep(exn: BaseException) -> bool:
        errors.append(exn)
        return False  # stop this shard; raised below

    for member in tar_file_iterator(stream, handler=keep, select_files=select):
        yield member["fname"], member["data"]
    if errors:
        raise errors[0]


_ZERO_BLOCK = bytes(_BLOCK)


def _octal(field: bytes, offset: int) -> int:
    if field[:1] in (b"\x80", b"\xff"):  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big", signed=field[:1] == b"\xff")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarFormatError(f"bad numeric field {field!r} at byte {offset}") from None


def _pax_records(data: bytes) -> dict[str, str]:
    """POSIX.1-2001 extended header: records "<len> <key>=<value>\\n"."""
    out, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        out[key.decode()] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _read_exact(stream, n: int) -> bytes:
    data = stream.read(n)
    if len(data) == n or not data:
        return data
    parts = [data]
    got = len(data)
    while got < n:
        more = stream.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _seekable(stream) -> bool:
    try:
        return bool(stream.seekable())
    except (AttributeError, OSError, ValueError):
        return False


def _skip(stream, n: int, seekable: bool) -> None:
    if n <= 0:
        return
    if seekable:
        stream.seek(n, io.SEEK_CUR)
        return
    while n > 0:
        chunk = stream.read(min(n, 1 << 20))
        if not chunk:
            return
        n -= len(chunk)


class _Prepended(io.RawIOBase):
    """``head`` followed by the rest of ``stream``: puts back bytes read to sniff the format."""

    def __init__(self, head: bytes, stream) -> None:
        self._head, self._stream = head, stream

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        if self._head:
            out = self._head if n < 0 else self._head[:n]
            self._head = self._head[len(out) :]
            if n < 0:
                out += self._stream.read()
            return out
        return self._stream.read(n)

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


# --- the reader -------------------------------------------------------------------------------------


class _StopShard(Exception):
    """Raised from the member filter once the span is read: ends the tar stream early."""


@dataclass
class _Sample:
    key: str
    image: bytes
    label: int


class ShardReader:
    """Fixed-size batches of encoded images + labels for one rank of one epoch (policy: module doc).

    ``manifest_url``: ``manifest.json`` or its directory, local or any fsspec URL (s3:// ...);
    ``storage_options``: fsspec options for remote shards (endpoint, profile); ``num_workers``: reading
    threads, each with its own ``shuffle_buffer`` (in samples) and ``prefetch`` ready batches;
    ``validate``: ``True``/``"cheap"``, ``"decode"`` or ``False`` (module doc); a shard that fails to
    open is retried ``max_open_retries`` times, waiting ``retry_delay`` seconds, doubled each time.
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
        if validate not in (True, False, "cheap", "decode"):
            raise ValueError(f'validate must be True, False, "cheap" or "decode", got {validate!r}')
        self.storage_options = storage_options
        self.manifest = load_manifest(manifest_url, storage_options)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.num_workers, self.seed, self.shuffle_buffer = num_workers, seed, shuffle_buffer
        self.validate, self.max_open_retries, self.retry_delay = validate, max_open_retries, retry_delay
        self.prefetch = prefetch
        self._counts = [s.samples for s in self.manifest.shards]
        self.samples_per_rank = samples_per_rank(sum(self._counts), world_size, batch_size)
        if self.samples_per_rank == 0:
            raise ValueError(
                f"{self.manifest.url}: {sum(self._counts)} samples cannot give world_size={world_size} "
                f"ranks one batch of {batch_size} each"
            )
        self.batches_per_epoch = self.samples_per_rank // batch_size
        image_ext = self.manifest.image_ext
        self._image_exts = {"jpg", "jpeg"} if image_ext in ("jpg", "jpeg") else {image_ext}
        self._wanted = self._image_exts | ({self.manifest.label_ext} if self.manifest.label_ext else set())
        self._lock = threading.Lock()
        self._stats: dict[str, int] = dict.fromkeys((*SKIP_REASONS, "bad_label", "filled", "samples"), 0)
        self._logged: set[tuple[str, str, str]] = set()
        if storage.is_remote(self.manifest.url):
            storage.register_webdataset_opener(storage_options, (storage.protocol(self.manifest.url),))

    def __len__(self) -> int:
        return self.batches_per_epoch

    @property
    def stats(self) -> dict[str, int]:
        """Cumulative counters: samples skipped per reason, ``bad_label``, ``filled`` slots, ``samples``
        (good samples delivered, fills excluded)."""
        with self._lock:
            return dict(self._stats)

    def plan(self, epoch: int) -> list[list[Span]]:
        """This rank's spans per loader worker for ``epoch``."""
        spans = plan_epoch(self._counts, self.rank, self.world_size, self.batch_size, self.seed, epoch)
        return split_workers(spans, self.num_workers, self.batch_size)

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[RawBatch]:
        """Batches ``start_batch .. batches_per_epoch-1`` of ``epoch`` on this rank."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch must be in [0, {self.batches_per_epoch}], got {start_batch}")
        segments = self.plan(epoch)
        workers = self.num_workers
        streams = [
            self._worker_slots(epoch, w, segment, max(0, -(-(start_batch - w) // workers)))
            for w, segment in enumerate(segments)
        ]
        if workers == 1:
            batches = streams[0]
        else:
            batches = _round_robin(streams, self.batches_per_epoch - start_batch, start_batch, self.prefetch)
        # Fill policy (module doc, rule 6), over the rank's batches in order.
        pending: list[list[_Sample | None]] = []  # batches without any good sample, waiting for one
        last_goods: list[_Sample] = []
        try:
            for slots in batches:
                goods = [s for s in slots if s is not None]
                if not goods:
                    pending.append(slots)
                    continue
                for waiting in pending:
                    yield self._filled(waiting, goods)
                pending.clear()
                last_goods = goods
                yield self._filled(slots, goods)
            if pending and not last_goods:
                raise RuntimeError(
                    f"rank {self.rank} found no readable sample in epoch {epoch} from batch {start_batch} on "
                    f"(shards {sorted({self.manifest.shards[s].name for seg in segments for s, _, _ in seg})}): "
                    "see the logged errors"
                )
            for waiting in pending:
                yield self._filled(waiting, last_goods)
        finally:
            batches.close()

    # -- one worker's stream --

    def _worker_slots(
        self, epoch: int, worker: int, spans: list[Span], start_batch: int
    ) -> Generator[list[_Sample | None], None, None]:
        """The worker's batches as slot lists (``None`` for a bad sample), from ``start_batch`` on."""
        bsz = self.batch_size
        n = sum(stop - start for _, start, stop in spans)
        rng = np.random.default_rng([self.seed, epoch, 1, self.rank, worker])
        order = shuffle_order(n, self.shuffle_buffer, rng)
        first_slot = start_batch * bsz
        needed = np.zeros(n, dtype=bool)
        needed[order[first_slot:]] = True
        positions = self._read_positions(spans, needed)
        held: dict[int, _Sample | None] = {}
        slots: list[_Sample | None] = []
        try:
            for j in range(first_slot, n):
                p = int(order[j])
                while p not in held:
                    pos, sample = next(positions)
                    held[pos] = sample
                slots.append(held.pop(p))
                if len(slots) == bsz:
                    yield slots
                    slots = []
        finally:
            positions.close()  # the shard being read, if the epoch ended or was abandoned in it

    def _filled(self, slots: list[_Sample | None], goods: list[_Sample]) -> RawBatch:
        filled, out = 0, []
        for s in slots:
            if s is None:
                s = goods[filled % len(goods)]
                filled += 1
            out.append(s)
        with self._lock:
            self._stats["filled"] += filled
            self._stats["samples"] += len(slots) - filled
        return RawBatch(
            images=[s.image for s in out],
            labels=np.fromiter((s.label for s in out), dtype=np.int64, count=len(out)),
            keys=[s.key for s in out],
        )

    def _read_positions(self, spans: list[Span], needed: np.ndarray) -> Iterator[tuple[int, _Sample | None]]:
        """``(position, sample or None if bad)`` for every needed position, in increasing order."""
        base = 0
        for shard, start, stop in spans:
            ordinals = np.flatnonzero(needed[base : base + stop - start]) + start
            if len(ordinals):
                for ordinal, sample in self._read_shard(shard, ordinals):
                    yield base + ordinal - start, sample
            base += stop - start

    def _read_shard(
        self, shard: int, ordinals: np.ndarray, attempt: int = 0
    ) -> Iterator[tuple[int, _Sample | None]]:
        """Samples ``ordinals`` (sorted) of one shard, streamed; ``None`` for each bad one. A read error
        of the storage (``OSError``: connection reset, timeout) mid-shard re-opens the shard, with
        backoff, at the first sample not yet handed out; a broken tar does not."""
        name = self.manifest.shards[shard].name
        wanted_ordinals = set(ordinals.tolist())
        last = int(ordinals[-1])
        stream = self._open(shard)
        if isinstance(stream, Exception):
            detail = f"{type(stream).__name__}: {stream} (after {self.max_open_retries + 1} attempts)"
            self._count("unreadable_shard", name, "*", detail, len(ordinals))
            for o in ordinals:
                yield int(o), None
            return
        state = {"ordinal": -1, "prefix": None}
        first = int(ordinals[0])
        if first > 0 and self._seek_to_sample(stream, shard, first):
            state["ordinal"] = first - 1

        def select(fname: str) -> bool:
            prefix, suffix = base_plus_ext(fname)
            if prefix is None:
                return False
            if prefix != state["prefix"]:
                state["prefix"] = prefix
                state["ordinal"] += 1
                if state["ordinal"] > last:
                    raise _StopShard
            return state["ordinal"] in wanted_ordinals and suffix.lower() in self._wanted

        errors: list[BaseException] = []
        delivered = -1  # highest ordinal handed out (good or bad)
        group: dict[str, Any] | None = None
        group_ordinal = -1
        try:
            for fname, data in tar_members(stream, select):
                ordinal = state["ordinal"]
                if ordinal != group_ordinal:
                    if group is not None:
                        yield from self._gaps(shard, delivered, group_ordinal, wanted_ordinals)
                        yield group_ordinal, self._finish(name, group)
                        delivered = group_ordinal
                    group, group_ordinal = {"__key__": base_plus_ext(fname)[0]}, ordinal
                group[base_plus_ext(fname)[1].lower()] = data
        except _StopShard:
            pass
        except Exception as e:  # a broken tar or a read error mid-stream: keep what was complete
            errors.append(e)
        finally:
            stream.close()
        seen = state["ordinal"]  # highest ordinal whose name the tar showed
        if errors and seen < 0:
            detail = f"not a readable tar: {type(errors[0]).__name__}: {errors[0]}"
            self._count("unreadable_shard", name, "*", detail, len(ordinals))
            for o in ordinals:
                yield int(o), None
            return
        if group is not None and not (errors and group_ordinal == seen):  # else the tar broke inside it
            yield from self._gaps(shard, delivered, group_ordinal, wanted_ordinals)
            yield group_ordinal, self._finish(name, group)
            delivered = group_ordinal
        if errors and isinstance(errors[0], OSError) and attempt < self.max_open_retries:
            delay = self.retry_delay * 2**attempt
            log.info("re-opening %s at sample %d in %.1fs after %r", name, delivered + 1, delay, errors[0])
            time.sleep(delay)
            yield from self._read_shard(shard, ordinals[ordinals > delivered], attempt + 1)
            return
        if errors:
            self._log_once(
                "truncated_tar", name, f"sample #{seen}", f"{type(errors[0]).__name__}: {errors[0]}"
            )
        # Ordinals the tar never completed: missing members if the tar went on past them (and did not
        # break there), else the tar is shorter than the manifest says or broke.
        rest = [o for o in ordinals.tolist() if o > delivered]
        complete_upto = seen if not errors else seen - 1
        missing = [o for o in rest if o <= complete_upto]
        truncated = [o for o in rest if o > complete_upto]
        if missing:
            self._count("missing_image", name, f"sample #{missing[0]}", "no image member", len(missing))
        if truncated:
            detail = f"tar ends after sample {seen}, manifest lists {self.manifest.shards[shard].samples}"
            self._count("truncated_tar", name, f"samples #{truncated[0]}..", detail, len(truncated))
        for o in rest:
            yield o, None

    def _seek_to_sample(self, stream, shard: int, ordinal: int) -> bool:
        """Jump to sample ``ordinal`` using the shard's DALI ``.idx`` (byte offsets of every member), so
        that a rank block or a resume starting deep in a shard transfers nothing before it. Falls back
        to scanning (``False``) when there is no index, the stream cannot seek, or the header found
        there is not the member the index names (an index out of date, or GNU/pax long names)."""
        index = self.manifest.shards[shard].index
        if not index or not _seekable(stream):
            return False
        idx_url = storage.join(storage.dirname(self.manifest.url), index)
        try:
            with storage.open_url(idx_url, "rb", self.storage_options) as f:
                for line_number, line in enumerate(f):
                    if line_number == ordinal + 1:  # line 0 is "v1.2 <samples>"
                        _ext, data_offset, _size, member = line.split()[:4]
                        break
                else:
                    return False
            header_offset = int(data_offset) - _BLOCK
            stream.seek(header_offset)
            head = _read_exact(stream, _BLOCK)
            stream.seek(header_offset)
        except (OSError, ValueError) as e:
            self._log_once(
                "index_unusable", self.manifest.shards[shard].name, index, f"{type(e).__name__}: {e}"
            )
            stream.seek(0)
            return False
        if head[:100].split(b"\0", 1)[0] != member:
            stream.seek(0)
            return False
        return True

    def _gaps(self, shard: int, delivered: int, upto: int, wanted: set[int]) -> Iterator[tuple[int, None]]:
        """Wanted ordinals between the last delivered one and ``upto`` had no selected member."""
        for o in range(delivered + 1, upto):
            if o in wanted:
                self._count(
                    "missing_image", self.manifest.shards[shard].name, f"sample #{o}", "no image member"
                )
                yield o, None

    def _finish(self, shard_name: str, group: dict[str, Any]) -> _Sample | None:
        key = group["__key__"]
        image = next((group[e] for e in self._image_exts if e in group), None)
        if image is None:
            self._count("missing_image", shard_name, key, f"members {sorted(set(group) - {'__key__'})}")
            return None
        problem = image_problem(image, self.manifest.image_ext, self.validate)
        if problem is not None:
            self._count(problem[0], shard_name, key, problem[1])
            return None
        label = parse_label(
            group.get(self.manifest.label_ext) if self.manifest.label_ext else None, self.manifest
        )
        if label is None:
            self._count("bad_label", shard_name, key, f"unparseable .{self.manifest.label_ext}")
            label = -1
        return _Sample(key, image, label)

    def _open(self, shard: int):
        """The shard's byte stream, or the last error after ``max_open_retries`` retries with backoff."""
        url = self.manifest.shard_url(shard)
        opts = {"storage_options": self.storage_options} if storage.is_remote(url) else {}
        delay = self.retry_delay
        for attempt in range(self.max_open_retries + 1):
            try:
                return wds_gopen.gopen(url, "rb", **opts)
            except Exception as e:  # any backend error: retry, then skip the shard
                if attempt == self.max_open_retries:
                    return e
                log.info("retrying %s in %.1fs after %s: %s", url, delay, type(e).__name__, e)
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    # -- counters --

    def _count(self, reason: str, shard: str, key: str, detail: str, n: int = 1) -> None:
        with self._lock:
            self._stats[reason] += n
        self._log_once(reason, shard, key, detail)

    def _log_once(self, reason: str, shard: str, key: str, detail: str) -> None:
        with self._lock:
            if (reason, shard, key) in self._logged:
                return
            self._logged.add((reason, shard, key))
        log.warning("skipping %s: shard %s key %s: %s", reason, shard, key, detail)


def _get(q: queue.Queue, producer: threading.Thread):
    """Wait for the producer's next item; a producer that died without a word is an error, not a hang."""
    while True:
        try:
            return q.get(timeout=1.0)
        except queue.Empty:
            if not producer.is_alive() and q.empty():
                raise RuntimeError(f"{producer.name} stopped without finishing its batches") from None


def _round_robin(
    streams: list[Generator[Any, None, None]], count: int, start_batch: int, prefetch: int
) -> Generator[Any, None, None]:
    """Run each worker stream in a thread; yield batch ``b`` from worker ``b % len(streams)``."""
    workers = len(streams)
    queues: list[queue.Queue] = [queue.Queue(maxsize=max(1, prefetch)) for _ in streams]
    stop = threading.Event()
    done = object()

    def put(q: queue.Queue, item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False  # the consumer is gone

    def run(stream: Generator[Any, None, None], q: queue.Queue) -> None:
        try:
            for item in stream:
                if not put(q, item):
                    return
            put(q, done)
        except BaseException as e:  # handed to the consumer, re-raised there
            put(q, e)
        finally:
            stream.close()  # closes the shard it is reading

    threads = [
        threading.Thread(target=run, args=(s, q), name=f"shard-reader-{w}", daemon=True)
        for w, (s, q) in enumerate(zip(streams, queues))
    ]
    for t in threads:
        t.start()
    try:
        for b in range(start_batch, start_batch + count):
            item = _get(queues[b % workers], threads[b % workers])
            if isinstance(item, BaseException):
                raise item
            if item is done:
                raise RuntimeError(f"reader worker {b % workers} ended before batch {b}")
            yield item
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=5)
