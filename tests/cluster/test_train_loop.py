"""The worker loop without Ray (``LocalSession``): segments, exact in-process resume, kNN monitor,
cross-rank aggregation and the driver's progress line. Fast: one process, tiny model, 16x16 views."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support import run_local

from cluster.checkpoint import checkpoint_due, latest_checkpoint, load_model_from_checkpoint, segment_end
from cluster.config import load_config
from cluster.reporting import aggregate
from cluster.session import LocalSession
from cluster.trainer import progress_line

TINY = Path(__file__).with_name("tiny.yaml")


@pytest.mark.parametrize(
    ("step", "every", "end", "expected"),
    [(0, 0, 1000, 78), (0, 4, 1000, 4), (4, 4, 1000, 8), (76, 4, 1000, 78), (78, 0, 1000, 156), (5, 0, 7, 7)],
)
def test_segments_end_at_checkpoint_boundaries(step, every, end, expected):
    assert segment_end(step, steps_per_epoch=78, checkpoint_every=every, end_step=end) == expected


@pytest.mark.parametrize(
    ("every", "every_epochs", "end"), [(0, 1, 40), (0, 3, 40), (4, 0, 38), (5, 2, 41), (0, 0, 9)]
)
def test_checkpoints_are_due_at_their_cadences_and_the_end(every, every_epochs, end):
    per_epoch = 7
    expected = {end}
    expected |= set(range(every, end + 1, every)) if every else set()
    expected |= (
        set(range(per_epoch * every_epochs, end + 1, per_epoch * every_epochs)) if every_epochs else set()
    )
    due = {
        s
        for s in range(1, end + 1)
        if checkpoint_due(
            s,
            steps_per_epoch=per_epoch,
            checkpoint_every=every,
            checkpoint_every_epochs=every_epochs,
            end_step=end,
        )
    }
    assert due == expected
    # every checkpoint is a segment boundary, so a resumed run starts where a segment starts
    for s in due - {end}:
        assert segment_end(s - 1, steps_per_epoch=per_epoch, checkpoint_every=every, end_step=end) == s


def test_aggregate_sums_throughput_and_skips_and_averages_waiting():
    ranks = [
        {
            "images": 80,
            "elapsed": 2.0,
            "wait": 0.2,
            "stats": {"corrupt_image": 2, "filled": 2, "unmasked": 5},
        },
        {
            "images": 80,
            "elapsed": 4.0,
            "wait": 2.0,
            "stats": {"corrupt_image": 1, "missing_image": 3, "bad_mask": 1},
        },
    ]
    out = aggregate(ranks, ("corrupt_image", "missing_image", "truncated_tar"))
    assert out["images_per_s"] == pytest.approx(40 + 20)
    assert out["data_wait_fraction"] == pytest.approx((0.1 + 0.5) / 2)
    assert out["skipped/corrupt_image"] == 3 and out["skipped/missing_image"] == 3
    assert out["skipped/truncated_tar"] == 0 and out["skipped_total"] == 6 and out["filled"] == 2
    assert (out["unmasked"], out["bad_mask"], out["bad_label"]) == (5, 1, 0)  # kept, not skipped


def test_progress_line_is_one_concise_line():
    line = progress_line(
        {
            "step": 12,
            "total_steps": 100,
            "epoch": 1,
            "loss": 4.25,
            "contrastive": 4.0,
            "invariance": 0.25,
            "lr": 0.05,
            "momentum": 0.9961,
            "images_per_s": 1234.5,
            "data_wait_fraction": 0.031,
            "skipped_total": 3,
            "knn_accuracy": 0.875,
            "checkpoint": "/r/checkpoint-00000012",
        }
    )
    assert "\n" not in line
    for part in (
        "step 12/100",
        "ep 1",
        "loss 4.2500",
        "i 0.2500",
        "1234 img/s",
        "wait 3%",
        "skipped 3",
        "kNN 87.5%",
        "[ckpt]",
    ):
        assert part in line, (part, line)


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory):
    """builtin:digits validation split (179 labelled images): 11 batches of 16 per epoch."""
    from pipeline.shards.build import build_shards

    out = tmp_path_factory.mktemp("val_shards")
    build_shards("builtin:digits?split=val", str(out), max_samples=64, index=True, progress=False)
    return str(out)


def _run(shards: str, root: Path, *overrides: str) -> tuple[LocalSession, list[dict]]:
    overrides = (
        f"data.train={shards}",
        f"run.storage={root}",
        "run.name=local",
        "scaling.num_workers=1",
        *overrides,
    )
    records: list[dict] = []

    class Collect:
        def on_step(self, info):
            records.append({"step": info.step, "loss": info.metrics["loss"], "keys": info.keys})

    return run_local(load_config(TINY, list(overrides)), root, hooks=[Collect()]), records


@pytest.mark.slow
def test_local_loop_resumes_exactly_and_runs_the_knn_monitor(small_shards, tmp_path):
    knn = [f"data.knn_val={small_shards}", "run.knn_every=1", "data.knn_max_samples=64", "run.report_every=5"]
    whole, ref = _run(small_shards, tmp_path / "whole", "run.max_steps=14", "run.checkpoint_every=6", *knn)
    assert [r["step"] for r in whole.reports] == [5, 6, 10, 11, 12, 14]
    at_epoch_end = [r for r in whole.reports if "knn_accuracy" in r]
    assert [r["step"] for r in at_epoch_end] == [11]  # 11 steps per epoch, monitor after every epoch
    assert 0.0 <= at_epoch_end[0]["knn_accuracy"] <= 1.0

    # stop at 6 (a checkpoint), then a second session on the same run directory continues to 14
    part1, first = _run(small_shards, tmp_path / "split", "run.max_steps=6", "run.checkpoint_every=6", *knn)
    assert latest_checkpoint(part1.run_dir).endswith("checkpoint-00000006")
    part2, second = _run(small_shards, tmp_path / "split", "run.max_steps=14", "run.checkpoint_every=6", *knn)
    assert {r["restored_step"] for r in part2.reports} == {6}
    resumed = first + second
    assert [r["step"] for r in resumed] == [r["step"] for r in ref] == list(range(1, 15))
    for a, b in zip(resumed, ref):
        assert a["keys"] == b["keys"], a["step"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), a["step"]
    # epoch 0 covers distinct samples; epoch 1 starts over with a new order
    epoch0 = [k for r in ref[:11] for k in r["keys"]]
    assert len(set(epoch0)) == len(epoch0) == 11 * 16

    loaded = load_model_from_checkpoint(part2.run_dir)
    saved = torch.load(Path(part2.run_dir) / "checkpoint-00000014" / "train_state.pt", weights_only=True)
    assert loaded.step == 14 and loaded.epoch == 1
    assert (
        json.loads((Path(part2.run_dir) / "checkpoint-00000014" / "meta.json").read_text())["git_sha"]
        == "test"
    )
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, saved["model"][name]), name
    assert loaded.target is not None


@pytest.mark.slow
def test_checkpoints_every_k_epochs_still_report_every_epoch_end(small_shards, tmp_path):
    knn = [f"data.knn_val={small_shards}", "run.knn_every=1", "data.knn_max_samples=64"]
    session, _ = _run(
        small_shards,
        tmp_path,
        "schedule.epochs=3",
        "run.max_steps=23",
        "run.checkpoint_every=0",
        "run.checkpoint_every_epochs=2",
        "run.report_every=100",
        *knn,
    )
    # 11 steps per epoch: epoch ends at 11 and 22, the end at 23; checkpoints at 22 (2nd epoch) and 23
    assert [r["step"] for r in session.reports] == [11, 22, 23]
    assert [r["step"] for r in session.reports if "knn_accuracy" in r] == [11, 22]
    assert sorted(p.name for p in Path(session.run_dir).glob("checkpoint-*")) == [
        "checkpoint-00000022",
        "checkpoint-00000023",
    ]
