"""``configs/demo_semppl.yaml`` trains in-process (``LocalSession``) on real digits of which 30% keep
their labels, with the pseudo-label monitor reading the true labels of the full set; and the
statistics ``relic demo --semppl`` and ``--seeds`` report (mean, standard error, paired difference) against
independent computations."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest
from scipy import stats
from support import run_local

from cluster.config import load_config
from cluster.trainer import preflight
from commands.seeds import mean_se, paired, summarise

SEMPPL = Path(__file__).parents[2] / "configs" / "demo_semppl.yaml"
SHRINK = (
    "data.global_batch_size=16",
    "data.shuffle_buffer=64",
    "model.width=0.25",
    "model.projector_hidden_dim=64",
    "model.projector_out_dim=32",
    "objective.semppl_queue_size=32",
    "schedule.epochs=2",
    "schedule.warmup_epochs=0.5",
    "run.report_every=1",
    "run.checkpoint_every_epochs=2",
    "run.tensorboard=false",
    "scaling.num_workers=1",
)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    from pipeline.shards.build import build_shards

    root = tmp_path_factory.mktemp("semppl")
    full = build_shards("builtin:digits?split=val&size=16", str(root / "full"), progress=False)
    part = build_shards(
        "builtin:digits?split=val&size=16", str(root / "part"), label_fraction=0.3, seed=0, progress=False
    )
    return full, part


def test_the_demo_semppl_config_trains_and_reports_pseudo_label_accuracy(digits, tmp_path):
    full, part = digits
    cfg = load_config(
        SEMPPL, [*SHRINK, f"data.train={part.url}", f"data.true_labels={full.url}", f"run.storage={tmp_path}"]
    )
    assert cfg.objective.name == "semppl" and preflight(cfg)["labelled_samples"] == part.labelled["labelled"]
    steps: list[dict] = []

    class Record:
        def on_step(self, info):
            steps.append({"labels": info.batch.labels.tolist(), "pseudo": info.state.pseudo_labels.tolist()})

    session = run_local(cfg, tmp_path, hooks=[Record()])
    reports = session.reports
    assert len(steps) == 2 * (179 // 16) and all(math.isfinite(r["loss"]) for r in reports)
    # labelled samples keep their labels; unlabelled ones get pseudo-labels once the queue has rows
    for s in steps:
        assert all(p == y for p, y in zip(s["pseudo"], s["labels"]) if y >= 0)
    assert any(p >= 0 for s in steps[1:] for p, y in zip(s["pseudo"], s["labels"]) if y < 0)
    semantic = [r["semantic"] for r in reports]
    assert semantic[0] >= 0 and max(semantic) > 0
    accuracy = [r["pseudo_label_accuracy"] for r in reports if "pseudo_label_accuracy" in r]
    assert accuracy and all(0.0 <= a <= 1.0 for a in accuracy)


def test_the_reported_statistics_match_independent_ones():
    a, b = [0.80, 0.84, 0.83], [0.85, 0.86, 0.83]
    mean, se = mean_se(a)
    assert mean == pytest.approx(statistics.mean(a)) and se == pytest.approx(
        statistics.stdev(a) / math.sqrt(3)
    )
    d = paired(a, b)
    assert d["mean"] == pytest.approx(statistics.mean([0.05, 0.02, 0.0]))
    assert d["p_value"] == pytest.approx(stats.ttest_rel(b, a).pvalue)
    results = {"relic": {0: {"knn": 0.8, "linear": 0.7}, 1: {"knn": 0.9, "linear": 0.8}},
               "semppl": {0: {"knn": 0.85, "linear": 0.7}, 1: {"knn": 0.95, "linear": 0.9}}}  # fmt: skip
    summary = summarise(results, "relic", "semppl")
    assert summary["recipes"]["relic"]["knn"]["mean"] == pytest.approx(0.85)
    assert summary["difference"]["knn"]["diffs"] == pytest.approx([0.05, 0.05])
    assert summary["difference"]["linear"]["mean"] == pytest.approx(0.05)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--seeds", "1"], "--seeds: expected at least 2 for an error bar, got 1"),
        (["--seeds", "2", "--alpha", "0"], "--alpha / objective.alpha: expected > 0, got 0.0"),
        (["--semppl", "--seeds", "1"], "--seeds: expected at least 2 for an error bar, got 1"),
        (["--semppl", "--label-fraction", "1.5"], "--label-fraction: expected a value in (0, 1], got 1.5"),
    ],
)
def test_seed_comparisons_refuse_what_would_give_no_answer(argv, message, tmp_path, capsys):
    from commands.cli import main

    assert main(["demo", "--out", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "shards").exists()  # refused before building anything
