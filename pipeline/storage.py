"""Opening local paths and fsspec URLs (s3:// first) the same way everywhere.

Credentials never pass through this module's return values or logs: s3fs resolves them itself from
the usual places (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, instance roles).
What we carry around are *storage options* — the non-secret knobs (endpoint URL, profile name,
region) that fsspec passes to the filesystem constructor. ``RELIC_S3_ENDPOINT_URL`` or the standard
``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL`` select an S3-compatible endpoint (MinIO, moto, Ceph).

No S3 touch waits forever: ``storage_options`` gives every client botocore's connect and read timeouts
and a bounded number of attempts (``S3_CONFIG``), and ``filesystem`` opens s3:// through
``S3FileSystem``, which does not retry on top of them. A check that spans several requests (``relic
doctor``, the driver's preflight) puts one deadline over all of them with ``call_with_deadline``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import os
import posixpath
import threading
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import fsspec
import s3fs

T = TypeVar("T")

_ENDPOINT_ENV = ("RELIC_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
_SECRET_KEYS = {"key", "secret", "token", "aws_access_key_id", "aws_secret_access_key", "aws_session_token"}


def protocol(url: str) -> str:
    """``"s3"`` for ``s3://b/k``, ``"file"`` for a plain path."""
    return url.split("://", 1)[0] if "://" in url else "file"


def is_remote(url: str) -> bool:
    return protocol(url) not in ("file", "local")


S3_CONFIG: dict[str, Any] = {
    "connect_timeout": 5,
    "read_timeout": 15,
    "retries": {"mode": "standard", "total_max_attempts": 3},
}
"""botocore ``Config`` of every S3 client (s3fs ``config_kwargs``): seconds to open a connection, seconds
without a byte from the server, and attempts per request — botocore's standard mode retries
throttling, 5xx, connection errors and timeouts with backoff. So one request to an endpoint that
accepts connections but never answers fails after 3 x 15 s plus at most 3 s of backoff; a refused
connection after about 3 s. The timeouts are s3fs's own defaults; the retries replace botocore's
legacy mode (5 attempts) under s3fs's own 5 (see ``S3FileSystem``)."""


class S3FileSystem(s3fs.S3FileSystem):
    """s3fs with a single attempt per call: botocore already retries each request (``S3_CONFIG``) and
    the shard reader re-opens a shard that fails, so s3fs's own 5 attempts would multiply the time a
    silent endpoint takes to fail (5 x botocore's attempts x the read timeout). A class attribute
    rather than an option: ``S3FileSystem`` takes no ``retries`` argument, and the class, unlike an
    instance attribute, travels with the filesystem when Ray pickles it (``cluster.storage``)."""

    retries = 1


def storage_options(
    url: str, endpoint_url: str | None = None, profile: str | None = None, **extra: Any
) -> dict[str, Any]:
    """Storage options for ``url``: explicit arguments, then the environment. Empty for local paths.

    For s3:// they hold ``config_kwargs`` with ``S3_CONFIG``; a ``config_kwargs`` in ``extra`` wins
    key by key (``config_kwargs={"read_timeout": 60}`` keeps the connect timeout and the retries)."""
    if protocol(url) != "s3":
        return dict(extra)
    opts: dict[str, Any] = {}
    endpoint = endpoint_url or next((os.environ[k] for k in _ENDPOINT_ENV if os.environ.get(k)), None)
    if endpoint:
        opts["endpoint_url"] = endpoint
    if profile:
        opts["profile"] = profile
    opts.update(extra)
    opts["config_kwargs"] = {**copy.deepcopy(S3_CONFIG), **(extra.get("config_kwargs") or {})}
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
    """The fsspec filesystem for ``url`` and the path within it (s3://: an ``S3FileSystem``)."""
    if protocol(url) == "s3":
        fs = S3FileSystem(**(options or {}))
        return fs, fs._strip_protocol(url)
    fs, path = fsspec.core.url_to_fs(url, **(options or {}))
    return fs, path


class DeadlineExceeded(TimeoutError):
    """A call given to ``call_with_deadline`` did not return in time."""


