"""`relic demo`: the report's numbers come from the encoders, and a reduced demo runs end to end."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from PIL import Image
from support import run_bounded

from commands import demo, report
from pipeline.labelled import load_labelled_images
from training.model import build_encoder, resnet

REPO = Path(__file__).resolve().parents[2]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def eval_data(digits_shards):
    x, y = load_labelled_images(digits_shards, size=16, max_samples=500)
    return demo.EvalData(
        train=(x[:300], y[:300]), val=(x[300:380], y[300:380]), test=(x[380:], y[380:]), mean=MEAN, std=STD
    )


def test_report_numbers_are_computed_from_the_encoder(eval_data):
    """Zeroing the encoder's weights must move every accuracy to chance: nothing is copied."""
    torch.manual_seed(0)
    encoder = build_encoder("resnet18").eval()
    zeroed = copy.deepcopy(encoder)
    with torch.no_grad():
        for p in zeroed.parameters():
            p.zero_()
    evals = demo.evaluate_encoders({"random": encoder, "zeroed": zeroed}, eval_data, severities=(1,))
    for name in ("random", "zeroed"):
        entry = demo.encoder_entry(name, None, evals[name], None, 0)
        metrics = {**_metrics_shell([1]), "encoders": {name: entry}}
        assert report.check_metrics(metrics) == []
    good, bad = evals["random"], evals["zeroed"]
    # random ResNet features of digits are informative (pixels almost are); constant features are not
    assert good["knn"] > 0.6 and good["linear"] > 0.6 and good["knn_val"] > 0.6
    for key in ("knn", "linear", "knn_corrupted", "linear_corrupted", "knn_val"):
        assert bad[key] < 0.3, (key, bad[key])
        assert good[key] - bad[key] > 0.3, key
    assert set(good["robustness"]["knn"]) == set(good["knn_per_corruption"])


def test_random_encoder_is_the_initialisation_of_the_trained_runs():
    from cluster.config import load_config
    from training.loop import build_train_state

    cfg = load_config(demo.DEFAULT_CONFIG, ["data.train=unused"])
    state = build_train_state(
        cfg.model,
        cfg.objective,
        cfg.optim,
        cfg.schedule,
        steps_per_epoch=10,
        global_batch=128,
        seed=cfg.run.seed,
    )
    started_from = state.online.encoder.state_dict()
    random = demo.initial_encoder(cfg).state_dict()
    assert started_from.keys() == random.keys()
    assert all(torch.equal(started_from[k], random[k]) for k in random)


def test_history_keeps_the_latest_report_per_step_and_knn_per_epoch():
    reports = [
        {"step": 5, "epoch": 0, "loss": 5.0, "contrastive": 4.9, "invariance": 0.1},
        {"step": 10, "epoch": 0, "loss": 4.0, "contrastive": 3.9, "invariance": 0.1, "knn_accuracy": 0.5},
        {
            "step": 10,
            "epoch": 0,
            "loss": 4.5,
            "contrastive": 4.4,
            "invariance": 0.1,
            "knn_accuracy": 0.6,
        },  # rerun
        {"step": 20, "epoch": 1, "loss": 3.0, "contrastive": 2.9, "invariance": 0.05, "knn_accuracy": 0.7},
    ]
    h = demo.history_from_reports(reports)
    assert h["step"] == [5, 10, 20] and h["loss"] == [5.0, 4.5, 3.0]
    assert h["knn_epoch"] == [1, 2] and h["knn_acc"] == [0.6, 0.7]


def _metrics_shell(severities):
    from training.evaluate import CORRUPTIONS

    return {
        "schema": report.SCHEMA,
        "created": "now",
        "git_sha": None,
        "config": {},
        "selection": {},
        "data": {},
        "corruptions": list(CORRUPTIONS),
        "severities": severities,
        "timings": {},
    }


def _relic(*argv: str, env: dict, timeout: float) -> subprocess.CompletedProcess:
    """Run ``relic ARGV`` in a fresh process group; on timeout the whole group (with the local Ray
    instance it started) is killed, so nothing outlives the test."""
    result, timed_out = run_bounded(
        [sys.executable, "-m", "commands.cli", *argv], cwd=REPO, env=env, timeout=timeout
    )
    if timed_out:
        pytest.fail(
            f"relic {' '.join(argv)} did not finish in {timeout} s:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return result


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.timeout(1500)
def test_reduced_demo_runs_end_to_end_and_writes_a_complete_report(tmp_path):
    """`relic demo --quick` in a fresh process: shards, two Ray Train runs, evaluation, report; then
    `relic eval` on its checkpoint. About a minute and a half on an idle 2-core machine."""
    out = tmp_path / "demo"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    quick = ("--quick", "--out", str(out), "--max-train", "200", "--max-test", "60")
    proc = _relic("demo", *quick, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[-1].startswith("report: ") and str(out / "report" / "report.md") in lines[-1]
    assert any("[2/4] training" in line for line in lines)
    assert any("relic_alpha0: step" in line for line in lines)

    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert report.check_metrics(metrics) == []
    assert list(metrics["encoders"]) == ["random", "relic_alpha0", "relic"]
    assert metrics["data"]["test"] == 60 and metrics["data"]["train"] == 200
    assert metrics["severities"] == [1, 5]
    alpha0, relic = metrics["encoders"]["relic_alpha0"], metrics["encoders"]["relic"]
    assert alpha0["alpha"] == 0 and relic["alpha"] > 0
    assert alpha0["steps"] == relic["steps"] == 1258 // 64  # same budget: one epoch (--quick)
    assert alpha0["history"]["knn_epoch"] == relic["history"]["knn_epoch"] == [1]
    assert relic["final_invariance"] > 0
    for name in ("losses.png", "robustness.png"):
        with Image.open(out / "report" / name) as img:
            img.load()
            assert img.format == "PNG" and img.width > 400
    text = (out / "report" / "report.md").read_text()
    for enc in metrics["encoders"].values():
        assert enc["label"] in text and f"{100 * enc['knn']:.1f}" in text
    # the run directories hold what relic train writes: resolved config and checkpoints
    for name in ("relic_alpha0", "relic"):
        assert (out / name / "config.yaml").exists()
        assert any(p.name.startswith("checkpoint-") for p in (out / name).iterdir())

    # relic eval on the demo's checkpoint: the report's clean accuracies again (same images, same
    # encoder), and an export that torchvision loads strictly
    export = tmp_path / "export"
    data = ("--train", str(out / "shards" / "train"), "--test", str(out / "shards" / "test"))
    subset = ("--max-train", "200", "--max-test", "60", "--corruptions", "none")
    saved = ("--export", str(export), "--json", str(tmp_path / "eval.json"))
    proc = _relic("eval", str(out / "relic"), *data, *subset, *saved, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    evaluated = json.loads((tmp_path / "eval.json").read_text())
    assert evaluated["knn"] == pytest.approx(relic["knn"])
    assert evaluated["linear"] == pytest.approx(relic["linear"], abs=0.02)
    # torchvision's ResNet class at the demo's width (plain torchvision.models.resnet18() at width 1)
    width = metrics["config"]["model"]["width"]
    assert json.loads((export / "export.json").read_text())["width"] == width
    tv = resnet("resnet18", width=width) if width != 1 else torchvision.models.resnet18()
    assert isinstance(tv, torchvision.models.ResNet)
    tv.load_state_dict(torch.load(export / "encoder.pt", weights_only=True), strict=True)
    assert (export / "projector.pt").exists()
