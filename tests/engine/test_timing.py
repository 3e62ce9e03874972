"""The shared timing loop: what it times and what it leaves out (no speed assertions)."""

from __future__ import annotations

import itertools
import time
from typing import cast

import numpy as np
import pytest

from fcos_offline.engine.base import Engine
from fcos_offline.engine.timing import time_engine, time_interleaved

LOG: list[tuple[str, float, float]] = []  # (engine, start, end) of every run, across fakes


class _Fake:
    """Runs take ``slow_s`` right after another engine ran (its threads still busy), else ``fast_s``."""

    def __init__(self, name: str, fast_s: float, slow_s: float) -> None:
        self.name, self.fast_s, self.slow_s = name, fast_s, slow_s

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        start = time.perf_counter()
        after_other = bool(LOG) and LOG[-1][0] != self.name
        time.sleep(self.slow_s if after_other else self.fast_s)
        LOG.append((self.name, start, time.perf_counter()))
        return np.zeros((batch.shape[0], 1, 5), np.float32), np.zeros((batch.shape[0], 1), np.int64)


def test_interleaved_timing_leaves_out_the_run_after_a_switch() -> None:
    """The first run after another engine is untimed, and a pause lets the other engine's threads settle."""
    LOG.clear()
    batch = np.zeros((2, 3, 8, 8), np.float32)
    engines = [_Fake("a", 0.002, 0.05), _Fake("b", 0.004, 0.05)]
    timings = time_interleaved([(cast(Engine, e), batch) for e in engines], rounds=3, per_round=2, warmup=1, settle_s=0.03)
    assert [len(t.seconds) for t in timings] == [6, 6]
    # every timed run is a fast one: the slow run after each switch was not counted
    assert max(max(t.seconds) for t in timings) < 0.04
    assert timings[0].ms_per_img < 0.04 * 1000 / 2 and timings[1].batch_size == 2
    switches = [(prev, cur) for prev, cur in itertools.pairwise(LOG) if prev[0] != cur[0]]
    assert len(switches) == 1 + 3 * 2  # warm-ups a->b, then every turn of 3 rounds x 2 engines
    for prev, cur in switches[1:]:
        assert cur[1] - prev[2] >= 0.03  # the settle pause before each turn


def test_time_engine_counts_runs_after_the_warm_up() -> None:
    LOG.clear()
    engine = _Fake("a", 0.001, 0.001)
    timing = time_engine(cast(Engine, engine), np.zeros((1, 3, 8, 8), np.float32), warmup=2, runs=5)
    assert len(timing.seconds) == 5 and len(LOG) == 7


def test_spread_is_the_coefficient_of_variation_and_segments_average_the_content() -> None:
    """spread_pct: standard deviation / mean of repeated timings, in percent; none below three runs. A run over many
    inputs is cut into consecutive segments first, so batches that are slow by content (more detections to suppress)
    do not read as a noisy machine, while a slow stretch of time does."""
    import statistics

    from fcos_offline.engine.timing import busy_note, segment_spread_pct, spread_pct

    runs = [0.010, 0.012, 0.011, 0.013]
    assert spread_pct(runs) == pytest.approx(100 * statistics.stdev(runs) / statistics.mean(runs))
    assert spread_pct([0.01, 0.02]) is None and spread_pct([0.01] * 5) == 0.0
    alternating = [0.010, 0.020] * 15  # content: every other batch slow, the same on average in every stretch
    assert spread_pct(alternating) > 30 and segment_spread_pct(alternating) == pytest.approx(0.0, abs=1e-9)
    stalled = [0.010] * 24 + [0.030] * 6  # another process took the cores for the last fifth
    assert segment_spread_pct(stalled) > 50
    assert segment_spread_pct([0.01] * 8) is None  # fewer than three segments of three batches
    quiet = busy_note({"load_avg_1m": 0.4, "cores": 2, "busy": False}, {"a": 3.0, "b": None})
    assert quiet["note"] is None and quiet["noisy"] == []
    busy = busy_note({"load_avg_1m": 3.5, "cores": 2, "busy": True}, {"a": 3.0, "b": 25.0})
    assert busy["noisy"] == ["b (25%)"] and "load average 3.50" in busy["note"] and "b (25%)" in busy["note"]
    many = busy_note({"load_avg_1m": 0.1, "cores": 2, "busy": False}, {f"c{i}": 20.0 + i for i in range(6)})
    assert len(many["noisy"]) == 6 and "6 of 6 measurements (first: c0 (20%))" in many["note"]  # one line, however many
