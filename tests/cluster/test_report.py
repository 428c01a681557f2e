"""The demo report renders every number it is given, and refuses malformed metrics."""

from __future__ import annotations

import copy
import json

import pytest
from PIL import Image

from commands import report

CORRUPTIONS = ["gaussian_noise", "contrast"]
SEVERITIES = [1, 2]


def _encoder(label: str, trained: bool, alpha: float | None, base: float) -> dict:
    rob = {
        probe: {
            c: {str(s): round(base - 0.1 * s - (0.01 if probe == "linear" else 0), 4) for s in SEVERITIES}
            for c in CORRUPTIONS
        }
        for probe in report.PROBES
    }
    per = {p: {c: sum(v.values()) / len(v) for c, v in rob[p].items()} for p in report.PROBES}
    steps = list(range(1, 7)) if trained else []
    return {
        "label": label,
        "trained": trained,
        "alpha": alpha,
        "knn": base,
        "linear": base - 0.01,
        "knn_corrupted": sum(per["knn"].values()) / len(CORRUPTIONS),
        "linear_corrupted": sum(per["linear"].values()) / len(CORRUPTIONS),
        "knn_per_corruption": per["knn"],
        "linear_per_corruption": per["linear"],
        "robustness": rob,
        "final_loss": 3.5 if trained else None,
        "final_contrastive": 3.4 if trained else None,
        "final_invariance": (0.0123 if alpha else 0.0456) if trained else None,
        "steps": len(steps),
        "epochs": 3 if trained else 0,
        "history": {
            "step": steps,
            "loss": [4.0 - 0.1 * s for s in steps],
            "contrastive": [3.9 - 0.1 * s for s in steps],
            "invariance": [0.05 - 0.001 * s for s in steps],
            "knn_epoch": [1, 2, 3] if trained else [0],
            "knn_acc": [0.7, 0.8, 0.9] if trained else [0.6],
        },
    }


def fake_metrics() -> dict:
    return {
        "schema": report.SCHEMA,
        "created": "2026-01-01T00:00:00Z",
        "git_sha": "abc1234",
        "config": {
            "model": {"arch": "resnet18", "small_stem": False},
            "objective": {"temperature": 0.2, "alpha": 1.0},
            "schedule": {"epochs": 3},
            "views": {"preset": "demo", "options": {}},
            "scaling": {"num_workers": 2},
            "optim": {"name": "lars", "base_lr": 0.4},
            "data": {"global_batch_size": 128},
        },
        "selection": {"split": "validation", "criterion": "mean kNN accuracy"},
        "data": {
            "train": 100,
            "val": 20,
            "test": 40,
            "classes": [str(i) for i in range(10)],
            "image_size": 16,
            "source": "builtin:digits",
        },
        "corruptions": CORRUPTIONS,
        "severities": SEVERITIES,
        "timings": {"shards_s": 1.0, "train_s": {"relic_alpha0": 10.0}, "total_s": 20.0},
        "encoders": {
            "random": _encoder("random init", False, None, 0.611),
            "relic_alpha0": _encoder("ReLIC alpha=0", True, 0.0, 0.822),
            "relic": _encoder("ReLIC alpha=1", True, 1.0, 0.933),
        },
    }


def test_write_report_writes_every_file_with_the_numbers(tmp_path):
    metrics = fake_metrics()
    paths = report.write_report(metrics, tmp_path / "report")
    assert set(paths) == {"metrics", "losses", "robustness", "report"}
    for key in ("losses", "robustness"):
        with Image.open(paths[key]) as img:
            img.verify()
        with Image.open(paths[key]) as img:
            assert img.format == "PNG" and img.size[0] > 400 and img.size[1] > 200
    saved = json.loads(paths["metrics"].read_text())
    assert saved["encoders"] == json.loads(json.dumps(metrics["encoders"]))
    cmp = saved["comparison"]
    assert cmp["relic_minus_relic_alpha0"]["knn"] == pytest.approx(0.933 - 0.822)
    assert cmp["relic_alpha0_minus_random"]["linear"] == pytest.approx(0.812 - 0.601)
    text = paths["report"].read_text()
    for value in ("61.1", "82.2", "93.3", "0.0123", "0.0456"):
        assert value in text
    assert "yes — alpha > 0" in text
    assert "losses.png" in text and "robustness.png" in text
    table = report.terminal_table(metrics)
    assert "93.3" in table and "random init" in table and len(table.splitlines()) == 5


def test_verdict_follows_the_numbers():
    metrics = fake_metrics()
    metrics["encoders"]["relic"], metrics["encoders"]["relic_alpha0"] = (
        {**metrics["encoders"]["relic_alpha0"], "label": "ReLIC alpha=1", "alpha": 1.0},
        {**metrics["encoders"]["relic"], "label": "ReLIC alpha=0", "alpha": 0.0},
    )
    assert "no — alpha > 0 is not more accurate" in report.render_markdown(metrics)


def test_check_metrics_names_the_problem():
    assert report.check_metrics(fake_metrics()) == []
    bad = copy.deepcopy(fake_metrics())
    del bad["encoders"]["relic"]["final_invariance"]
    assert report.check_metrics(bad) == ["encoders.relic: missing key 'final_invariance'"]
    bad = copy.deepcopy(fake_metrics())
    bad["encoders"]["random"]["knn"] = 1.5
    assert any("encoders.random.knn" in p for p in report.check_metrics(bad))
    bad = copy.deepcopy(fake_metrics())
    del bad["encoders"]["relic_alpha0"]["robustness"]["linear"]["contrast"]["2"]
    assert any("robustness.linear.contrast" in p for p in report.check_metrics(bad))
    bad = copy.deepcopy(fake_metrics())
    bad["encoders"]["relic"]["history"]["step"] = []
    assert any("loss curve" in p for p in report.check_metrics(bad))
    with pytest.raises(ValueError, match="missing key 'timings'"):
        report.write_report({k: v for k, v in fake_metrics().items() if k != "timings"}, "/nonexistent")
