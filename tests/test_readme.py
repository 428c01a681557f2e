"""README.md's shell commands, run as written, so that the README cannot drift from the code.

Every fenced ``bash`` block of README.md runs here, in README order, as one ``bash -euo pipefail``
script per block, in a fresh working directory that holds a copy of ``configs/`` and the example
inputs the README's commands name under ``data/`` (a small ImageFolder tree, a CSV list, two shards
made with GNU tar). S3 buckets are buckets of a moto S3 server on loopback: ``RELIC_S3_ENDPOINT_URL``
points at it and the README's MinIO address (``http://127.0.0.1:9000``) is replaced by it. ``HOME`` is
a temporary directory, so nothing the commands write (Ray's token, caches) touches the user's.

A block may be left out only by a marker on the line above it,
``<!-- readme-test: skip REASON -->``, where REASON is one of ``SKIP_REASONS``: it needs a GPU, Docker
or a cloud account, or it is this test suite itself, or it is ``make demo`` (six minutes; the same
code runs reduced in tests/cluster/test_demo.py).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support import run_bounded

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BIN = Path(sys.executable).parent
MINIO = "http://127.0.0.1:9000"
SKIP_REASONS = {
    "gpu": re.compile(r"imagenet_r50|--gpus|use_gpu=true", re.I),
    "docker": re.compile(r"\bdocker\b"),
    "cloud": re.compile(r"\bkubectl\b|\bray up\b|\baws\b|head:8265"),
    "suite": re.compile(r"^make test\b", re.M),
    "demo": re.compile(r"^make demo\b", re.M),
}
BLOCK = re.compile(
    r"(?:<!--\s*readme-test:\s*skip\s+(?P<reason>\w+)\s*-->\s*\n)?```(?P<lang>[\w-]*)\n(?P<body>.*?)^```",
    re.S | re.M,
)
pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.s3, pytest.mark.timeout(1500)]


def blocks() -> list[tuple[str | None, str]]:
    """``(skip reason or None, script)`` of every bash block of README.md, in order."""
    return [(m["reason"], m["body"]) for m in BLOCK.finditer(README.read_text()) if m["lang"] == "bash"]


def test_every_skipped_block_needs_what_its_reason_says():
    found = blocks()
    assert len(found) >= 6
    for reason, body in found:
        if reason is None:
            continue
        assert reason in SKIP_REASONS, f"unknown skip reason {reason!r} before:\n{body}"
        assert SKIP_REASONS[reason].search(body), f"the block does not need {reason}:\n{body}"
    assert sum(reason is None for reason, _ in found) >= 4


def _jpeg(seed: int, size=(96, 72)) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(small).resize(size, Image.BILINEAR).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _example_inputs(work: Path) -> None:
    """The inputs README.md's examples name: ``data/imagenet/train`` (ImageFolder, two classes),
    ``data/masks`` (saliency masks for half of its images), ``data/images.csv`` (path,label),
    ``data/laion/00000{0,1}.tar`` (img2dataset-style shards)."""
    for c, wnid in enumerate(("n01440764", "n01443537")):
        folder = work / "data" / "imagenet" / "train" / wnid
        folder.mkdir(parents=True)
        for i in range(24):
            (folder / f"{wnid}_{i}.JPEG").write_bytes(_jpeg(100 * c + i))
    # saliency masks (8-bit grey PNG, a quarter of the image's size) for half of the tree's images,
    # at the images' relative paths: the other half has none (counted, trained unmasked)
    for image in sorted((work / "data" / "imagenet" / "train").rglob("*.JPEG"))[::2]:
        mask = np.zeros((18, 24), np.uint8)
        mask[4:14, 6:18] = 255
        target = work / "data" / "masks" / image.parent.name / f"{image.stem}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(target)
    rows = ["path,label"] + [
        f"imagenet/train/{p.parent.name}/{p.name},{p.parent.name}"
        for p in sorted((work / "data" / "imagenet" / "train").rglob("*.JPEG"))
    ]
    (work / "data" / "images.csv").write_text("\n".join(rows) + "\n")
    laion = work / "data" / "laion"
    laion.mkdir()
    for s in range(2):
        with tarfile.open(laion / f"{s:06d}.tar", "w", format=tarfile.GNU_FORMAT) as tar:
            for i in range(10):
                key = f"{s:05d}{i:04d}"
                for ext, data in (("jpg", _jpeg(1000 + 10 * s + i)), ("txt", b"a caption"), ("json", b"{}")):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def _buckets(scripts: list[str]) -> set[str]:
    return {m for s in scripts for m in re.findall(r"s3://([a-z0-9][a-z0-9.-]+)", s)}


def test_readme_commands_run_as_written(tmp_path, s3_server):
    import s3fs

    runnable = [body for reason, body in blocks() if reason is None]
    work, home = tmp_path / "work", tmp_path / "home"
    home.mkdir()
    shutil.copytree(REPO / "configs", work / "configs")
    _example_inputs(work)
    fs = s3fs.S3FileSystem(endpoint_url=s3_server)
    for bucket in _buckets(runnable):
        fs.mkdir(bucket)
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "HOME": str(home),
        "RELIC_S3_ENDPOINT_URL": s3_server,
        "RAY_ADDRESS": "",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("RAY_ADDRESS")
    for n, body in enumerate(runnable):
        script = "set -euo pipefail\n" + body.replace(MINIO, s3_server)
        try:
            result, _ = run_bounded(["bash", "-c", script], cwd=work, env=env, timeout=600, merge_stderr=True)
        finally:
            if "ray start" in body:  # never leave a Ray head behind, whatever the block did
                with contextlib.suppress(OSError, subprocess.SubprocessError):
                    subprocess.run(
                        [str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=60
                    )
        out = result.stdout
        assert result.returncode == 0, (
            f"README block {n + 1} failed ({result.returncode}):\n{body}\n--- output:\n{out[-6000:]}"
        )
        if "ray job submit" in body:  # the CLI's exit code alone does not say how the job ended
            assert re.search(r"Job '[\w-]+' succeeded", out), out[-6000:]
            assert "relic train: done at step" in out, out[-6000:]