def call_with_deadline(timeout_s: float, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``, or ``DeadlineExceeded`` when it has not returned after ``timeout_s`` seconds.

    One bound over a check that makes several requests, whatever they wait on (an S3 endpoint, a stale
    NFS mount). ``fn`` runs in a daemon thread that is abandoned at the deadline, not stopped: it ends
    with its own request timeouts and never keeps the process from exiting."""
    future: concurrent.futures.Future = concurrent.futures.Future()

    def run() -> None:
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # handed to the caller below
            future.set_exception(e)

    threading.Thread(target=run, name=f"deadline:{getattr(fn, '__name__', 'call')}", daemon=True).start()
    concurrent.futures.wait([future], timeout=timeout_s)
    if not future.done():
        raise DeadlineExceeded(f"no answer within {timeout_s:g} s")
    return future.result()


def open_url(url: str, mode: str = "rb", options: dict[str, Any] | None = None):
    """A file object for ``url`` (local path or any fsspec URL), streaming, never read whole."""
    fs, path = filesystem(url, options)
    return fs.open(path, mode)


def write_atomic(url: str, payload: bytes, options: dict[str, Any] | None = None) -> None:
    """Write ``payload`` so that ``url`` is either absent (or its old content) or complete: locally a
    temporary name in the same directory, then ``os.replace``; on object stores one whole PUT."""
    fs, path = filesystem(url, options)
    if is_remote(url):
        fs.pipe_file(path, payload)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def publish_file(local_path: str, url: str, options: dict[str, Any] | None = None) -> None:
    """Move the finished local file ``local_path`` to ``url`` atomically (a rename on the same disk,
    one whole-object upload to a store); the local file is gone afterwards either way."""
    if not is_remote(url):
        os.replace(local_path, url)
        return
    fs, path = filesystem(url, options)
    try:
        fs.put_file(local_path, path)
    finally:
        os.unlink(local_path)


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


REMOTE_BLOCK_SIZE = 8 << 20
"""Read-ahead block of streams over remote files: bounded memory, few round trips."""


def open_stream(url: str, options: dict[str, Any] | None = None):
    """A file object for reading ``url`` front to back (shards): remote files with an
    ``REMOTE_BLOCK_SIZE`` read-ahead buffer, local files as they are; both seekable."""
    if "://" not in url:
        return open(url, "rb")
    fs, path = filesystem(url, options)
    if not is_remote(url):
        return fs.open(path, "rb")
    return fs.open(path, "rb", block_size=REMOTE_BLOCK_SIZE, cache_type="readahead")


# webdataset opens shards with ``webdataset.gopen.gopen(url, mode, bufsize, **kw)``, which dispatches on
# the URL scheme through the module-level table ``gopen_schemes`` and forwards ``**kw`` to the handler
# (webdataset 1.0.2, gopen.py). Plain paths and file:// never reach the table.
_wds_default_options: dict[str, dict[str, Any]] = {}


def _gopen_fsspec(url: str, mode: str = "rb", bufsize: int = 8192, storage_options=None, **kw: Any):
    """webdataset ``gopen`` handler: ``open_stream`` for reading, fsspec's ``open`` for writing.
    ``storage_options`` passed to ``gopen`` win over those given to ``register_webdataset_opener``."""
    opts = storage_options if storage_options is not None else _wds_default_options.get(protocol(url), {})
    if mode.startswith("r"):
        return open_stream(url, opts)
    return open_url(url, mode, opts)


def register_webdataset_opener(
    options: dict[str, Any] | None = None, protocols: tuple[str, ...] = ("s3",)
) -> None:
    """Make users' own webdataset pipelines open ``protocols`` URLs (default s3://) through fsspec
    with ``options``. Idempotent; a later call replaces the default options of the protocols it
    names. Any fsspec protocol works (``gs``, ``az``, ``memory``...) given its backend is installed."""
    from importlib import import_module

    wds_gopen = import_module(
        "webdataset.gopen"
    )  # the module; `from webdataset import gopen` is the function
    for proto in protocols:
        _wds_default_options[proto] = dict(options or {})
        wds_gopen.gopen_schemes[proto] = _gopen_fsspec
