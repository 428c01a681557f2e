"""The paper's ReLICv2 config (``configs/imagenet_r50_relicv2.yaml``) shrunk to CPU size but keeping its
recipe (4 large + 2 small views, large views cut from background-removed images with probability
p_m, all L x L + S x L pairs, per-view BatchNorm) trains in-process (``LocalSession``) on real digits
shards with spectral-residual saliency masks from ``relic shards masks``; and on a set without masks
it trains unmasked, saying so."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import torch
from support import run_local

from cluster.checkpoint import load_model_from_checkpoint
from cluster.config import load_config
from cluster.trainer import preflight
from pipeline.shards.manifest import load_manifest

RELICV2 = Path(__file__).parents[2] / "configs" / "imagenet_r50_relicv2.yaml"
#: ``max_samples`` is per shard: the val split's 179 digits make shards of 64, 64 and 51 samples.
SAMPLES, BATCH = 179, 16
STEPS = SAMPLES // BATCH  # 11: one epoch (schedule.epochs=1); the last 3 samples of the order wait

#: CPU-sized values; the recipe keys (views.preset, num_large, num_small, objective.pairs,
#: model.batchnorm, the EMA target, ...) stay the file's.
SHRINK = (
    f"data.global_batch_size={BATCH}",
    "data.shuffle_buffer=64",
    "data.reader_workers=1",
    "data.knn_train=null",
    "data.knn_val=null",
    "views.options.size=16",
    "views.options.small_size=8",
    "views.options.mask_prob=0.5",
    "views.num_threads=1",
    "views.prefetch=1",
    "model.arch=resnet18",
    "model.width=0.25",
    "model.projector_hidden_dim=64",
    "model.projector_out_dim=32",
    "model.sync_batchnorm=false",
    "model.channels_last=false",
    "model.bf16=false",
    "optim.name=sgd",
    "optim.base_lr=0.05",
    "schedule.epochs=1",
    "schedule.warmup_epochs=0.5",
    "objective.negatives=8",
    "run.name=relicv2",
    "run.report_every=1",
    "run.checkpoint_every=2",
    "run.knn_every=0",
    "run.tensorboard=false",
    "scaling.num_workers=1",
    "scaling.use_gpu=false",
    "scaling.cpus_per_worker=1",
    "scaling.backend=auto",
)


def _config(shards: str, storage: Path, *overrides: str):
    return load_config(RELICV2, [*SHRINK, f"data.train={shards}", f"run.storage={storage}", *overrides])


class Record:
    """Per step: the loss terms, the views the worker trained on; before the first step, the weights."""

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.initial: dict[str, torch.Tensor] | None = None

    def on_start(self, info):
        self.initial = {k: v.detach().clone() for k, v in info.state.model.state_dict().items()}

    def on_step(self, info):
        batch = info.batch
        self.steps.append(
            {
                "step": info.step,
                "metrics": dict(info.metrics),
                "keys": list(info.keys),
                "num_large": batch.num_large,
                "shapes": [tuple(v.shape) for v in batch.views],
            }
        )


@pytest.fixture(scope="module")
def shard_sets(tmp_path_factory):
    """``(plain, masked)``: the 179 labelled digits of the val split (3 shards), and the same set with
    spectral-residual masks written by ``relic shards masks``'s function into a second directory."""
    from pipeline.shards.build import add_masks, build_shards

    plain = tmp_path_factory.mktemp("digits")
    build_shards("builtin:digits?split=val", str(plain), max_samples=64, index=True, progress=False)
    masked = tmp_path_factory.mktemp("digits_masked")
    add_masks(str(plain), str(masked), progress=False)
    return str(plain), str(masked)


def test_the_paper_config_shrinks_but_keeps_its_recipe_and_sources(shard_sets, tmp_path):
    cfg = _config(shard_sets[1], tmp_path)
    recipe = cfg.views.recipe()
    assert cfg.views.preset == "relicv2"
    assert (recipe.num_large, len(recipe.views) - recipe.num_large) == (4, 2)
    assert recipe.mask_prob == 0.5
    assert [v.size for v in recipe.views] == [16] * 4 + [8] * 2
    assert (cfg.objective.pairs, cfg.model.batchnorm, cfg.objective.target) == ("all", "per_view", "ema")
    # an overridden key loses the file's claim; keys left alone keep theirs
    assert cfg.sources["views.options.mask_prob"] == "overridden: command line"
    assert cfg.sources["optim.name"] == "overridden: command line"
    assert cfg.sources["objective.pairs"].startswith("verified:")
    assert cfg.sources["views.options.num_large"].startswith("assumed:")


