"""A build whose worker process is killed by a signal resumes to the identical manifest.

The kill is made deterministic with a named pipe among the inputs: the worker that reaches it blocks
in open() while every other chunk finishes, and the test then SIGKILLs the pool's workers."""

from __future__ import annotations

import filecmp
import json
import os
import signal
import subprocess
import sys
import time

import psutil
from shards_helpers import image_bytes

from pipeline.shards.build import RECEIPT_DIR, build_shards
from pipeline.shards.manifest import load_manifest

N_INPUTS, PER_SHARD = 40, 4


def _wait(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _pool_workers(pid):
    """The ProcessPoolExecutor's workers: forked children of the build (or of its forkserver)."""
    workers = []
    for child in psutil.Process(pid).children():
        cmd = " ".join(child.cmdline())
        if "forkserver" in cmd:
            workers.extend(child.children())
        elif "resource_tracker" not in cmd:
            workers.append(child)
    return workers


def test_killed_worker_then_rerun_gives_identical_manifest(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    names = [f"img{i:03d}.jpg" for i in range(N_INPUTS)]
    for i, name in enumerate(names):
        if i != 17:
            (src / name).write_bytes(image_bytes("PNG" if i % 3 else "JPEG", seed=i))
    os.mkfifo(src / names[17])  # blocks the worker that opens it
    (src / "list.csv").write_text("path,label\n" + "".join(f"{n},{i % 3}\n" for i, n in enumerate(names)))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "commands.cli", "shards", "build", str(src / "list.csv"), str(out)]
    cmd += ["--workers", "2", "--max-samples", str(PER_SHARD), "--index", "--seed", "5", "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        n_chunks = N_INPUTS // PER_SHARD
        receipts = out / RECEIPT_DIR
        _wait(
            lambda: receipts.is_dir() and len(list(receipts.glob("chunk-*.json"))) == n_chunks - 1,
            60,
            "every chunk but the blocked one",
        )
        workers = _pool_workers(proc.pid)
        assert workers, "no pool worker found"
        for w in workers:
            os.kill(w.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert "Re-run the same command to resume" in err
    assert not (out / "manifest.json").exists()  # the manifest only appears when complete
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert len(finished) == n_chunks - 1

    (src / names[17]).unlink()
    (src / names[17]).write_bytes(image_bytes("PNG", seed=17))
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    resumed = load_manifest(str(out))
    # finished shards were reused, not rewritten
    assert {n: (out / n).stat().st_mtime_ns for n in finished} == finished
    assert not [p for p in out.iterdir() if ".tmp-" in p.name or p.name == RECEIPT_DIR]

    fresh = build_shards(
        str(src / "list.csv"),
        str(tmp_path / "fresh"),
        max_samples=PER_SHARD,
        index=True,
        seed=5,
        progress=False,
    )
    assert resumed.to_json() == fresh.to_json()
    for s in fresh.shards:
        assert filecmp.cmp(out / s.name, tmp_path / "fresh" / s.name, shallow=False)
        assert filecmp.cmp(out / s.index, tmp_path / "fresh" / s.index, shallow=False)


def test_max_bytes_build_resumes_from_receipts(tmp_path, monkeypatch):
    """With --max-bytes the main process numbers the shards; an interrupted run (here: a crash just
    before the manifest) and a lost shard still end with the uninterrupted run's manifest."""
    import pytest

    from pipeline.shards import build

    kwargs = dict(max_samples=50, max_bytes=40_000, index=True, seed=2, progress=False)
    reference = build_shards("builtin:digits?split=val", str(tmp_path / "ref"), **kwargs)
    out = tmp_path / "out"

    def crash(*args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "save_manifest", crash)
    with pytest.raises(KeyboardInterrupt):
        build_shards("builtin:digits?split=val", str(out), **kwargs)
    monkeypatch.undo()
    assert not (out / "manifest.json").exists() and len(list((out / RECEIPT_DIR).glob("chunk-*.json"))) == 4
    receipts = [json.loads(p.read_text()) for p in sorted((out / RECEIPT_DIR).glob("chunk-*.json"))]
    lost = receipts[1]["shards"][1]["name"]  # chunk 1 is rebuilt whole, the others are reused
    (out / lost).unlink()
    kept = {
        s["name"]: (out / s["name"]).stat().st_mtime_ns
        for r in receipts
        if r["chunk"] != 1
        for s in r["shards"]
    }
    resumed = build_shards("builtin:digits?split=val", str(out), **kwargs)
    assert resumed.to_json() == reference.to_json()
    assert {n: (out / n).stat().st_mtime_ns for n in kept} == kept
    assert filecmp.cmp(out / lost, tmp_path / "ref" / lost, shallow=False)
