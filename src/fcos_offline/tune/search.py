"""``fcos-offline tune``: the fastest engine configuration whose COCO mAP stays within a budget.

The search, in a work folder (``--output``):

1. **Reference**: ONNX Runtime with its defaults (fp32, all graph optimisations, default threads):
   the mAP and speed every other configuration is compared with.
2. **Candidates**, most promising first: OpenVINO's default (no precision hint; bf16 on CPUs
   that have it), OpenVINO int8 (NNCF post-training quantization: its defaults; full bias
   correction with global min/max activation ranges; asymmetric activations), ONNX Runtime int8 static QDQ (``quantize_static``,
   per-channel, U8S8 — which ORT fuses into int8 kernels on x86 — and S8S8 for comparison,
   MinMax / Percentile / Entropy calibration), OpenVINO running ONNX Runtime's QDQ graph,
   OpenVINO f32 / bf16. Each is evaluated (COCO mAP on the eval subset through the same
   ``infer`` + ``postprocess`` path as the recipe) and timed.
3. **Accuracy fallback**: for an int8 model whose mAP drop exceeds the budget, convolutions go
   back to float — the head's last convs first, then the groups with the largest measured
   per-layer error (:func:`fcos_offline.tune.quantize.layer_sensitivity`), 1, 2, 4, … at a time —
   until the budget holds or the model is no faster than the best float configuration.
4. **Sweep**: threads, batch sizes (and ORT graph optimisation level / bf16 for an OpenVINO int8
   model's remaining float ops)
   for the fastest configurations within the budget; these reuse the accuracy of the trial that
   evaluated the same model and precision (``accuracy_from``).
5. The fastest configuration within the budget is saved as an artifact folder ``<output>/best``
   (model + ``artifact.json`` with its engine options, which ``infer``/``open_engine`` apply when
   not overridden) and verified: the artifact is run again through ``infer`` + ``postprocess``
   and that mAP is the one recorded in ``tune.json["chosen"]``.

Every finished trial is written to ``<output>/tune.json`` at once (keyed by configuration);
a rerun with the same model, data and settings skips finished trials. ``time_budget`` stops
starting new work (the reference, saving and verifying the choice always run).

mAP values are fractions (``bbox_mAP``); ``map_drop`` is in mAP *points* (percent units):
``100 * (reference mAP - mAP)``, the unit of ``--max-map-drop``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fcos_offline.data.dataset import (
    EvalSet,
    class_names_for,
    demo_split,
    prepare_eval_set,
    resolve_source,
)
from fcos_offline.engine.artifact import Artifact, read_artifact, write_artifact
from fcos_offline.engine.backends import EngineOptions, backend, open_engine
from fcos_offline.engine.base import Engine
from fcos_offline.engine.infer import cap_batch
from fcos_offline.errors import FcosError, UsageError
from fcos_offline.io import atomic_folder, file_digest
from fcos_offline.progress import info, warn
from fcos_offline.tune import policy
from fcos_offline.tune.quantize import CALIB_METHODS
from fcos_offline.tune.space import (
    ORT_QDQ_DEFAULT,
    TUNE_ENGINES,
    Candidate,
    candidate_list,
    nncf_config,
    ort_config,
    parse_build,
    quant_description,
    sweep_variants,
)
from fcos_offline.tune.store import (
    TUNE_FILE,
    SearchState,
    Trial,
    load_state,
    save_state,
)

BEST_DIR = "best"

__all__ = ["BEST_DIR", "TUNE_FILE", "TuneOptions", "Tuner", "format_table", "tune"]


@dataclass
class TuneOptions:
    """Everything ``tune`` needs; with no model and no data it tunes the demo model on the demo data."""

    model: str | None = None
    coco: str | None = None
    images: str | None = None
    annotations: str | None = None
    output: str = "tuned"
    calib_images: int | None = None  # default 200
    eval_images: int | None = None  # default 500 (the demo's validation size for the demo)
    max_map_drop: float = 0.3
    batch_sizes: tuple[int, ...] = (1,)
    threads: tuple[int, ...] | None = None  # default: all cores and half of them
    engines: tuple[str, ...] = TUNE_ENGINES
    calib_methods: tuple[str, ...] = CALIB_METHODS
    time_budget: float | None = None
    bench_runs: int = 10
    bench_seconds: float = 20.0
    warmup: int = 2
    sensitivity_images: int = 4
    shape: tuple[int, int] | None = None  # canvas when exporting a checkpoint (demo: the demo canvas)
    fresh: bool = False
    sweep_top: int = 2
    confirm_top: int = 3  # re-time the reference and this many finalists, interleaved (0: off)
    candidates: tuple[str, ...] | None = None  # restrict the candidate list (see tune.space.candidate_list)
    fallback: bool = True
    max_fallback_steps: int | None = None  # None: until the budget holds or no speedup is left
    sweep: bool = True
    demo_checkpoint: str | None = None  # default: fcos_offline.demo.DEMO_CHECKPOINT


@dataclass
class _Data:
    eval_set: EvalSet
    calib_paths: list[str]
    canvas: tuple[int, int]
    class_names: list[str] | None
    description: str


def _now() -> float:
    return time.perf_counter()


def _model_size_mb(path: Path) -> float:
    files = [path, path.with_suffix(".bin")] if path.suffix == ".xml" else [path]
    return sum(p.stat().st_size for p in files if p.is_file()) / 2**20


class _quiet_stdout:
    """Silence libraries that print (ORT's histogram calibrators) while keeping our stderr progress."""

    def __enter__(self) -> _quiet_stdout:
        import contextlib
        import io

        self._ctx = contextlib.redirect_stdout(io.StringIO())
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._ctx.__exit__(None, None, None)


class Tuner:
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
        self._images: Any = None
        self._has_bf16: bool | None = None
        self.ref_key = ""
        self.nproc = os.cpu_count() or 1
        self.base_batch = 1

    # ------------------------------------------------------------------ setup

    def _validate(self) -> None:
        o = self.opts
        if o.max_map_drop < 0:
            raise UsageError("--max-map-drop must be >= 0 (mAP points)")
        if not o.batch_sizes or any(b < 1 for b in o.batch_sizes):
            raise UsageError("batch sizes must be >= 1")
        if o.threads and any(t < 1 for t in o.threads):
            raise UsageError("--threads values must be >= 1")
        for n, v in (("--calib-images", o.calib_images), ("--eval-images", o.eval_images)):
            if v is not None and v < 1:
                raise UsageError(f"{n} must be >= 1")
        if o.time_budget is not None and o.time_budget <= 0:
            raise UsageError("--time-budget must be > 0 seconds")
        bad = [e for e in o.engines if e not in TUNE_ENGINES]
        if bad:
            raise UsageError(f"unknown engine(s) {', '.join(bad)} (choose {', '.join(TUNE_ENGINES)})")
        bad = [m for m in o.calib_methods if m not in CALIB_METHODS]
        if bad:
            raise UsageError(f"unknown calibration method(s) {', '.join(bad)} (choose from {', '.join(CALIB_METHODS)})")
        demo = not (o.model or o.coco or o.images)
        if not demo and not o.model:
            raise UsageError("--coco/--images need --model (the demo model only fits the demo data)")
        if o.model and not (o.coco or o.images):
            raise UsageError("--model needs data: --coco DIR (or --images DIR and --annotations FILE)")
        if o.images and not o.annotations:
            raise UsageError("--images needs --annotations")

    def _prepare_model(self, demo: bool) -> Path:
        """The ONNX model to tune (exported from a checkpoint, or the demo model, when needed)."""
        from fcos_offline.demo import DEMO_CHECKPOINT
        from fcos_offline.demo.synthetic import DEMO_CANVAS
        from fcos_offline.export.cache import cached_export

        if demo:
            ckpt = Path(self.opts.demo_checkpoint or DEMO_CHECKPOINT)
            if not ckpt.is_file():
                raise FcosError(f"{ckpt}: the demo model is missing; give --model and --coco to tune your own model")
            shape = tuple(self.opts.shape or DEMO_CANVAS)
        else:
            src = Path(self.opts.model).resolve()  # type: ignore[arg-type]
            if not src.is_file():
                raise FcosError(f"{src}: no such model file")
            if src.suffix.lower() == ".onnx":
                return src
            if src.suffix.lower() not in (".pth", ".pt", ".ckpt"):
                raise UsageError(f"{src}: tune takes an exported .onnx (dynamic batch preferred) or a checkpoint")
            ckpt, shape = src, tuple(self.opts.shape or (800, 1333))
        onnx_path, _ = cached_export(ckpt, self.out / "work", shape)  # type: ignore[arg-type]
        return onnx_path.resolve()

    def _prepare_data(self, demo: bool, metadata: dict[str, Any], canvas: tuple[int, int]) -> _Data:
        from fcos_offline.data.preprocess import list_images

        data_dir = self.out / "work" / "data"
        o = self.opts
        if demo:
            from fcos_offline.demo import DEMO_TRAIN_SEED
            from fcos_offline.demo.synthetic import DEMO_VAL_IMAGES, DEMO_VAL_SEED

            n_eval, n_calib = o.eval_images or DEMO_VAL_IMAGES, o.calib_images or 200
            val = demo_split(data_dir / "demo_val", "val", n_eval, DEMO_VAL_SEED)
            train = demo_split(data_dir / "demo_train", "train", n_calib, DEMO_TRAIN_SEED)
            eval_set = prepare_eval_set(data_dir / "eval", val / "val2017", val / "annotations" / "instances_val2017.json", n_eval, demo=True)
            calib = [str(p) for p in list_images(train / "train2017") if p.is_file()][:n_calib]
            description = (
                f"demo: {n_eval} validation images (seed {DEMO_VAL_SEED}), {n_calib} calibration images from the train split (seed {DEMO_TRAIN_SEED})"
            )
        else:
            n_eval, n_calib = o.eval_images or 500, o.calib_images or 200
            images_dir, ann = resolve_source(o.coco, o.images, o.annotations)
            eval_set = prepare_eval_set(data_dir / "eval", images_dir, ann, n_eval)
            if len(eval_set.items) + len(eval_set.missing) < n_eval:
                warn(f"only {len(eval_set.items)} annotated images available for evaluation (asked for {n_eval})")
            eval_paths = {it.path for it in eval_set.items} | {m["path"] for m in eval_set.missing}
            calib = [str(p) for p in list_images(images_dir) if p.is_file() and str(p) not in eval_paths][:n_calib]
            if len(calib) < n_calib:
                extra = [it.path for it in eval_set.items][: n_calib - len(calib)]
                if extra:
                    warn(f"only {len(calib)} images outside the eval subset; calibration also uses {len(extra)} eval images")
                calib += extra
            description = (
                f"{images_dir}: first {n_eval} annotated images (by file name) for mAP; {len(calib)} calibration "
                "images (not in the eval subset where possible)"
            )
        for m in eval_set.missing:
            self.state.skip(m["path"], m["problem"])
        return _Data(eval_set, calib, canvas, class_names_for(metadata, eval_set.ann_file), description)

    def _context(self) -> dict[str, Any]:
        return {
            "model_sha1": file_digest(self.source, "sha1"),
            "eval_set": self.data.eval_set.digest,
            "eval_annotations_sha1": file_digest(self.data.eval_set.ann_file, "sha1"),
            "eval_images": len(self.data.eval_set.items),
            "calib_images": len(self.data.calib_paths),
            "calib_sha1": hashlib.sha1("\n".join(self.data.calib_paths).encode()).hexdigest(),
            "canvas": list(self.data.canvas),
        }

    # ------------------------------------------------------------------ helpers

    def time_left(self) -> float:
        """Seconds before the time budget runs out (inf without one)."""
        return float("inf") if self.deadline is None else self.deadline - _now()

    def _images_for_calibration(self) -> Any:
        from fcos_offline.tune.quantize import ImageTensors

        if self._images is None:
            self._images = ImageTensors(self.data.calib_paths, self.data.canvas)
        return self._images

    def _bench_batch(self, batch_size: int) -> np.ndarray:
        from fcos_offline.data.preprocess import preprocess_image, read_image

        items = self.data.eval_set.items
        have = 0 if self._bench_inputs is None else self._bench_inputs.shape[0]
        if have < batch_size:
            self._bench_inputs = np.stack([preprocess_image(read_image(items[i % len(items)].path), *self.data.canvas)[0] for i in range(batch_size)])
        assert self._bench_inputs is not None
        return self._bench_inputs[:batch_size]

    def _model_file(self, cand: Candidate) -> Path:
        """Build (or reuse) the model file of ``cand``."""
        from fcos_offline.engine.backends.openvino import onnx_to_ir
        from fcos_offline.tune import quantize as q

        models = self.out / "models"
        models.mkdir(parents=True, exist_ok=True)
        kind, tag = parse_build(cand.build)
        if kind == "fp32":
            return self.source if cand.engine == "onnxruntime" else onnx_to_ir(self.source, models / "openvino-fp32" / "model.xml")
        folder = models / cand.model_id
        nodes = self._nodes_of(cand.float_groups)
        float_note = f", {len(nodes)} conv nodes float" if nodes else ""
        if kind == "ort-qdq":
            dst = folder / "model.onnx"
            if not dst.is_file():
                pre = q.preprocess_for_ort(self.source, models / "ort-preprocessed.onnx")
                info(f"  quantizing with onnxruntime quantize_static ({tag}{float_note})")
                with _quiet_stdout():
                    q.ort_quantize(pre, dst, self._images_for_calibration(), ort_config(tag), nodes, cache_dir=self.out / "work" / "calibration")
            return dst
        dst = folder / "model.xml"
        if not (dst.is_file() and dst.with_suffix(".bin").is_file()):
            info(f"  quantizing with nncf.quantize ({tag}{float_note})")
            with _quiet_stdout():
                q.nncf_quantize(self.source, dst, self._images_for_calibration(), nncf_config(tag), nodes)
        return dst

    def _nodes_of(self, groups: tuple[str, ...]) -> list[str]:
        from fcos_offline.tune.quantize import conv_groups

        if not groups:
            return []
        by_name = {g.name: g for g in conv_groups(self.source)}
        return [n for name in groups for n in by_name[name].nodes]

    def _open(self, cand: Candidate, model: Path) -> Engine:
        options = EngineOptions(cand.engine, "cpu", cand.threads, cand.engine_precision, cand.batch_size, cand.opt_level, cand.inter_op_threads)
        return open_engine(model, options)

    def evaluate_engine(self, engine: Engine, batch_size: int, tag: str) -> float:
        """COCO bbox mAP (fraction) of ``engine`` on the eval subset through infer + postprocess."""
        from fcos_offline.engine.infer import run_inference
        from fcos_offline.evaluate.postprocess import postprocess

        es = self.data.eval_set
        work = self.out / "work" / "eval" / tag
        shutil.rmtree(work, ignore_errors=True)
        dumps = work / "dumps"
        workers = 0 if len(es.items) <= 16 else None  # a worker process only pays off on longer runs
        run_inference(engine, es.items, dumps, batch_size, warmup=0, perf_dir=work, workers=workers, show_progress=False)
        summary = postprocess(dumps, es.jpg_info, work / "eval", es.ann_file, *self.data.canvas, class_names=self.data.class_names)
        known = {Path(m["path"]).name for m in es.missing}
        lost = [f for f in summary["missing_dump_files"] if Path(f).name not in known]
        if summary.get("skipped") or lost:
            raise FcosError(f"evaluation of {tag} skipped images: {summary.get('skipped') or lost}")
        shutil.rmtree(work, ignore_errors=True)
        return float(summary["bbox_mAP"])

    def bench(self, engine: Engine, batch_size: int) -> dict[str, float]:
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
            "model": str(self.source),
            "reference": {"key": self.ref_key, **({"bbox_mAP": ref.bbox_mAP, "ms_per_img": ref.ms_per_img} if ref else {})},
            "float_by_design": self.float_by_design,
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
        try:
            model = self._model_file(cand)
            build_s = _now() - t0
            with self._open(cand, model) as engine:
                t1 = _now()
                if evaluate:
                    bbox_map, accuracy_from = self.evaluate_engine(engine, cand.batch_size, cand.key.replace("|", "_").replace("/", "_")), cand.key
                else:
                    bbox_map, accuracy_from = st.accuracy[cand.accuracy_id]
                eval_s = _now() - t1
                speed = self.bench(engine, cand.batch_size)
                executed = engine.execution_precision()
        except Exception as exc:
            if cand.key == self.ref_key:
                raise
            msg = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            warn(f"{cand.label()} failed: {msg}")
            st.skip(cand.key, f"failed: {msg}")
            return None
        ref = st.trials.get(self.ref_key)
        ref_map = bbox_map if ref is None else ref.bbox_mAP
        ref_ms = speed["ms_per_img"] if ref is None else ref.ms_per_img
        drop = 100.0 * (ref_map - bbox_map)
        trial = Trial(
            candidate=cand,
            label=cand.label(),
            precision="int8" if cand.quantized else executed,
            float_precision=executed if cand.quantized else None,
            threads_effective=cand.threads or self.nproc,
            float_nodes=self._nodes_of(cand.float_groups),
            bbox_mAP=bbox_map,
            map_drop=drop,
            ms_per_img=speed["ms_per_img"],
            img_per_s=speed["img_per_s"],
            bench_runs=int(speed["runs"]),
            speedup_vs_reference=ref_ms / speed["ms_per_img"] if speed["ms_per_img"] > 0 else 0.0,
            size_mb=_model_size_mb(model),
            model=os.path.relpath(model, self.out) if self.out.resolve() in model.resolve().parents else str(model),
            accuracy_from=accuracy_from,
            build_s=build_s,
            eval_s=eval_s,
            note=note,
            within_budget=policy.within_budget(drop, self.opts.max_map_drop),
        )
        st.add(trial, evaluated=evaluate)
        info(f"    mAP {bbox_map:.4f} (drop {drop:+.2f} points), {trial.ms_per_img:.1f} ms/img, {trial.speedup_vs_reference:.2f}x reference")
        self.save()
        return trial

    # ------------------------------------------------------------------ search phases

    def _ensure_sensitivity(self) -> dict[str, float]:
        from fcos_offline.tune import quantize as q

        sens = self.state.sensitivity
        if sens and sens.get("scores"):
            return {k: v["score"] for k, v in sens["scores"].items()}
        n = min(self.opts.sensitivity_images, len(self.data.calib_paths))
        info(f"measuring per-layer quantization noise (ONNX Runtime QDQ probe, {n} calibration images)")
        pre = q.preprocess_for_ort(self.source, self.out / "models" / "ort-preprocessed.onnx")
        probe = self._model_file(Candidate("onnxruntime", f"ort-qdq:{ORT_QDQ_DEFAULT}-keepact"))
        groups = q.conv_groups(pre)
        detail = q.layer_sensitivity(pre, probe, self._images_for_calibration(), groups, n)
        scores = {k: v["score"] for k, v in detail.items()}
        self.state.sensitivity = {
            "method": f"relative MSE of each conv's quantized input (ONNX Runtime {ORT_QDQ_DEFAULT} QDQ probe, {n} calibration "
            "images) plus that of its per-channel int8 weights, against fp32; max over FPN levels",
            "scores": detail,
            "order": [g.name for g in q.fallback_order(groups, scores)],
        }
        self.save()
        return scores

    def fallback(self, base: Candidate, best_float_ms: float | None) -> Trial | None:
        """Return conv groups to float until ``base``'s drop holds the budget (see module doc)."""
        from fcos_offline.tune import quantize as q

        # no shortcut on resume: the walk is cheap (finished steps are cached trials) and the budget may have changed
        scores = self._ensure_sensitivity()
        groups = {g.name: g for g in q.conv_groups(self.source)}
        order = [groups[n] for n in self.state.sensitivity["order"] if n in groups]  # type: ignore[index]
        all_steps = q.fallback_steps(order)
        steps = all_steps if self.opts.max_fallback_steps is None else all_steps[: self.opts.max_fallback_steps]
        record: dict[str, Any] = {"base": base.key, "label": base.label(), "steps": [], "done": False}
        info(f"accuracy fallback for {base.label()}: {len(steps)} step(s) at most, head's last convs first")
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

    def confirm(self) -> None:
        """Time the reference and the fastest configurations within the budget again, interleaved.

        On a shared machine a trial's timing can catch a busy moment; round-robin rounds give the
        finalists the same conditions. Their ``ms_per_img`` become the medians of these runs (the
        first measurement stays in ``ms_per_img_first``) and every trial's speedup is taken against
        the re-timed reference.
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
        engines = [self._open(t.candidate, self._model_file(t.candidate)) for t in chosen]
        try:
            timings = time_interleaved(
                [(e, self._bench_batch(t.candidate.batch_size)) for e, t in zip(engines, chosen)], rounds, per_round, max(1, self.opts.warmup)
            )
        finally:
            for e in engines:
                e.close()
        for t, timing in zip(chosen, timings):
            if t.ms_per_img_first is None:
                t.ms_per_img_first = t.ms_per_img
            t.ms_per_img, t.img_per_s, t.confirmed_runs = timing.ms_per_img, timing.img_per_s, len(timing.seconds)
        ref_ms = trials[self.ref_key].ms_per_img
        for t in trials.values():
            t.speedup_vs_reference = ref_ms / t.ms_per_img if t.ms_per_img > 0 else 0.0
        self.state.confirmation = {"keys": keys, "rounds": rounds, "runs_per_round": per_round}
        self.save()

    # ------------------------------------------------------------------ artifact

    def save_artifact(self, trial: Trial) -> Path:
        """``<output>/best``: the chosen model and ``artifact.json`` with its engine options (written whole)."""
        from fcos_offline.export.metadata import read_metadata
        from fcos_offline.io import atomic_write_json

        cand = trial.candidate
        best = self.out / BEST_DIR
        model = self._model_file(cand)  # rebuilt if its files were removed
        with atomic_folder(best) as tmp:
            if model.suffix == ".xml":
                shutil.copy(model, tmp / "model.xml")
                shutil.copy(model.with_suffix(".bin"), tmp / "model.bin")
                meta = model.with_suffix(".meta.json")
                if meta.is_file():
                    shutil.copy(meta, tmp / "model.meta.json")
                else:
                    atomic_write_json(tmp / "model.meta.json", read_metadata(self.source))
                model_file = "model.xml"
            else:
                shutil.copy(model, tmp / "model.onnx")
                model_file = "model.onnx"
            post_file = None
            if read_metadata(self.source).get("nms_in_graph") is False:
                shutil.copy(self.source.with_name(self.source.name[: -len(".onnx")] + ".post.onnx"), tmp / "model.post.onnx")
                post_file = "model.post.onnx"
            artifact = Artifact(
                engine=cand.engine,
                model_file=model_file,
                batch_size=cand.batch_size,
                input_shape=[cand.batch_size, 3, *self.data.canvas],
                precision=trial.precision,
                engine_version=backend(cand.engine).version(),
                source=str(self.source),
                post_file=post_file,
                dynamic_batch=True,
                engine_options=EngineOptions(
                    engine=cand.engine,
                    threads=cand.threads,
                    precision=cand.engine_precision,
                    batch_size=cand.batch_size,
                    ort_opt_level=cand.opt_level,
                    inter_op_threads=cand.inter_op_threads,
                ),
                tuned=True,
                tuning={
                    "trial": trial.key,
                    "float_precision": trial.float_precision,
                    "quantization": quant_description(cand),
                    "float_groups": list(cand.float_groups),
                    "float_nodes": trial.float_nodes,
                    "bbox_mAP": trial.bbox_mAP,
                    "map_drop": trial.map_drop,
                    "ms_per_img": trial.ms_per_img,
                    "infer": f"fcos-offline infer --model {best} --batch-size {cand.batch_size} --images DIR",
                },
            )
            write_artifact(tmp, artifact)
        return best

    def verify_artifact(self, best: Path, batch_size: int) -> float:
        """mAP of the artifact as ``infer`` runs it (engine options from artifact.json)."""
        with open_engine(best, EngineOptions()) as engine:
            return self.evaluate_engine(engine, batch_size, "best")

    # ------------------------------------------------------------------ main

    def run(self) -> dict[str, Any]:
        """The whole search; returns the tune.json content."""
        import json

        import onnx

        from fcos_offline.export.metadata import read_metadata
        from fcos_offline.tune.quantize import float_by_design

        self._validate()
        self.out.mkdir(parents=True, exist_ok=True)
        demo = not (self.opts.model or self.opts.coco or self.opts.images)
        self.source = self._prepare_model(demo)
        metadata = read_metadata(self.source)
        dims = onnx.load(str(self.source), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
        canvas = tuple(metadata.get("input_shape") or (dims[2].dim_value, dims[3].dim_value))
        if dims[0].HasField("dim_value") and dims[0].dim_value > 0 and set(self.opts.batch_sizes) != {dims[0].dim_value}:
            fixed = dims[0].dim_value
            warn(f"{self.source} has a fixed batch of {fixed}: tuning batch size {fixed} only (export with --dynamic-export for more)")
            self.opts = dataclasses.replace(self.opts, batch_sizes=(fixed,))
        self.data = self._prepare_data(demo, metadata, (int(canvas[0]), int(canvas[1])))
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

        self.base_batch = 1 if 1 in self.opts.batch_sizes else min(self.opts.batch_sizes)
        ref = Candidate("onnxruntime", "fp32", "fp32", batch_size=self.base_batch)
        self.ref_key = ref.key
        if self.trial(ref, note="reference: ONNX Runtime defaults") is None:
            raise FcosError("the reference configuration (ONNX Runtime fp32) failed; see the warning above")
        for cand in candidate_list(self.opts.engines, self.opts.calib_methods, self.base_batch, self.opts.candidates):
            if cand.build == "fp32" and cand.exec_precision == "bf16":
                auto = self.state.trials.get(dataclasses.replace(cand, exec_precision="auto").key)
                if not self.has_bf16() or (auto is not None and auto.precision == "bf16"):
                    continue  # no bf16 here, or OpenVINO's default already runs bf16
            self.trial(cand)
        if self.opts.fallback:
            self._run_fallbacks()
        if self.opts.sweep:
            self.sweep(policy.sweep_bases(list(self.state.trials.values()), self.opts.sweep_top))
        self.confirm()
        reference = self.state.trials[self.ref_key]
        while True:
            best_trial, reason = policy.choose(list(self.state.trials.values()), self.opts.max_map_drop, reference)
            best = self.save_artifact(best_trial)
            info(f"verifying {best} through infer + postprocess")
            verified = self.verify_artifact(best, best_trial.candidate.batch_size)
            drop = 100.0 * (reference.bbox_mAP - verified)
            if abs(verified - best_trial.bbox_mAP) > 1e-6:
                warn(f"the artifact's mAP {verified:.4f} differs from its trial's {best_trial.bbox_mAP:.4f} (batch/threads numerics)")
            ok = policy.within_budget(drop, self.opts.max_map_drop)
            if ok or best_trial.key == self.ref_key:
                break
            # its own numbers put it over budget: record them and choose again
            best_trial.bbox_mAP, best_trial.map_drop, best_trial.within_budget = verified, drop, False
            best_trial.accuracy_from = "verification"
        chosen = {
            **best_trial.to_dict(),
            "reason": reason,
            "trial_bbox_mAP": best_trial.bbox_mAP,
            "bbox_mAP": verified,
            "map_drop": drop,
            "within_budget": ok,
            "artifact": str(best),
            "verified": True,
        }
        artifact = read_artifact(best)
        artifact.tuning.update(bbox_mAP=verified, map_drop=drop)
        write_artifact(best, artifact)
        self.chosen = chosen
        self.save()
        return dict(json.loads((self.out / TUNE_FILE).read_text()))


def format_table(result: dict[str, Any]) -> Any:
    """A rich Table of every trial (the chosen one marked)."""
    from rich.table import Table

    chosen_key = (result.get("chosen") or {}).get("key")
    table = Table(title=f"tune: {len(result['trials'])} configurations (budget {result['settings']['max_map_drop']:g} mAP points)")
    for col, just in (
        ("", "left"),
        ("engine", "left"),
        ("precision", "left"),
        ("quantization", "left"),
        ("float", "right"),
        ("threads", "right"),
        ("batch", "right"),
        ("mAP", "right"),
        ("Δ mAP", "right"),
        ("ms/img", "right"),
        ("img/s", "right"),
        ("speedup", "right"),
        ("size MB", "right"),
    ):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for t in sorted(result["trials"], key=lambda t: t["ms_per_img"]):
        c = t["candidate"]
        quant = "-" if c["build"] == "fp32" else c["build"].replace("ort-qdq:", "ORT QDQ ").replace("nncf:", "NNCF ")
        prec = t["precision"] + (f" (+{t['float_precision']})" if t.get("float_precision") else "")
        threads = f"{t['threads_effective']}" + ("" if t["threads"] else "*") + (f"+{t['inter_op_threads']}io" if t.get("inter_op_threads") else "")
        opt = f" opt-{t['ort_opt_level']}" if t["engine"] == "onnxruntime" and t["ort_opt_level"] != "all" else ""
        mark = "→" if t["key"] == chosen_key else ("" if t["within_budget"] else "✗")
        table.add_row(
            mark,
            t["engine"] + opt,
            prec,
            quant,
            str(len(t["float_groups"])) if t["float_groups"] else "",
            threads,
            str(t["batch_size"]),
            f"{t['bbox_mAP']:.4f}",
            f"{t['map_drop']:+.2f}",
            f"{t['ms_per_img']:.1f}",
            f"{t['img_per_s']:.2f}",
            f"{t['speedup_vs_reference']:.2f}x",
            f"{t['size_mb']:.1f}",
        )
    return table


def tune(opts: TuneOptions) -> dict[str, Any]:
    """Run the search (see the module docstring); returns the ``tune.json`` content."""
    return Tuner(opts).run()
