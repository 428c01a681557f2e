"""A checkpoint is data, never code: ``train_state.pt`` loads with PyTorch's restricted unpickler on
resume (every worker) and in ``relic eval``, locally and from s3://."""

from __future__ import annotations

import pathlib
import shutil
from pathlib import Path

import pytest
import torch
from support import tiny_state

from cluster.checkpoint import (
    STATE_FILE,
    CheckpointError,
    load_model_from_checkpoint,
    make_meta,
    restore,
    write_checkpoint,
)
from cluster.config import load_config

TINY = Path(__file__).with_name("tiny.yaml")


class _Payload:
    """Unpickling this calls ``Path.write_text(marker, "ran")``: code execution made visible."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.write_text, (pathlib.Path(self.marker), "ran"))


@pytest.fixture
def good_checkpoint(tmp_path):
    cfg = load_config(TINY, ["data.train=/unused"])
    state = tiny_state(cfg)
    directory = tmp_path / "run" / "checkpoint-00000000"
    write_checkpoint(directory, state, cfg, make_meta(state, git_sha="test", world_size=1, batch_size=16))
    return cfg, directory


def _poison(directory: Path, marker: Path) -> None:
    saved = torch.load(directory / STATE_FILE, weights_only=True)
    saved["extra"] = {"data": _Payload(marker)}
    torch.save(saved, directory / STATE_FILE)


def test_our_checkpoints_load_as_plain_data(good_checkpoint):
    cfg, directory = good_checkpoint
    state = tiny_state(cfg)
    restore(state, directory)  # RNG states included: nothing beyond tensors and plain values
    loaded = load_model_from_checkpoint(str(directory))
    assert loaded.step == 0 and loaded.target is not None


def test_a_checkpoint_carrying_a_callable_is_refused_and_nothing_runs(good_checkpoint, tmp_path):
    cfg, directory = good_checkpoint
    marker = tmp_path / "code-ran"
    _poison(directory, marker)
    # the crafted file really executes code under an unrestricted load (so the test can fail)
    torch.load(directory / STATE_FILE, weights_only=False)
    assert marker.read_text() == "ran"
    marker.unlink()

    with pytest.raises(CheckpointError, match=rf"{STATE_FILE}: refused to load.*data only"):
        restore(tiny_state(cfg), directory)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_model_from_checkpoint(str(directory))
    assert not marker.exists()


@pytest.mark.s3
def test_a_crafted_checkpoint_on_s3_is_refused(good_checkpoint, tmp_path, s3_bucket, s3_options):
    import s3fs

    _cfg, directory = good_checkpoint
    marker = tmp_path / "code-ran"
    _poison(directory, marker)
    fs = s3fs.S3FileSystem(**s3_options)
    remote = f"{s3_bucket}/runs/r/checkpoint-00000000"
    fs.put(str(directory) + "/", remote.removeprefix("s3://") + "/", recursive=True)
    shutil.rmtree(directory)
    with pytest.raises(CheckpointError, match="refused to load"):
        load_model_from_checkpoint(f"{s3_bucket}/runs/r", storage_options=s3_options)
    assert not marker.exists()
