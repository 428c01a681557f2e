"""What Ray Train costs: steps/s of the same training loop run directly vs inside Ray Train.

    python -m benchmarks.ray_overhead [--quick] [--out benchmarks/results/ray_overhead.json]

Contenders, each in a fresh process, on shards built from ``builtin:digits`` (train split):

- ``direct``: ``cluster.worker.run_loop`` in one process with a ``LocalSession`` (no Ray at all:
  checkpoints copied into the run directory, reports kept in memory);
- ``ray``: ``cluster.trainer.fit`` — the same ``run_loop`` as the only Ray Train worker of a local Ray
  instance (TorchTrainer, controller, ``ray.train.report`` barriers, checkpoint persistence).

Both use ``configs/demo.yaml`` with ``scaling.num_workers=1`` (global batch 128 on one worker), kNN
monitor off, the same seed and number of epochs, reports every ``run.report_every`` steps as in the
demo, and a checkpoint every ``CHECKPOINT_EVERY_EPOCHS`` epochs — more often than the demo's cadence,
so that many checkpoints (written, uploaded by Ray in the background, committed) fall inside the
measured windows. A hook inside the loop timestamps every step, so a step's time includes everything
the loop does for it, reports and checkpoints included; steps of the first epoch (DALI pipeline
being built, allocator cold) and process and Ray start-up are not measured.

How the two are compared: interleaved, not one after the other. On this 2-core VM the host's speed
drifts by 10-40% over seconds (the same direct run measured 4.99 to 6.87 steps/s in five runs of one
session), so runs one after the other disagreed: five back-to-back direct/ray pairs gave a median
ratio of 0.913 in one session and 1.004 in the next, on the same code. So both contenders start
together and take turns (``benchmarks.common.run_interleaved``): in each ``WINDOW_S``-second window
one runs while the other's whole process tree (for ``ray``: driver, GCS, raylet and every worker) is
frozen with SIGSTOP. Adjacent windows see the same host. A step counts for its contender if it began
and ended inside one of the contender's windows; steps/s is the number of counted steps over their
summed time. Each contender first starts alone (the other frozen) until its first step, so that
Ray's slower start-up leaves no window unpaired. ``ROUNDS`` rounds alternate which contender starts.
A control round runs ``direct`` against ``direct``: its ratio (ideally 1) is the method's own error
on this machine. Even interleaved, one round's ratio scatters by about ±3% here (control rounds
gave 0.951 to 1.016, and three rounds of two nearly identical Ray contenders 0.992 to 1.072): the
same CPU-bound loop takes 0.13 to 0.21 s on either vCPU from one run to the next. Hence several
rounds, the headline over all of them, and the rounds' mean ratio with its standard error beside it.

What Ray Train costs per report: ``ray.train.report`` is a barrier across ranks on Ray's
synchronisation actor (about 5 ms here), it blocks while the previous report is unread, and the
controller reads reports when it polls the workers (Ray's default: every 2 s; ``fit`` sets
``cluster.trainer.CONTROLLER_POLL_S`` unless the user chose one). So the loop sends the metrics of
every report to the driver's sink actor directly and calls ``ray.train.report`` at segment ends only
(``cluster.worker``); rank 0 waits for a checkpoint's commit only before its next
``ray.train.report`` (the next segment end). Waiting at the next metrics report instead, two steps
after a checkpoint here, stalled 20 ms per checkpoint in the median and up to 1.1 s (one round: 2.6%
of the measured time, 0.8% without that longest wait). What remains is Ray's own processes sharing
the two cores with the training thread: about 14 for one Train worker, 8 of them Python workers
(Train's controller, synchronisation, placement-group, dataset and autoscaling actors, the report
sink, an idle worker, the Train worker) whose main thread wakes about 100 times a second. ``off-CPU ms/step`` (wall time per step minus the training thread's CPU time)
shows it.

``demo``: ``configs/demo.yaml`` as the demo runs it (2 Ray workers, kNN monitor on), alone: the
fraction of step time spent waiting for data, as the workers report it, averaged over the reports
after the first epoch.

Headline (DESIGN.md): ``ray_vs_direct`` = ray steps/s / direct steps/s over the counted steps of all
rounds (target >= 0.95, i.e. Ray Train costs at most 5%), ``data_wait_fraction`` = the demo's warm
data-wait fraction (target <= 0.05). Run it on an otherwise idle machine.
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import measure_child, parser, print_table, run_interleaved, write_results

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"
CHECKPOINT_EVERY_EPOCHS = 2
#: How often the parent samples the contender's process tree for its RSS: every 20 ms (the default)
#: across a Ray instance's ~15 processes cost the parent ~10% of a core, taken from the contender.
RSS_INTERVAL_S = 0.5
#: Seconds each contender runs while the other is frozen.
WINDOW_S = 3.0
#: Interleaved direct/ray rounds (alternating which starts), before the direct/direct control round.
ROUNDS = 6


class StepTimer:
    """Worker hook: appends the step, ``time.perf_counter()`` and the training thread's CPU time
    (``time.thread_time()``) after every step of rank 0 to ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_step(self, info: Any) -> None:
        if info.rank == 0:
            with open(self.path, "a") as f:
                f.write(f"{info.step} {time.perf_counter()!r} {time.thread_time()!r}\n")


