"""Checkpoint on preemption: a worker that gets a termination notice makes the whole group write a
checkpoint at the next step boundary and stop, so that a preempted run loses at most one step.

Two notices count:

- **SIGTERM** to a worker process (what Kubernetes, Slurm or a spot-instance agent sends before the
  kill). Python runs signal handlers on a process's main thread only, and Ray Train runs the training
  function in a thread of its worker actor, so the handler is installed through the actor's
  ``execute`` method, which runs on the main thread (``RaySession.on_main_thread``). The handler only
  notes the notice while a training loop runs in the process; otherwise, and at a second SIGTERM, it
  hands the signal to the handler it replaced (Ray's, which exits the process).
- **Ray's own preemption signal** (``ray.train.get_preemption_info``, Ray 2.60: a node of the worker
  group is being drained, e.g. a spot reclaim announced to Ray). It is a barrier across the workers,
  so the loop asks at its reports only (``run.report_every``).

Every rank must checkpoint at the same step, so the ranks agree on "any rank got a notice" with one
all-reduce of a flag per step. After the checkpoint is committed every rank raises :class:`Preempted`:
Ray Train restarts the group (on the nodes still there; an elastic run with fewer workers) from that
checkpoint. That restart counts against ``run.max_failures``.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import torch

log = logging.getLogger(__name__)

_notice = threading.Event()
_training = threading.Event()
_replaced: dict[str, Any] = {}


class Preempted(RuntimeError):
    """The group stopped after its preemption checkpoint; Ray Train restarts it from there."""


def install_sigterm_notice() -> bool:
    """Note SIGTERM as a termination notice in this process (module doc); call on the main thread.
    Returns whether the handler is installed."""
    if threading.current_thread() is not threading.main_thread():
        return False
    if "handler" not in _replaced:
        _replaced["handler"] = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, _on_sigterm)
    return True


def remove_sigterm_notice() -> None:
    """Put back the SIGTERM handler ``install_sigterm_notice`` replaced; call on the main thread."""
    if "handler" in _replaced and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _replaced.pop("handler"))


def _on_sigterm(signum: int, frame: Any) -> None:
    if _training.is_set() and not _notice.is_set():
        _notice.set()
        log.warning("SIGTERM: the worker group checkpoints at the next step boundary, then stops")
        return
    previous = _replaced.get("handler")
    if callable(previous):
        previous(signum, frame)
    elif previous != signal.SIG_IGN:
        raise SystemExit(128 + signum)


class PreemptionMonitor:
    """The worker loop's component: ``due(reporting)`` after each step says whether to checkpoint and
    stop now (the same answer on every rank)."""

    def __init__(self, session: Any) -> None:
        self.session = session
        self.sigterm = session.on_main_thread(install_sigterm_notice)
        _notice.clear()
        _training.set()

    def due(self, reporting: bool) -> bool:
        """Whether any rank got a notice; ``reporting``: this step is a report, where Ray's preemption
        signal is asked for too. A collective: every rank calls it after every step."""
        local = _notice.is_set()
        if reporting and self.session.preemption_signalled():
            local = True
        return _any_rank(local, self.session.device)

    def stop(self, step: int) -> None:
        """After the preemption checkpoint at ``step`` was reported: wait until Ray Train has committed
        it (rank 0), let no rank go before that (a rank that stops first makes Ray tear the group down),
        then raise :class:`Preempted` on every rank."""
        import torch.distributed as dist

        self.session.wait_committed()
        if dist.is_available() and dist.is_initialized():
            dist.barrier()
        raise Preempted(f"preemption notice: stopped after the checkpoint at step {step}")

    def close(self) -> None:
        _training.clear()
        if self.sigterm:
            self.session.on_main_thread(remove_sigterm_notice)


def _any_rank(flag: bool, device: torch.device) -> bool:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
