"""The cluster entry point as a user runs it: ``ray start --head`` on 127.0.0.1, then the real
``ray job submit --working-dir . -- relic train CONFIG key=value`` CLI; the job must end SUCCEEDED and
its logs must show training steps.

The head runs as ``ray start --block`` in its own process group, with its own ``--temp-dir``; teardown
stops exactly that group (SIGTERM, then SIGKILL) instead of ``ray stop``, which would stop every Ray
instance of this user on the machine, including ones other test sessions started.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TINY = "tests/cluster/tiny.yaml"

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(500)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    port, dashboard = _free_port(), _free_port()
    # A short temp dir: Ray's unix socket paths must stay under ~107 characters.
    temp_dir = tempfile.mkdtemp(prefix="rayjob-", dir="/tmp")
    # Ray's token authentication, with a token of this test's own (not the user's ~/.ray/auth_token):
    # the head, the CLI and the job's driver all read it from RAY_AUTH_TOKEN_PATH.
    token = Path(temp_dir) / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        # keep "127.0.0.1" addresses on loopback (see tests/distributed/test_ray_multinode.py)
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_ADDRESS": "",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
    }
    head = subprocess.Popen(
        [
            str(BIN / "ray"),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={port}",
            "--num-cpus=2",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ],
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if head.poll() is not None:
                raise RuntimeError(f"ray start exited with {head.returncode}")
            try:
                with urllib.request.urlopen(f"{address}/api/version", timeout=5):
                    break
            except urllib.error.HTTPError:
                break  # it answers (401 under Ray's token authentication, which the ray CLI handles)
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("the Ray head's job API did not come up within 180 s")
            time.sleep(1)
        yield address, env
    finally:
        _stop_group(head)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _stop_group(proc: subprocess.Popen) -> None:
    """Stop the process group we started (ray start and everything it spawned): SIGTERM, a grace
    period, then SIGKILL for whatever of the group is left."""
    pgid = proc.pid  # start_new_session: the group id is the leader's pid
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)
    time.sleep(1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    proc.wait(timeout=10)


def _ray(args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "ray"), *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def test_ray_job_submit_runs_relic_train(ray_head, digits_shards, tmp_path):
    address, env = ray_head
    job_id = f"relic-test-{os.getpid()}"
    command = [
        "job",
        "submit",
        f"--address={address}",
        f"--submission-id={job_id}",
        "--working-dir=.",
        "--",
        "relic",
        "train",
        TINY,
        f"data.train={digits_shards}",
        f"run.storage={tmp_path / 'runs'}",
        "run.name=job",
        "run.max_steps=2",
        "run.report_every=1",
    ]
    # The job API answers before the head's job agent has registered; on a loaded machine the
    # first submissions can be refused with "No available agent" (nothing was submitted then).
    deadline = time.monotonic() + 120
    while True:
        submit = _ray(command, env, timeout=400)
        if "No available agent" not in submit.stderr + submit.stdout or time.monotonic() > deadline:
            break
        time.sleep(3)
    status = _ray(["job", "status", f"--address={address}", job_id], env, timeout=60)
    logs = _ray(["job", "logs", f"--address={address}", job_id], env, timeout=60).stdout
    assert f"Job '{job_id}' succeeded" in status.stdout, (
        f"{status.stdout}\n{submit.stdout[-3000:]}\n{submit.stderr[-3000:]}"
    )
    assert submit.returncode == 0
    assert "relic train: git " in logs
    assert "step 1/2" in logs and "step 2/2" in logs, logs[-3000:]
    assert "relic train: done at step 2" in logs
    run_dir = tmp_path / "runs" / "job"
    assert (run_dir / "checkpoint-00000002" / "train_state.pt").exists()
    assert json.loads((run_dir / "run_info.json").read_text())["git_sha"]
