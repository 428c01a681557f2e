"""The shard format: what a shard *is*, for every component that reads or writes one.

Everything that opens a shard — the training reader, ``relic shards index|verify|inspect``, the DALI
index writer, evaluation, ``relic doctor``, the torchvision reference and the benchmarks — goes
through this module; the image checks live beside it in :mod:`pipeline.shards.images`, the manifest
in :mod:`pipeline.shards.manifest`, atomic writes in :mod:`pipeline.storage`.

Tar files. A shard is a POSIX tar (ustar, GNU or pax headers), plain or compressed with gzip, bzip2
or xz; local or at any fsspec URL. :func:`tar_members` yields its regular-file members in order,
lazily: a member's data is read only when :meth:`Member.read` is called, and skipped with ``seek``
otherwise (local files and s3fs: nothing is transferred for it). Plain tars go through a small header
parser; compressed ones through Python's ``tarfile`` stream mode. A tar that ends inside a member, or
whose header is damaged, raises :class:`TarFormatError`; storage errors (``OSError``) pass through.

Samples. WebDataset's convention (Breuel, webdataset ``tariterators.base_plus_ext``): a member name
splits into a *key*, up to the first dot after its last ``/``, and an *extension*, the rest
(``a.b/c.d.jpg`` -> ``a.b/c`` + ``d.jpg``). A sample is a run of consecutive members sharing a key;
extensions are compared in lower case. Names without an extension, hidden files (``dir/.x``) and
``__*__`` metadata are not sample data. The members of a sample must be adjacent: a key that comes
back after another one (``tar cf`` of a directory lists files in directory order) raises
:class:`NonAdjacentMembers`, naming the shard and the fix.

Our writer (``relic shards build``) stores ``{key}.jpg`` (RGB JPEG), ``{key}.mask.png`` (its saliency
mask, when it has one: :mod:`pipeline.shards.masks` owns that member), ``{key}.cls`` (decimal class
index, when labelled; ``-1`` for a sample left unlabelled in a partly labelled set,
:mod:`pipeline.shards.partial_labels`) and ``{key}.json`` (source, original size, label), in that order.

Labels. :class:`LabelRule` says where a sample's class is (``.cls`` text, or a field of ``.json``) and
how to read it: an integer index, a decimal string, or a class name listed in the manifest's
``classes``; -1 means unlabelled. The manifest carries the rule (``Manifest.labels``).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import lzma
import re
import struct
import tarfile
import zlib
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from pipeline import storage
from pipeline.shards.masks import MASK_EXT

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
"""Extensions a sample's image may have, in order of preference."""
LABEL_EXTS = ("cls", "json")
LABEL_KEYS = ("label", "cls", "class", "target")
"""JSON fields searched for a class, in this order, when a manifest names none."""

_BLOCK = 512
_ZERO_BLOCK = bytes(_BLOCK)
_META = re.compile(r"__[^/]*__($|/)")  # webdataset's skip_meta
_COMPRESSED = {b"\x1f\x8b": "gz", b"BZh": "bz2", b"\xfd7zXZ\x00": "xz"}
_DECOMPRESSION_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile, lzma.LZMAError, tarfile.TarError)


class TarFormatError(tarfile.TarError):
    """The bytes are not a (complete) tar: a damaged header, or the data ends inside a member."""


class NonAdjacentMembers(TarFormatError):
    """A sample's members are scattered over the tar; readers that stream cannot group them."""


def split_key(name: str) -> tuple[str, str] | None:
    """``(key, extension)`` of a member name by WebDataset's rule, the extension in lower case;
    ``None`` for members that are not sample data (no extension, hidden, ``__meta__``)."""
    if _META.match(name):
        return None
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot <= slash:  # no dot after the last slash, or a hidden name (".x")
        return None
    return name[:dot], name[dot + 1 :].lower()


def image_member(parts: Mapping[str, Any], image_ext: str) -> str | None:
    """The extension holding the image among ``parts``: ``image_ext`` (``jpg`` and ``jpeg`` are one
    format), else ``None``."""
    accepted = ("jpg", "jpeg") if image_ext in ("jpg", "jpeg") else (image_ext,)
    return next((e for e in accepted if e in parts), None)


