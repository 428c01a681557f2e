"""SemPPL's wiring in the cluster layer: the pseudo-label monitor, its aggregation over ranks, the
label map it reads, and the checks before a SemPPL run starts."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch

from cluster.config import ConfigError, config_from_dict
from cluster.monitor import PseudoLabelMonitor
from cluster.reporting import aggregate
from cluster.trainer import preflight, progress_line


def test_pseudo_label_monitor_counts_unlabelled_samples_only_and_resets():
    monitor = PseudoLabelMonitor({"a": 1, "b": 2, "c": 3, "d": 4})
    batch = SimpleNamespace(keys=["a", "b", "c", "d", "zz"], labels=torch.tensor([1, -1, -1, -1, -1]))
    # a is labelled (not counted); b right, c wrong, d no pseudo-label (-1: wrong), zz has no true label
    monitor.observe(SimpleNamespace(pseudo_labels=torch.tensor([7, 2, 0, -1, 5])), batch)
    assert monitor.counts() == {"pseudo_right": 1, "pseudo_seen": 3}
    assert monitor.counts() == {"pseudo_right": 0, "pseudo_seen": 0}
    monitor.observe(SimpleNamespace(pseudo_labels=None), batch)  # a ReLIC step: nothing to compare
    assert monitor.counts()["pseudo_seen"] == 0


def test_pseudo_label_accuracy_is_summed_over_ranks_and_shown():
    ranks = [
        {"images": 8, "elapsed": 1.0, "wait": 0.0, "stats": {"pseudo_right": 3, "pseudo_seen": 4}},
        {"images": 8, "elapsed": 1.0, "wait": 0.0, "stats": {"pseudo_right": 1, "pseudo_seen": 6}},
    ]
    out = aggregate(ranks, ())
    assert out["pseudo_label_accuracy"] == pytest.approx(4 / 10)  # not the mean of 0.75 and 0.17
    assert "pseudo_label_accuracy" not in aggregate([{**ranks[0], "stats": {}}], ())
    line = progress_line({"step": 3, "epoch": 0, "loss": 1.0, "contrastive": 0.5, "semantic": 0.25,
                          "invariance": 0.1, **out})  # fmt: skip
    assert "s 0.2500" in line and "pseudo 40%" in line


def _cfg(train: str, **objective) -> object:
    return config_from_dict(
        {
            "data": {"train": train, "global_batch_size": 16},
            "run": {"name": "t", "knn_every": 0},
            "scaling": {"num_workers": 1},
            "objective": objective,
        }
    )


def test_semppl_on_shards_without_labels_is_refused_before_training(tmp_path):
    from pipeline.shards.build import build_shards

    unlabelled = tmp_path / "photos"
    build_shards("builtin:photos?count=20", str(unlabelled), progress=False)
    preflight(_cfg(str(unlabelled)))  # ReLIC needs no labels
    with pytest.raises(ConfigError, match=r"objective\.name: SemPPL needs labels .* carry none"):
        preflight(_cfg(str(unlabelled), name="semppl"))


def test_a_set_without_masks_with_mask_prob_is_said_before_training(tmp_path, caplog):
    from pipeline.shards.build import build_shards

    shards = tmp_path / "digits"
    build_shards("builtin:digits?split=val", str(shards), progress=False)
    cfg = config_from_dict(
        {
            "data": {"train": str(shards), "global_batch_size": 16},
            "run": {"name": "t", "knn_every": 0},
            "scaling": {"num_workers": 1},
            "views": {"preset": "relic", "options": {"mask_prob": 0.5}},
        }
    )
    with caplog.at_level(logging.WARNING):
        facts = preflight(cfg)
    assert facts["masked_samples"] == 0
    assert "carry no saliency masks" in caplog.text
