"""Round trip to S3 (moto's server on 127.0.0.1, through s3fs): build, verify, index, read back."""

from __future__ import annotations

import hashlib

import pytest
import s3fs
from shards_helpers import read_webdataset

from commands.shards import run as cli_run
from pipeline import storage
from pipeline.shards.build import build_shards
from pipeline.shards.index import index_shards
from pipeline.shards.manifest import load_manifest
from pipeline.shards.verify import verify_shards

pytestmark = pytest.mark.s3


def test_s3_round_trip_matches_local_build(s3_bucket, s3_options, tmp_path, monkeypatch):
    url = f"{s3_bucket}/digits/train"
    remote = build_shards(
        "builtin:digits?split=val",
        url,
        max_samples=50,
        index=True,
        workers=2,
        storage_options=s3_options,
        progress=False,
    )
    local = build_shards(
        "builtin:digits?split=val", str(tmp_path), max_samples=50, index=True, progress=False
    )
    assert [(s.name, s.sha256, s.bytes) for s in remote.shards] == [
        (s.name, s.sha256, s.bytes) for s in local.shards
    ]

    fs = s3fs.S3FileSystem(**s3_options)
    listing = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(url.removeprefix("s3://"), refresh=True))
    expected = sorted(["manifest.json", *(s.name for s in local.shards), *(s.index for s in local.shards)])
    assert listing == expected  # no receipts, no temporary objects left behind
    manifest_text = fs.cat_file(f"{url.removeprefix('s3://')}/manifest.json").decode()
    assert "testing" not in manifest_text and "secret" not in manifest_text.lower()

    loaded = load_manifest(url, s3_options)
    assert loaded.to_json() == local.to_json()
    for i, s in enumerate(loaded.shards):
        data = fs.cat_file(loaded.shard_url(i).removeprefix("s3://"))
        assert hashlib.sha256(data).hexdigest() == s.sha256
    assert verify_shards(url, decode=True, storage_options=s3_options) == []

    # webdataset streams the S3 shards through s3fs (registered as its s3:// opener): same samples
    import importlib

    gopen_module = importlib.import_module("webdataset.gopen")
    monkeypatch.setitem(
        gopen_module.gopen_schemes,
        "s3",
        lambda u, mode="rb", bufsize=8192, **kw: storage.open_url(u, mode, s3_options),
    )
    local_samples = read_webdataset([local.shard_url(i) for i in range(len(local.shards))])
    assert read_webdataset([loaded.shard_url(i) for i in range(len(loaded.shards))]) == local_samples


def test_s3_index_and_verify_detects_damage(s3_bucket, s3_options, tmp_path):
    src = build_shards("builtin:digits?split=val", str(tmp_path), max_samples=60, progress=False)
    fs = s3fs.S3FileSystem(**s3_options)
    bucket = s3_bucket.removeprefix("s3://")
    for s in src.shards:
        fs.put_file(str(tmp_path / s.name), f"{bucket}/foreign/{s.name}")
    pattern = f"{s3_bucket}/foreign/shard-{{000000..{len(src.shards) - 1:06d}}}.tar"
    m = index_shards(
        pattern, f"{s3_bucket}/foreign", write_idx=True, storage_options=s3_options, progress=False
    )
    assert [(s.name, s.sha256, s.samples) for s in m.shards] == [
        (s.name, s.sha256, s.samples) for s in src.shards
    ]
    assert m.label_ext == "cls" and m.class_counts == src.class_counts
    assert verify_shards(f"{s3_bucket}/foreign", storage_options=s3_options) == []
    fs.pipe_file(f"{bucket}/foreign/{src.shards[1].name}", b"garbage")
    problems = verify_shards(f"{s3_bucket}/foreign", storage_options=s3_options)
    assert problems and all(p.shard == src.shards[1].name for p in problems)


def test_cli_build_to_s3_with_endpoint_flag(s3_bucket, s3_server, capsys, monkeypatch):
    import argparse

    from commands.shards import add_arguments

    for k in ("RELIC_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(k, raising=False)
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    url = f"{s3_bucket}/cli"
    args = parser.parse_args(
        ["build", "builtin:digits?split=test", url, "--max-samples", "100", "--endpoint-url", s3_server]
    )
    assert cli_run(args) == 0
    out = capsys.readouterr().out
    assert "rejected 0 inputs" in out and "testing" not in out
    opts = storage.storage_options(url, endpoint_url=s3_server)
    assert load_manifest(url, opts).total_samples == 360
    assert cli_run(parser.parse_args(["verify", url, "--endpoint-url", s3_server])) == 0


def test_image_folder_on_s3_as_source(s3_bucket, s3_options, tmp_path):
    from shards_helpers import image_bytes

    fs = s3fs.S3FileSystem(**s3_options)
    bucket = s3_bucket.removeprefix("s3://")
    for cls in ("a", "b"):
        for i in range(3):
            fs.pipe_file(f"{bucket}/imgs/{cls}/{i}.jpg", image_bytes("JPEG", seed=i))
    fs.pipe_file(f"{bucket}/imgs/a/bad.jpg", b"")
    m = build_shards(f"{s3_bucket}/imgs", str(tmp_path), source_storage_options=s3_options, progress=False)
    assert m.classes == ["a", "b"] and m.class_counts == {"a": 3, "b": 3}
    assert [(r.input, r.reason) for r in m.rejected] == [("a/bad.jpg", "empty file (0 bytes)")]
