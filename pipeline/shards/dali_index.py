"""DALI index files (``.idx``) for ``nvidia.dali.fn.readers.webdataset``: written beside a shard,
read by the training reader to seek straight to a sample.

Format, as DALI 2.4 reads it (``dali/operators/reader/loader/webdataset_loader.cc``, index version
``"v1.2"``; the same files DALI's own ``wds2idx`` tool writes)::

    v1.2 <number of samples>
    <ext> <data offset> <size> <member name> [<ext> <offset> <size> <name> ...]   one line per sample

The samples and members are the shard format's (:mod:`pipeline.shards.format`); the offset is the
byte position of a member's data (after its 512-byte header) in the tar file.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import IO

from pipeline.shards import format as shard_format

INDEX_VERSION = "v1.2"

Component = tuple[str, int, int, str]
"""One member of a sample: ``(ext, data offset, size, member name)``."""


def format_dali_index(samples: Sequence[Sequence[Component]]) -> str:
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


def sample_location(index_lines: Iterable[bytes | str], ordinal: int) -> tuple[int, str] | None:
    """``(data offset, member name)`` of the first member of sample ``ordinal``, from the lines of an
    ``.idx`` file; None when the index has no such sample."""
    for number, line in enumerate(index_lines):
        if number == ordinal + 1:  # line 0 is "v1.2 <samples>"
            fields = line.split()
            if len(fields) < 4:
                return None
            name = fields[3]
            return int(fields[1]), name.decode("utf-8", "surrogateescape") if isinstance(
                name, bytes
            ) else name
    return None


def write_dali_index(tar_fileobj: IO[bytes], out_fileobj: IO[str] | IO[bytes]) -> int:
    """Scan a tar stream and write its DALI index to ``out_fileobj`` (text or binary); returns samples."""
    components = [s.components() for s in shard_format.samples(shard_format.tar_members(tar_fileobj))]
    text = format_dali_index(components)
    try:
        out_fileobj.write(text)  # type: ignore[arg-type]
    except TypeError:
        out_fileobj.write(text.encode())  # type: ignore[arg-type]
    return len(components)
