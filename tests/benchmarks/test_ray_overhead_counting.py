"""benchmarks.ray_overhead._window_steps: which steps count for a contender."""

from __future__ import annotations

import pytest

from benchmarks.ray_overhead import _window_steps


@pytest.mark.parametrize(
    ("warm_step", "expected"),
    [
        # step k runs from mark k-1 to mark k; it counts if mark k-1 >= warm_step and the step begins
        # and ends inside one window
        (0, [3, 4, 5, 6, 21, 22, 23, 24, 25, 26, 27, 28, 29]),
        (4, [5, 6, 21, 22, 23, 24, 25, 26, 27, 28, 29]),
        (24, [25, 26, 27, 28, 29]),
    ],
)
def test_counted_steps(tmp_path, warm_step, expected):
    # mark k at t = 10 + 0.5 k s with k² / 100 s of thread CPU: every step takes 0.5 s, and step k
    # (2k - 1) / 100 s of CPU, which tells the steps apart
    path = tmp_path / "steps.txt"
    path.write_text("".join(f"{k} {10 + 0.5 * k!r} {k * k / 100!r}\n" for k in range(30)))
    got = _window_steps(str(path), [(10.9, 13.1), (20.0, 30.0)], warm_step)
    assert [round(100 * cpu + 1) // 2 for _, cpu in got] == expected
    assert all(wall == pytest.approx(0.5) for wall, _ in got)
