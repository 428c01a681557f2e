"""benchmarks.views.window_rate: which batches count for a contender, and its rate."""

from __future__ import annotations

import pytest

from benchmarks.views import window_rate


def test_only_batches_inside_one_window_count():
    # a batch every 0.5 s from t = 10; windows [10.9, 13.1] and [20, 30]: the intervals
    # (11.0, 11.5) ... (12.5, 13.0) and (20.0, 20.5) ... (29.5, 30.0) lie inside one
    stamps = [10 + 0.5 * k for k in range(41)]
    rate = window_rate(stamps, [(10.9, 13.1), (20.0, 30.0)], batch=8)
    assert rate["batches_counted"] == 4 + 20
    assert rate["seconds_counted"] == pytest.approx(12.0)
    assert rate["images_per_s"] == pytest.approx(16.0)


def test_no_window_no_rate():
    assert window_rate([1.0, 2.0], [(5.0, 6.0)])["images_per_s"] == 0.0
