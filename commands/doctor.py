"""``relic doctor``: what this node offers and whether relic-ssl can run here.

    relic doctor                                       versions, CUDA/GPUs, DALI, NCCL, /dev/shm
    relic doctor --address 10.0.0.1:6379               ... plus the Ray cluster's nodes and resources
    relic doctor --url s3://bucket/shards --endpoint-url http://minio:9000
                                                       ... plus whether the shards are readable

Every check prints one line, ``OK``, ``WARN`` or ``FAIL``, and for WARN/FAIL the fix. The exit code is
1 when any check FAILs, so the command can gate a job (``relic doctor && relic train ...``) or serve as
a container's readiness probe. ``--json`` prints the same results as a JSON list.

GPU requirements, from the pinned dependency set: torch 2.14.1+cu130 and nvidia-dali-cuda130 2.4 use
CUDA 13.0, which needs an NVIDIA driver >= 580 (CUDA 13.0 release notes, "CUDA Toolkit and
Corresponding Driver Versions") and a GPU of compute capability >= 7.5 (Turing or newer: CUDA 13
dropped Maxwell, Pascal and Volta; torch's cu130 wheels are built for sm_75 and up). bf16 training
needs compute capability >= 8.0 (Ampere).
"""

from __future__ import annotations

import argparse
import ctypes
import importlib.metadata
import io
import json
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

OK, WARN, FAIL = "OK", "WARN", "FAIL"

DIST_NAME = "relic-ssl"
CUDA_MAJOR_REQUIRED = 13  # torch 2.14.1+cu130, nvidia-dali-cuda130
DRIVER_FIX = "install NVIDIA driver >= 580 (CUDA 13.0)"
MIN_COMPUTE_CAPABILITY = (7, 5)
SHM_MIN_BYTES = 1 << 30

# The packages whose versions the doctor reports one per line (distribution name, import name).
REPORTED_PACKAGES = (
    ("torch", "torch"),
    ("torchvision", "torchvision"),
    ("nvidia-dali-cuda130", "nvidia.dali"),
    ("ray", "ray"),
)


@dataclass
class Check:
    name: str
    status: str  # OK | WARN | FAIL
    detail: str
    fix: str = ""


# --------------------------------------------------------------------------------------------------
# Versions


def _requirements() -> dict[str, str]:
    """The installed project's dependency ranges, ``{normalised name: specifier}`` (not the extras)."""
    from packaging.requirements import Requirement

    try:
        reqs = importlib.metadata.requires(DIST_NAME) or []
    except importlib.metadata.PackageNotFoundError:
        return {}
    out = {}
    for line in reqs:
        req = Requirement(line)
        if req.marker is None:
            out[_normalise(req.name)] = str(req.specifier)
    return out


