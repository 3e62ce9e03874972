"""``fcos-offline tune``: the fastest engine configuration whose COCO mAP stays within a budget.

The search, in a work folder (``--output``):

1. **Reference**: ONNX Runtime with its defaults (fp32, all graph optimisations, default threads):
   the mAP and speed every other configuration is compared with.
2. **Candidates**, most promising first (the CPU's features are printed and recorded; OpenVINO
   int8 builds run their float ops in bf16 and in fp32 where the CPU has native bf16, else fp32): OpenVINO's
   default (no precision hint; bf16 on CPUs that have it), OpenVINO int8 (NNCF post-training quantization: its defaults; full bias
   correction with global min/max activation ranges, with symmetric and with asymmetric activations; asymmetric activations
   without it), ONNX Runtime int8 static QDQ (``quantize_static``,
   per-channel, U8S8 — which ORT fuses into int8 kernels on x86 — and S8S8 for comparison,
   MinMax / Percentile / Entropy calibration), OpenVINO running ONNX Runtime's QDQ graph,
   OpenVINO f32 / bf16. Each is evaluated (COCO mAP on the eval subset through the same
   ``infer`` + ``postprocess`` path as the recipe) and timed.
3. **Accuracy fallback**: for an int8 model whose mAP drop exceeds the budget, conv groups go
   back to float — those whose int8 alone causes the largest error at the head's outputs first
   (:func:`fcos_offline.tune.sensitivity.output_sensitivity`), 1, 2, 4, … at a time — until the
   budget holds or the model is no faster than the best float configuration.
4. **Sweep**: threads, batch sizes (and ORT graph optimisation level / bf16 for an OpenVINO int8
   model's remaining float ops)
   for the fastest configurations within the budget; these reuse the accuracy of the trial that
   evaluated the same model and precision (``accuracy_from``).
5. The fastest configuration within the budget is saved as an artifact folder ``<output>/best``
   (model + ``artifact.json`` with its engine options, which ``infer``/``open_engine`` apply when
   not overridden) and verified: the artifact is run again through ``infer`` + ``postprocess``
   and that mAP is the one recorded in ``tune.json["chosen"]``.
6. **Held-out check** (:meth:`Tuner.holdout_check`): the choice was made on the eval images, so its
   drop there is biased low, and on few images loose (its standard error is measured). When that
   error exceeds a third of the budget (or ``holdout_images`` asks for it), the drop is measured
   again on images the search never saw, as many as that error asks for (once more, on more,
   when their own spread asks for more; every later choice is checked on the same images);
   over budget there, that model is out, its own fallback goes on (returning more convs to float
   until the eval images hold the budget again), sweep and re-timing follow, and the next choice
   is checked.

7. **An accuracy check that cannot be vacuous**: when the reference's mAP is below
   :data:`policy.MAP_FLOOR` (a random or untrained model: every drop is 0), or the images that judged
   the chosen drop leave it uncertain by more than a third of the budget and no held-out images are
   left, an mAP drop decides nothing; candidates are then judged by their outputs' agreement with the
   reference's on the eval images, by ``compare``'s tolerance (:class:`compare.outputs.Tolerance`),
   which every trial records (``agreement``). ``tune.json["accuracy_check"]`` says which criterion
   decided and why; the change is said in one line.

Every finished trial is written to ``<output>/tune.json`` at once (keyed by configuration);
a rerun with the same model, data and settings skips finished trials. ``time_budget`` stops
starting new work — trials, fallbacks (and their sensitivity probe), sweeps, re-timing, the
held-out check; preparing the data, the reference, a trial under way, and saving and verifying
the choice always run, so a run overshoots the budget by about their time.

mAP values are fractions (``bbox_mAP``); ``map_drop`` is in mAP *points* (percent units):
``100 * (reference mAP - mAP)``, the unit of ``--max-map-drop``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from fcos_offline.compare.outputs import Tolerance
from fcos_offline.cpu import cpu_count, cpu_description, describe_cpu, machine_load
from fcos_offline.engine.artifact import read_artifact, write_artifact
from fcos_offline.engine.backends import EngineOptions, open_engine
from fcos_offline.engine.base import Engine
from fcos_offline.engine.infer import cap_batch
from fcos_offline.engine.timing import busy_note
from fcos_offline.errors import FcosError, first_line
from fcos_offline.io import OutputLock, file_digest, json_digest
from fcos_offline.progress import info, warn
from fcos_offline.render.html import write_tune_html
from fcos_offline.tune import policy
from fcos_offline.tune.builds import ModelBuilder, model_size_mb
from fcos_offline.tune.evaluation import drop_spread, evaluate_engine, output_agreement
from fcos_offline.tune.fallback import Fallback
from fcos_offline.tune.inputs import BEST_DIR, TuneOptions, holdout_data, prepare_data, prepare_model, validate
from fcos_offline.tune.quantize import vnni_cpu
from fcos_offline.tune.space import Candidate, candidate_list, sweep_variants
from fcos_offline.tune.store import TUNE_FILE, SearchState, Trial, load_state, save_state
from fcos_offline.units import JSON_UNITS, map_text

__all__ = ["BEST_DIR", "TUNE_FILE", "TuneOptions", "Tuner", "tune"]


def _now() -> float:
    return time.perf_counter()


class Tuner(Fallback):
    """The driver: runs the search described in the module docstring; :meth:`run` returns the tune.json dict."""

    def __init__(self, opts: TuneOptions) -> None:
        self.opts = opts
        self.out = Path(opts.output)
        self.start = _now()
        self.deadline = self.start + opts.time_budget if opts.time_budget else None
        self.state = SearchState()
        self.float_by_design: dict[str, Any] | None = None
        self.chosen: dict[str, Any] | None = None
        self._bench_inputs: np.ndarray | None = None
        self._has_bf16: bool | None = None
        self.ref_key = ""
        self.machine: dict[str, Any] = {}
        self.nproc = cpu_count()
        self.base_batch = 1
        self.criterion, self.criterion_why = policy.MAP, ""
        self.load = machine_load()  # before the search adds its own

    def _context(self) -> dict[str, Any]:
        return {
            "model_sha1": file_digest(self.source, "sha1"),
            "eval_set": self.data.eval_set.digest,
            "eval_annotations_sha1": file_digest(self.data.eval_set.ann_file, "sha1"),
            "eval_images": len(self.data.eval_set.items),
            "calib_images": len(self.data.calib_paths),
            "calib_sha1": json_digest([[p, file_digest(p)] for p in self.data.calib_paths]),  # the images' bytes, not only their names
            "canvas": list(self.data.canvas),
        }

    # ------------------------------------------------------------------ helpers

    def time_left(self) -> float:
        """Seconds before the time budget runs out (inf without one)."""
        return float("inf") if self.deadline is None else self.deadline - _now()

    def _bench_batch(self, batch_size: int) -> np.ndarray:
        from fcos_offline.data.preprocess import preprocess_image, read_image

        items = self.data.eval_set.items
        have = 0 if self._bench_inputs is None else self._bench_inputs.shape[0]
        if have < batch_size:
            self._bench_inputs = np.stack([preprocess_image(read_image(items[i % len(items)].path), *self.data.canvas)[0] for i in range(batch_size)])
        assert self._bench_inputs is not None
        return self._bench_inputs[:batch_size]

    def _open(self, cand: Candidate, model: Path) -> Engine:
        return open_engine(model, cand.engine_options("cpu"))

    def evaluate_engine(self, engine: Engine, batch_size: int, tag: str, keep: str | None = None, dumps: str | None = None) -> float:
        """COCO bbox mAP of ``engine`` on the eval subset; ``keep``: keep its results as ``work/results/<keep>.json``;
        ``dumps``: keep its dumps as ``work/dumps/<dumps>``."""
        results = None if keep is None else self.out / "work" / "results" / f"{keep}.json"
        dumps_to = None if dumps is None else self.out / "work" / "dumps" / dumps
        return evaluate_engine(engine, self.data, self.out / "work" / "eval" / tag, batch_size, results, dumps_to)

    def agreement(self, dumps: str) -> dict[str, Any]:
        """How ``work/dumps/<dumps>`` agree with the reference's outputs (evaluated again when an earlier run left none)."""
        reference = self.out / "work" / "dumps" / "reference"
        if not reference.is_dir():
            ref = self.state.trials[self.ref_key].candidate
            with self._open(ref, self.builder.model_file(ref)) as engine:
                self.evaluate_engine(engine, ref.batch_size, "reference", dumps="reference")
        return output_agreement(reference, self.out / "work" / "dumps" / dumps)

    def set_criterion(self, criterion: str, why: str) -> None:
        """Judge every trial (and every later one) by ``criterion`` from now on; said in one line when it changes."""
        if criterion != self.criterion:
            info(
                f"judging by output agreement with the reference ({Tolerance().describe()}), not by mAP drop: {why}"
                if criterion == policy.AGREEMENT
                else f"judging by mAP drop: {why}"
            )
        self.criterion, self.criterion_why = criterion, why
        for t in self.state.trials.values():
            t.within_budget = policy.judged_within(t, criterion, self.opts.max_map_drop)
        self._apply_holdout_verdicts()
        self.save()

    def bench(self, engine: Engine, batch_size: int) -> dict[str, Any]:
        """Median ms per image over repeated runs of one batch (after warm-up): the shared timing loop."""
        from fcos_offline.engine.timing import time_engine

        timing = time_engine(
            engine, self._bench_batch(batch_size), warmup=self.opts.warmup, runs=self.opts.bench_runs, max_seconds=self.opts.bench_seconds
        )
        return timing.to_dict()

    def has_bf16(self) -> bool:
        """Does OpenVINO report native bf16 on this CPU?"""
        if self._has_bf16 is None:
            try:
                import openvino as ov

                self._has_bf16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
            except Exception:
                self._has_bf16 = False
        return self._has_bf16

    def save(self) -> None:
        """Write tune.json (atomically) with everything so far."""
        ref = self.state.trials.get(self.ref_key)
        header = {
            "context": self.context,
            "settings": {
                "max_map_drop": self.opts.max_map_drop,
                "batch_sizes": list(self.opts.batch_sizes),
                "threads": list(self.opts.threads) if self.opts.threads else None,
                "engines": list(self.opts.engines),
                "time_budget_s": self.opts.time_budget,
                "bench_runs": self.opts.bench_runs,
                "cores": self.nproc,
            },
            "data": self.data.description,
            "machine": self.machine,
            "model": str(self.source),
            "reference": {"key": self.ref_key, **({"bbox_mAP": ref.bbox_mAP, "ms_per_img": ref.ms_per_img} if ref else {})},
            "float_by_design": self.float_by_design,
            "accuracy_check": {
                "criterion": self.criterion,
                "why": self.criterion_why,
                "map_floor": policy.MAP_FLOOR,
                "agreement_tolerance": Tolerance().describe(),
                "eval_images": len(self.data.eval_set.items),
            },
            "units": {**JSON_UNITS, "speedup_vs_reference": "times the reference's speed"},
            "machine_load": busy_note(self.load, {t.key: t.spread_pct for t in self.state.trials.values()}),  # one entry per trial
        }
        save_state(self.out / TUNE_FILE, header, self.state, {"chosen": self.chosen, "elapsed_s": _now() - self.start})

    # ------------------------------------------------------------------ trials

    def trial(self, cand: Candidate, *, note: str = "") -> Trial | None:
        """Run (or reuse) one configuration; ``None`` when skipped or failed."""
        st = self.state
        if cand.key in st.trials:
            return st.trials[cand.key]
        if cand.engine not in self.opts.engines and cand.key != self.ref_key:
            return None
        if self.time_left() <= 0 and cand.key != self.ref_key:
            st.skip(cand.key, "time budget")
            return None
        evaluate = cand.accuracy_id not in st.accuracy
        info(
            f"[{len(st.trials) + 1}] {cand.label()}, threads {cand.threads or 'auto'}, batch {cand.batch_size}"
            + (f", ORT opt {cand.opt_level}" if cand.engine == "onnxruntime" and cand.opt_level != "all" else "")
            + (f" ({note})" if note else "")
        )
        t0 = _now()
        agreement: dict[str, Any] | None
        try:
            model = self.builder.model_file(cand)
            build_s = _now() - t0
            with self._open(cand, model) as engine:
                t1 = _now()
                if evaluate:
                    tag = cand.key.replace("|", "_").replace("/", "_")
                    keep = "reference" if cand.key == self.ref_key else None
                    bbox_map, accuracy_from = self.evaluate_engine(engine, cand.batch_size, tag, keep, keep or "candidate"), cand.key
                    agreement = self.agreement(keep or "candidate")
                else:
                    bbox_map, accuracy_from = st.accuracy[cand.accuracy_id]
                    agreement = st.trials[accuracy_from].agreement if accuracy_from in st.trials else None
                eval_s = _now() - t1
                speed = self.bench(engine, cand.batch_size)
                executed = engine.execution_precision()
        except Exception as exc:
            if cand.key == self.ref_key:
                raise
            detail = first_line(exc, 300)
            msg = detail if detail == type(exc).__name__ else f"{type(exc).__name__}: {detail}"
            warn(f"{cand.label()} failed: {msg}")
            st.skip(cand.key, f"failed: {msg}")
            return None
        ref = st.trials.get(self.ref_key)
        ref_map = bbox_map if ref is None else ref.bbox_mAP
        ref_ms = speed["ms_per_img"] if ref is None else ref.ms_per_img  # the reference's timing of this phase
        drop = 100.0 * (ref_map - bbox_map)
        trial = Trial(
            candidate=cand,
            label=cand.label(),
            precision="int8" if cand.quantized else executed,
            float_precision=executed if cand.quantized else None,
            threads_effective=cand.threads or self.nproc,
            float_nodes=self.builder.float_nodes(cand.float_groups),
            bbox_mAP=bbox_map,
            map_drop=drop,
            ms_per_img=speed["ms_per_img"],
            img_per_s=speed["img_per_s"],
            bench_runs=int(speed["runs"]),
            speedup_vs_reference=ref_ms / speed["ms_per_img"] if speed["ms_per_img"] > 0 else 0.0,
            size_mb=model_size_mb(model),
            model=os.path.relpath(model, self.out) if self.out.resolve() in model.resolve().parents else str(model),
            accuracy_from=accuracy_from,
            build_s=build_s,
            eval_s=eval_s,
            note=note,
            agreement=agreement,
            spread_pct=speed.get("spread_pct"),
            timed_at=time.time(),
            reference_ms=ref_ms,
        )
        trial.within_budget = policy.judged_within(trial, self.criterion, self.opts.max_map_drop)
        st.add(trial, evaluated=evaluate)
        agrees = "" if agreement is None else f", outputs {'within' if agreement['within_tolerance'] else 'beyond'} compare's tolerance"
        spread = "" if trial.spread_pct is None else f" ±{trial.spread_pct:.0f}%"
        info(
            f"    mAP {map_text(bbox_map, 2)} (drop {drop:+.2f} points{agrees}), {trial.ms_per_img:.1f} ms/img{spread}, "
            f"{trial.speedup_vs_reference:.2f}x reference"
        )
        self.save()
        return trial

    # ------------------------------------------------------------------ search phases

    def sweep(self, bases: list[Trial]) -> None:
        """Threads, batch size, ORT optimisation level, OpenVINO float precision for the best bases."""
        threads = list(self.opts.threads) if self.opts.threads else sorted({self.nproc, max(1, self.nproc // 2)}, reverse=True)
        for t in bases:
            # from the main-phase form of the configuration, so reruns generate the same keys
            base = t.candidate.main_form(self.base_batch)
            for v in sweep_variants(base, threads, self.opts.batch_sizes, self.nproc, self.has_bf16()):
                if self.time_left() <= 0:
                    self.state.skip(v.key, "time budget")
                    continue
                self.trial(v, note="sweep")

    def refine(self) -> None:
        """The phases after the candidates: fallback, sweep, re-timing; again after the held-out check rejects a
        choice, whose own fallback then goes on until its drop holds on the eval images again."""
        self._apply_holdout_verdicts()
        rejected = [self.state.trials[c["key"]].candidate for c in (self.state.holdout or {}).get("checks", []) if not c["within_budget"]]
        if self.opts.fallback:
            for base in dict.fromkeys(dataclasses.replace(c.main_form(self.base_batch), float_groups=()) for c in rejected if c.quantized):
                self.fallback(base, policy.best_float_ms(list(self.state.trials.values())))
            self._run_fallbacks()
        if self.opts.sweep:
            self.sweep(policy.sweep_bases(list(self.state.trials.values()), self.opts.sweep_top))
        self.confirm()

    def confirm(self) -> None:
        """Time the reference and the fastest configurations within the budget again, interleaved.

        On a shared machine a trial's timing can catch a busy moment; round-robin rounds give the
        finalists the same conditions. Their ``ms_per_img`` become the medians of these runs (the
        first measurement stays in ``ms_per_img_first``) and their speedups are taken against the
        re-timed reference; every other trial keeps its own timing and its speedup against the
        reference's timing of its phase (``reference_ms``; ``confirmed_runs`` None marks it, ``timed_at`` dates it).
        """
        from fcos_offline.engine.timing import time_interleaved

        k = self.opts.confirm_top
        trials = self.state.trials
        chosen = [trials[self.ref_key], *policy.finalists(list(trials.values()), self.ref_key, k)]
        keys = sorted(t.key for t in chosen)
        if k <= 0 or len(chosen) < 2 or (self.state.confirmation or {}).get("keys") == keys:
            return
        if self.time_left() <= 0:
            self.state.skip("confirmation", "time budget")
            return
        info(f"re-timing the reference and {len(chosen) - 1} finalist(s), interleaved")
        rounds, per_round = 3, max(1, self.opts.bench_runs // 3)
        engines = [self._open(t.candidate, self.builder.model_file(t.candidate)) for t in chosen]
        try:
            timings = time_interleaved(
                [(e, self._bench_batch(t.candidate.batch_size)) for e, t in zip(engines, chosen)], rounds, per_round, max(1, self.opts.warmup)
            )
        finally:
            for e in engines:
                e.close()
        now = time.time()
        for t in trials.values():
            t.confirmed_runs = None  # only this round's rows count as re-timed
        for t, timing in zip(chosen, timings):
            if t.ms_per_img_first is None:
                t.ms_per_img_first = t.ms_per_img
            t.ms_per_img, t.img_per_s, t.confirmed_runs = timing.ms_per_img, timing.img_per_s, len(timing.seconds)
            t.spread_pct, t.timed_at = timing.spread_pct, now
        ref_ms = trials[self.ref_key].ms_per_img
        for t in chosen:  # the others keep the speedup against the reference timing of their own phase
            t.reference_ms = ref_ms
            t.speedup_vs_reference = ref_ms / t.ms_per_img if t.ms_per_img > 0 else 0.0
        self.state.confirmation = {"keys": keys, "rounds": rounds, "runs_per_round": per_round, "at": now}
        self.save()

    # ------------------------------------------------------------------ artifact

    def save_artifact(self, trial: Trial) -> Path:
        """``<output>/best``: the chosen model and ``artifact.json`` with its engine options (written whole)."""
        return self.builder.save_artifact(trial, self.out / BEST_DIR)

    def verify_artifact(self, best: Path, batch_size: int) -> tuple[float, dict[str, Any]]:
        """mAP of the artifact as ``infer`` runs it (engine options from artifact.json), and its outputs' agreement with the reference's."""
        with open_engine(best, EngineOptions()) as engine:
            bbox_map = self.evaluate_engine(engine, batch_size, "best", keep="best", dumps="best")
        return bbox_map, self.agreement("best")

    def drop_spread(self) -> dict[str, Any]:
        """The chosen artifact's drop's standard error (:func:`fcos_offline.tune.evaluation.drop_spread`); a reference
        evaluated by an earlier run is evaluated again for its results."""
        results = self.out / "work" / "results"
        if len(self.data.eval_set.items) >= 4 and not (results / "reference.json").is_file():
            ref = self.state.trials[self.ref_key].candidate
            with self._open(ref, self.builder.model_file(ref)) as engine:
                self.evaluate_engine(engine, ref.batch_size, "reference", keep="reference")
        return drop_spread(self.data, results / "reference.json", results / "best.json", self.opts.max_map_drop)

    def holdout_check(self, trial: Trial, spread: dict[str, Any]) -> dict[str, Any] | None:
        """Re-judge ``trial``'s drop on images the search never saw (:func:`policy.holdout_size` says when and on how many).

        The search chose ``trial`` because its drop on the eval images looked small, so that drop is
        biased low, and on few images it is loose; held-out images give an unbiased one. None when
        not done (not needed, turned off, out of time or out of images); else the check
        (``within_budget`` decides).
        """
        h = self.state.holdout
        done = next((c for c in (h or {}).get("checks", []) if c["accuracy_id"] == trial.accuracy_id), None)
        if done is not None:
            return dict(done)
        size = h["requested"] if h else policy.holdout_size(spread, self.opts.holdout_images)
        if size == 0:
            return None
        if self.time_left() <= 0:
            self.state.skip("held-out check", "time budget")
            return None
        data = holdout_data(self.opts, self.out, self.data, size)
        if data is None:
            info("no annotated images are left outside the eval and calibration images: no held-out check")
            return None
        if h is None:
            h = self.state.holdout = {"requested": size, "grown": False, "bbox_mAP": {}, "checks": []}
        h["source"] = data.description
        n, maps, results = len(data.eval_set.items), h["bbox_mAP"], self.out / "work" / "results"
        info(f"held-out check of {trial.label} on {n} images the search never saw ({data.description})")
        kept = []
        for t in (self.state.trials[self.ref_key], trial):
            keep = results / ("holdout-" + t.accuracy_id.replace("|", "_").replace("/", "_") + ".json")
            if t.accuracy_id not in maps or not keep.is_file():
                with self._open(t.candidate, self.builder.model_file(t.candidate)) as engine:
                    maps[t.accuracy_id] = evaluate_engine(engine, data, self.out / "work" / "eval" / "holdout", t.candidate.batch_size, keep)
            kept.append(keep)
        ref_map, cand_map = maps[self.state.trials[self.ref_key].accuracy_id], maps[trial.accuracy_id]
        held = drop_spread(data, kept[0], kept[1], self.opts.max_map_drop, "--holdout-images")
        more = policy.holdout_regrow(held, n, self.opts.holdout_images, h.get("grown", False))
        if more and n == size:  # fewer than requested: no more images to take
            info(f"    re-judging on {more} held-out images")
            h.update(requested=more, grown=True, bbox_mAP={})
            return self.holdout_check(trial, spread)
        drop = 100.0 * (ref_map - cand_map)
        check = {
            "key": trial.key,
            "accuracy_id": trial.accuracy_id,
            "label": trial.label,
            "images": n,
            "reference_bbox_mAP": ref_map,
            "bbox_mAP": cand_map,
            "map_drop": drop,
            "map_drop_se": held["se_points"],
            "map_drop_spread": held,
            "eval_map_drop": trial.map_drop,
            "within_budget": policy.within_budget(drop, self.opts.max_map_drop),
        }
        h["checks"].append(check)
        self.save()
        verdict = "holds the budget" if check["within_budget"] else "over budget: choosing again"
        info(f"    held-out drop {drop:+.2f} points (+-{held['se_points'] or 0:.2f}; {trial.map_drop:+.2f} on the eval images): {verdict}")
        return dict(check)

    def _apply_holdout_verdicts(self) -> None:
        failed = policy.failed_holdout((self.state.holdout or {}).get("checks", []))
        for t in self.state.trials.values():
            t.within_budget = t.within_budget and t.accuracy_id not in failed

    # ------------------------------------------------------------------ main

    def run(self) -> dict[str, Any]:
        """The whole search; returns the tune.json content."""
        import json

        import onnx

        from fcos_offline.export.metadata import read_metadata
        from fcos_offline.tune.quantize import float_by_design

        validate(self.opts)
        self.out.mkdir(parents=True, exist_ok=True)
        demo = not (self.opts.model or self.opts.coco or self.opts.images)
        self.source = prepare_model(self.opts, self.out, demo)
        metadata = read_metadata(self.source)
        dims = onnx.load(str(self.source), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
        canvas = tuple(metadata.get("input_shape") or (dims[2].dim_value, dims[3].dim_value))
        if dims[0].HasField("dim_value") and dims[0].dim_value > 0 and set(self.opts.batch_sizes) != {dims[0].dim_value}:
            fixed = dims[0].dim_value
            warn(f"{self.source} has a fixed batch of {fixed}: tuning batch size {fixed} only (export with --dynamic-export for more)")
            self.opts = dataclasses.replace(self.opts, batch_sizes=(fixed,))
        self.data = prepare_data(self.opts, self.out, demo, metadata, (int(canvas[0]), int(canvas[1])))
        for m in self.data.eval_set.missing:
            self.state.skip(m["path"], m["problem"])
        self.builder = ModelBuilder(self.source, self.out, self.data.calib_paths, self.data.canvas)
        n_items = len(self.data.eval_set.items)
        if max(self.opts.batch_sizes) > n_items:
            capped = tuple(dict.fromkeys(cap_batch(b, n_items) for b in self.opts.batch_sizes))
            self.opts = dataclasses.replace(self.opts, batch_sizes=capped)
        self.context = self._context()
        skipped = self.state.skipped
        self.state = load_state(self.out / TUNE_FILE, self.context, self.opts.max_map_drop, self.opts.fresh)
        for s in skipped:
            self.state.skip(s["key"], s["reason"])
        self.float_by_design = float_by_design(self.source)
        info(
            f"tuning {self.source} ({canvas[0]}x{canvas[1]}) on {self.data.description}; budget {self.opts.max_map_drop:g} mAP points"
            + (f", time budget {self.opts.time_budget:g} s" if self.opts.time_budget else "")
        )

        int8_rest = "bf16" if self.has_bf16() else "fp32"
        cpu = cpu_description()
        vnni = vnni_cpu(cpu["features"])
        self.machine = {**cpu, "openvino_native_bf16": self.has_bf16(), "openvino_int8_float_ops": int8_rest, "nncf_overflow_fix": not vnni}
        weights = "NNCF keeps every weight in 8 bits (VNNI: no int16 saturation)" if vnni else "NNCF's first conv weights in 7 bits (no VNNI)"
        info(
            f"CPU: {describe_cpu(self.machine)}; OpenVINO int8 builds run their float ops in {int8_rest}"
            + (" (native bf16 here), and in fp32 to compare" if int8_rest == "bf16" else " (no native bf16 here)")
            + f"; {weights}"
        )
        self.base_batch = 1 if 1 in self.opts.batch_sizes else min(self.opts.batch_sizes)
        ref = Candidate("onnxruntime", "fp32", "fp32", batch_size=self.base_batch)
        self.ref_key = ref.key
        reference = self.trial(ref, note="reference: ONNX Runtime defaults")
        if reference is None:
            raise FcosError("the reference configuration (ONNX Runtime fp32) failed; see the warning above")
        self.set_criterion(*policy.floor_criterion(reference.bbox_mAP))
        for cand in candidate_list(self.opts.engines, self.opts.calib_methods, self.base_batch, self.opts.candidates, int8_rest, vnni):
            if cand.build == "fp32" and cand.exec_precision == "bf16":
                auto = self.state.trials.get(dataclasses.replace(cand, exec_precision="auto").key)
                if not self.has_bf16() or (auto is not None and auto.precision == "bf16"):
                    continue  # no bf16 here, or OpenVINO's default already runs bf16
            self.trial(cand)
        self.refine()
        reference = self.state.trials[self.ref_key]
        while True:
            self._apply_holdout_verdicts()
            best_trial, reason = policy.choose(list(self.state.trials.values()), self.opts.max_map_drop, reference, self.criterion)
            best = self.save_artifact(best_trial)
            info(f"verifying {best} through infer + postprocess")
            verified, agreement = self.verify_artifact(best, best_trial.candidate.batch_size)
            drop = 100.0 * (reference.bbox_mAP - verified)
            if abs(verified - best_trial.bbox_mAP) > 1e-6:
                warn(
                    f"the artifact's mAP {map_text(verified, 2)} differs from its trial's {map_text(best_trial.bbox_mAP, 2)} (batch/threads numerics)"
                )
            ok = policy.within_budget(drop, self.opts.max_map_drop) if self.criterion == policy.MAP else bool(agreement["within_tolerance"])
            spread = holdout = None
            if best_trial.accuracy_id == reference.accuracy_id:
                break  # the reference's numbers: no drop to judge
            if not ok:  # its own numbers fail the check: record them and choose again
                best_trial.bbox_mAP, best_trial.map_drop, best_trial.within_budget = verified, drop, False
                best_trial.agreement, best_trial.accuracy_from = agreement, "verification"
                continue
            if self.criterion == policy.AGREEMENT:
                break  # its outputs agree with the reference's: no drop to judge
            spread = self.drop_spread()
            holdout = self.holdout_check(best_trial, spread)
            if holdout is not None and not holdout["within_budget"]:
                self.refine()  # over budget on unseen images: its fallback goes on from there
                continue
            se = holdout["map_drop_se"] if holdout else spread["se_points"]
            criterion, why = policy.spread_criterion(se, (holdout or spread)["images"], self.opts.max_map_drop)
            if criterion == policy.MAP:
                break
            self.set_criterion(criterion, why)  # the images cannot resolve the budget: judge by agreement and choose again
        chosen = {
            **best_trial.to_dict(),
            "reason": reason,
            "trial_bbox_mAP": best_trial.bbox_mAP,
            "bbox_mAP": verified,
            "map_drop": drop,
            "map_drop_se": spread["se_points"] if spread else 0.0,  # None: not measured (too few eval images)
            "map_drop_spread": spread,
            "holdout": holdout,
            "within_budget": ok,
            "accuracy_check": self.criterion,
            "agreement": agreement,
            "artifact": str(best),
            "verified": True,
        }
        artifact = read_artifact(best)
        artifact.tuning.update(bbox_mAP=verified, map_drop=drop, map_drop_se=chosen["map_drop_se"])
        if holdout:
            artifact.tuning["holdout"] = {k: holdout[k] for k in ("images", "reference_bbox_mAP", "bbox_mAP", "map_drop", "map_drop_se")}
        write_artifact(best, artifact)
        self.chosen = chosen
        self.save()
        return dict(json.loads((self.out / TUNE_FILE).read_text()))


def tune(opts: TuneOptions) -> dict[str, Any]:
    """Run the search (see the module docstring); returns the ``tune.json`` content. One writer per ``--output``."""
    validate(opts)  # usage errors before the output folder is made or locked
    with OutputLock(opts.output, "tune"):
        result = Tuner(opts).run()
        write_tune_html(Path(opts.output), result)  # report.html beside tune.json: the trials and the speed/drop plot
        return result
