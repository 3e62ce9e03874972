"""The one timing loop: ``infer``, ``tune`` and ``bench/`` all time engines through here."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np

from fcos_offline.engine.base import Engine


def run_timed(call: Callable[[], tuple[np.ndarray, np.ndarray]], loop: int = 1) -> tuple[np.ndarray, np.ndarray, float]:
    """Run ``call`` (one engine call on one batch) ``loop`` times; (dets, labels, seconds per run)."""
    loop = max(1, loop)
    t0 = time.perf_counter()
    for _ in range(loop):
        dets, labels = call()
    return dets, labels, (time.perf_counter() - t0) / loop


#: fewer timed runs than this give no spread (one or two runs say nothing about the noise)
MIN_RUNS_FOR_SPREAD = 3


def spread_pct(seconds: list[float]) -> float | None:
    """How much repeated timings of the same work vary: their coefficient of variation in percent
    (standard deviation / mean); None below :data:`MIN_RUNS_FOR_SPREAD` runs."""
    if len(seconds) < MIN_RUNS_FOR_SPREAD:
        return None
    values = np.asarray(seconds, dtype=np.float64)
    mean = float(values.mean())
    return 100.0 * float(values.std(ddof=1)) / mean if mean > 0 else None


#: a run's batches are cut into this many consecutive segments for :func:`segment_spread_pct`
SEGMENTS = 5


def segment_spread_pct(batch_seconds: list[float], segments: int = SEGMENTS) -> float | None:
    """How much one pass over many inputs varies in speed: the batches' times (per image, so a short last
    batch is not a fast moment) are cut into up to ``segments`` consecutive segments of equal count, and
    this is :func:`spread_pct` of the segments' total times. A segment averages the batches' content (NMS time follows the detections) and keeps
    what changes over time (another process taking the cores). None with fewer than
    :data:`MIN_RUNS_FOR_SPREAD` segments of at least :data:`MIN_RUNS_FOR_SPREAD` batches."""
    n = min(segments, len(batch_seconds) // MIN_RUNS_FOR_SPREAD)
    if n < MIN_RUNS_FOR_SPREAD:
        return None
    size = len(batch_seconds) // n
    return spread_pct([sum(batch_seconds[i * size : (i + 1) * size]) for i in range(n)])


#: timings varying more than this (percent, :func:`spread_pct`) are called noisy
NOISY_SPREAD_PCT = 10.0


def busy_note(load: dict[str, Any], spreads: dict[str, float | None]) -> dict[str, Any]:
    """``load`` (:func:`fcos_offline.cpu.machine_load`, read before the work) with the measurements whose spread is above
    :data:`NOISY_SPREAD_PCT` (``noisy``) and one line saying the machine was busy (``note``; None when quiet)."""
    noisy = [f"{name} ({s:.0f}%)" for name, s in spreads.items() if s is not None and s > NOISY_SPREAD_PCT]
    notes = []
    if load["busy"]:
        notes.append(f"load average {load['load_avg_1m']:.2f} before the run, above the {load['cores']} cores this process may use")
    if noisy:
        named = ", ".join(noisy) if len(noisy) <= 3 else f"{len(noisy)} of {len(spreads)} measurements (first: {noisy[0]})"
        notes.append(f"timings vary more than {NOISY_SPREAD_PCT:g}% in {named}")
    return {**load, "noisy": noisy, "note": ("busy machine: " + "; ".join(notes) + ": speeds are not a quiet machine's") if notes else None}


@dataclass
class Timing:
    """Seconds per run of one batch of ``batch_size`` images."""

    batch_size: int
    seconds: list[float] = field(default_factory=list)

    @property
    def ms_per_img(self) -> float:
        """Median milliseconds per image."""
        return float(np.median(self.seconds)) * 1000.0 / self.batch_size if self.seconds else 0.0

    @property
    def img_per_s(self) -> float:
        """Images per second at the median."""
        return 1000.0 / self.ms_per_img if self.ms_per_img > 0 else 0.0

    @property
    def spread_pct(self) -> float | None:
        """How much the runs vary (:func:`spread_pct`)."""
        return spread_pct(self.seconds)

    def to_dict(self) -> dict[str, float | None]:
        """ms_per_img, img_per_s, runs, ms_per_batch_min, spread_pct."""
        return {
            "ms_per_img": self.ms_per_img,
            "img_per_s": self.img_per_s,
            "runs": len(self.seconds),
            "ms_per_batch_min": min(self.seconds) * 1000.0 if self.seconds else 0.0,
            "spread_pct": self.spread_pct,
        }


def warm_up(engine: Engine, batch: np.ndarray, runs: int = 1) -> None:
    """Untimed runs (first-call allocations, kernel selection)."""
    for _ in range(max(0, runs)):
        engine.run(batch)


def time_engine(engine: Engine, batch: np.ndarray, *, warmup: int = 1, runs: int = 10, max_seconds: float | None = None, min_runs: int = 3) -> Timing:
    """Warm up, then time up to ``runs`` runs of ``batch`` (stopping after ``max_seconds`` once ``min_runs`` are done)."""
    warm_up(engine, batch, warmup)
    timing = Timing(batch.shape[0])
    end = None if max_seconds is None else time.perf_counter() + max_seconds
    while len(timing.seconds) < max(min_runs, runs):
        timing.seconds.append(run_timed(partial(engine.run, batch))[2])
        if end is not None and len(timing.seconds) >= min_runs and time.perf_counter() > end:
            break
    return timing


def time_interleaved(
    runners: list[tuple[Engine, np.ndarray]], rounds: int = 3, per_round: int = 3, warmup: int = 1, settle_s: float = 0.1
) -> list[Timing]:
    """Time several engines round-robin, so each sees the same (noisy, shared) machine.

    Each turn starts with a pause of ``settle_s`` and one untimed run: thread pools spin-wait for
    a while after a run (ONNX Runtime's intra-op pool does by default), and without the pause the
    engine timed next shares the cores with the previous one's spinning threads. Measured on the
    demo model, 2 cores: OpenVINO int8 timed 15 ms/img alone and 23 ms/img right after ONNX Runtime.
    """
    timings = []
    for engine, batch in runners:
        warm_up(engine, batch, warmup)
        timings.append(Timing(batch.shape[0]))
    for _ in range(rounds):
        for (engine, batch), timing in zip(runners, timings):
            time.sleep(settle_s)
            warm_up(engine, batch, 1)
            for _ in range(per_round):
                timing.seconds.append(run_timed(partial(engine.run, batch))[2])
    return timings
