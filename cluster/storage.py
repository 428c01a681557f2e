"""Run storage for Ray Train: a local directory or an fsspec URL (s3:// first) with custom endpoints.

Ray Train persists checkpoints through ``pyarrow.fs``. Its own S3 filesystem ignores the endpoint
settings of S3-compatible stores (MinIO, Ceph, moto) unless they are spelled in Ray's URL syntax, and
it resolves credentials differently from s3fs. So for remote storage we hand Ray the *same* fsspec
filesystem the data path uses (``pipeline.storage``), wrapped as
``pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))`` (the wrapper pyarrow documents for fsspec
filesystems), with the storage path stripped of its ``s3://`` prefix as ``RunConfig`` requires
(``storage_filesystem`` given -> ``storage_path`` is "bucket/prefix").
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow.fs

from pipeline import storage as fsutil


@dataclass(frozen=True)
class RunStorage:
    """Where runs live. ``url`` is what the user wrote; ``options`` the fsspec storage options."""

    url: str
    options: dict[str, Any]

    @classmethod
    def from_url(cls, url: str, endpoint_url: str | None = None) -> RunStorage:
        if not fsutil.is_remote(url):
            return cls(url=os.path.abspath(url), options={})
        return cls(url=url.rstrip("/"), options=fsutil.storage_options(url, endpoint_url=endpoint_url))

    @property
    def is_remote(self) -> bool:
        return fsutil.is_remote(self.url)

    def ray_storage(self) -> tuple[str, pyarrow.fs.FileSystem | None]:
        """``(storage_path, storage_filesystem)`` for ``ray.train.RunConfig``."""
        if not self.is_remote:
            return self.url, None
        fs, path = fsutil.filesystem(self.url, self.options)
        return path, pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))

    def run_url(self, name: str, *parts: str) -> str:
        """URL of ``parts`` inside run ``name`` (the experiment directory Ray Train writes to)."""
        return fsutil.join(self.url, name, *parts)

    def write_text(self, url: str, text: str) -> None:
        """Write ``text`` atomically (``pipeline.storage.write_atomic``)."""
        fsutil.write_atomic(url, text.encode(), self.options)

    def read_text(self, url: str) -> str:
        with fsutil.open_url(url, "r", self.options) as f:
            return f.read()

    def exists(self, url: str) -> bool:
        fs, path = fsutil.filesystem(url, self.options)
        return fs.exists(path)

    def check_writable(self) -> None:
        """Write and delete a small probe file at the storage root; raises what the store raises (no
        bucket, no permission, an unreachable endpoint)."""
        probe = fsutil.join(self.url, f".relic-write-probe-{uuid.uuid4().hex[:8]}")
        self.write_text(probe, "")
        fs, path = fsutil.filesystem(probe, self.options)
        fs.rm_file(path)

    def upload_dir(self, local_dir: str, url: str) -> None:
        """Copy the files of ``local_dir`` (recursively) to ``url``, overwriting what is there."""
        fs, path = fsutil.filesystem(url, self.options)
        for root, _dirs, files in os.walk(local_dir):
            rel = os.path.relpath(root, local_dir)
            for name in files:
                target = path.rstrip("/") + "/" + (name if rel == "." else f"{rel}/{name}")
                if not self.is_remote:
                    os.makedirs(os.path.dirname(target), exist_ok=True)
                fs.put_file(os.path.join(root, name), target)
