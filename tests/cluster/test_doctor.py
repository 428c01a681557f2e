"""`relic doctor` on this CPU-only machine: GPU lines WARN (never crash), storage and Ray checks against
real endpoints (a local directory, the moto S3 server, a loopback Ray instance), exit code 1 on FAIL."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile

import pytest

from commands import cli, doctor
from pipeline import storage
from pipeline.shards.manifest import Manifest, ShardInfo, save_manifest


def _tar_bytes(n: int = 2) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(n):
            for ext, payload in (("jpg", doctor._tiny_jpeg()), ("cls", b"0")):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def write_shard_set(url: str, options: dict | None = None, payload: bytes | None = None) -> None:
    """One shard and its manifest at ``url`` (local dir or s3://), the layout `relic shards build` makes."""
    payload = _tar_bytes() if payload is None else payload
    fs, path = storage.filesystem(url, options)
    fs.makedirs(path, exist_ok=True)
    fs.pipe_file(path.rstrip("/") + "/shard-000000.tar", payload)
    info = ShardInfo(
        "shard-000000.tar", samples=2, bytes=len(payload), sha256=hashlib.sha256(payload).hexdigest()
    )
    save_manifest(Manifest(shards=[info], classes=["a"]), url, options)


def by_name(checks):
    return {c.name: c for c in checks}


def test_cpu_node_reports_every_line_and_gpu_lines_warn(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    write_shard_set(str(tmp_path / "shards"))
    rc = cli.main(["doctor", "--json", "--url", str(tmp_path / "shards")])
    checks = {c["name"]: c for c in json.loads(capsys.readouterr().out)}
    assert rc == 0
    for name in ("python", "torch", "torchvision", "nvidia-dali-cuda130", "ray", "dali cpu", "storage"):
        assert checks[name]["status"] == "OK", checks[name]
    # No GPU here: every GPU-related line is a WARN that says how to fix it, never a FAIL or a crash.
    for name in ("nvidia driver", "torch cuda", "dali gpu", "nccl"):
        assert checks[name]["status"] == "WARN", checks[name]
        assert "580" in checks[name]["fix"]
    assert checks["torch"]["detail"] == __import__("importlib.metadata").metadata.version("torch")
    assert "1 shards, 2 samples" in checks["storage"]["detail"]


def test_any_fail_makes_the_exit_code_nonzero(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    rc = cli.main(["doctor", "--url", str(tmp_path / "nowhere")])
    out = capsys.readouterr().out
    assert rc == 1
    line = next(ln for ln in out.splitlines() if ln.startswith("FAIL"))
    assert "storage" in line and "not found" in line
    assert "fix:" in out.split(line, 1)[1].splitlines()[1]
    assert out.strip().endswith("1 FAIL")


def test_local_storage_problems(tmp_path):
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "shard-000000.tar").write_bytes(_tar_bytes())
    check = doctor.check_storage(str(tmp_path / "bare"), None, 5)[0]
    assert check.status == "WARN" and "relic shards index" in check.fix

    write_shard_set(str(tmp_path / "broken"), payload=b"not a tar file" * 100)
    check = doctor.check_storage(str(tmp_path / "broken"), None, 5)[0]
    assert check.status == "FAIL" and "not a tar file" in check.detail

    write_shard_set(str(tmp_path / "gzipped"), payload=gzip.compress(_tar_bytes()))  # the reader reads these
    check = doctor.check_storage(str(tmp_path / "gzipped"), None, 5)[0]
    assert check.status == "OK" and "first shard readable" in check.detail, check

    write_shard_set(str(tmp_path / "ok"))
    assert doctor.check_storage(str(tmp_path / "ok" / "manifest.json"), None, 5)[0].status == "OK"
    (tmp_path / "ok" / "shard-000000.tar").unlink()
    check = doctor.check_storage(str(tmp_path / "ok"), None, 5)[0]
    assert check.status == "FAIL" and "missing" in check.detail


@pytest.mark.s3
def test_s3_shards_readable_and_missing_bucket(s3_server, s3_options, s3_bucket):
    url = f"{s3_bucket}/imagenet/train"
    write_shard_set(url, s3_options)
    ok = doctor.check_storage(url, s3_server, 10)[0]
    assert ok.status == "OK", ok
    assert "1 shards, 2 samples" in ok.detail and s3_server in ok.detail

    missing = doctor.check_storage("s3://relic-no-such-bucket-1234/shards", s3_server, 10)[0]
    assert missing.status == "FAIL"
    assert "'relic-no-such-bucket-1234' does not exist" in missing.detail
    assert "bucket name" in missing.fix

    key_missing = doctor.check_storage(f"{s3_bucket}/nothing/here", s3_server, 10)[0]
    assert key_missing.status == "FAIL" and "not found" in key_missing.detail


@pytest.mark.ray
def test_ray_cluster_nodes_and_resources():
    import ray

    # address="local": always a fresh instance, never a cluster someone left running on this machine
    ray.init(
        address="local",
        num_cpus=1,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        logging_level="ERROR",
    )
    try:
        address = ray.get_runtime_context().gcs_address
        check = doctor.check_ray(address, timeout=30)
    finally:
        ray.shutdown()
    # One CPU-only node: reachable, but a GPU config would wait forever -> WARN with the fix.
    assert check.status == "WARN", check
    assert "1 node(s) alive, 1 CPU, 0 GPU" in check.detail
    assert check.detail.startswith(address) and address.rsplit(":", 1)[0] in check.detail.split(";")[1]
    assert "GPU" in check.fix


@pytest.mark.ray
def test_ray_unreachable_fails_within_the_timeout():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    check = doctor.check_ray(f"127.0.0.1:{port}", timeout=2)
    assert check.status == "FAIL" and "127.0.0.1" in check.detail and "RAY_AUTH_MODE=token" in check.fix


def test_no_address_is_not_a_problem():
    assert doctor.check_ray(None, timeout=1).status == "OK"


@pytest.mark.parametrize(
    ("driver", "status"), [(None, "WARN"), (12080, "FAIL"), (13000, "OK"), (13020, "OK")]
)
def test_driver_must_support_cuda_13(monkeypatch, driver, status):
    monkeypatch.setattr(doctor, "cuda_driver_version", lambda: driver)
    check = doctor.check_driver()
    assert check.status == status
    if status == "FAIL":
        assert "12.8" in check.detail and "580" in check.fix


def test_small_shm_warns(monkeypatch, tmp_path):
    import collections

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(doctor.shutil, "disk_usage", lambda p: usage(64 << 20, 0, 64 << 20))
    check = doctor.check_shm(str(tmp_path))
    assert check.status == "WARN" and "0.1 GiB" in check.detail and "shm-size" in check.fix
    assert doctor.check_shm(str(tmp_path / "absent")).status == "WARN"


def test_package_versions_against_the_project_ranges():
    ranges = doctor._requirements()
    assert ranges["torch"] == ">=2.14,<2.15" or set(ranges["torch"].split(",")) == {">=2.14", "<2.15"}
    assert doctor.check_package("torch", "torch", {"torch": ">=99"}).status == "WARN"
    missing = doctor.check_package("relic-no-such-dist", "relic_no_such_dist", ranges)
    assert missing.status == "FAIL" and "constraints.txt" in missing.fix


def test_a_crashing_check_becomes_a_fail_line(monkeypatch):
    def boom():
        raise RuntimeError("driver exploded")

    monkeypatch.setattr(doctor, "check_driver", boom)
    checks = by_name(doctor.run_checks())
    assert checks["nvidia driver"].status == "FAIL" and "driver exploded" in checks["nvidia driver"].detail


def test_gpu_benchmark_skips_without_cuda(monkeypatch, capsys, tmp_path):
    """`python -m benchmarks.gpu` on a node without CUDA: exit 0, say why, write nothing."""
    import sys
    from pathlib import Path

    import torch

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delitem(sys.modules, "benchmarks.gpu", raising=False)
    from benchmarks import gpu

    out = tmp_path / "gpu.json"
    assert gpu.main(["--quick", "--out", str(out)]) == 0
    assert "gpu benchmark skipped: no CUDA device is visible" in capsys.readouterr().out
    assert not out.exists()


class _FakeProps:
    def __init__(self, name, major, minor):
        self.name, self.major, self.minor, self.total_memory = name, major, minor, 80 * 2**30


def test_gpu_lines_when_torch_sees_gpus(monkeypatch):
    """The GPU branch, with torch's CUDA queries replaced: a Volta GPU FAILs (CUDA 13 needs sm_75+),
    an A100 is OK, and no bf16 support is a WARN."""
    import torch

    gpus = [_FakeProps("Tesla V100", 7, 0), _FakeProps("NVIDIA A100", 8, 0)]
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(gpus))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: gpus[i])
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    checks = by_name(doctor.check_torch_cuda())
    assert checks["torch cuda"].status == "WARN" and "2 GPU(s)" in checks["torch cuda"].detail
    assert checks["gpu 0"].status == "FAIL" and "7.5" in checks["gpu 0"].detail
    assert checks["gpu 1"].status == "OK" and checks["gpu 1"].detail == "NVIDIA A100, compute 8.0, 80 GiB"
    nccl = doctor.check_nccl()
    assert nccl.status == "OK" and nccl.detail.startswith("NCCL 2.")


def test_dali_gpu_failure_is_a_fail_line_not_a_crash(monkeypatch):
    import nvidia.dali.backend

    monkeypatch.setattr(nvidia.dali.backend, "GetCUDADeviceCount", lambda: 1)
    checks = by_name(doctor.check_dali())
    assert checks["dali cpu"].status == "OK"
    # DALI believes in a GPU this machine does not have: the mixed-decoder pipeline fails -> FAIL + fix.
    assert checks["dali gpu"].status == "FAIL" and "mixed-decoder" in checks["dali gpu"].detail
    assert "580" in checks["dali gpu"].fix
