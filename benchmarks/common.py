"""What every benchmark shares: a results table on stdout, a JSON file, and peak-RSS measurement.

Each benchmark runs its contenders side by side in one process tree, so that the ratios it reports
are measured under the same machine load. Peak RSS is measured in a fresh child process per
contender (``measure_child``), because a process's high-water mark never goes down.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import platform
import queue as queue_mod
import resource
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psutil

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc)
    p.add_argument("--out", default=str(RESULTS_DIR / f"{name}.json"), help="where to write the JSON results")
    p.add_argument("--quick", action="store_true", help="a smaller run that still measures every figure")
    return p


def peak_rss_mb() -> float:
    """This process's peak resident set size (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def children_peak_rss_mb() -> float:
    """Largest peak RSS among waited-for children of this process (e.g. DataLoader workers)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads) and its waited-for children: a cost figure
    that other load on the machine does not distort the way it distorts wall-clock time."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _named_child(name: str, fn: Callable[..., dict], args: tuple, queue: mp.Queue) -> None:
    try:
        result = fn(*args)
        result.setdefault("peak_rss_mb", max(peak_rss_mb(), children_peak_rss_mb()))
        queue.put((name, "ok", result))
    except BaseException as e:  # report, so the parent prints which contender failed
        queue.put((name, "error", f"{type(e).__name__}: {e}"))


def _tree(proc: psutil.Process) -> list[psutil.Process]:
    """``proc`` and all its descendants; none once it has exited."""
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return []


def _tree_rss_bytes(proc: psutil.Process) -> int:
    total = 0
    for p in _tree(proc):
        with contextlib.suppress(psutil.Error):  # a worker that just exited
            total += p.memory_info().rss
    return total


def measure_child(
    fn: Callable[..., dict], *args: Any, timeout: float = 1800, rss_interval: float = 0.02
) -> dict:
    """Run ``fn(*args)`` in a fresh process (spawn) and return its result dict plus ``peak_rss_mb``
    (that process's own high-water mark, or its largest child's) and ``tree_peak_rss_mb``: the peak
    of the summed RSS of the process and all its descendants (DataLoader workers, build workers),
    sampled every ``rss_interval`` seconds *from this process* — a sampling thread inside the
    contender would change what it measures (e.g. the shard build forks its workers only when it
    runs no other thread). Sampling costs CPU in proportion to the number of processes in the tree
    (a local Ray instance has about 15): where the tree's peak is not a target, sample less often."""
    ctx = mp.get_context("spawn")
    queue: mp.Queue = ctx.Queue()
    name = getattr(fn, "__name__", str(fn))
    proc = ctx.Process(target=_named_child, args=(name, fn, args, queue))
    proc.start()
    watched = psutil.Process(proc.pid)
    peak, deadline = 0, time.monotonic() + timeout
    try:
        while True:
            peak = max(peak, _tree_rss_bytes(watched))
            try:
                _, status, payload = queue.get(timeout=rss_interval)
                break
            except queue_mod.Empty:
                if time.monotonic() > deadline or not proc.is_alive():
                    raise RuntimeError(f"benchmark contender {name} died or timed out") from None
    finally:
        proc.join(timeout=60)
        if proc.is_alive():
            proc.kill()
    if status != "ok":
        raise RuntimeError(f"benchmark contender {name} failed: {payload}")
    return {**payload, "tree_peak_rss_mb": peak / 2**20}


def _signal_tree(proc: psutil.Process, stop: bool) -> None:
    """SIGSTOP (``stop``) or SIGCONT ``proc`` and all its descendants. Stopping sweeps the tree again
    until it finds no process it has not stopped (one forked during the sweep)."""
    done: set[int] = set()
    while True:
        todo = [p for p in _tree(proc) if p.pid not in done]
        for p in todo:
            with contextlib.suppress(psutil.Error):
                p.suspend() if stop else p.resume()
            done.add(p.pid)
        if not todo or not stop:
            return