# --------------------------------------------------------------------------------------------------
# Tar members


class Member:
    """One regular-file member: ``name``, ``offset`` (of its data in the tar), ``size``; ``read()``
    returns the data, once the iterator has stopped at this member and before it moves on."""

    __slots__ = ("_data", "_reader", "name", "offset", "size")

    def __init__(self, name: str, offset: int, size: int, reader: Callable[[Member], bytes]) -> None:
        self.name, self.offset, self.size = name, offset, size
        self._reader: Callable[[Member], bytes] | None = reader
        self._data: bytes | None = None

    def read(self) -> bytes:
        if self._data is None:
            if self._reader is None:
                raise RuntimeError(f"tar member {self.name}: read after the stream moved past it")
            self._data = self._reader(self)
        return self._data

    @property
    def was_read(self) -> bool:
        return self._data is not None

    def _close(self) -> None:
        self._reader = None


def tar_members(stream: IO[bytes]) -> Iterator[Member]:
    """The regular-file members of a tar stream (plain or compressed), in order (module doc)."""
    head = read_exact(stream, _BLOCK)
    kind = next((k for magic, k in _COMPRESSED.items() if head.startswith(magic)), None)
    if kind is None:
        yield from _plain_members(head, stream)
    else:
        yield from _compressed_members(_Prepended(head, stream))


def _plain_members(head: bytes, stream: IO[bytes]) -> Iterator[Member]:
    seekable = _seekable(stream)
    long_name: str | None = None
    pax: dict[str, str] = {}
    offset = 0

    def read_data(member: Member) -> bytes:
        data = read_exact(stream, member.size)
        if len(data) < member.size:
            raise TarFormatError(f"tar ends inside {member.name} (byte {member.offset + len(data)})")
        return data

    while True:
        if len(head) < _BLOCK:
            if head:
                raise TarFormatError(f"tar ends inside a header at byte {offset}")
            return  # ended at a member boundary, without end-of-archive blocks
        if head == _ZERO_BLOCK:
            return
        _check_header(head, offset)
        size = int(pax["size"]) if "size" in pax else _octal(head[124:136], offset)
        kind = head[156:157]
        padded = size + (-size % _BLOCK)
        if kind in (b"L", b"x", b"g"):  # GNU long name, pax header, pax global header
            data = read_exact(stream, padded)
            if len(data) < padded:
                raise TarFormatError(f"tar ends inside an extended header at byte {offset}")
            if kind == b"L":
                long_name = data[:size].rstrip(b"\0").decode("utf-8", "surrogateescape")
            elif kind == b"x":
                pax = _pax_records(data[:size], offset)
        else:
            name = pax.get("path") or long_name or header_name(head)
            long_name, pax = None, {}
            if kind in (b"0", b"\0", b"7"):
                member = Member(name, offset + _BLOCK, size, read_data)
                yield member
                member._close()
                _skip(stream, padded - size if member.was_read else padded, seekable)
            else:
                _skip(stream, padded, seekable)
        offset += _BLOCK + padded
        head = read_exact(stream, _BLOCK)


def header_name(head: bytes) -> str:
    """The member name a ustar/GNU header block holds (with the POSIX prefix field)."""
    name = head[:100].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
    if head[257:265] == b"ustar\x0000" and head[345] != 0:  # POSIX prefix (GNU uses 345 for atime)
        prefix = head[345:500].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        name = f"{prefix}/{name}"
    return name


def _check_header(head: bytes, offset: int) -> None:
    (stored,) = struct.unpack_from("8s", head, 148)
    checksum = sum(head) - sum(stored) + 8 * 32  # the field counts as eight spaces
    expected = _octal(stored, offset)
    if expected == checksum:
        return
    signed = checksum - 256 * sum(b > 127 for b in head[:148] + head[156:])  # old tars sum signed bytes
    if expected != signed:
        raise TarFormatError(f"bad tar header checksum at byte {offset} (not a tar, or damaged)")


