"""Image bytes in shards: what the decoders accept, and how inputs become RGB baseline JPEGs.

One JPEG marker walker (:func:`jpeg_segments`, ITU-T T.81 annex B) serves both questions asked of a
JPEG without decoding it:

- :func:`jpeg_info` (``relic shards build``): frame type, size, components and EXIF orientation,
  to decide whether an input can be stored byte for byte;
- :func:`image_problem` (the training reader, ``validate`` levels below): whether DALI's decoder will
  take the bytes. DALI's image decoder raises on a corrupt image and stops the pipeline, so the
  reader hands out only images that pass this check.

``image_problem`` levels: ``True``/``"cheap"`` — magic bytes consistent with the member's extension;
JPEG: every marker segment up to the first scan (every scan of a progressive JPEG) checked where
libjpeg-turbo, DALI's CPU decoder, fails (known markers, lengths inside the data, 8-bit frame of
1..65535 pixels a side, quantization tables defined, Huffman tables forming a valid prefix code and
defined before use, scan parameters, blocks per MCU; libjpeg-turbo jdmarker.c, jdhuff.c, jdphuff.c,
jdinput.c), then an EOI after the scan data; PNG: the chunk walk with every CRC up to IEND; WebP: the
RIFF size and the VP8/VP8L/VP8X header. DALI's decoder raises on truncation, a missing EOI and broken
headers (all caught here) and decodes corrupted entropy-coded data with warnings (garbage pixels,
harmless for training); about 20 us per image. ``"decode"`` — additionally a full PIL decode
(:func:`decode_problem`). ``False`` — only empty images are refused.

Header readers: :func:`jpeg_info`, :func:`png_header` and :func:`image_size` (the displayed size of
any image, EXIF orientation applied: what a saliency mask's aspect ratio is checked against).

Reasons returned (the reader's skip reasons): ``empty_image``, ``wrong_format`` (a valid image of
another format than the extension says), ``corrupt_image``, ``unsupported_image`` (well-formed but
not something DALI decodes: 12-bit, lossless or arithmetic-coded JPEG).
"""

from __future__ import annotations

import functools
import io
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

_MAGIC = ((b"\xff\xd8\xff", "jpeg"), (b"\x89PNG\r\n\x1a\n", "png"), (b"RIFF", "webp"))
FORMAT_OF_EXT = {"jpg": "jpeg", "jpeg": "jpeg", "png": "png", "webp": "webp"}
_SOF_SUPPORTED = {0xC0, 0xC1, 0xC2}  # baseline, extended sequential, progressive (Huffman, 8-bit)
_SOF_OTHER = {0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}  # lossless/arithmetic/hier.
_HEADER_MARKERS = {0xC4, 0xCC, 0xDB, 0xDD, 0xFE, *range(0xE0, 0xF0)}
_NO_LENGTH = {0x01, *range(0xD0, 0xD8)}  # TEM and RSTn carry no length field
_MAX_SIDE = 65535
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # not stuffing, restart or fill
EXIF_ORIENTATION = 0x0112


class BadImage(Exception):
    """Why an image would not decode; ``reason`` is one of the reader's skip reasons."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def sniff_format(data: bytes) -> str | None:
    """``"jpeg"``, ``"png"``, ``"webp"`` from the magic bytes, else None."""
    for magic, fmt in _MAGIC:
        if data.startswith(magic):
            return None if fmt == "webp" and data[8:12] != b"WEBP" else fmt
    return None


def image_problem(data: bytes, image_ext: str = "jpg", validate: bool | str = True) -> tuple[str, str] | None:
    """``None`` if ``data`` is an image DALI will decode, else ``(reason, detail)`` (module doc)."""
    if not data:
        return "empty_image", "zero bytes"
    if validate is False:
        return None
    expected = FORMAT_OF_EXT[image_ext]
    fmt = sniff_format(data)
    if fmt is None:
        return "corrupt_image", f"not a {expected} (starts with {data[:8].hex()})"
    if fmt != expected:
        return "wrong_format", f"{fmt} data in a .{image_ext} member"
    try:
        {"jpeg": _check_jpeg, "png": _check_png, "webp": _check_webp}[fmt](data)
    except BadImage as e:
        return e.reason, str(e)
    if validate == "decode":
        problem = decode_problem(data)
        if problem is not None:
            return "corrupt_image", f"full decode failed: {problem}"
    return None


def decode_problem(data: bytes) -> str | None:
    """``None`` when PIL decodes ``data`` completely, else what went wrong: the thorough (slow) check."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except Exception as e:  # PIL raises many types for bad data
        return f"{type(e).__name__}: {e}"
    return None