def _normalise(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _requires_python() -> str | None:
    try:
        return importlib.metadata.metadata(DIST_NAME)["Requires-Python"]
    except importlib.metadata.PackageNotFoundError:
        return None


def check_python() -> Check:
    from packaging.specifiers import SpecifierSet

    version = platform.python_version()
    spec = _requires_python()
    if spec is None:
        return Check(
            "python",
            WARN,
            f"{version} ({sys.executable}); {DIST_NAME} is not installed in this environment",
            "pip install -c requirements/constraints.txt .",
        )
    if version not in SpecifierSet(spec):
        return Check("python", FAIL, f"{version}, {DIST_NAME} needs {spec}", f"use a Python {spec}")
    return Check("python", OK, f"{version} ({sys.executable})")


def check_package(dist: str, module: str, ranges: dict[str, str]) -> Check:
    """Installed version of ``dist`` against the project's range, and whether ``module`` imports."""
    from packaging.specifiers import SpecifierSet

    fix = f'pip install -c requirements/constraints.txt "{dist}"'
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return Check(dist, FAIL, "not installed", fix)
    try:
        __import__(module)
    except Exception as e:  # a broken install (missing shared library, ABI mismatch) lands here
        return Check(dist, FAIL, f"{version} installed but `import {module}` fails: {e}", fix)
    spec = ranges.get(_normalise(dist))
    if spec and version not in SpecifierSet(spec, prereleases=True):
        return Check(dist, WARN, f"{version}, outside the tested range {spec}", fix)
    return Check(dist, OK, version)


def check_other_dependencies(ranges: dict[str, str]) -> Check:
    """The rest of the project's dependencies in one line (only problems are named)."""
    from packaging.specifiers import SpecifierSet

    reported = {_normalise(d) for d, _ in REPORTED_PACKAGES}
    problems = []
    for name, spec in sorted(ranges.items()):
        if name in reported:
            continue
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{name} missing")
            continue
        if spec and version not in SpecifierSet(spec, prereleases=True):
            problems.append(f"{name} {version} not in {spec}")
    if not ranges:
        return Check(
            "dependencies",
            WARN,
            f"{DIST_NAME} is not installed",
            "pip install -c requirements/constraints.txt .",
        )
    if problems:
        return Check(
            "dependencies", FAIL, "; ".join(problems), "pip install -c requirements/constraints.txt ."
        )
    return Check(
        "dependencies", OK, f"{len(ranges) - len(reported & set(ranges))} others within pyproject ranges"
    )


# --------------------------------------------------------------------------------------------------
# CUDA, GPUs, DALI, NCCL, shared memory


def cuda_driver_version() -> int | None:
    """The CUDA version the installed NVIDIA driver supports (e.g. 13000 for 13.0); None without one.

    Asked of ``libcuda`` directly (``cuDriverGetVersion``), so that it works when torch cannot."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int(0)
    if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return None
    return version.value


def check_driver() -> Check:
    version = cuda_driver_version()
    if version is None:
        return Check(
            "nvidia driver",
            WARN,
            "no NVIDIA driver found (libcuda.so.1): CPU only",
            f"on a GPU node: {DRIVER_FIX}; in Docker run with --gpus all; in Kubernetes request nvidia.com/gpu",
        )
    major, minor = version // 1000, version % 1000 // 10
    if major < CUDA_MAJOR_REQUIRED:
        return Check(
            "nvidia driver", FAIL, f"supports CUDA {major}.{minor}, torch/DALI need CUDA 13.0", DRIVER_FIX
        )
    return Check("nvidia driver", OK, f"supports CUDA {major}.{minor}")


def check_torch_cuda() -> list[Check]:
    """CUDA as torch sees it: build, devices, compute capability, bf16."""
    import torch

    if torch.version.cuda is None:
        return [
            Check(
                "torch cuda",
                WARN,
                f"torch {torch.__version__} is a CPU-only build",
                "pip install -c requirements/constraints.txt . (the pinned torch is the CUDA 13.0 build)",
            )
        ]
    if not torch.cuda.is_available():
        return [
            Check(
                "torch cuda",
                WARN,
                f"built for CUDA {torch.version.cuda}, but no GPU is visible: training runs on CPU",
                f"{DRIVER_FIX}; check CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')}",
            )
        ]
    checks = []
    count = torch.cuda.device_count()
    for i in range(count):
        props = torch.cuda.get_device_properties(i)
        cap = (props.major, props.minor)
        detail = f"{props.name}, compute {cap[0]}.{cap[1]}, {props.total_memory / 2**30:.0f} GiB"
        if cap < MIN_COMPUTE_CAPABILITY:
            checks.append(
                Check(
                    f"gpu {i}",
                    FAIL,
                    f"{detail}: CUDA 13 builds need compute capability >= 7.5",
                    "use a Turing-or-newer GPU (T4, A10, A100, L4, H100, ...)",
                )
            )
        else:
            checks.append(Check(f"gpu {i}", OK, detail))
    bf16 = torch.cuda.is_bf16_supported()
    checks.insert(
        0,
        Check(
            "torch cuda",
            OK if bf16 else WARN,
            f"CUDA {torch.version.cuda}, {count} GPU(s) visible" + ("" if bf16 else ", no bf16 support"),
            "" if bf16 else "train in fp32/fp16 (bf16 needs compute capability >= 8.0)",
        ),
    )
    return checks


def _tiny_jpeg() -> bytes:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 127, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def decode_one_image(device: str) -> tuple[int, ...]:
    """Decode one JPEG with a one-operator DALI pipeline (``device``: "cpu" or "mixed") -> HWC shape."""
    import numpy as np
    from nvidia.dali import fn, pipeline_def, types

    data = np.frombuffer(_tiny_jpeg(), np.uint8)

    @pipeline_def(batch_size=1, num_threads=1, device_id=0 if device == "mixed" else None)
    def one_image():
        encoded = fn.external_source(source=lambda: [data], batch=True)
        return fn.decoders.image(encoded, device=device, output_type=types.RGB)

    pipe = one_image()
    pipe.build()
    (out,) = pipe.run()
    if device == "mixed":
        out = out.as_cpu()
    return tuple(np.asarray(out[0]).shape)


def check_dali() -> list[Check]:
    import nvidia.dali.backend as dali_backend

    checks = []
    try:
        shape = decode_one_image("cpu")
        checks.append(Check("dali cpu", OK, f"decoded a test JPEG on the CPU -> {shape}"))
    except Exception as e:
        checks.append(
            Check(
                "dali cpu", FAIL, f"CPU pipeline failed: {e}", "pip install -c requirements/constraints.txt ."
            )
        )
    try:
        gpus = dali_backend.GetCUDADeviceCount()
    except Exception:
        gpus = 0
    if gpus == 0:
        checks.append(
            Check(
                "dali gpu",
                WARN,
                "no GPU visible to DALI: the loader uses DALI's CPU operators",
                f"on a GPU node: {DRIVER_FIX}",
            )
        )
        return checks
    try:
        shape = decode_one_image("mixed")
        checks.append(
            Check("dali gpu", OK, f"{gpus} GPU(s); decoded a test JPEG with the mixed decoder -> {shape}")
        )
    except Exception as e:
        checks.append(
            Check("dali gpu", FAIL, f"{gpus} GPU(s) but the mixed-decoder pipeline failed: {e}", DRIVER_FIX)
        )
    return checks


def check_nccl() -> Check:
    import torch
    import torch.distributed as dist

    gpu = torch.cuda.is_available()
    if not (dist.is_available() and dist.is_nccl_available()):
        fix = "install the CUDA build of torch: pip install -c requirements/constraints.txt ."
        if gpu:
            return Check("nccl", FAIL, "torch was built without NCCL: multi-GPU training cannot run", fix)
        return Check("nccl", WARN, "torch was built without NCCL (CPU workers use gloo)", fix)
    try:
        version = ".".join(str(v) for v in torch.cuda.nccl.version())
    except Exception:
        version = "available"
    if not gpu:
        return Check(
            "nccl",
            WARN,
            f"NCCL {version} built in, but no GPU: workers use gloo",
            f"on a GPU node: {DRIVER_FIX}",
        )
    return Check("nccl", OK, f"NCCL {version}")


def check_shm(path: str = "/dev/shm") -> Check:
    """DALI and NCCL put buffers in shared memory; Docker's default /dev/shm is only 64 MiB."""
    if not os.path.isdir(path):
        return Check("shared memory", WARN, f"{path} does not exist", "mount a tmpfs at /dev/shm")
    total = shutil.disk_usage(path).total
    detail = f"{path} {total / 2**30:.1f} GiB"
    if total < SHM_MIN_BYTES:
        return Check(
            "shared memory",
            WARN,
            f"{detail}: too small for NCCL and DALI with several workers",
            "docker run --shm-size=16g (compose: shm_size); Kubernetes: emptyDir {medium: Memory} at /dev/shm",
        )
    return Check("shared memory", OK, detail)


# --------------------------------------------------------------------------------------------------
# Ray cluster


def check_ray(address: str | None, timeout: float) -> Check:
    """Nodes and resources of the cluster at ``address`` (GCS ``host:port``, ``auto``, ``ray://`` or the
    dashboard's ``http://host:8265``), asked in a child process so that a hung connection is killed
    after ``timeout`` seconds and this process never joins the cluster."""
    if not address:
        return Check(
            "ray cluster", OK, "no --address or RAY_ADDRESS: `relic train` starts a local Ray instance"
        )
    fix = (
        "run on a cluster node, or pass the dashboard address (http://HEAD:8265) or ray://HEAD:10001; "
        "check that the head is up (`ray status`) and that the Ray versions match; a head started with "
        "Ray's token authentication needs RAY_AUTH_MODE=token here too (the token is read from "
        "~/.ray/auth_token or RAY_AUTH_TOKEN_PATH), also for `ray job submit`"
    )
    cmd = [sys.executable, "-c", "import sys, commands.doctor as d; d._ray_probe_main(sys.argv[1])", address]
    # The probe connects to `address`, never to an inherited RAY_ADDRESS, and imports this very module
    # (also from a source checkout that is not installed).
    source_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {
        **os.environ,
        "RAY_ADDRESS": "",
        "PYTHONPATH": os.pathsep.join(filter(None, [source_root, os.environ.get("PYTHONPATH")])),
    }
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return Check("ray cluster", FAIL, f"{address}: no answer within {timeout:g} s", fix)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return Check("ray cluster", FAIL, f"{address}: cannot connect: {err}", fix)
    report = json.loads(lines[-1])
    nodes = report["nodes"]
    total: dict[str, float] = {}
    for node in nodes:
        for key, value in node["resources"].items():
            total[key] = total.get(key, 0) + value
    gpus = total.get("GPU", 0)
    mem = total.get("memory", 0) / 2**30
    detail = (
        f"{address}: {len(nodes)} node(s) alive, {total.get('CPU', 0):g} CPU, {gpus:g} GPU, {mem:.0f} GiB; "
        + ", ".join(
            f"{n['ip']} ({n['resources'].get('CPU', 0):g} CPU, {n['resources'].get('GPU', 0):g} GPU)"
            for n in nodes
        )
    )
    if not nodes:
        return Check("ray cluster", FAIL, f"{address}: no node alive", fix)
    if gpus == 0:
        return Check(
            "ray cluster",
            WARN,
            detail + "; no GPUs: GPU configs (scaling.use_gpu) will wait for GPU nodes forever",
            "add GPU worker nodes, or train with a CPU config",
        )
    return Check("ray cluster", OK, detail)


def _ray_probe_main(address: str) -> None:
    """Child-process side of :func:`check_ray`: print one JSON line ``{"nodes": [{ip, resources}]}``."""
    if address.startswith(("http://", "https://")):
        from ray.util.state import list_nodes

        nodes = [
            {"ip": n.node_ip, "resources": dict(n.resources_total)}
            for n in list_nodes(address=address, detail=True, raise_on_missing_output=False)
            if n.state == "ALIVE"
        ]
    else:
        import ray

        kwargs = {}
        host = address.split("://", 1)[-1].rsplit(":", 1)[0]
        if host in ("127.0.0.1", "localhost"):  # a loopback-only cluster: join it on loopback too
            kwargs["_node_ip_address"] = "127.0.0.1"
        ray.init(address=address, logging_level="ERROR", log_to_driver=False, **kwargs)
        nodes = [
            {"ip": n["NodeManagerAddress"], "resources": n["Resources"]} for n in ray.nodes() if n["Alive"]
        ]
        ray.shutdown()
    print(json.dumps({"nodes": nodes}), flush=True)


# --------------------------------------------------------------------------------------------------
# Storage


def check_storage(url: str, endpoint_url: str | None, timeout: float) -> list[Check]:
    """Whether ``url`` (a shard directory, a manifest, any file or prefix; local or s3://) can be listed
    and read: loads ``manifest.json`` when there is one and reads the first shard's first tar header.

    The whole check, all its requests together, ends within ``timeout`` seconds: an endpoint that
    accepts connections but never answers is a FAIL, not a hang (``pipeline.storage.S3_CONFIG`` bounds
    each request, ``call_with_deadline`` the sum)."""
    from pipeline import storage

    opts = storage.storage_options(url, endpoint_url=endpoint_url)
    where = url + (f" (endpoint {opts['endpoint_url']})" if opts.get("endpoint_url") else "")
    try:
        return storage.call_with_deadline(timeout, _probe_storage, url, opts, where)
    except storage.DeadlineExceeded:
        return [
            Check(
                "storage",
                FAIL,
                f"{where}: no answer within {timeout:g} s",
                "check --endpoint-url and the network: the endpoint accepts connections or drops "
                "them silently but never answers (a stopped server behind a proxy or a load balancer, "
                "a firewall); raise --timeout for a slow store",
            )
        ]


def _probe_storage(url: str, opts: dict, where: str) -> list[Check]:
    """``check_storage`` without its deadline."""
    from pipeline import storage
    from pipeline.shards import manifest as manifest_mod
    from pipeline.shards.index import is_shard_name

    name = "storage"
    try:
        fs, path = storage.filesystem(url, opts)
        if not fs.exists(path):
            return [_missing(fs, path, url, where)]
        if fs.isdir(path):
            entries = fs.ls(path, detail=False)
            names = [e.rstrip("/").rsplit("/", 1)[-1] for e in entries]
            if manifest_mod.MANIFEST_NAME not in names:
                tars = sum(is_shard_name(n) for n in names)
                if tars:
                    return [
                        Check(
                            name,
                            WARN,
                            f"{where}: {tars} shards but no {manifest_mod.MANIFEST_NAME}",
                            f"relic shards index {url}",
                        )
                    ]
                return [Check(name, OK, f"{where}: listable, {len(entries)} entries")]
            manifest_url = storage.join(url, manifest_mod.MANIFEST_NAME)
        elif url.endswith(".json"):
            manifest_url = url
        else:
            with storage.open_url(url, "rb", opts) as f:
                head = f.read(512)
            return [Check(name, OK, f"{where}: readable ({len(head)} bytes read)")]
        return [_check_shards(manifest_url, opts, where)]
    except PermissionError as e:
        return [Check(name, FAIL, f"{where}: access denied ({e})", _credentials_fix(url))]
    except Exception as e:
        kind = type(e).__name__
        if kind == "NoCredentialsError":
            return [Check(name, FAIL, f"{where}: no S3 credentials found", _credentials_fix(url))]
        if kind in ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionError", "ReadTimeoutError"):
            return [
                Check(
                    name, FAIL, f"{where}: endpoint unreachable ({e})", "check --endpoint-url and the network"
                )
            ]
        return [
            Check(
                name, FAIL, f"{where}: {kind}: {e}", _credentials_fix(url) if storage.is_remote(url) else ""
            )
        ]


def _credentials_fix(url: str) -> str:
    from pipeline import storage

    if storage.protocol(url) != "s3":
        return "check the path and its permissions"
    return (
        "set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or an instance role) and "
        "--endpoint-url / RELIC_S3_ENDPOINT_URL for S3-compatible stores"
    )


def _missing(fs, path: str, url: str, where: str) -> Check:
    from pipeline import storage

    if storage.protocol(url) == "s3":
        bucket = path.split("/", 1)[0]
        try:
            fs.invalidate_cache()
            bucket_exists = fs.exists(bucket)
        except Exception:
            bucket_exists = False
        if not bucket_exists:
            return Check(
                "storage",
                FAIL,
                f"{where}: bucket {bucket!r} does not exist or is not visible with these credentials",
                "check the bucket name, the endpoint (--endpoint-url) and the credentials",
            )
    return Check("storage", FAIL, f"{where}: not found", "check the path (relic shards build writes it)")


def _check_shards(manifest_url: str, opts: dict, where: str) -> Check:
    from pipeline.shards.format import TarFormatError, first_samples
    from pipeline.shards.manifest import load_manifest

    try:
        manifest = load_manifest(manifest_url, opts)
    except Exception as e:
        return Check(
            "storage", FAIL, f"{manifest_url}: not a valid manifest: {e}", "rebuild or re-index the shards"
        )
    summary = f"{where}: manifest with {len(manifest.shards)} shards, {manifest.total_samples} samples"
    if not manifest.shards:
        return Check("storage", WARN, summary, "the manifest lists no shards: rebuild them")
    first = manifest.shard_url(0)
    try:
        found = first_samples(first, 1, opts)
    except FileNotFoundError:
        return Check(
            "storage", FAIL, f"{summary}; first shard {first} is missing", "rebuild or re-upload the shards"
        )
    except TarFormatError as e:
        return Check(
            "storage",
            FAIL,
            f"{summary}; {first} is not a tar file, or a damaged one ({e})",
            f"relic shards verify {where.split()[0]}",
        )
    if not found:
        return Check("storage", FAIL, f"{summary}; {first} holds no sample", "rebuild or re-index the shards")
    return Check("storage", OK, f"{summary}; first shard readable")


# --------------------------------------------------------------------------------------------------
# Command


def run_checks(
    address: str | None = None, url: str | None = None, endpoint_url: str | None = None, timeout: float = 20.0
) -> Iterator[Check]:
    """Every check, in the order printed. Each is isolated: one crashing check becomes a FAIL line."""
    steps: list[tuple[str, Callable[[], Check | list[Check]]]] = [("python", check_python)]
    ranges = _requirements()
    for dist, module in REPORTED_PACKAGES:
        steps.append((dist, lambda d=dist, m=module: check_package(d, m, ranges)))
    steps += [
        ("dependencies", lambda: check_other_dependencies(ranges)),
        ("nvidia driver", check_driver),
        ("torch cuda", check_torch_cuda),
        ("dali", check_dali),
        ("nccl", check_nccl),
        ("shared memory", check_shm),
        ("ray cluster", lambda: check_ray(address, timeout)),
    ]
    if url:
        steps.append(("storage", lambda: check_storage(url, endpoint_url, timeout)))
    for name, step in steps:
        try:
            result = step()
        except Exception as e:
            result = Check(name, FAIL, f"check crashed: {type(e).__name__}: {e}", "report this as a bug")
        yield from result if isinstance(result, list) else [result]


def format_check(check: Check) -> str:
    line = f"{check.status:<4}  {check.name:<20} {check.detail}"
    if check.fix and check.status != OK:
        line += f"\n      fix: {check.fix}"
    return line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--address",
        default=os.environ.get("RAY_ADDRESS") or None,
        help="Ray cluster to inspect: host:port (GCS), auto, ray://host:10001 or http://host:8265 "
        "(default: $RAY_ADDRESS; none: skip)",
    )
    parser.add_argument(
        "--url", help="shard or storage URL to test for reading: a local path or s3://bucket/prefix"
    )
    parser.add_argument(
        "--endpoint-url",
        help="S3-compatible endpoint (MinIO, Ceph); default: $RELIC_S3_ENDPOINT_URL / $AWS_ENDPOINT_URL",
    )
    parser.add_argument(
        "--timeout", type=float, default=20.0, help="seconds allowed for each of the Ray and storage checks"
    )
    parser.add_argument("--json", action="store_true", help="print the results as a JSON list")


def run(args: argparse.Namespace) -> int:
    checks = []
    for check in run_checks(args.address, args.url, args.endpoint_url, args.timeout):
        checks.append(check)
        if not args.json:
            print(format_check(check), flush=True)
    counts = {s: sum(c.status == s for c in checks) for s in (OK, WARN, FAIL)}
    if args.json:
        print(json.dumps([asdict(c) for c in checks], indent=2))
    else:
        print(f"doctor: {counts[OK]} OK, {counts[WARN]} WARN, {counts[FAIL]} FAIL")
    return 1 if counts[FAIL] else 0