def _compressed_members(stream: IO[bytes]) -> Iterator[Member]:
    try:
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                if not info.isreg():
                    continue

                def read_data(member: Member, info: tarfile.TarInfo = info) -> bytes:
                    f = tar.extractfile(info)
                    return f.read() if f is not None else b""

                member = Member(info.name, info.offset_data, info.size, read_data)
                yield member
                member._close()
    except _DECOMPRESSION_ERRORS as e:
        raise TarFormatError(f"compressed tar is damaged or truncated: {type(e).__name__}: {e}") from None


def _octal(field_bytes: bytes, offset: int) -> int:
    if field_bytes[:1] in (b"\x80", b"\xff"):  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field_bytes[1:], "big", signed=field_bytes[:1] == b"\xff")
    text = field_bytes.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise TarFormatError(
            f"bad numeric field {field_bytes!r} in the tar header at byte {offset}"
        ) from None


def _pax_records(data: bytes, offset: int) -> dict[str, str]:
    """POSIX.1-2001 extended header: records ``"<len> <key>=<value>\\n"``."""
    out, pos = {}, 0
    try:
        while pos < len(data):
            space = data.index(b" ", pos)
            length = int(data[pos:space])
            key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
            out[key.decode()] = value.decode("utf-8", "surrogateescape")
            pos += length
    except ValueError:
        raise TarFormatError(f"bad pax extended header at byte {offset}") from None
    return out


def read_exact(stream: IO[bytes], n: int) -> bytes:
    """``n`` bytes, fewer only at the end of the stream (streams may return short reads)."""
    data = stream.read(n)
    if len(data) == n or not data:
        return data
    parts, got = [data], len(data)
    while got < n:
        more = stream.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


def _seekable(stream: IO[bytes]) -> bool:
    try:
        return bool(stream.seekable())
    except (AttributeError, OSError, ValueError):
        return False


def _skip(stream: IO[bytes], n: int, seekable: bool) -> None:
    """Step over ``n`` bytes: a seek where the stream can (a seek past the end shows as a tar ending
    at the next header), else reads that must find all ``n`` bytes."""
    if n <= 0:
        return
    if seekable:
        stream.seek(n, io.SEEK_CUR)
        return
    while n > 0:
        chunk = stream.read(min(n, 1 << 20))
        if not chunk:
            raise TarFormatError(f"tar ends {n} bytes before the end of a member")
        n -= len(chunk)


class _Prepended(io.RawIOBase):
    """``head`` followed by the rest of ``stream``: puts back the bytes read to sniff the format."""

    def __init__(self, head: bytes, stream: IO[bytes]) -> None:
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

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


# --------------------------------------------------------------------------------------------------
# Samples


@dataclass
class Sample:
    """One sample of a shard: its position (``ordinal``), ``key`` and members; ``parts`` maps the
    extensions that were read to their bytes."""

    ordinal: int
    key: str
    members: list[Member] = field(default_factory=list)
    exts: list[str] = field(default_factory=list)
    """The extension (lower case) of each member."""
    parts: dict[str, bytes] = field(default_factory=dict)

    def components(self) -> list[tuple[str, int, int, str]]:
        """``(extension as written, data offset, size, member name)`` of each member: a line of the
        shard's DALI index (:mod:`pipeline.shards.dali_index`)."""
        return [(m.name[len(self.key) + 1 :], m.offset, m.size, m.name) for m in self.members]


Wanted = Callable[[int, str], bool]
"""``wanted(ordinal, extension)``: whether to read that member's data."""


def samples(
    members: Iterator[Member],
    wanted: Wanted | Collection[str] = (),
    *,
    shard: str = "shard",
    first_ordinal: int = 0,
    last_ordinal: int | None = None,
) -> Iterator[Sample]:
    """Group ``members`` into samples (module doc), numbering them from ``first_ordinal`` and reading
    the members ``wanted`` selects (a collection of extensions, or a function of ordinal and
    extension). Stops after ``last_ordinal``, before reading further. Raises
    :class:`NonAdjacentMembers` when a key comes back after another one."""
    want = wanted if callable(wanted) else (lambda _o, ext, exts=frozenset(wanted): ext in exts)
    seen: set[str] = set()
    current: Sample | None = None
    ordinal = first_ordinal - 1
    for member in members:
        split = split_key(member.name)
        if split is None:
            continue
        key, ext = split
        if current is None or key != current.key:
            if current is not None:
                yield current
            if key in seen:
                raise NonAdjacentMembers(
                    f"{shard}: the members of sample {key!r} are not adjacent in the tar (it was "
                    f"written in directory order?); rewrite it with `tar --sort=name -cf ...` or "
                    f"webdataset's ShardWriter"
                )
            seen.add(key)
            ordinal += 1
            if last_ordinal is not None and ordinal > last_ordinal:
                return
            current = Sample(ordinal, key)
        current.members.append(member)
        current.exts.append(ext)
        if want(ordinal, ext) and ext not in current.parts:
            current.parts[ext] = member.read()
    if current is not None:
        yield current