def image_size(data: bytes) -> tuple[int, int] | None:
    """``(width, height)`` of an image *as displayed* (EXIF orientation applied, as DALI's decoder and
    :func:`to_rgb` apply it), from its headers: JPEG through :func:`jpeg_info`, PNG through
    :func:`png_header`, anything else through PIL's lazy header read. ``None`` when unreadable."""
    fmt = sniff_format(data)
    if fmt == "jpeg":
        info = jpeg_info(data)
        if info is not None:
            turned = info.orientation in (5, 6, 7, 8)
            return (info.height, info.width) if turned else (info.width, info.height)
    elif fmt == "png":
        header = png_header(data)
        return None if header is None else (header.width, header.height)
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
            turned = img.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)
    except Exception:  # PIL raises many types for bad data
        return None
    return (h, w) if turned else (w, h)


# --------------------------------------------------------------------------------------------------
# JPEG


def jpeg_segments(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """``(marker, position, body)`` of a JPEG's marker segments from SOI on. After a scan header (SOS)
    it continues at the next marker after the entropy-coded data, so a progressive JPEG's later
    tables and scans follow; it ends at EOI. TEM and RSTn come with an empty body. Raises
    :class:`BadImage` where the structure breaks (a missing marker, a segment overrunning the data,
    scan data running to the end)."""
    n, pos = len(data), 2
    if not data.startswith(b"\xff\xd8"):
        raise BadImage("corrupt_image", "jpeg: no SOI marker")
    while True:
        if pos + 4 > n:
            raise BadImage("corrupt_image", f"jpeg headers end at byte {pos} of {n}")
        if data[pos] != 0xFF:
            raise BadImage("corrupt_image", f"jpeg: expected a marker at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in _NO_LENGTH:
            yield marker, pos, b""
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", data, pos + 2)
        end = pos + 2 + length
        if length < 2 or end > n:
            raise BadImage("corrupt_image", f"jpeg: segment 0x{marker:02X} at {pos} overruns the data")
        yield marker, pos, data[pos + 4 : end]
        if marker != 0xDA:
            pos = end
            continue
        found = _NEXT_MARKER.search(data, end)
        if found is None:
            raise BadImage("corrupt_image", f"jpeg: scan data runs to the end ({n} bytes; truncated?)")
        pos = found.start()
        if data[pos + 1] == 0xD9:
            return


@dataclass(frozen=True)
class JpegInfo:
    sof: int
    """The frame marker: 0xC0 baseline, 0xC2 progressive, ..."""
    precision: int
    width: int
    height: int
    components: int
    orientation: int
    """EXIF orientation, 1 when absent."""


def jpeg_info(data: bytes) -> JpegInfo | None:
    """Frame type, size, components and EXIF orientation from the headers (ITU T.81 B.1.1; EXIF 2.3
    4.6.4), about ten times faster than ``PIL.Image.open``; ``None`` when the headers up to the first
    scan are not a plain, complete marker sequence (the caller then asks PIL)."""
    frame: tuple[int, bytes] | None = None
    orientation = 1
    try:
        for marker, _pos, body in jpeg_segments(data):
            if marker in _SOF_SUPPORTED or marker in _SOF_OTHER:
                if len(body) < 6:
                    return None
                frame = (marker, body)
            elif marker == 0xE1 and body.startswith(b"Exif\0\0"):
                found = _exif_orientation(body[6:])
                if found is None:
                    return None
                orientation = found
            elif marker == 0xDA:
                if frame is None:
                    return None
                precision, height, width, components = struct.unpack_from(">BHHB", frame[1])
                if width == 0 or height == 0:
                    return None
                return JpegInfo(frame[0], precision, width, height, components, orientation)
    except BadImage:
        return None
    return None


def _exif_orientation(tiff: bytes) -> int | None:
    """The Orientation tag of IFD0 in a TIFF-structured EXIF block, 1 when absent; None if malformed."""
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return None
    fmt = "<" if tiff[:2] == b"II" else ">"
    (start,) = struct.unpack_from(fmt + "I", tiff, 4)
    if start + 2 > len(tiff):
        return None
    (count,) = struct.unpack_from(fmt + "H", tiff, start)
    for i in range(count):
        entry = start + 2 + 12 * i
        if entry + 12 > len(tiff):
            return None
        tag, kind = struct.unpack_from(fmt + "HH", tiff, entry)
        if tag == EXIF_ORIENTATION:
            return struct.unpack_from(fmt + "H", tiff, entry + 8)[0] if kind == 3 else None
    return 1


def _check_jpeg(data: bytes) -> None:
    frame: tuple[int, dict[int, tuple[int, int]]] | None = None  # SOF marker, id -> (qtable, h*v)
    qtables: set[int] = set()
    htables: set[tuple[int, int]] = set()
    for marker, pos, body in jpeg_segments(data):
        if marker in _SOF_SUPPORTED:
            if frame is not None:
                raise BadImage("corrupt_image", "jpeg: two frame headers")
            frame = (marker, _check_sof(body))
        elif marker in _SOF_OTHER:
            raise BadImage(
                "unsupported_image", f"jpeg: SOF 0x{marker:02X} (lossless/arithmetic/hierarchical)"
            )
        elif marker == 0xDB:
            qtables |= _check_dqt(body)
        elif marker == 0xC4:
            htables |= _check_dht(body)
        elif marker == 0xDA:
            if frame is None:
                raise BadImage("corrupt_image", "jpeg: scan before frame header (no SOF)")
            missing = {q for q, _ in frame[1].values()} - qtables
            if missing:
                raise BadImage("corrupt_image", f"jpeg: quantization tables {sorted(missing)} not defined")
            _check_sos(body, frame[0], frame[1], htables)
            if frame[0] != 0xC2:
                # Entropy-coded data cannot contain FF D9 (FF is stuffed as FF 00), so the last EOI
                # must follow it; bytes after EOI are ignored by decoders.
                if data.rfind(b"\xff\xd9") < pos + 2 + len(body) + 2:
                    raise BadImage("corrupt_image", f"jpeg: no EOI after the scan data ({len(data)} bytes)")
                return
        elif marker not in _HEADER_MARKERS:
            raise BadImage("corrupt_image", f"jpeg: invalid marker 0xFF{marker:02X} at byte {pos}")
    # the walker reached the EOI after the last scan of a progressive JPEG


def _check_sof(body: bytes) -> dict[int, tuple[int, int]]:
    if len(body) < 6:
        raise BadImage("corrupt_image", "jpeg: short SOF")
    precision, height, width, ncomp = struct.unpack_from(">BHHB", body)
    if precision != 8:
        raise BadImage("unsupported_image", f"jpeg: {precision}-bit samples")
    if not (1 <= width <= _MAX_SIDE and 1 <= height <= _MAX_SIDE):
        raise BadImage("corrupt_image", f"jpeg: size {width}x{height}")
    if ncomp not in (1, 3, 4) or len(body) != 6 + 3 * ncomp:
        raise BadImage("corrupt_image", f"jpeg: {ncomp} components in a {len(body)}-byte SOF")
    components = {}
    for c in range(ncomp):
        cid, sampling, qtable = body[6 + 3 * c : 9 + 3 * c]
        if not (1 <= sampling >> 4 <= 4 and 1 <= sampling & 15 <= 4) or qtable > 3 or cid in components:
            raise BadImage("corrupt_image", f"jpeg: component {cid} sampling 0x{sampling:02X} table {qtable}")
        components[cid] = (qtable, (sampling >> 4) * (sampling & 15))
    return components


def _check_dqt(body: bytes) -> set[int]:
    pos, defined = 0, set()
    while pos < len(body):
        pq, tq = body[pos] >> 4, body[pos] & 15
        if pq > 1 or tq > 3:
            raise BadImage("corrupt_image", f"jpeg: DQT precision {pq} table {tq}")
        defined.add(tq)
        pos += 1 + 64 * (1 + pq)
    if pos != len(body):
        raise BadImage("corrupt_image", "jpeg: DQT length mismatch")
    return defined


def _check_dht(body: bytes) -> frozenset[tuple[int, int]]:
    """Each table: class/id, 16 code-length counts that form a valid prefix code with the all-ones code
    unused (libjpeg's "Bogus Huffman table definition"), DC symbols <= 15."""
    result = _dht_tables(body)
    if isinstance(result, str):
        raise BadImage("corrupt_image", result)
    return result


@functools.lru_cache(maxsize=4096)
def _dht_tables(body: bytes) -> frozenset[tuple[int, int]] | str:
    """The tables a DHT body defines, or what is wrong with it. Cached: encoders mostly reuse tables."""
    pos, defined = 0, set()
    while pos < len(body):
        tc, th = body[pos] >> 4, body[pos] & 15
        if tc > 1 or th > 3 or pos + 17 > len(body):
            return f"jpeg: DHT class {tc} table {th}"
        counts = body[pos + 1 : pos + 17]
        total = sum(counts)
        if total > 256 or pos + 17 + total > len(body):
            return f"jpeg: DHT with {total} codes"
        code = 0
        for bits, count in enumerate(counts, 1):
            code += count
            if count and code >= 1 << bits:
                return f"jpeg: Huffman table {tc}/{th}: too many codes of length {bits}"
            code <<= 1
        if tc == 0 and max(body[pos + 17 : pos + 17 + total], default=0) > 15:
            return f"jpeg: DC Huffman table {th} has a symbol > 15"
        defined.add((tc, th))
        pos += 17 + total
    if pos != len(body):
        return "jpeg: DHT length mismatch"
    return frozenset(defined)


def _check_sos(
    body: bytes, sof: int, components: dict[int, tuple[int, int]], htables: set[tuple[int, int]]
) -> None:
    ns = body[0] if body else 0
    if not 1 <= ns <= 4 or len(body) != 4 + 2 * ns:
        raise BadImage("corrupt_image", f"jpeg: SOS with {ns} components in {len(body)} bytes")
    ss, se, ah, al = body[1 + 2 * ns], body[2 + 2 * ns], body[3 + 2 * ns] >> 4, body[3 + 2 * ns] & 15
    if sof == 0xC2:  # progressive: libjpeg-turbo jdphuff.c start_pass_phuff_decoder
        bad = se != 0 if ss == 0 else (ss > se or se > 63 or ns != 1)
        bad = bad or (ah != 0 and al != ah - 1) or al > 13
    else:
        bad = (ss, se, ah, al) != (0, 63, 0, 0)
    if bad:
        raise BadImage("corrupt_image", f"jpeg: scan parameters Ss={ss} Se={se} Ah={ah} Al={al}")
    if sof == 0xC2:  # the first scan needs the DC tables (DC scan) or the AC table (AC scan)
        uses = (0,) if ss == 0 and ah == 0 else (1,) if ss > 0 else ()
    else:
        uses = (0, 1)
    blocks = 0
    for c in range(ns):
        cid, tables = body[1 + 2 * c], body[2 + 2 * c]
        if cid not in components:
            raise BadImage("corrupt_image", f"jpeg: SOS component {cid} is not in the frame")
        blocks += components[cid][1]
        for table_class in uses:
            table = (table_class, tables >> 4 if table_class == 0 else tables & 15)
            if table not in htables:  # libjpeg-turbo: "Huffman table 0x.. was not defined"
                raise BadImage(
                    "corrupt_image", f"jpeg: SOS component {cid} uses undefined Huffman table {table}"
                )
    if ns > 1 and blocks > 10:  # libjpeg's D_MAX_BLOCKS_IN_MCU
        raise BadImage("corrupt_image", f"jpeg: {blocks} blocks per MCU in an interleaved scan (max 10)")


# --------------------------------------------------------------------------------------------------
# PNG, WebP


PNG_COLOR_TYPES = {0: "greyscale", 2: "RGB", 3: "palette", 4: "greyscale+alpha", 6: "RGBA"}
"""PNG IHDR colour types (ISO/IEC 15948, 11.2.2)."""


@dataclass(frozen=True)
class PngHeader:
    width: int
    height: int
    bit_depth: int
    color_type: int
    """0 greyscale, 2 RGB, 3 palette, 4 greyscale + alpha, 6 RGBA (``PNG_COLOR_TYPES``)."""

    def describe(self) -> str:
        kind = PNG_COLOR_TYPES.get(self.color_type, f"colour type {self.color_type}")
        return f"{self.bit_depth}-bit {kind}"


def png_header(data: bytes) -> PngHeader | None:
    """The IHDR chunk of a PNG (signature, then IHDR first, 13 bytes); ``None`` when absent. The CRCs
    and the rest of the chunks are :func:`image_problem`'s job."""
    if len(data) < 33 or not data.startswith(b"\x89PNG\r\n\x1a\n") or data[12:16] != b"IHDR":
        return None
    width, height, depth, color = struct.unpack_from(">IIBB", data, 16)
    return PngHeader(width, height, depth, color)


def _check_png(data: bytes) -> None:
    pos, n, first = 8, len(data), True
    while True:
        if pos + 12 > n:
            raise BadImage(
                "corrupt_image", f"png: chunk header past the end at byte {pos} of {n} (truncated?)"
            )
        (length,) = struct.unpack_from(">I", data, pos)
        ctype = data[pos + 4 : pos + 8]
        end = pos + 12 + length
        if end > n:
            raise BadImage("corrupt_image", f"png: chunk {ctype!r} overruns the data (truncated?)")
        (crc,) = struct.unpack_from(">I", data, end - 4)
        if zlib.crc32(data[pos + 4 : end - 4]) != crc:
            raise BadImage("corrupt_image", f"png: bad CRC in chunk {ctype!r} at byte {pos}")
        if first:
            if ctype != b"IHDR" or length != 13:
                raise BadImage("corrupt_image", "png: first chunk is not IHDR")
            width, height = struct.unpack_from(">II", data, pos + 8)
            if not (1 <= width <= _MAX_SIDE and 1 <= height <= _MAX_SIDE):
                raise BadImage("corrupt_image", f"png: size {width}x{height}")
            first = False
        if ctype == b"IEND":
            return
        pos = end


def _check_webp(data: bytes) -> None:
    (riff_size,) = struct.unpack_from("<I", data, 4) if len(data) >= 8 else (0,)
    if len(data) < 30 or riff_size + 8 > len(data):
        raise BadImage("corrupt_image", f"webp: RIFF size {riff_size + 8} > {len(data)} bytes (truncated?)")
    chunk = data[12:16]
    (chunk_size,) = struct.unpack_from("<I", data, 16)
    if chunk not in (b"VP8 ", b"VP8L", b"VP8X") or 20 + chunk_size > len(data):
        raise BadImage("corrupt_image", f"webp: first chunk {chunk!r} of {chunk_size} bytes")
    if chunk == b"VP8 " and data[23:26] != b"\x9d\x01\x2a":
        raise BadImage("corrupt_image", "webp: VP8 key frame start code missing")
    if chunk == b"VP8L" and data[20] != 0x2F:
        raise BadImage("corrupt_image", "webp: VP8L signature missing")


# --------------------------------------------------------------------------------------------------
# Conversion to RGB baseline JPEG


_EXIF_TRANSPOSE = {  # EXIF 2.3 table 4.6.4 "Orientation", as Pillow's ImageOps.exif_transpose applies it
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def orient(img: Image.Image, orientation: int) -> Image.Image:
    """``img`` turned/flipped as its EXIF ``orientation`` (1..8) says it is displayed."""
    return img.transpose(_EXIF_TRANSPOSE[orientation]) if orientation in _EXIF_TRANSPOSE else img


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB pixels of a decoded image: EXIF orientation applied, high bit depths scaled (not clipped)
    to 8 bits (:func:`to_8bit`), palettes expanded, alpha composited over white."""
    orientation = img.getexif().get(EXIF_ORIENTATION, 1)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        img = Image.fromarray(to_8bit(img), mode="L")  # before the turn: it needs the TIFF tags
    img = orient(img, orientation)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img if img.mode == "RGB" else img.convert("RGB")


def sample_range(img: Image.Image) -> float:
    """The largest value a single-channel integer image's samples can take: ``2**bits - 1`` with the
    TIFF BitsPerSample tag (``2**(bits-1) - 1`` for signed samples, SampleFormat 2) when present;
    else 16 bits for Pillow's 16-bit modes and for mode "I" from other formats (Pillow scales 9..16-bit
    PGM/PNG samples to 0..65535), 32 bits when the data does not fit 16."""
    tags = getattr(img, "tag_v2", None) or {}
    bits = tags.get(258)
    bits = bits[0] if isinstance(bits, tuple) and bits else bits
    signed = (tags.get(339) or (1,))[0] == 2 if isinstance(tags.get(339), tuple) else tags.get(339) == 2
    if not (isinstance(bits, int) and 8 < bits <= 32):
        bits = 32 if img.mode == "I" and img.getextrema()[1] > 65535 else 16
    return float(2 ** (bits - 1) - 1 if signed else 2**bits - 1)


def to_8bit(img: Image.Image) -> np.ndarray:
    """A grey image of mode I;16*, I or F as uint8 on the full 0..255 scale: integers divided by the
    largest value their bit depth allows (:func:`sample_range`), floats taken as 0..1 when they lie
    there (else clipped to 0..255); negative values clip to 0."""
    arr = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        scaled = arr * 255.0 if np.nanmin(arr) >= 0 and np.nanmax(arr) <= 1.0 else arr
    else:
        scaled = arr * (255.0 / sample_range(img))
    return np.clip(np.rint(np.nan_to_num(scaled)), 0, 255).astype(np.uint8)


def encode_jpeg(img: Image.Image, *, max_side: int | None = None, quality: int = 95) -> bytes:
    """An RGB baseline JPEG of ``img`` (:func:`to_rgb`), downscaled (Lanczos) so that its longer side is
    at most ``max_side``. The target size comes from ``img.info["original_size"]`` when set (the size
    before a JPEG draft shrink), with its sides swapped when the EXIF orientation turns the image."""
    w, h = img.info.get("original_size", img.size)
    if img.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8):  # a transpose or a quarter turn
        w, h = h, w
    img = to_rgb(img)
    if max_side is not None and max(w, h) > max_side:
        scale = max_side / max(w, h)
        img = img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, optimize=False, progressive=False)
    return buf.getvalue()


def reencode(data: bytes, quality: int = 95) -> bytes:
    """Decode with PIL and write an RGB baseline JPEG: for files PIL reads but DALI does not."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return encode_jpeg(img, quality=quality)


__all__ = [
    "BadImage",
    "JpegInfo",
    "PngHeader",
    "decode_problem",
    "encode_jpeg",
    "image_problem",
    "image_size",
    "jpeg_info",
    "jpeg_segments",
    "orient",
    "png_header",
    "reencode",
    "sample_range",
    "sniff_format",
    "to_8bit",
    "to_rgb",
]
