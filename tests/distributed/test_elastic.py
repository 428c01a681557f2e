"""Runs that change size and stay exact (pipeline/plan.py): a run stopped after a mid-epoch checkpoint
and resumed with 1, then 3 workers trains, in every epoch, on the epoch's samples, each once, with the
same samples at every step as one process reading the whole global batch; SIGTERM to a worker gives a
checkpoint at the next step and the run resumes there; a restore that could not continue exactly is
refused, naming what differs."""

from __future__ import annotations

import pytest
from helpers import STEPS_PER_EPOCH, assert_each_epoch_once, elastic_config, ray_hooks, steps_of
from support import local_ray, run_local

from cluster.checkpoint import CheckpointError

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def ray_local():
    ray_hooks().by_value()
    with local_ray(num_cpus=3):
        yield


def test_resumed_with_other_sizes_every_step_holds_the_same_samples(ray_local, val_shards, tmp_path):
    from cluster.trainer import fit
    from pipeline.reader import ShardReader

    rh = ray_hooks()
    end = 2 * STEPS_PER_EPOCH  # two whole epochs
    records = tmp_path / "records"
    records.mkdir()
    lines: list[str] = []
    # 2 workers to step 3 (a checkpoint mid-epoch), then 1 worker to step 9, then 3 workers to the end
    for workers, stop in ((2, 3), (1, 9), (3, end)):
        cfg = elastic_config(
            val_shards,
            tmp_path / "runs",
            "resized",
            f"run.max_steps={stop}",
            f"scaling.num_workers={workers}",
        )
        result = fit(cfg, progress=lines.append, hooks=[rh.Recorder(records)])
        assert result.metrics[-1]["step"] == stop and result.metrics[-1]["world_size"] == workers
    assert (
        "resumed from the checkpoint at step 3" in lines and "resumed from the checkpoint at step 9" in lines
    )
    assert any(" w3 " in line for line in lines) and any(" w1 " in line for line in lines)

    ours = steps_of(rh.read_records(records))
    assert sorted(ours) == list(range(1, end + 1))
    assert [len(ours[s]) for s in (1, 4, 10)] == [2, 1, 3]  # the world size of each segment
    # the same samples at every step, in the same order (ranks in order), as one process reading the
    # whole global batch of the same data settings
    whole = ShardReader(val_shards, batch_size=24, partitions=6, shuffle_buffer=16, seed=cfg.run.seed)
    reference = [b.keys for epoch in range(2) for b in whole.epoch(epoch)]
    for step in ours:
        assert [k for r in sorted(ours[step], key=lambda r: r["rank"]) for k in r["keys"]] == reference[
            step - 1
        ]
    assert_each_epoch_once(ours, 2)
    # The loss goes on where it was: no step-to-step change at a resize larger than 1.5 times the
    # largest within a segment (other augmentations and BatchNorm batches at other sizes: not
    # bit-identical to an uninterrupted run).
    loss = {s: sum(r["loss"] for r in rs) / len(rs) for s, rs in ours.items()}
    resized_after = (3, 9)
    noise = max(abs(loss[s + 1] - loss[s]) for s in range(1, end) if s not in resized_after)
    for s in resized_after:
        assert abs(loss[s + 1] - loss[s]) <= 1.5 * noise, (s, loss)


def test_sigterm_to_one_worker_checkpoints_at_the_next_step_and_resumes_there(
    ray_local, val_shards, tmp_path
):
    from cluster.trainer import fit

    rh = ray_hooks()
    records = tmp_path / "records"
    records.mkdir()
    cfg = elastic_config(
        val_shards, tmp_path / "runs", "preempted", "run.max_steps=10", "run.checkpoint_every=0",
        "run.checkpoint_every_epochs=0", "scaling.num_workers=2", "run.max_failures=2",
    )  # fmt: skip
    lines: list[str] = []
    term = rh.TermOnce(step=5, marker=tmp_path / "sent", rank=1)
    result = fit(cfg, progress=lines.append, hooks=[term, rh.Recorder(records)])
    story = "\n".join([*lines, *map(str, result.failures)])
    assert (tmp_path / "sent").exists() and len(result.failures) == 1, story
    assert any("Preempted" in error and "step 5" in error for error in result.failures[0].values()), story
    assert "resumed from the checkpoint at step 5" in lines, story
    assert result.metrics[-1]["step"] == 10
    starts = [r for r in rh.read_records(records) if r["event"] == "start" and r["rank"] == 0]
    assert [s["restored_step"] for s in starts] == [None, 5]
    trained = [
        (r["restored_step"], r["step"])
        for r in rh.read_records(records)
        if r["event"] == "step" and r["rank"] == 0
    ]
    assert trained == [(None, s) for s in range(1, 6)] + [(5, s) for s in range(6, 11)]  # no step lost


def test_a_restore_that_cannot_continue_exactly_is_refused(val_shards, tmp_path):
    from pipeline.shards.build import build_shards

    def local(*overrides: str) -> None:
        run_local(
            elastic_config(val_shards, tmp_path / "runs", "local", "scaling.num_workers=1", *overrides),
            tmp_path / "runs",
        )

    local("run.max_steps=3")
    with pytest.raises(CheckpointError, match=r"global_batch 24 there, 12 here"):
        local("run.max_steps=6", "data.global_batch_size=12")
    with pytest.raises(CheckpointError, match=r"seed 0 there, 5 here"):
        local("run.max_steps=6", "run.seed=5")
    other = tmp_path / "other_shards"
    build_shards("builtin:digits?split=val", str(other), max_samples=90, index=True, progress=False)
    with pytest.raises(CheckpointError, match=r"shards '[0-9a-f]+' there, '[0-9a-f]+' here"):
        local("run.max_steps=6", f"data.train={other}")
    local("run.max_steps=6")  # the same settings resume