class HashingReader(io.RawIOBase):
    """A read-only stream that hashes (sha256) and counts every byte read through it."""

    def __init__(self, fileobj: IO[bytes]) -> None:
        self.fileobj = fileobj
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.fileobj.read(n)
        self.sha256.update(data)
        self.bytes += len(data)
        return data

    def drain(self, chunk: int = 1 << 20) -> None:
        while self.read(chunk):
            pass


class ShardScan:
    """One whole pass over a shard (``relic shards index`` and ``verify``): iterate its samples, with
    the members of ``read`` loaded; afterwards ``bytes``, ``sha256`` and ``components`` (per sample:
    ``(ext, data offset, size, member name)`` of every member, for its DALI index) describe the file.
    """

    def __init__(self, url: str, options: dict[str, Any] | None = None, read: Collection[str] = ()) -> None:
        self.url, self.options, self.read = url, options, frozenset(read)
        self.bytes = 0
        self.sha256 = ""
        self.components: list[list[tuple[str, int, int, str]]] = []

    def __iter__(self) -> Iterator[Sample]:
        with storage.open_stream(self.url, self.options) as raw:
            hashing = HashingReader(raw)
            for sample in samples(tar_members(hashing), self.read, shard=self.url):
                self.components.append(sample.components())
                yield sample
            hashing.drain()
        self.bytes, self.sha256 = hashing.bytes, hashing.sha256.hexdigest()


def first_samples(url: str, n: int, options: dict[str, Any] | None = None, read: Collection[str] = ()):
    """The first ``n`` samples of the shard at ``url`` (streams only as far as it needs)."""
    with storage.open_stream(url, options) as f:
        return list(samples(tar_members(f), read, shard=url, last_ordinal=n - 1))


# --------------------------------------------------------------------------------------------------
# Writing (``relic shards build``)


def sample_key(position: int) -> str:
    """The key of the input at ``position`` of a build's shuffled order."""
    return f"{position:09d}"


