"""benchmarks.common.run_interleaved: contenders take turns, each whole process tree frozen outside
its own windows (the Ray-overhead benchmark relies on it to compare runs under the same host speed)."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest

from benchmarks.common import run_interleaved

#: How late a stop or a start may take effect after the window boundary (signal delivery, scheduling).
SLACK_S = 0.05

STAMPER = """
import sys, time
def stamp(path, count):
    with open(path, "a") as f:
        for _ in range(count):
            f.write(f"{time.perf_counter()!r}\\n"); f.flush(); time.sleep(0.005)
if __name__ == "__main__":
    stamp(sys.argv[1], int(sys.argv[2]))
"""


def stamp_with_child(path: str, count: int) -> dict:
    """Contender: it and a child process of its own each write ``count`` perf_counter stamps, 5 ms apart."""
    child = subprocess.Popen([sys.executable, "-c", STAMPER, path + ".child", str(count)])
    namespace: dict = {"__name__": "stamper"}
    exec(STAMPER, namespace)
    namespace["stamp"](path, count)
    return {"child_ok": child.wait() == 0}


def fail() -> dict:
    raise ValueError("bad contender")


def _stamps(path) -> list[float]:
    return [float(x) for x in path.read_text().split()]


def test_contenders_never_run_at_the_same_time(tmp_path):
    paths = {name: str(tmp_path / name) for name in ("a", "b")}
    results, windows = run_interleaved(
        {name: (stamp_with_child, (path, 300)) for name, path in paths.items()},
        window_s=0.25,
        ready=lambda name: (tmp_path / name).exists(),
    )
    assert results["a"]["child_ok"] and results["b"]["child_ok"]
    assert len(windows["a"]) >= 2 and len(windows["b"]) >= 2
    # the windows take turns and never overlap
    ordered = sorted((start, end, name) for name, ws in windows.items() for start, end in ws)
    assert all(prev[1] <= nxt[0] for prev, nxt in itertools.pairwise(ordered))
    assert all(prev[2] != nxt[2] for prev, nxt in itertools.pairwise(ordered))
    first, last = ordered[0][0], ordered[-1][1]
    for name, other in (("a", "b"), ("b", "a")):
        # stamps of the contender and of its grandchild, while the turns were being taken
        stamps = [t for p in (paths[name], paths[name] + ".child") for t in _stamps(tmp_path / p)]
        during = [t for t in stamps if first <= t <= last]
        assert during, f"{name} never ran during the turns"
        inside_other = [
            t for t in during for start, end in windows[other] if start + SLACK_S < t < end - SLACK_S
        ]
        assert not inside_other, f"{name} ran {len(inside_other)} times inside {other}'s windows"
        inside_own = [t for t in during if any(start <= t <= end + SLACK_S for start, end in windows[name])]
        assert len(inside_own) >= 0.95 * len(during)


def test_a_failing_contender_is_named_and_the_others_thawed(tmp_path):
    with pytest.raises(RuntimeError, match="contender b failed: ValueError: bad contender"):
        run_interleaved(
            {"a": (stamp_with_child, (str(tmp_path / "a"), 100)), "b": (fail, ())},
            window_s=0.2,
        )
    # a was thawed and ran to its end (with its child), not left stopped or killed
    assert len(_stamps(tmp_path / "a")) == len(_stamps(tmp_path / "a.child")) == 100
