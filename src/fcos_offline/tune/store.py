"""Trial records and ``tune.json``: what was measured, written after every trial, read back to resume.

A :class:`Trial` is one measured configuration (its :class:`Candidate`, mAP, drop, speed,
provenance of its accuracy). ``tune.json`` holds every trial plus the search's context (model
and data digests): a rerun with the same context skips finished trials; another context starts
over. mAP values are fractions; ``map_drop`` is in mAP points (``100 * (reference - mAP)``); ``tune.json``'s
``units`` names each.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fcos_offline.errors import FcosError
from fcos_offline.io import atomic_write_json, read_json_bounded
from fcos_offline.progress import info, warn
from fcos_offline.tune.space import Candidate

TUNE_FILE = "tune.json"
FORMAT_VERSION = 3  # 3: output agreement with the reference, timing spread and time per trial


@dataclass
class Trial:
    """One measured configuration (the JSON form is one entry of ``tune.json["trials"]``)."""

    candidate: Candidate
    label: str
    precision: str  # int8, or the float precision the engine really ran
    float_precision: str | None  # int8 builds: the precision of their remaining float ops
    threads_effective: int
    float_nodes: list[str]
    bbox_mAP: float
    map_drop: float
    ms_per_img: float
    img_per_s: float
    bench_runs: int
    speedup_vs_reference: float
    size_mb: float
    model: str
    accuracy_from: str  # the key of the trial that evaluated this model's mAP ("verification" after re-evaluation)
    build_s: float = 0.0
    eval_s: float = 0.0
    note: str = ""
    within_budget: bool = False
    ms_per_img_first: float | None = None  # the first timing, before the interleaved re-timing
    confirmed_runs: int | None = None
    status: str = "ok"
    agreement: dict[str, Any] | None = None  # its outputs against the reference's on the eval images (compare's figures)
    spread_pct: float | None = None  # how much its timed runs varied (engine.timing.spread_pct)
    timed_at: float = 0.0  # when it was timed (Unix time): a row not re-timed with the others shows its age
    reference_ms: float | None = None  # the reference's ms/img its speedup was taken against (timed in the same phase)

    @property
    def key(self) -> str:
        """The candidate's key."""
        return self.candidate.key

    @property
    def accuracy_id(self) -> str:
        """The candidate's accuracy id."""
        return self.candidate.accuracy_id

    @property
    def first_ms(self) -> float:
        """The first measurement (finalists are picked by it, so reruns pick the same)."""
        return self.ms_per_img_first if self.ms_per_img_first is not None else self.ms_per_img

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (the candidate's fields flattened in as well, for readers of tune.json)."""
        c = self.candidate
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "candidate"}
        out.update(
            key=c.key,
            engine=c.engine,
            build=c.build,
            exec_precision_option=c.exec_precision,
            threads=c.threads,
            inter_op_threads=c.inter_op_threads,
            batch_size=c.batch_size,
            ort_opt_level=c.opt_level if c.has_opt_level else None,
            float_groups=list(c.float_groups),
            accuracy_id=c.accuracy_id,
            candidate=dataclasses.asdict(c),
        )
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Trial:
        """From the JSON form."""
        names = {f.name for f in dataclasses.fields(cls)} - {"candidate"}
        return cls(candidate=Candidate.from_dict(data["candidate"]), **{k: v for k, v in data.items() if k in names})


@dataclass
class SearchState:
    """Everything a search has so far (what ``tune.json`` stores besides its header)."""

    trials: dict[str, Trial] = field(default_factory=dict)
    accuracy: dict[str, tuple[float, str]] = field(default_factory=dict)  # accuracy id -> (mAP, key that measured it)
    sensitivity: dict[str, Any] | None = None
    confirmation: dict[str, Any] | None = None
    holdout: dict[str, Any] | None = None  # the held-out check: {"requested", "grown", "source", "bbox_mAP": {accuracy id: mAP}, "checks"}
    fallbacks: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)

    def add(self, trial: Trial, evaluated: bool) -> None:
        """Record a finished trial (and its accuracy when it measured it)."""
        self.trials[trial.key] = trial
        if evaluated:
            self.accuracy[trial.accuracy_id] = (trial.bbox_mAP, trial.key)

    def skip(self, what: str, reason: str) -> None:
        """Note a configuration or phase not tried (once)."""
        if not any(s["key"] == what for s in self.skipped):
            self.skipped.append({"key": what, "reason": reason})


def load_state(path: Path, context: dict[str, Any], budget: float, fresh: bool) -> SearchState:
    """The finished work in ``path`` when its context matches (budget re-applied), else a fresh state."""
    state = SearchState()
    if fresh or not path.is_file():
        return state
    try:
        prev = read_json_bounded(path, 1 << 28, "tune.json")
    except FcosError as exc:
        warn(f"{exc}; starting over")
        return state
    if not isinstance(prev, dict) or prev.get("version") != FORMAT_VERSION or prev.get("context") != context:
        warn(f"{path} was made for another model, data, settings or version; starting over (previous trials ignored)")
        return state
    from fcos_offline.tune.policy import within_budget  # policy builds on this module's Trial

    try:
        for t in prev.get("trials", []):
            if t.get("status") == "ok":
                trial = Trial.from_dict(t)
                trial.within_budget = within_budget(trial.map_drop, budget)  # the budget may differ from last time
                state.add(trial, evaluated=trial.accuracy_from == trial.key)
    except (KeyError, TypeError, FcosError) as exc:
        warn(f"{path}: unreadable trial record ({exc}); starting over")
        return SearchState()
    state.sensitivity = prev.get("sensitivity")
    state.confirmation = prev.get("confirmation")
    state.holdout = prev.get("holdout")
    state.fallbacks = [f for f in prev.get("fallback", []) if f.get("done")]
    if state.trials:
        info(f"resuming: {len(state.trials)} finished trial(s) from {path}")
    return state


def save_state(path: Path, header: dict[str, Any], state: SearchState, extra: dict[str, Any]) -> None:
    """Write ``tune.json`` atomically: header (version, context, settings…), trials and the rest."""
    payload = {
        "version": FORMAT_VERSION,
        **header,
        "sensitivity": state.sensitivity,
        "trials": [t.to_dict() for t in state.trials.values()],
        "fallback": state.fallbacks,
        "confirmation": state.confirmation,
        "holdout": state.holdout,
        "skipped": state.skipped,
        **extra,
    }
    atomic_write_json(path, payload, indent=1)