def sample_members(
    jpeg: bytes,
    *,
    label: int | None,
    source: str,
    original_size: tuple[int, int],
    mask: bytes | None = None,
) -> list[tuple[str, bytes]]:
    """The members of one sample as our writer stores them, in order: ``jpg``, ``mask.png`` (when
    given: an encoded mask, :mod:`pipeline.shards.masks`), ``cls`` (when labelled), ``json``
    (``{"source", "original_size", "label"}``)."""
    meta: dict[str, Any] = {"source": source, "original_size": list(original_size)}
    members = [("jpg", jpeg)]
    if mask is not None:
        members.append((MASK_EXT, mask))
    if label is not None:
        members.append(("cls", str(label).encode()))
        meta["label"] = label
    members.append(("json", json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()))
    return members


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte POSIX ustar header of a regular file with our fixed metadata (mtime 0, uid/gid 0,
    mode 0444, empty user/group names): the bytes ``tarfile.TarInfo.tobuf(USTAR_FORMAT)`` makes, built
    directly because it runs three times per sample."""
    encoded = name.encode("utf-8")
    if len(encoded) > 100 or size >= 8**11:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = (
            size,
            0,
            0o444,
            0,
            0,
            "",
            "",
        )
        return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")
    head = encoded.ljust(100, b"\0") + _HEADER_MODE_IDS + b"%011o\0" % size + _HEADER_MTIME
    tail = _HEADER_TAIL
    chksum = sum(head) + 256 + sum(tail)  # the checksum field counts as eight spaces (0x20 * 8)
    return head + b"%06o\0 " % chksum + tail


_HEADER_MODE_IDS = b"0000444\0" + b"0000000\0" * 2  # mode, uid, gid
_HEADER_MTIME = b"00000000000\0"
_HEADER_TAIL = (b"0" + b"\0" * 100 + b"ustar\x0000" + b"\0" * 32 * 2 + b"\0" * 16 + b"\0" * 155).ljust(
    512 - 148 - 8, b"\0"
)


class TarShardWriter:
    """Streams samples into a tar file (``sample_members`` each) with fixed metadata; tracks its size,
    sha256 and, per sample, the DALI index components ``(ext, data offset, size, name)``."""

    def __init__(self, fileobj: IO[bytes]):
        self.fileobj = fileobj
        self.sha256 = hashlib.sha256()
        self.bytes = 0
        self.samples = 0
        self.index: list[list[tuple[str, int, int, str]]] = []

    def _write(self, data: bytes) -> None:
        self.fileobj.write(data)
        self.sha256.update(data)
        self.bytes += len(data)

    @staticmethod
    def sample_size(members: list[tuple[str, bytes]]) -> int:
        return sum(512 + -(-len(d) // 512) * 512 for _, d in members)

    def add(self, key: str, members: list[tuple[str, bytes]]) -> None:
        components = []
        for ext, data in members:
            name = f"{key}.{ext}"
            self._write(ustar_header(name, len(data)))
            components.append((ext, self.bytes, len(data), name))
            self._write(data)
            if len(data) % 512:
                self._write(b"\0" * (512 - len(data) % 512))
        self.index.append(components)
        self.samples += 1

    def size_with(self, sample_bytes: int) -> int:
        """The file's size once a sample of ``sample_bytes`` (``sample_size``) is added and it is closed."""
        return self.bytes + sample_bytes + 2 * _BLOCK

    def close(self) -> None:
        self._write(2 * _ZERO_BLOCK)  # end-of-archive marker: two zero blocks (POSIX ustar)


# --------------------------------------------------------------------------------------------------
# Labels


@dataclass(frozen=True)
class LabelRule:
    """Where a sample's class is and how to read it (module doc)."""

    ext: str | None = None
    """``"cls"`` (the member's text), ``"json"`` (a field of the member) or None (unlabelled set)."""
    key: str | None = None
    """The JSON field; None searches ``LABEL_KEYS`` in order."""
    classes: Sequence[str] | None = None
    """Class index -> name: names in the data are looked up here, indices checked against its length."""

    def raw(self, parts: Mapping[str, bytes]) -> int | str | None:
        """The class as written (an integer, or a name), or None when the sample has none."""
        data = parts.get(self.ext) if self.ext else None
        if data is None:
            return None
        try:
            if self.ext == "cls":
                value: Any = data.decode("utf-8").strip()
            else:
                obj = json.loads(data)
                keys = [self.key] if self.key else LABEL_KEYS
                value = next((obj[k] for k in keys if k in obj), None) if isinstance(obj, dict) else None
        except (UnicodeDecodeError, ValueError):
            return None
        if isinstance(value, bool) or value is None:
            return None
        if isinstance(value, int):
            return value
        if isinstance(value, str) and value:
            return int(value) if re.fullmatch(r"-?\d+", value) else value
        return None

    def parse(self, parts: Mapping[str, bytes]) -> int | None:
        """The class index of a sample: -1 in an unlabelled set (or where the data says -1); None when
        the label is missing, unparseable, an unknown name or out of ``classes``' range."""
        if self.ext is None:
            return -1
        value = self.raw(parts)
        if isinstance(value, str):
            return list(self.classes).index(value) if self.classes and value in self.classes else None
        if value is None or value < -1 or (self.classes and value >= len(self.classes)):
            return None
        return value


__all__ = [
    "IMAGE_EXTS",
    "LABEL_EXTS",
    "LABEL_KEYS",
    "HashingReader",
    "LabelRule",
    "Member",
    "NonAdjacentMembers",
    "Sample",
    "ShardScan",
    "TarFormatError",
    "TarShardWriter",
    "first_samples",
    "header_name",
    "image_member",
    "read_exact",
    "sample_key",
    "sample_members",
    "samples",
    "split_key",
    "tar_members",
    "ustar_header",
]
