"""Helpers shared by the test packages: a command run the way a user runs it, bounded in time (so that
nothing it starts, a local Ray instance included, outlives the test); a local Ray instance for a test
module; a small training state; the worker loop run in the test's process."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator, Sequence
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


def local_ray(num_cpus: int = 2):
    """A local Ray instance for a test module, started as ``relic train`` starts one (on loopback)."""
    from cluster.trainer import ray_session

    return ray_session(num_cpus=num_cpus)


def tiny_state(cfg):
    """A fresh ``TrainState`` of ``cfg`` (4 steps per epoch, seed 0), for checkpoint tests."""
    from training.loop import build_train_state

    return build_train_state(
        cfg.model,
        cfg.objective,
        cfg.optim,
        cfg.schedule,
        steps_per_epoch=4,
        global_batch=cfg.data.global_batch_size,
        seed=0,
    )


def run_local(cfg, root: str | Path, hooks: Sequence = ()):
    """``cfg`` trained by the worker loop in this process (``LocalSession``, no Ray) under ``root``;
    returns the session (its ``reports`` and ``run_dir``)."""
    from cluster.session import LocalSession
    from cluster.storage import RunStorage
    from cluster.trainer import worker_spec
    from cluster.worker import run_loop

    storage = RunStorage.from_url(str(root))
    session = LocalSession(storage.run_url(cfg.run.name))
    Path(session.run_dir).mkdir(parents=True, exist_ok=True)
    run_loop(worker_spec(cfg, storage, hooks=hooks, sha="test"), session)
    return session


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def gloo_group(rank: int, world: int, port: int) -> Iterator[None]:
    """Inside a spawned test worker: a gloo process group on loopback for the block (one torch thread)."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), GLOO_SOCKET_IFNAME="lo")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        yield
    finally:
        dist.destroy_process_group()


def spawn_workers(target, world: int, *args, timeout: float = 240) -> None:
    """``target(rank, port, *args)`` in ``world`` spawned processes sharing a free port; each must exit
    0 within ``timeout`` seconds (one that does not is killed and the call fails)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=target, args=(rank, port, *args)) for rank in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0] * world, "a gloo worker failed or timed out (see its stderr)"