def run_interleaved(
    contenders: dict[str, tuple[Callable[..., dict], tuple]],
    *,
    window_s: float,
    ready: Callable[[str], bool] | None = None,
    timeout: float = 1800,
) -> tuple[dict[str, dict], dict[str, list[tuple[float, float]]]]:
    """Run the contenders concurrently, but never at the same time: each in a fresh process (spawn),
    all but one frozen (SIGSTOP of its whole process tree: a local Ray instance, workers and all),
    taking turns in windows of ``window_s`` seconds in the order given, while every one is alive;
    after the first exits, the others are thawed and run to their end. With ``ready``, each contender
    first starts alone (in the order given, the others frozen) until ``ready(name)`` holds, so that
    a slow start-up (a Ray instance) does not leave the others' windows unpaired.

    Why: on a shared machine the speed of the host drifts by 10% and more over seconds (a 2-core VM
    here: the same training loop ran 4.99 to 6.87 steps/s in five runs). Contenders run one after the
    other see different drifts; alternating every few seconds gives them the same. Timestamps taken
    inside a contender with ``time.perf_counter()`` (CLOCK_MONOTONIC, one clock for every process on
    Linux) compare directly with the windows.

    Returns each contender's result dict, with ``tree_peak_rss_mb`` (its tree's summed RSS, sampled
    at the end of each of its windows), and the ``time.perf_counter()`` windows in which it ran alone.
    """
    ctx = mp.get_context("spawn")
    queue: mp.Queue = ctx.Queue()
    names = list(contenders)
    procs = {
        n: ctx.Process(target=_named_child, args=(n, fn, args, queue)) for n, (fn, args) in contenders.items()
    }
    windows: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    peaks = dict.fromkeys(names, 0)
    results: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    try:
        for proc in procs.values():
            proc.start()
        watched = {n: psutil.Process(p.pid) for n, p in procs.items()}
        for n in names[1:]:
            _signal_tree(watched[n], stop=True)
        for i, n in enumerate(names if ready else []):
            if i:
                _signal_tree(watched[names[i - 1]], stop=True)
                _signal_tree(watched[n], stop=False)
            while not ready(n) and procs[n].is_alive() and time.monotonic() < deadline:
                time.sleep(0.1)
        turn = len(names) - 1 if ready else 0
        while all(p.is_alive() for p in procs.values()) and time.monotonic() < deadline:
            current = names[turn % len(names)]
            start = time.perf_counter()
            time.sleep(window_s)
            windows[current].append((start, time.perf_counter()))
            peaks[current] = max(peaks[current], _tree_rss_bytes(watched[current]))
            _signal_tree(watched[current], stop=True)
            turn += 1
            _signal_tree(watched[names[turn % len(names)]], stop=False)
        for n in names:
            _signal_tree(watched[n], stop=False)
        while len(results) < len(names):
            try:
                name, status, payload = queue.get(timeout=1.0)
            except queue_mod.Empty:
                missing = [n for n in names if n not in results]
                dead = [n for n in missing if not procs[n].is_alive()]
                if queue.empty() and (dead or time.monotonic() > deadline):
                    raise RuntimeError(f"benchmark contenders {dead or missing} died or timed out") from None
                continue
            if status != "ok":
                raise RuntimeError(f"benchmark contender {name} failed: {payload}")
            results[name] = {**payload, "tree_peak_rss_mb": peaks[name] / 2**20}
    finally:
        for proc in procs.values():
            if proc.is_alive():  # never leave a frozen process behind
                with contextlib.suppress(psutil.Error):
                    _signal_tree(psutil.Process(proc.pid), stop=False)
            proc.join(timeout=60)
            if proc.is_alive():
                proc.kill()
    return results, windows


def median_run(runs: Sequence[dict[str, Any]], key: str) -> dict[str, Any]:
    """The run with the median ``run[key]`` (the lower middle one of an even number)."""
    ordered = sorted(runs, key=lambda r: r[key])
    return ordered[(len(ordered) - 1) // 2]


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self.start


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str | None = None) -> None:
    def fmt(v: Any) -> str:
        return (
            f"{v:,.3g}"
            if isinstance(v, float) and abs(v) < 10
            else (f"{v:,.1f}" if isinstance(v, float) else str(v))
        )

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    if title:
        print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def write_results(
    path: str | os.PathLike, headline: dict[str, Any], contenders: dict[str, Any], **extra: Any
) -> Path:
    """Headline ratios at the top level (names fixed by DESIGN.md), raw figures under ``contenders``."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        **headline,
        "contenders": contenders,
        **extra,
        "machine": {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {out}")
    return out
