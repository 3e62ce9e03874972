"""The accuracy fallback of :class:`~fcos_offline.tune.search.Tuner` (its step 3): conv groups of an int8
model over the budget go back to float, those whose int8 alone causes the largest error at the head's
outputs first (:func:`fcos_offline.tune.sensitivity.output_sensitivity`), 1, 2, 4, … at a time, until
the budget holds or the model is no faster than the best float configuration."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fcos_offline.progress import info
from fcos_offline.tune import policy
from fcos_offline.tune import sensitivity as sens
from fcos_offline.tune.space import ORT_QDQ_DEFAULT, Candidate
from fcos_offline.tune.store import SearchState, Trial

if TYPE_CHECKING:
    from fcos_offline.tune.builds import ModelBuilder
    from fcos_offline.tune.inputs import TuneData, TuneOptions


class Fallback:
    """The fallback phase; mixed into the tuner, whose search state, builder and trials it uses."""

    opts: TuneOptions
    state: SearchState
    source: Path
    out: Path
    data: TuneData
    builder: ModelBuilder

    if TYPE_CHECKING:

        def trial(self, cand: Candidate, *, note: str = "") -> Trial | None: ...
        def time_left(self) -> float: ...
        def save(self) -> None: ...

    def _ensure_sensitivity(self) -> dict[str, float]:
        from fcos_offline.tune import quantize as q

        done = self.state.sensitivity
        if done and done.get("scores") and done.get("method", "").startswith(sens.METHOD):
            return {k: v["score"] for k, v in done["scores"].items()}
        n = sens.probe_images(self.opts.sensitivity_images, self.data.canvas, len(self.data.calib_paths))
        info(f"measuring each conv group's int8 error at the head's outputs (ONNX Runtime {ORT_QDQ_DEFAULT} quantization, {n} calibration image(s))")
        pre = self.builder.preprocessed()
        probe = self.builder.model_file(Candidate("onnxruntime", f"ort-qdq:{ORT_QDQ_DEFAULT}"))
        groups = q.conv_groups(pre)
        detail = sens.output_sensitivity(pre, probe, self.builder.images(), groups, n)
        scores = {k: v["score"] for k, v in detail.items()}
        self.state.sensitivity = {
            "method": f"{sens.METHOD} (ONNX Runtime {ORT_QDQ_DEFAULT} quantization, {n} calibration images)",
            "scores": detail,
            "order": [g.name for g in sens.fallback_order(groups, scores)],
        }
        self.save()
        return scores

    def fallback(self, base: Candidate, best_float_ms: float | None) -> Trial | None:
        """Return conv groups to float until ``base``'s drop holds the budget (see module doc)."""
        from fcos_offline.tune import quantize as q

        if self.time_left() <= 0:  # before the sensitivity probe, which quantizes and runs the model
            self.state.skip(f"fallback {base.key}", "time budget")
            return None
        # no shortcut on resume: the walk is cheap (finished steps are cached trials) and the budget may have changed
        scores = self._ensure_sensitivity()
        groups = {g.name: g for g in q.conv_groups(self.source)}
        order = [groups[n] for n in self.state.sensitivity["order"] if n in groups]  # type: ignore[index]
        all_steps = sens.fallback_steps(order)
        steps = all_steps if self.opts.max_fallback_steps is None else all_steps[: self.opts.max_fallback_steps]
        record: dict[str, Any] = {"base": base.key, "label": base.label(), "steps": [], "done": False}
        info(f"accuracy fallback for {base.label()}: {len(steps)} step(s) at most, the largest error at the outputs first")
        result = None
        for i, step in enumerate(steps, 1):
            if self.time_left() <= 0:
                self.state.skip(f"fallback {base.key} step {i}", "time budget")
                record["stopped"] = "time budget"
                break
            t = self.trial(
                dataclasses.replace(base, float_groups=tuple(g.name for g in step)), note=f"fallback step {i}: {len(step)} conv group(s) float"
            )
            if t is None:
                record["stopped"] = "trial failed"
                break
            previous = set(record["steps"][-1]["float_groups"]) if record["steps"] else set()
            added = [g.name for g in step if g.name not in previous]
            record["steps"].append(
                {
                    "key": t.key,
                    "float_groups": list(t.candidate.float_groups),
                    "added": added,
                    "added_scores": {g: scores.get(g, 0.0) for g in added},
                    "map_drop": t.map_drop,
                    "ms_per_img": t.ms_per_img,
                }
            )
            if t.within_budget:
                result = t
                record["stopped"] = "budget holds"
                break
            if best_float_ms is not None and t.ms_per_img >= best_float_ms:
                record["stopped"] = "no speedup left (not faster than the best float configuration)"
                break
        else:
            record["stopped"] = "every conv group is float" if len(record["steps"]) == len(all_steps) else "step limit"
        record["done"] = record.get("stopped") != "time budget"
        record["result_key"] = result.key if result else None
        self.state.fallbacks = [f for f in self.state.fallbacks if f["base"] != base.key] + [record]
        self.save()
        info(
            f"  fallback {record['stopped']}"
            + (f": {len(result.candidate.float_groups)} group(s) float, drop {result.map_drop:+.2f} points" if result else "")
        )
        return result

    def _run_fallbacks(self) -> None:
        """One fallback per engine/quantizer family over budget, on its most accurate near-fastest model."""
        trials = list(self.state.trials.values())
        best_float = policy.best_float_ms(trials)
        for base, family in policy.fallback_bases(trials):
            if not policy.fallback_worthwhile(list(self.state.trials.values()), family):
                continue  # something within budget is about as fast already; float convs only slow this down
            if self.time_left() <= 0:
                self.state.skip(f"fallback {base.key}", "time budget")
                continue
            self.fallback(base.candidate, best_float)
