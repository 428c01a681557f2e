"""Opening local paths and fsspec URLs (s3:// first) the same way everywhere.

Credentials never pass through this module's return values or logs: s3fs resolves them itself from
the usual places (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, instance roles).
What we carry around are *storage options* — the non-secret knobs (endpoint URL, profile name,
region) that fsspec passes to the filesystem constructor. ``RELIC_S3_ENDPOINT_URL`` or the standard
``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL`` select an S3-compatible endpoint (MinIO, moto, Ceph).
"""

from __future__ import annotations

import os
import posixpath
from typing import Any

import fsspec

_ENDPOINT_ENV = ("RELIC_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
_SECRET_KEYS = {"key", "secret", "token", "aws_access_key_id", "aws_secret_access_key", "aws_session_token"}


def protocol(url: str) -> str:
    """``"s3"`` for ``s3://b/k``, ``"file"`` for a plain path."""
    return url.split("://", 1)[0] if "://" in url else "file"


def is_remote(url: str) -> bool:
    return protocol(url) not in ("file", "local")


def storage_options(
    url: str, endpoint_url: str | None = None, profile: str | None = None, **extra: Any
) -> dict[str, Any]:
    """Storage options for ``url``: explicit arguments, then the environment. Empty for local paths."""
    if protocol(url) != "s3":
        return dict(extra)
    opts: dict[str, Any] = {}
    endpoint = endpoint_url or next((os.environ[k] for k in _ENDPOINT_ENV if os.environ.get(k)), None)
    if endpoint:
        opts["endpoint_url"] = endpoint
    if profile:
        opts["profile"] = profile
    opts.update(extra)
    return opts


def redact(options: dict[str, Any] | None) -> dict[str, Any]:
    """A copy safe to print or store: secrets replaced by ``"***"``."""
    out: dict[str, Any] = {}
    for k, v in (options or {}).items():
        if k in _SECRET_KEYS:
            out[k] = "***"
        elif isinstance(v, dict):
            out[k] = redact(v)
        else:
            out[k] = v
    return out


def filesystem(url: str, options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for ``url`` and the path within it."""
    fs, path = fsspec.core.url_to_fs(url, **(options or {}))
    return fs, path


def open_url(url: str, mode: str = "rb", options: dict[str, Any] | None = None):
    """A file object for ``url`` (local path or any fsspec URL), streaming, never read whole."""
    fs, path = filesystem(url, options)
    return fs.open(path, mode)


def join(base: str, *names: str) -> str:
    """Join path components onto a local path or URL (``s3://b/p`` + ``x`` -> ``s3://b/p/x``)."""
    if "://" in base:
        scheme, rest = base.split("://", 1)
        return f"{scheme}://" + posixpath.join(rest.rstrip("/"), *names)
    return os.path.join(base, *names)


def dirname(url: str) -> str:
    if "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://" + posixpath.dirname(rest.rstrip("/"))
    return os.path.dirname(os.path.abspath(url))
