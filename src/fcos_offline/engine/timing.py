"""The one timing loop: ``infer``, ``tune`` and ``bench/`` all time engines through here."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from fcos_offline.engine.base import Engine


def run_timed(call: Callable[[], tuple[np.ndarray, np.ndarray]], loop: int = 1) -> tuple[np.ndarray, np.ndarray, float]:
    """Run ``call`` (one engine call on one batch) ``loop`` times; (dets, labels, seconds per run)."""
    loop = max(1, loop)
    t0 = time.perf_counter()
    for _ in range(loop):
        dets, labels = call()
    return dets, labels, (time.perf_counter() - t0) / loop


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

    def to_dict(self) -> dict[str, float]:
        """ms_per_img, img_per_s, runs, ms_per_batch_min."""
        return {
            "ms_per_img": self.ms_per_img,
            "img_per_s": self.img_per_s,
            "runs": len(self.seconds),
            "ms_per_batch_min": min(self.seconds) * 1000.0 if self.seconds else 0.0,
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
