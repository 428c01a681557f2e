"""Ray Train end to end on CPU (gloo): two workers, metrics, checkpoints, restart after SIGKILL, S3.

One local Ray instance (127.0.0.1, 2 CPUs, no dashboard) serves the whole module. The uninterrupted
reference run is shared: the end-to-end test inspects it and the restart test compares against it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import ray_hooks
import torch

from cluster.checkpoint import load_model_from_checkpoint
from cluster.config import ConfigError, load_config

TINY = Path(__file__).with_name("tiny.yaml")
REPO = Path(__file__).resolve().parents[2]
STEPS = 8  # checkpoints at 4 and 8 (run.checkpoint_every=4), reports every 2

pytestmark = [pytest.mark.ray]


def tiny(shards: str, storage: str, *overrides: str):
    return load_config(
        TINY, [f"data.train={shards}", f"run.storage={storage}", f"run.max_steps={STEPS}", *overrides]
    )


@pytest.fixture(scope="module")
def ray_local(s3_server):
    """Local Ray for this module. Started after the moto fixture has put dummy AWS credentials into
    os.environ, so the Train controller (which reads the run storage) inherits them."""
    import ray

    ray_hooks.by_value()
    ray.init(
        address="local",
        num_cpus=2,
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        log_to_driver=False,
    )
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def reference(ray_local, digits_shards, tmp_path_factory):
    """An uninterrupted 8-step run with every step recorded on every rank."""
    from cluster.trainer import fit

    root = tmp_path_factory.mktemp("reference")
    records = root / "records"
    records.mkdir()
    lines: list[str] = []
    result = fit(
        tiny(digits_shards, str(root / "runs")), progress=lines.append, hooks=[ray_hooks.Recorder(records)]
    )
    return result, ray_hooks.read_records(records), lines


@pytest.mark.slow
def test_two_workers_train_end_to_end(reference):
    result, records, lines = reference
    # metrics arrive every 2 steps, aggregated over both ranks
    assert [m["step"] for m in result.metrics] == [2, 4, 6, 8]
    for m in result.metrics:
        for key in (
            "loss",
            "contrastive",
            "invariance",
            "lr",
            "momentum",
            "images_per_s",
            "data_wait_fraction",
        ):
            assert key in m and m[key] == m[key], (key, m)
        assert m["loss"] == pytest.approx(m["contrastive"] + 1.0 * m["invariance"], rel=1e-5)
        assert m["images_per_s"] > 0 and 0 <= m["data_wait_fraction"] <= 1
        assert m["skipped_total"] == 0 and "skipped/corrupt_image" in m
        assert m["restored_step"] == -1
    assert len(lines) >= 4 and lines[-1].startswith("step 8/8")
    # the reported loss is the mean of the two ranks' losses
    steps = ray_hooks.last_by_rank_step(records)
    assert sorted({r for r, _ in steps}) == [0, 1]
    assert result.metrics[-1]["loss"] == pytest.approx(steps[(0, 8)]["loss"], rel=1e-6)
    # the two ranks read disjoint samples, and no sample twice within the epoch
    keys = [k for (_r, _s), rec in steps.items() for k in rec["keys"]]
    assert len(keys) == 2 * STEPS * 8 and len(set(keys)) == len(keys)

    run_dir = Path(result.run_dir)
    assert result.checkpoint == str(run_dir / "checkpoint-00000008")
    assert sorted(p.name for p in run_dir.glob("checkpoint-*")) == [
        "checkpoint-00000004",
        "checkpoint-00000008",
    ]
    info = json.loads((run_dir / "run_info.json").read_text())
    assert len(info["git_sha"]) >= 7 and info["steps_per_epoch"] == 1258 // 2 // 8
    assert "global_batch_size: 16" in (run_dir / "config.yaml").read_text()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert len((run_dir / "metrics.jsonl").read_text().splitlines()) == 4

    loaded = load_model_from_checkpoint(result.run_dir)
    assert loaded.step == STEPS and loaded.epoch == 0
    saved = torch.load(run_dir / "checkpoint-00000008" / "train_state.pt", weights_only=False)
    assert saved["step"] == STEPS and saved["extra"]["data"] == {
        "epoch": 0,
        "batch_in_epoch": 8,
        "world_size": 2,
    }
    for name, tensor in loaded.model.state_dict().items():
        assert torch.equal(tensor, saved["model"][name]), name
    features = loaded.encoder(torch.rand(2, 3, 16, 16))
    assert features.shape == (2, 512)


@pytest.mark.slow
def test_killed_worker_restarts_from_checkpoint_and_matches_uninterrupted_run(
    reference, digits_shards, tmp_path
):
    from cluster.trainer import fit

    ref_result, ref_records, _ = reference
    records = tmp_path / "records"
    records.mkdir()
    lines: list[str] = []
    kill = ray_hooks.KillOnce(step=6, marker=tmp_path / "killed", rank=0)
    result = fit(
        tiny(digits_shards, str(tmp_path / "runs")),
        progress=lines.append,
        hooks=[kill, ray_hooks.Recorder(records)],
    )
    assert (tmp_path / "killed").exists(), "the worker was never killed"
    assert len(result.failures) >= 1, lines
    assert any("resumed from the checkpoint at step 4" in line for line in lines), lines

    recs = ray_hooks.read_records(records)
    starts = [r for r in recs if r["event"] == "start" and r["rank"] == 0]
    assert [s["restored_step"] for s in starts] == [None, 4]
    # after the restart: steps 5..8 again, from the checkpoint at step 4
    rerun = [r["step"] for r in recs if r["event"] == "step" and r["rank"] == 0 and r["restored_step"] == 4]
    assert rerun == [5, 6, 7, 8]
    # final step count and checkpoint
    assert result.metrics[-1]["step"] == STEPS and result.checkpoint.endswith("checkpoint-00000008")
    assert load_model_from_checkpoint(result.checkpoint).step == STEPS

    ours, ref = ray_hooks.last_by_rank_step(recs), ray_hooks.last_by_rank_step(ref_records)
    assert sorted(ours) == sorted(ref)
    for key in sorted(ref):
        for term in ("loss", "contrastive", "invariance", "lr", "momentum"):
            assert ours[key][term] == pytest.approx(ref[key][term], rel=1e-5, abs=1e-6), (key, term)
        # same samples in the same order: nothing seen twice or skipped by the resume
        assert ours[key]["keys"] == ref[key]["keys"], key

    ref_state = torch.load(Path(ref_result.checkpoint) / "train_state.pt", weights_only=False)
    our_state = torch.load(Path(result.checkpoint) / "train_state.pt", weights_only=False)
    for name, tensor in ref_state["model"].items():
        torch.testing.assert_close(our_state["model"][name], tensor, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.s3
def test_checkpoints_on_s3_and_a_new_run_with_the_same_name_resumes(
    ray_local, digits_shards, s3_server, s3_bucket, s3_options, tmp_path
):
    import s3fs

    from cluster.trainer import fit

    def cfg(steps: int):
        return tiny(
            digits_shards,
            f"{s3_bucket}/runs",
            f"run.max_steps={steps}",
            "run.checkpoint_every=2",
            "run.report_every=1",
            f"run.endpoint_url={s3_server}",
            "run.name=s3run",
        )

    creds = {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    first = fit(cfg(2), progress=False, worker_env=creds)
    assert first.run_dir == f"{s3_bucket}/runs/s3run"
    assert first.checkpoint == f"{s3_bucket}/runs/s3run/checkpoint-00000002"
    assert [m["restored_step"] for m in first.metrics] == [-1, -1]

    second = fit(cfg(4), progress=False, worker_env=creds)
    assert [m["step"] for m in second.metrics] == [3, 4]
    assert {m["restored_step"] for m in second.metrics} == {2}
    assert second.checkpoint == f"{s3_bucket}/runs/s3run/checkpoint-00000004"

    fs = s3fs.S3FileSystem(**s3_options)
    fs.invalidate_cache()
    listing = {p.rsplit("/", 1)[-1] for p in fs.ls(f"{s3_bucket[5:]}/runs/s3run")}
    assert {"config.yaml", "run_info.json", "metrics.jsonl", "tensorboard", "checkpoint-00000004"} <= listing
    assert len(fs.cat(f"{s3_bucket[5:]}/runs/s3run/metrics.jsonl").decode().splitlines()) == 4
    loaded = load_model_from_checkpoint(second.run_dir, storage_options=s3_options)
    assert loaded.step == 4 and loaded.path.endswith("checkpoint-00000004")


@pytest.mark.slow
def test_bad_config_is_rejected_before_any_worker_starts(ray_local, digits_shards, tmp_path):
    import ray

    from cluster.trainer import fit

    def actors() -> int:
        return len(ray._private.state.actors())

    before = actors()
    with pytest.raises(ConfigError) as info:
        fit(tiny(str(tmp_path / "no-such-shards"), str(tmp_path / "runs")), progress=False)
    assert info.value.key == "data.train" and "no-such-shards" in str(info.value)
    with pytest.raises(ConfigError) as info:
        fit(tiny(digits_shards, str(tmp_path / "runs"), "data.global_batch_size=4096"), progress=False)
    assert info.value.key == "data.global_batch_size" and "1258" in str(info.value)
    assert actors() == before
    assert not (tmp_path / "runs").exists()


def test_cli_rejects_a_bad_config_without_starting_ray(tmp_path):
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "train", str(TINY), "data.train=/x", "scaling.num_workers=3"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr
    assert "data.global_batch_size" in proc.stderr and "num_workers=3" in proc.stderr
    assert "Ray" not in proc.stderr and "Ray" not in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "cluster.cli", "train", str(TINY), "data.train=/x", "optim.lr=1"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=env,
    )
    assert proc.returncode == 2 and "optim.lr" in proc.stderr and "unknown key" in proc.stderr