def _config(
    shards: str, storage: str, name: str, epochs: int, *, workers: int, knn: bool, demo: bool = False
):
    from cluster.config import load_config

    overrides = [
        f"data.train={shards}",
        f"run.storage={storage}",
        f"run.name={name}",
        f"schedule.epochs={epochs}",
        f"scaling.num_workers={workers}",
    ]
    if not demo:
        overrides.append(f"run.checkpoint_every_epochs={CHECKPOINT_EVERY_EPOCHS}")
    if knn:
        overrides += [f"data.knn_train={shards}", f"data.knn_val={shards}", "data.knn_max_samples=500"]
    else:
        overrides += ["data.knn_val=null", "run.knn_every=0"]
    return load_config(DEMO, overrides)


def _window_steps(path: str, windows: list[tuple[float, float]], warm_step: int) -> list[tuple[float, float]]:
    """(wall, CPU) seconds of each step from ``warm_step`` on that began and ended inside one of the
    windows, in order. A step's interval runs from the previous step's timestamp to its own; CPU is
    the training thread's."""
    rows = [line.split() for line in Path(path).read_text().splitlines()]
    marks = [(int(step), float(t), float(cpu)) for step, t, cpu in rows]
    return [
        (t1 - t0, c1 - c0)
        for (s0, t0, c0), (_, t1, c1) in itertools.pairwise(marks)
        if s0 >= warm_step and any(start <= t0 and t1 <= end for start, end in windows)
    ]


def run_direct(shards: str, epochs: int, timer: str) -> dict:
    # Ray starts a worker with OMP_NUM_THREADS = its CPUs (1); give the direct process the same
    # thread budget before torch/numpy load their thread pools.
    os.environ["OMP_NUM_THREADS"] = "1"
    from cluster.session import LocalSession
    from cluster.storage import RunStorage
    from cluster.trainer import preflight, worker_spec
    from cluster.worker import run_loop

    with tempfile.TemporaryDirectory(prefix="relic-bench-") as tmp:
        cfg = _config(shards, tmp, "direct", epochs, workers=1, knn=False)
        facts = preflight(cfg)
        storage = RunStorage.from_url(tmp)
        spec = worker_spec(cfg, storage, hooks=[StepTimer(timer)], sha="benchmark")
        session = LocalSession(storage.run_url(cfg.run.name))
        os.makedirs(session.run_dir, exist_ok=True)
        t0 = time.perf_counter()
        run_loop(spec, session)
        wall = time.perf_counter() - t0
        waits = [r["data_wait_fraction"] for r in session.reports if r["epoch"] >= 1]
    return {
        "warm_step": facts["steps_per_epoch"],
        "wall_s": wall,
        "data_wait_fraction": sum(waits) / len(waits),
    }


def run_ray(shards: str, epochs: int, timer: str) -> dict:
    from ray import cloudpickle

    from cluster.trainer import fit, preflight, ray_session

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    with tempfile.TemporaryDirectory(prefix="relic-bench-") as tmp:
        cfg = _config(shards, tmp, "ray", epochs, workers=1, knn=False)
        facts = preflight(cfg)
        with ray_session(num_cpus=2):
            t0 = time.perf_counter()
            result = fit(cfg, progress=False, hooks=[StepTimer(timer)])
            wall = time.perf_counter() - t0
        waits = [m["data_wait_fraction"] for m in result.metrics if m["epoch"] >= 1]
    return {
        "warm_step": facts["steps_per_epoch"],
        "wall_s": wall,
        "data_wait_fraction": sum(waits) / len(waits),
    }


def run_demo(shards: str, epochs: int) -> dict:
    from cluster.trainer import fit, ray_session

    with tempfile.TemporaryDirectory(prefix="relic-bench-") as tmp:
        cfg = _config(shards, tmp, "demo", epochs, workers=2, knn=True, demo=True)
        with ray_session(num_cpus=2):
            t0 = time.perf_counter()
            result = fit(cfg, progress=False)
            wall = time.perf_counter() - t0
    warm = [m for m in result.metrics if m["epoch"] >= 1]
    return {
        "data_wait_fraction": sum(m["data_wait_fraction"] for m in warm) / len(warm),
        "data_wait_fraction_first_epoch": sum(
            m["data_wait_fraction"] for m in result.metrics if m["epoch"] == 0
        )
        / max(1, sum(1 for m in result.metrics if m["epoch"] == 0)),
        "images_per_s": sum(m["images_per_s"] for m in warm) / len(warm),
        "reports": len(result.metrics),
        "wall_s": wall,
    }


RUNNERS = {"direct": run_direct, "ray": run_ray}


