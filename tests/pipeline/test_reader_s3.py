"""Reading shards from S3 (moto's server on 127.0.0.1, through s3fs) gives what the local copy gives."""

from __future__ import annotations

import pytest
import s3fs
import webdataset as wds
from test_reader import epoch_batches, make_clean_set

from pipeline import storage
from pipeline.reader import ShardReader

pytestmark = pytest.mark.s3


def upload(local_dir, bucket: str, options: dict) -> str:
    fs = s3fs.S3FileSystem(**options)
    fs.put(str(local_dir) + "/", f"{bucket[5:]}/set/", recursive=True)
    fs.invalidate_cache()
    return f"{bucket}/set"


def test_s3_epoch_equals_local_epoch(tmp_path, s3_bucket, s3_options):
    local = tmp_path / "set"
    make_clean_set(local, [11, 9, 14])
    remote = upload(local, s3_bucket, s3_options)
    kw = {"batch_size": 4, "world_size": 2, "num_workers": 2, "shuffle_buffer": 6, "seed": 3}
    for rank in range(2):
        ours = ShardReader(remote, rank=rank, storage_options=s3_options, **kw)
        ref = ShardReader(str(local), rank=rank, **kw)
        got, want = epoch_batches(ours, 1), epoch_batches(ref, 1)
        assert [b.keys for b in got] == [b.keys for b in want]
        assert [b.images for b in got] == [b.images for b in want]
        assert ours.stats == ref.stats
        # Resume from S3 too.
        assert [b.keys for b in epoch_batches(ours, 1, 2)] == [b.keys for b in want[2:]]


def test_s3_missing_shard_is_retried_then_skipped(tmp_path, s3_bucket, s3_options):
    local = tmp_path / "set"
    make_clean_set(local, [8, 8])
    remote = upload(local, s3_bucket, s3_options)
    s3fs.S3FileSystem(**s3_options).rm(f"{remote[5:]}/shard-000001.tar")
    reader = ShardReader(
        remote, batch_size=4, storage_options=s3_options, retry_delay=0.01, max_open_retries=1
    )
    batches = epoch_batches(reader, 0)
    assert len(batches) == 4
    assert reader.stats["unreadable_shard"] == 8 and reader.stats["filled"] == 8
    assert {k for b in batches for k in b.keys} == {f"{i:09d}" for i in range(8)}


def test_registered_opener_serves_plain_webdataset_pipelines(tmp_path, s3_bucket, s3_options):
    local = tmp_path / "set"
    make_clean_set(local, [5])
    remote = upload(local, s3_bucket, s3_options)
    storage.register_webdataset_opener(s3_options)
    url = f"{remote}/shard-000000.tar"
    dataset = wds.WebDataset(url, shardshuffle=False, empty_check=False)
    assert [s["__key__"] for s in dataset] == [f"{i:09d}" for i in range(5)]
    with storage.open_url(url, "rb", s3_options) as f:
        assert f.read(5) == (local / "shard-000000.tar").read_bytes()[:5]
