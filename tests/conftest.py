"""Fixtures shared by every test package.

S3 tests run against a real S3 endpoint on loopback: moto's server mode, reached through s3fs like
any production bucket. Nothing of our own code is mocked.
"""

from __future__ import annotations

import os
import socket
import uuid

import pytest


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1; yields its endpoint URL. Dummy credentials go into os.environ
    so that s3fs (and Ray workers started afterwards) pick them up the usual way."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {
        k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    }
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1"
    )
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def s3_options(s3_server):
    """Storage options for fsspec/s3fs pointing at the loopback endpoint."""
    return {"endpoint_url": s3_server}


@pytest.fixture
def s3_bucket(s3_server, s3_options):
    """A fresh, empty bucket; yields ``s3://<bucket>``."""
    import s3fs

    name = f"relic-test-{uuid.uuid4().hex[:12]}"
    fs = s3fs.S3FileSystem(**s3_options)
    fs.mkdir(name)
    fs.invalidate_cache()
    yield f"s3://{name}"


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory):
    """A local shard set (manifest.json + 5 tars + DALI .idx files) built from ``builtin:digits``'s
    train split (1,258 samples, 256 per shard, labelled 0..9); yields its directory path as str."""
    from pipeline.shards.build import build_shards

    out = tmp_path_factory.mktemp("digits_shards")
    build_shards("builtin:digits?split=train", str(out), max_samples=256, index=True, progress=False)
    return str(out)
