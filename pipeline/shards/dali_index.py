"""DALI index files (``.idx``) for ``nvidia.dali.fn.readers.webdataset``, and a streaming tar scan.

Format, as DALI 2.4 reads it (``dali/operators/reader/loader/webdataset_loader.cc``, index version
``"v1.2"``; the same files DALI's own ``wds2idx`` tool writes)::

    v1.2 <number of samples>
    <ext> <data offset> <size> <member name> [<ext> <offset> <size> <name> ...]   one line per sample

A sample is a run of consecutive regular tar members sharing a *basename*: the member name up to the
first dot after its last ``/`` (``a/b.c.jpg`` -> basename ``a/b``, ext ``c.jpg``). The offset is the
byte position of the member's data (after its 512-byte header) in the tar file. Non-regular members
(directories, links) and hidden members (empty basename) are left out, as DALI's tool does.
"""

from __future__ import annotations

import hashlib
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO

INDEX_VERSION = "v1.2"

# One component: (ext, data offset, size, member name)
Component = tuple[str, int, int, str]


def split_name(name: str) -> tuple[str, str]:
    """``("dir/key", "ext")`` for ``dir/key.ext`` (first dot after the last slash), as DALI splits."""
    dot = name.find(".", name.rfind("/") + 1)
    if dot < 0:
        return name, ""
    return name[:dot], name[dot + 1 :]


def format_dali_index(samples: list[list[Component]]) -> str:
    """The ``.idx`` text for samples given as lists of components, in tar order."""
    if not samples:
        raise ValueError("a DALI index needs at least one sample; DALI rejects empty webdataset shards")
    lines = [f"{INDEX_VERSION} {len(samples)}"]
    for components in samples:
        for _ext, _offset, _size, name in components:
            if any(c.isspace() for c in name):
                raise ValueError(f"tar member {name!r} has whitespace; a DALI index cannot describe it")
        lines.append(" ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in components))
    return "\n".join(lines) + "\n"


class HashingReader:
    """A read-only file wrapper that hashes (sha256) and counts every byte read through it."""

    def __init__(self, fileobj: IO[bytes]):
        self.fileobj = fileobj
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def read(self, n: int = -1) -> bytes:
        data = self.fileobj.read(n)
        self.sha256.update(data)
        self.bytes += len(data)
        return data

    def drain(self, chunk: int = 1 << 20) -> None:
        while self.read(chunk):
            pass


@dataclass
class Member:
    name: str
    offset: int  # data offset
    size: int
    data: bytes | None  # read only when asked for (wanted extensions)


def scan_tar(fileobj: IO[bytes], read_exts: frozenset[str] = frozenset()) -> Iterator[Member]:
    """Regular members of a tar stream, in order, streaming (no seeking, constant memory).

    The data of members whose extension is in ``read_exts`` is read and returned; others are skipped.
    Raises ``tarfile.TarError`` (or ``EOFError``) on a truncated or malformed archive."""
    with tarfile.open(fileobj=fileobj, mode="r|") as tar:
        for info in tar:
            if not info.isreg():
                continue
            data = None
            if read_exts and split_name(info.name)[1] in read_exts:
                f = tar.extractfile(info)
                data = f.read() if f is not None else b""
            yield Member(info.name, info.offset_data, info.size, data)


def group_samples(members: Iterator[Member]) -> Iterator[list[Member]]:
    """Consecutive members sharing a basename, as DALI and webdataset group them."""
    current: list[Member] = []
    current_key = None
    for m in members:
        key, _ = split_name(m.name)
        if not key or key.endswith("/"):
            continue
        if current and key != current_key:
            yield current
            current = []
        current_key = key
        current.append(m)
    if current:
        yield current


def write_dali_index(tar_fileobj: IO[bytes], out_fileobj: IO[str] | IO[bytes]) -> int:
    """Scan a tar stream and write its DALI index to ``out_fileobj`` (text or binary); returns samples."""
    samples = [
        [(split_name(m.name)[1], m.offset, m.size, m.name) for m in group]
        for group in group_samples(scan_tar(tar_fileobj))
    ]
    text = format_dali_index(samples)
    try:
        out_fileobj.write(text)  # type: ignore[arg-type]
    except TypeError:
        out_fileobj.write(text.encode())  # type: ignore[arg-type]
    return len(samples)
