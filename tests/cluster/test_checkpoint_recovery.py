"""A damaged or deleted newest checkpoint costs the steps since the one before it, not the run.

``write_checkpoint`` records the size and sha256 of ``train_state.pt`` and ``config.yaml`` in
``meta.json``; a checkpoint that fails the check is skipped, with a warning naming the file, for the
newest good one before it: when the workers resume (``LocalSession`` and Ray), in ``relic eval`` on a
run directory, and in Ray Train's run snapshot, which ``fit`` repairs before Ray reads it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path

import pytest
from support import local_ray, run_local, tiny_state

from cluster import checkpoint
from cluster.config import load_config
from cluster.session import LocalSession

TINY = Path(__file__).with_name("tiny.yaml")
STATE, META = checkpoint.STATE_FILE, checkpoint.META_FILE


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip_one_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# --------------------------------------------------------------------------------------------------
# Unit level: two checkpoints written by write_checkpoint, no training


@pytest.fixture
def run_dir(tmp_path) -> Path:
    """A run directory with checkpoints at steps 4 and 8 (``checkpoint-00000004``, ``-08``)."""
    cfg = load_config(TINY, ["data.train=/unused"])
    state = tiny_state(cfg)
    run = tmp_path / "run"
    for step in (4, 8):
        state.step = step
        meta = checkpoint.make_meta(state, git_sha="test", world_size=1, batch_size=16)
        checkpoint.write_checkpoint(run / checkpoint.checkpoint_dir_name(step), state, cfg, meta)
    return run


def test_each_checkpoint_records_the_size_and_sha256_of_its_files(run_dir):
    directory = run_dir / "checkpoint-00000008"
    recorded = json.loads((directory / META).read_text())["files"]
    for name in (STATE, checkpoint.CONFIG_FILE):
        data = (directory / name).read_bytes()
        assert recorded[name] == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.parametrize(("damage", "reason"), [(_truncate, "truncated"), (_flip_one_byte, "sha256")])
def test_a_damaged_newest_checkpoint_falls_back_to_the_older_one(run_dir, caplog, damage, reason):
    bad_file = run_dir / "checkpoint-00000008" / STATE
    size = bad_file.stat().st_size
    damage(bad_file)
    assert damage is _truncate or bad_file.stat().st_size == size

    with caplog.at_level(logging.WARNING, logger="cluster.checkpoint"):
        found = checkpoint.find_usable_checkpoint(str(run_dir))
    assert found == str(run_dir / "checkpoint-00000004")
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(bad_file) in m and reason in m for m in warned), warned

    # relic eval on the run directory loads the older checkpoint ...
    loaded = checkpoint.load_model_from_checkpoint(str(run_dir))
    assert loaded.step == 4 and loaded.path == found
    # ... and on the damaged checkpoint itself refuses, naming the file
    with pytest.raises(checkpoint.CheckpointError, match=re.escape(str(bad_file))):
        checkpoint.load_model_from_checkpoint(str(run_dir / "checkpoint-00000008"))


def test_a_checkpoint_without_meta_or_state_file_is_skipped(run_dir, caplog):
    (run_dir / "checkpoint-00000008" / META).unlink()
    with caplog.at_level(logging.WARNING, logger="cluster.checkpoint"):
        assert checkpoint.find_usable_checkpoint(str(run_dir)) == str(run_dir / "checkpoint-00000004")
    assert str(run_dir / "checkpoint-00000008" / META) in caplog.text
    (run_dir / "checkpoint-00000004" / STATE).unlink()
    with pytest.raises(checkpoint.CheckpointError, match=re.escape(f"checkpoint-00000004/{STATE}: missing")):
        checkpoint.load_model_from_checkpoint(str(run_dir / "checkpoint-00000004"))
    with pytest.raises(FileNotFoundError, match="usable"):
        checkpoint.load_model_from_checkpoint(str(run_dir))


def test_legacy_checkpoints_without_checksums_load_and_a_truncated_one_is_still_caught(run_dir, caplog):
    for directory in run_dir.glob("checkpoint-*"):
        meta = json.loads((directory / META).read_text())
        del meta["files"]
        (directory / META).write_text(json.dumps(meta))
    assert checkpoint.load_model_from_checkpoint(str(run_dir)).step == 8

    # no checksum to compare with, but train_state.pt is a zip archive whose end must be there
    _truncate(run_dir / "checkpoint-00000008" / STATE)
    with caplog.at_level(logging.WARNING, logger="cluster.checkpoint"):
        assert checkpoint.load_model_from_checkpoint(str(run_dir)).step == 4
    assert str(run_dir / "checkpoint-00000008" / STATE) in caplog.text


def _ray_snapshot(names: list[str]) -> dict:
    """A run snapshot in Ray Train's own format (its pydantic model, written with ``.json()`` and read
    with ``.parse_obj()`` as Ray does), checkpoints reported in order."""
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import (
        _CheckpointManagerState,
        _TrainingResultState,
    )

    results = [_TrainingResultState(checkpoint_dir_name=n, metrics={"step": i}) for i, n in enumerate(names)]
    return json.loads(
        _CheckpointManagerState(
            checkpoint_results=results,
            checkpoint_report_indices=list(range(len(names))),
            latest_checkpoint_result=results[-1],
            pending_training_results=[],
            pending_validation_specs=[],
            current_report_index=len(names),
            validated_checkpoint_dir_names=[],
            timed_out_validation_checkpoint_dir_names=[],
            failed_validation_checkpoint_dir_names=names[-1:],
        ).json()
    )


@pytest.mark.filterwarnings("ignore:The `(json|parse_obj)` method is deprecated")
def test_the_ray_snapshot_drops_missing_and_damaged_checkpoints_and_stays_loadable(run_dir, caplog):
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import _CheckpointManagerState

    shutil.copytree(run_dir / "checkpoint-00000008", run_dir / "checkpoint-00000012")
    snapshot_file = run_dir / checkpoint.RAY_SNAPSHOT_FILE
    names = ["checkpoint-00000004", "checkpoint-00000008", "checkpoint-00000012"]
    snapshot_file.write_text(json.dumps(_ray_snapshot(names)))

    assert checkpoint.repair_run_snapshot(str(run_dir)) == {}  # all usable: left as it is
    shutil.rmtree(run_dir / "checkpoint-00000012")
    _truncate(run_dir / "checkpoint-00000008" / STATE)
    with caplog.at_level(logging.WARNING, logger="cluster.checkpoint"):
        dropped = checkpoint.repair_run_snapshot(str(run_dir))
    assert sorted(dropped) == ["checkpoint-00000008", "checkpoint-00000012"]
    assert (
        "does not exist" in dropped["checkpoint-00000012"] and "truncated" in dropped["checkpoint-00000008"]
    )
    assert (
        "checkpoint-00000012" in caplog.text and str(run_dir / "checkpoint-00000008" / STATE) in caplog.text
    )

    repaired = _CheckpointManagerState.parse_obj(json.loads(snapshot_file.read_text()))
    assert [r.checkpoint_dir_name for r in repaired.checkpoint_results] == ["checkpoint-00000004"]
    assert repaired.checkpoint_report_indices == [0]
    assert repaired.latest_checkpoint_result.checkpoint_dir_name == "checkpoint-00000004"
    assert repaired.failed_validation_checkpoint_dir_names == []

    # nothing usable left that the snapshot names: an error naming the files, the snapshot untouched
    _flip_one_byte(run_dir / "checkpoint-00000004" / STATE)
    with pytest.raises(
        checkpoint.CheckpointError, match=re.escape(str(run_dir / "checkpoint-00000004" / STATE))
    ):
        checkpoint.repair_run_snapshot(str(run_dir))
    assert _CheckpointManagerState.parse_obj(json.loads(snapshot_file.read_text())) == repaired


@pytest.mark.s3
@pytest.mark.filterwarnings("ignore:The `(json|parse_obj)` method is deprecated")
def test_on_s3_the_fallback_and_the_snapshot_repair_work_the_same(run_dir, s3_bucket, s3_options, caplog):
    import s3fs

    shutil.copytree(run_dir / "checkpoint-00000008", run_dir / "checkpoint-00000012")
    names = ["checkpoint-00000004", "checkpoint-00000008", "checkpoint-00000012"]
    (run_dir / checkpoint.RAY_SNAPSHOT_FILE).write_text(json.dumps(_ray_snapshot(names)))
    _flip_one_byte(run_dir / "checkpoint-00000008" / STATE)
    shutil.rmtree(run_dir / "checkpoint-00000012")
    fs = s3fs.S3FileSystem(**s3_options)
    remote = f"{s3_bucket}/runs/r"
    fs.put(f"{run_dir}/", f"{remote.removeprefix('s3://')}/", recursive=True)

    with caplog.at_level(logging.WARNING, logger="cluster.checkpoint"):
        assert checkpoint.find_usable_checkpoint(remote, s3_options) == f"{remote}/checkpoint-00000004"
        assert checkpoint.load_model_from_checkpoint(remote, storage_options=s3_options).step == 4
        dropped = checkpoint.repair_run_snapshot(remote, s3_options)
    assert f"{remote}/checkpoint-00000008/{STATE}" in caplog.text
    assert sorted(dropped) == ["checkpoint-00000008", "checkpoint-00000012"]
    snapshot = json.loads(fs.cat(f"{remote.removeprefix('s3://')}/{checkpoint.RAY_SNAPSHOT_FILE}"))
    assert [r["checkpoint_dir_name"] for r in snapshot["checkpoint_results"]] == ["checkpoint-00000004"]


# --------------------------------------------------------------------------------------------------
# The worker loop without Ray


def test_resume_with_no_usable_checkpoint_left_is_an_error_naming_the_files(run_dir, caplog):
    cfg = load_config(TINY, ["data.train=/unused"])
    state = tiny_state(cfg)
    checkpointer = checkpoint.Checkpointer(
        cfg,
        LocalSession(str(run_dir)),
        run_dir=str(run_dir),
        run_options={},
        steps_per_epoch=4,
        total_steps=16,
        batch_size=16,
        git_sha="test",
    )
    _truncate(run_dir / "checkpoint-00000008" / STATE)
    assert checkpointer.restore(state) == 4
    _flip_one_byte(run_dir / "checkpoint-00000004" / STATE)
    with (
        caplog.at_level(logging.WARNING, logger="cluster.checkpoint"),
        pytest.raises(checkpoint.CheckpointError, match="no checkpoint before it") as error,
    ):
        checkpointer.restore(state)
    assert str(run_dir / "checkpoint-00000008" / STATE) in str(error.value)
    assert str(run_dir / "checkpoint-00000004" / STATE) in caplog.text


def _local_run(shards: str, root: Path, max_steps: int) -> LocalSession:
    overrides = [f"data.train={shards}", f"run.storage={root}", "run.name=local", "scaling.num_workers=1"]
    overrides += [f"run.max_steps={max_steps}", "run.checkpoint_every=4", "run.tensorboard=false"]
    return run_local(load_config(TINY, overrides), root)


def test_the_local_loop_resumes_from_the_older_checkpoint_when_the_newest_is_truncated(
    digits_shards, tmp_path, caplog
):
    first = _local_run(digits_shards, tmp_path, max_steps=8)
    bad_file = Path(first.run_dir) / "checkpoint-00000008" / STATE
    _truncate(bad_file)
    with caplog.at_level(logging.WARNING, logger="cluster.checkpoint"):
        second = _local_run(digits_shards, tmp_path, max_steps=10)
    assert {r["restored_step"] for r in second.reports} == {4}
    assert [r["step"] for r in second.reports] == [6, 8, 10]
    assert str(bad_file) in caplog.text
    # the run rewrote the damaged checkpoint on its way
    checkpoint.verify_checkpoint(str(bad_file.parent))


# --------------------------------------------------------------------------------------------------
# Ray Train


@pytest.fixture(scope="module")
def ray_local():
    with local_ray(num_cpus=2):
        yield


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.timeout(400)
def test_fit_resumes_past_a_truncated_a_deleted_and_a_handed_over_damaged_checkpoint(
    ray_local, digits_shards, tmp_path, caplog, monkeypatch
):
    from cluster.trainer import fit

    def run(max_steps: int):
        cfg = load_config(
            TINY,
            [
                f"data.train={digits_shards}",
                f"run.storage={tmp_path / 'runs'}",
                "run.name=recover",
                "scaling.num_workers=1",
                "run.checkpoint_every=4",
                "run.report_every=4",
                "run.tensorboard=false",
                f"run.max_steps={max_steps}",
            ],
        )
        return fit(cfg, progress=False)

    first = run(8)
    run_dir = Path(first.run_dir)
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == [
        "checkpoint-00000004",
        "checkpoint-00000008",
    ]

    # (i) the newest checkpoint's train_state.pt is cut short: resume from step 4
    bad_file = run_dir / "checkpoint-00000008" / STATE
    _truncate(bad_file)
    with caplog.at_level(logging.WARNING, logger="cluster.checkpoint"):
        second = run(12)
    assert str(bad_file) in caplog.text
    assert {m["restored_step"] for m in second.metrics} == {4}
    assert [m["step"] for m in second.metrics] == [8, 12]
    assert second.checkpoint == str(run_dir / "checkpoint-00000012")

    # (ii) the newest checkpoint folder is gone: Ray starts and resumes from step 8
    shutil.rmtree(run_dir / "checkpoint-00000012")
    third = run(16)
    assert {m["restored_step"] for m in third.metrics} == {8}
    assert [m["step"] for m in third.metrics] == [12, 16]
    assert checkpoint.load_model_from_checkpoint(str(run_dir)).step == 16

    # (iii) Ray itself hands the workers a damaged checkpoint (as after a restart within a run, once
    # the newest checkpoint was damaged): each worker resumes from the newest usable one before it
    monkeypatch.setattr("cluster.trainer.repair_run_snapshot", lambda *_args: {})
    _truncate(run_dir / "checkpoint-00000016" / STATE)
    fourth = run(20)
    assert {m["restored_step"] for m in fourth.metrics} == {12}
    assert [m["step"] for m in fourth.metrics] == [16, 20]