def interleaved_round(shards: str, epochs: int, contenders: list[tuple[str, str]]) -> dict[str, dict]:
    """One round: the ``(label, kind)`` contenders run interleaved (``run_interleaved``), the first
    label first. Per label: its result plus ``steps_per_s``, ``steps_measured``, ``measured_s``, the
    training thread's ``cpu_ms_per_step`` and ``off_cpu_ms_per_step`` over its counted steps, and
    ``windows``."""
    with tempfile.TemporaryDirectory(prefix="relic-bench-steps-") as tmp:
        timers = {label: os.path.join(tmp, f"steps-{i}.txt") for i, (label, _) in enumerate(contenders)}
        results, windows = run_interleaved(
            {label: (RUNNERS[kind], (shards, epochs, timers[label])) for label, kind in contenders},
            window_s=WINDOW_S,
            # started: its first step is timed (process, Ray and DALI pipeline up)
            ready=lambda label: os.path.exists(timers[label]) and os.path.getsize(timers[label]) > 0,
        )
        out = {}
        for label, _ in contenders:
            steps = _window_steps(timers[label], windows[label], results[label]["warm_step"])
            if not steps:
                raise RuntimeError(f"{label}: no step fell inside its {len(windows[label])} windows")
            wall, cpu = sum(w for w, _ in steps), sum(c for _, c in steps)
            out[label] = {
                **results[label],
                "steps_per_s": len(steps) / wall,
                "steps_measured": len(steps),
                "measured_s": wall,
                "cpu_ms_per_step": 1000 * cpu / len(steps),
                "off_cpu_ms_per_step": 1000 * (wall - cpu) / len(steps),
                "windows": len(windows[label]),
            }
    return out


def _pooled(runs: list[dict]) -> float:
    """Steps/s over the counted steps of several runs together."""
    return sum(r["steps_measured"] for r in runs) / sum(r["measured_s"] for r in runs)


def main(argv: list[str] | None = None) -> int:
    p = parser("ray_overhead", __doc__)
    p.add_argument("--rounds", type=int, help=f"interleaved direct/ray rounds (default {ROUNDS}, quick 1)")
    args = p.parse_args(argv)
    epochs, rounds = (20, 1) if args.quick else (40, ROUNDS)
    rounds = args.rounds or rounds
    from pipeline.shards.build import build_shards

    with tempfile.TemporaryDirectory(prefix="relic-bench-shards-") as tmp:
        shards = os.path.join(tmp, "train")
        build_shards("builtin:digits?split=train", shards, max_samples=256, index=True, progress=False)
        orders = [[("direct", "direct"), ("ray", "ray")], [("ray", "ray"), ("direct", "direct")]]
        measured = [interleaved_round(shards, epochs, orders[i % 2]) for i in range(rounds)]
        control = interleaved_round(shards, epochs, [("direct A", "direct"), ("direct B", "direct")])
        demo = measure_child(run_demo, shards, epochs, rss_interval=RSS_INTERVAL_S)

    ratio = _pooled([r["ray"] for r in measured]) / _pooled([r["direct"] for r in measured])
    round_ratios = [r["ray"]["steps_per_s"] / r["direct"]["steps_per_s"] for r in measured]
    mean_ratio = statistics.fmean(round_ratios)
    # standard error of the rounds' mean ratio; none from a single round (JSON null)
    se_ratio = statistics.stdev(round_ratios) / len(round_ratios) ** 0.5 if rounds > 1 else None
    control_ratio = control["direct B"]["steps_per_s"] / control["direct A"]["steps_per_s"]
    rows = [
        {"round": f"{i + 1} ({' first, '.join(r)} second)", "contender": label, **m}
        for i, r in enumerate([*measured, control])
        for label, m in r.items()
    ]
    print_table(
        rows,
        [
            "round",
            "contender",
            "steps_per_s",
            "steps_measured",
            "windows",
            "cpu_ms_per_step",
            "off_cpu_ms_per_step",
            "data_wait_fraction",
        ],
        title=f"Ray Train overhead: demo config, 1 worker, {epochs} epochs, interleaved in {WINDOW_S:g}-s windows "
        f"(warm steps after epoch 1)",
    )
    print(
        f"\nray / direct per round: {', '.join(f'{x:.3f}' for x in round_ratios)} "
        + (f"(mean {mean_ratio:.3f} ± {se_ratio:.3f} standard error)" if se_ratio is not None else "")
        + f"\ncontrol (direct B / direct A, ideally 1): {control_ratio:.3f}"
        f"\nray_vs_direct = {ratio:.3f} (all rounds' counted steps)   "
        f"data_wait_fraction (demo, 2 workers, warm) = {demo['data_wait_fraction']:.3f}"
    )
    write_results(
        args.out,
        {"ray_vs_direct": ratio, "data_wait_fraction": demo["data_wait_fraction"]},
        {
            "rounds": measured,
            "round_ratios": round_ratios,
            "round_ratio_mean": mean_ratio,
            "round_ratio_standard_error": se_ratio,
            "control": control,
            "control_ratio": control_ratio,
            "demo": demo,
        },
        config={
            "config": str(DEMO.relative_to(REPO)),
            "epochs": epochs,
            "rounds": rounds,
            "window_s": WINDOW_S,
            "quick": args.quick,
        },
    )
    print(json.dumps({"ray_vs_direct": ratio, "data_wait_fraction": demo["data_wait_fraction"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
