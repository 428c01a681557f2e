"""Running a command the way a user does, bounded in time: tests that start real processes (which may
start a local Ray instance of their own) use this, so that nothing outlives a test."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Sequence
from pathlib import Path


def run_bounded(
    args: Sequence[str], *, cwd: str | Path, env: dict[str, str], timeout: float, merge_stderr: bool = False
) -> tuple[subprocess.CompletedProcess, bool]:
    """``(result, timed_out)`` of ``args`` run in a new process group; on timeout the whole group is
    killed (with anything it started) and the output so far returned. ``merge_stderr``: stderr goes
    into ``result.stdout``."""
    proc = subprocess.Popen(
        list(args),
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
        timed_out = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        timed_out = True
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), timed_out