def test_a_tiny_relicv2_run_with_masks_trains(shard_sets, tmp_path):
    plain, masked = shard_sets
    assert not load_manifest(plain).has_masks
    manifest = load_manifest(masked)
    assert manifest.has_masks and manifest.masks["method"] == "spectral_residual"
    assert manifest.masks["samples"] == manifest.total_samples == SAMPLES  # every digit got a mask
    assert (manifest.masks["rejected"], manifest.masks["missing"]) == (0, 0)

    cfg = _config(masked, tmp_path)
    facts = preflight(cfg)
    assert (facts["masked_samples"], facts["steps_per_epoch"]) == (SAMPLES, STEPS)

    record = Record()
    session = run_local(cfg, tmp_path, hooks=[record])

    # one epoch: 11 steps of 16 samples, each sample at most once
    assert [s["step"] for s in record.steps] == list(range(1, STEPS + 1))
    keys = [k for s in record.steps for k in s["keys"]]
    assert len(keys) == len(set(keys)) == STEPS * BATCH
    # the worker trained on the recipe's views: 4 large 16x16 (online and target), then 2 small 8x8
    for s in record.steps:
        assert s["num_large"] == 4, s
        assert s["shapes"] == [(BATCH, 3, 16, 16)] * 4 + [(BATCH, 3, 8, 8)] * 2, s
    for s in record.steps:
        m = s["metrics"]
        assert all(math.isfinite(m[k]) for k in ("loss", "contrastive", "invariance")), m
        assert m["invariance"] > 0, m
    losses = [s["metrics"]["loss"] for s in record.steps]
    assert len(set(losses)) == len(losses), losses

    # a report per step; every sample carried its mask to the loader (none missing, none refused)
    assert [r["step"] for r in session.reports] == list(range(1, STEPS + 1))
    for r in session.reports:
        assert (r["unmasked"], r["bad_mask"], r["skipped_total"]) == (0, 0, 0), r
    assert session.reports[-1]["samples_seen"] == STEPS * BATCH

    # checkpoints every 2 steps and at the end (LocalSession keeps them all: pruning to
    # run.num_to_keep is Ray's); the weights moved from the initial ones, and after step 2 (not in the
    # last step: the cosine schedule ends at lr = final_lr_fraction x peak = 0)
    run_dir = Path(session.run_dir)
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == [
        f"checkpoint-{s:08d}" for s in (2, 4, 6, 8, 10, 11)
    ]
    mid = load_model_from_checkpoint(str(run_dir / "checkpoint-00000002"))
    end = load_model_from_checkpoint(str(run_dir))
    assert (mid.step, end.step) == (2, STEPS)
    assert end.config.views.recipe().num_large == 4 and end.config.objective.pairs == "all"
    assert record.initial is not None
    final = end.model.state_dict()
    assert final.keys() == record.initial.keys()
    weights = [k for k, v in final.items() if v.is_floating_point() and "running" not in k]
    assert weights
    assert any(not torch.equal(final[k], record.initial[k]) for k in weights)
    assert any(not torch.equal(final[k], mid.model.state_dict()[k]) for k in weights)


def test_masks_requested_on_a_set_without_masks_train_unmasked(shard_sets, tmp_path, caplog):
    plain = shard_sets[0]
    cfg = _config(plain, tmp_path, "run.max_steps=2")
    with caplog.at_level(logging.WARNING):
        facts = preflight(cfg)
    assert facts["masked_samples"] == 0
    assert any(
        "mask_prob is 0.5" in r.getMessage() and "carry no saliency masks" in r.getMessage()
        for r in caplog.records
    ), caplog.text
    caplog.clear()

    record = Record()
    with caplog.at_level(logging.WARNING):
        session = run_local(cfg, tmp_path, hooks=[record])
    assert [s["step"] for s in record.steps] == [1, 2]
    for s in record.steps:
        assert s["shapes"] == [(BATCH, 3, 16, 16)] * 4 + [(BATCH, 3, 8, 8)] * 2, s
        assert all(math.isfinite(s["metrics"][k]) for k in ("loss", "contrastive", "invariance"))
    told = [r for r in caplog.records if "every view is unmasked" in r.getMessage()]
    assert len(told) == 1, caplog.text  # the loader says so once, not per batch
    # ``unmasked`` counts samples without a mask in a set WITH masks; a set without any is the
    # warning above, not a counter
    assert [(r["unmasked"], r["bad_mask"]) for r in session.reports] == [(0, 0), (0, 0)]
