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
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fcos_offline.errors import FcosError, UsageError
from fcos_offline.progress import info, warn

TUNE_FILE = "tune.json"
BEST_DIR = "best"
FORMAT_VERSION = 1
ORT_QDQ_DEFAULT = "u8s8-minmax-pc"  # the ORT int8 build whose convs ONNX Runtime fuses into QLinearConv on x86


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
    engines: tuple[str, ...] = ("onnxruntime", "openvino")
    calib_methods: tuple[str, ...] = ("minmax", "percentile", "entropy")
    time_budget: float | None = None
    bench_runs: int = 10
    bench_seconds: float = 20.0
    warmup: int = 2
    sensitivity_images: int = 4
    shape: tuple[int, int] | None = None  # canvas when exporting a checkpoint (demo: the demo canvas)
    fresh: bool = False
    sweep_top: int = 2
    confirm_top: int = 3  # re-time the reference and this many finalists, interleaved (0: off)
    candidates: tuple[str, ...] | None = None  # restrict the candidate list (ids, see Tuner.candidate_ids)
    fallback: bool = True
    max_fallback_steps: int | None = None  # None: until the budget holds or no speedup is left
    sweep: bool = True
    demo_checkpoint: str | None = None  # default: fcos_offline.report.run.DEMO_CHECKPOINT


@dataclass(frozen=True)
class Candidate:
    """One configuration: how the model is built and how the engine runs it."""

    engine: str  # onnxruntime | openvino
    build: str  # "fp32" | "ort-qdq:<tag>" | "nncf:<tag>"
    exec_precision: str = "fp32"  # engine precision option: fp32 | bf16 | auto
    float_groups: tuple[str, ...] = ()
    threads: int | None = None
    inter_op_threads: int | None = None
    batch_size: int = 1
    opt_level: str = "all"

    @property
    def model_id(self) -> str:
        """Names the model file (build + the conv groups returned to float)."""
        base = self.build.replace(":", "-")
        if not self.float_groups:
            return base
        digest = hashlib.sha1("\n".join(sorted(self.float_groups)).encode()).hexdigest()[:8]
        return f"{base}+float{len(self.float_groups)}-{digest}"

    @property
    def quantized(self) -> bool:
        """An int8 build?"""
        return self.build != "fp32"

    @property
    def accuracy_id(self) -> str:
        """Configurations with the same accuracy id compute the same numbers (threads/batch aside)."""
        opt = f"|{self.opt_level}" if self.engine == "onnxruntime" and self.quantized else ""
        return f"{self.engine}|{self.model_id}|{self.exec_precision}{opt}"

    @property
    def key(self) -> str:
        """The trial's cache key in tune.json."""
        t = "auto" if self.threads is None else str(self.threads)
        inter = f"+{self.inter_op_threads}" if self.inter_op_threads else ""
        opt = f"|opt-{self.opt_level}" if self.engine == "onnxruntime" else ""
        return f"{self.engine}|{self.model_id}|{self.exec_precision}|t{t}{inter}|bs{self.batch_size}{opt}"

    def label(self) -> str:
        """Short human description for tables and logs."""
        if self.build == "fp32":
            what = {"fp32": "fp32", "bf16": "bf16", "auto": "default"}[self.exec_precision]
        else:
            kind, tag = self.build.split(":", 1)
            rest = "" if self.engine == "onnxruntime" else f", {self.exec_precision} rest"
            what = f"int8 {kind} {tag}{rest}"
        if self.float_groups:
            what += f", {len(self.float_groups)} groups float"
        return f"{self.engine} {what}"


@dataclass
class _Data:
    items: list  # InputItem
    jpg_info: Path
    ann_file: Path
    calib_paths: list[str]
    canvas: tuple[int, int]
    class_names: list[str] | None
    demo: bool
    description: str


def _now() -> float:
    return time.perf_counter()


def _atomic_json(path: Path, payload: Any) -> None:
    tmp = path.with_name(path.name + f".part{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1))
    os.replace(tmp, path)


def _file_digest(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _model_size_mb(path: Path) -> float:
    files = [path]
    if path.suffix == ".xml":
        files.append(path.with_suffix(".bin"))
    return sum(p.stat().st_size for p in files if p.is_file()) / 2**20


def demo_defaults() -> dict[str, Any]:
    """The demo's checkpoint, canvas, validation seed/size and a calibration seed (another split)."""
    from fcos_offline.report import run as run_mod

    out: dict[str, Any] = {"checkpoint": Path(run_mod.DEMO_CHECKPOINT)}
    try:
        from fcos_offline.demo import synthetic
    except ImportError:  # pragma: no cover - the demo module ships with the package
        synthetic = None  # type: ignore[assignment]
    train = None
    try:
        from fcos_offline.demo import train  # type: ignore[no-redef]
    except ImportError:  # pragma: no cover
        pass
    out["canvas"] = tuple(getattr(synthetic, "DEMO_CANVAS", None) or getattr(train, "DEMO_CANVAS", (320, 512)))
    out["val_seed"] = getattr(synthetic, "DEMO_VAL_SEED", None) or getattr(train, "VAL_SEED", 1000)
    out["val_images"] = getattr(synthetic, "DEMO_VAL_IMAGES", None) or 200
    out["calib_seed"] = getattr(synthetic, "DEMO_TRAIN_SEED", None)
    if out["calib_seed"] is None:
        out["calib_seed"] = getattr(train, "TRAIN_SEED", 0)
    return out


class Tuner:
    """Runs the search described in the module docstring; :meth:`run` returns the tune.json dict."""

    def __init__(self, opts: TuneOptions) -> None:
        self.opts = opts
        self.out = Path(opts.output)
        self.start = _now()
        self.deadline = self.start + opts.time_budget if opts.time_budget else None
        self.trials: dict[str, dict[str, Any]] = {}
        self.accuracy: dict[str, dict[str, Any]] = {}
        self.skipped: list[dict[str, str]] = []
        self.fallbacks: list[dict[str, Any]] = []
        self.sensitivity: dict[str, Any] | None = None
        self.state: dict[str, Any] = {}
        self._bench_inputs: np.ndarray | None = None
        self._images = None
        self.ref_key: str | None = None
        self.nproc = os.cpu_count() or 1

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
        bad = [e for e in o.engines if e not in ("onnxruntime", "openvino")]
        if bad:
            raise UsageError(f"unknown engine(s) {', '.join(bad)} (choose onnxruntime, openvino)")
        from fcos_offline.tune.quantize import CALIB_METHODS

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
        """The ONNX model to tune (exported from a checkpoint or the demo model when needed)."""
        from fcos_offline.export.cli import export_checkpoint

        work = self.out / "work"
        work.mkdir(parents=True, exist_ok=True)
        if demo:
            d = demo_defaults()
            ckpt = Path(self.opts.demo_checkpoint or d["checkpoint"])
            if not ckpt.is_file():
                raise FcosError(f"{ckpt}: the demo model is missing; give --model and --coco to tune your own model")
            shape = tuple(self.opts.shape or d["canvas"])
        else:
            src = Path(self.opts.model).resolve()  # type: ignore[arg-type]
            if not src.is_file():
                raise FcosError(f"{src}: no such model file")
            if src.suffix.lower() == ".onnx":
                return src
            if src.suffix.lower() not in (".pth", ".pt", ".ckpt"):
                raise UsageError(f"{src}: tune takes an exported .onnx (dynamic batch preferred) or a checkpoint")
            ckpt, shape = src, tuple(self.opts.shape or (800, 1333))
        onnx_path = (work / "model.onnx").resolve()
        stamp = work / "export.json"
        key = {"checkpoint": str(ckpt.resolve()), "size": ckpt.stat().st_size, "mtime": ckpt.stat().st_mtime, "shape": list(shape)}
        if onnx_path.is_file() and stamp.is_file() and json.loads(stamp.read_text()).get("key") == key:
            return onnx_path
        info(f"exporting {ckpt} -> {onnx_path} ({shape[0]}x{shape[1]}, dynamic batch, NMS in the graph)")
        result = export_checkpoint(str(ckpt), str(onnx_path), shape, dynamic_batch=True)
        stamp.write_text(json.dumps({"key": key, "result": result}))
        return onnx_path

    def _prepare_data(self, demo: bool, metadata: dict[str, Any], canvas: tuple[int, int]) -> _Data:
        from fcos_offline.data.info import InfoEntry, format_info
        from fcos_offline.data.preprocess import list_images, read_image
        from fcos_offline.engine.infer import InputItem
        from fcos_offline.evaluate.coco import find_annotation_file

        data_dir = self.out / "work" / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        o = self.opts
        if demo:
            from fcos_offline.demo.synthetic import make_demo_data

            d = demo_defaults()
            n_eval, n_calib = o.eval_images or d["val_images"], o.calib_images or 200
            sets = {}
            for split, n, seed in (("val", n_eval, d["val_seed"]), ("train", n_calib, d["calib_seed"])):
                root = data_dir / f"demo_{split}"
                marker = root / f".done_{n}_{seed}"
                if not marker.exists():
                    shutil.rmtree(root, ignore_errors=True)
                    info(f"generating {n} demo {split} images (seed {seed}) in {root}")
                    make_demo_data(root, split=split, num_images=n, seed=seed)
                    marker.touch()
                sets[split] = root
            images_dir = sets["val"] / "val2017"
            ann = find_annotation_file(sets["val"] / "annotations")
            calib_pool = [str(p) for p in list_images(sets["train"] / "train2017")]
            description = f"demo: {n_eval} validation images (seed {d['val_seed']}), {n_calib} calibration images from the train split (seed {d['calib_seed']})"
        else:
            n_eval, n_calib = o.eval_images or 500, o.calib_images or 200
            if o.coco:
                coco = Path(o.coco)
                images_dir = next((coco / s for s in ("val2017", "images/val2017", "images") if (coco / s).is_dir()), None)
                if images_dir is None:
                    raise FcosError(f"{coco}: expected a val2017/ image folder inside")
                ann = find_annotation_file(coco / "annotations")
            else:
                images_dir, ann = Path(o.images), find_annotation_file(o.annotations)  # type: ignore[arg-type]
            calib_pool = None
            description = f"{images_dir}: first {n_eval} annotated images (by file name) for mAP"
        from fcos_offline.data.preprocess import read_image as _read
        from fcos_offline.errors import BadFileError
        from fcos_offline.evaluate.coco import load_annotations

        data = load_annotations(ann)  # validated: a malformed file is one clear error
        annotated = []
        for img in sorted(data["images"], key=lambda i: i["file_name"]):
            path = Path(images_dir) / img["file_name"]
            try:
                if not path.is_file():
                    raise BadFileError(path, "annotated image is missing")
                if len(annotated) < n_eval:
                    _read(path)
            except BadFileError as exc:
                warn(f"skipped {exc.path}: {exc.problem} (left out of the tuning evaluation)")
                self.skipped.append({"key": exc.path, "reason": exc.problem})
                continue
            annotated.append(img)
        if not annotated:
            raise FcosError(f"no annotated images found in {images_dir}")
        keep = annotated[:n_eval]
        if len(keep) < n_eval:
            warn(f"only {len(keep)} annotated images available for evaluation (asked for {n_eval})")
        ids = {i["id"] for i in keep}
        subset = dict(data, images=keep, annotations=[a for a in data.get("annotations", []) if a["image_id"] in ids])
        ann_file = data_dir / "eval_annotations.json"
        payload = json.dumps(subset)
        if not ann_file.is_file() or ann_file.read_text() != payload:
            ann_file.write_text(payload)
        items = [InputItem(Path(i["file_name"]).stem, str(Path(images_dir) / i["file_name"]), "image") for i in keep]
        jpg_info = data_dir / "eval_jpg.info"
        if not jpg_info.is_file() or len(jpg_info.read_text().splitlines()) != len(items):
            entries = []
            for k, it in enumerate(items):
                img = read_image(it.path)
                entries.append(InfoEntry(k, it.path, int(img.shape[1]), int(img.shape[0])))
            jpg_info.write_text(format_info(entries))
        if calib_pool is None:
            eval_paths = {it.path for it in items}
            pool = [str(p) for p in list_images(images_dir) if str(p) not in eval_paths]
            calib = pool[:n_calib]
            if len(calib) < n_calib:
                extra = [it.path for it in items][: n_calib - len(calib)]
                if extra:
                    warn(f"only {len(calib)} images outside the eval subset; calibration also uses {len(extra)} eval images")
                calib += extra
            description += f"; {len(calib)} calibration images (not in the eval subset where possible)"
        else:
            calib = calib_pool[:n_calib]
        return _Data(items, jpg_info, ann_file, calib, canvas, self._class_names(metadata, ann_file), demo, description)

    @staticmethod
    def _class_names(metadata: dict[str, Any], ann_file: Path) -> list[str] | None:
        from fcos_offline.evaluate.coco import coco91_names, load_annotations

        if metadata.get("class_names"):
            return list(metadata["class_names"])
        num = (metadata.get("config") or {}).get("head", {}).get("num_classes", 80)
        if num == 80:
            return None
        if num == 91:
            return coco91_names()
        cats = sorted(load_annotations(ann_file)["categories"], key=lambda c: c["id"])
        return [c["name"] for c in cats] if len(cats) == num else [str(i) for i in range(num)]

    def _context(self) -> dict[str, Any]:
        return {
            "model_sha1": _file_digest(self.source),
            "eval_annotations_sha1": _file_digest(self.data.ann_file),
            "eval_images": len(self.data.items),
            "calib_images": len(self.data.calib_paths),
            "calib_sha1": hashlib.sha1("\n".join(self.data.calib_paths).encode()).hexdigest(),
            "canvas": list(self.data.canvas),
        }

    def _load_previous(self) -> None:
        path = self.out / TUNE_FILE
        if self.opts.fresh or not path.is_file():
            return
        try:
            prev = json.loads(path.read_text())
        except json.JSONDecodeError:
            warn(f"{path} is not valid JSON; starting over")
            return
        if prev.get("version") != FORMAT_VERSION or prev.get("context") != self.context:
            warn(f"{path} was made for another model, data or settings; starting over (previous trials ignored)")
            return
        for t in prev.get("trials", []):
            if t.get("status") == "ok":
                t["within_budget"] = t["map_drop"] <= self.opts.max_map_drop + 1e-9  # the budget may differ from last time
                self.trials[t["key"]] = t
                if t.get("accuracy_from") == t["key"]:
                    self.accuracy[t["accuracy_id"]] = {"bbox_mAP": t["bbox_mAP"], "from": t["key"]}
        self.sensitivity = prev.get("sensitivity")
        self.state["confirmation"] = prev.get("confirmation")
        self.fallbacks = [f for f in prev.get("fallback", []) if f.get("done")]
        if self.trials:
            info(f"resuming: {len(self.trials)} finished trial(s) from {path}")

    # ------------------------------------------------------------------ helpers

    def time_left(self) -> float:
        """Seconds before the time budget runs out (inf without one)."""
        return float("inf") if self.deadline is None else self.deadline - _now()

    def _skip(self, what: str, reason: str) -> None:
        if not any(s["key"] == what for s in self.skipped):
            self.skipped.append({"key": what, "reason": reason})

    def _images_for_calibration(self):
        from fcos_offline.tune.quantize import ImageTensors

        if self._images is None:
            self._images = ImageTensors(self.data.calib_paths, self.data.canvas)
        return self._images

    def _bench_batch(self, batch_size: int) -> np.ndarray:
        from fcos_offline.data.preprocess import preprocess_image, read_image

        have = 0 if self._bench_inputs is None else self._bench_inputs.shape[0]
        if have < batch_size:
            tensors = [preprocess_image(read_image(self.data.items[i % len(self.data.items)].path), *self.data.canvas)[0]
                       for i in range(batch_size)]
            self._bench_inputs = np.stack(tensors)
        return self._bench_inputs[:batch_size]  # type: ignore[index]

    def _model_file(self, cand: Candidate) -> Path:
        """Build (or reuse) the model file of ``cand``."""
        from fcos_offline.tune import quantize as q

        models = self.out / "models"
        if cand.build == "fp32":
            if cand.engine == "onnxruntime":
                return self.source
            return q.openvino_ir(self.source, models / "openvino-fp32" / "model.xml")
        kind, tag = cand.build.split(":", 1)
        folder = models / cand.model_id
        if kind == "ort-qdq":
            dst = folder / "model.onnx"
            if not dst.is_file():
                pre = q.preprocess_for_ort(self.source, models / "ort-preprocessed.onnx")
                nodes = self._nodes_of(cand.float_groups, pre)
                cfg = _ort_config(tag)
                info(f"  quantizing with onnxruntime quantize_static ({tag}{', ' + str(len(nodes)) + ' conv nodes float' if nodes else ''})")
                with _quiet_stdout():
                    q.ort_quantize(pre, dst, self._images_for_calibration(), cfg, nodes, cache_dir=self.out / "work" / "calibration")
            return dst
        if kind == "nncf":
            dst = folder / "model.xml"
            if not (dst.is_file() and dst.with_suffix(".bin").is_file()):
                nodes = self._nodes_of(cand.float_groups, self.source)
                info(f"  quantizing with nncf.quantize ({tag}{', ' + str(len(nodes)) + ' conv nodes float' if nodes else ''})")
                with _quiet_stdout():
                    q.nncf_quantize(self.source, dst, self._images_for_calibration(), _nncf_config(tag), nodes)
            return dst
        raise FcosError(f"unknown build {cand.build!r}")

    def _nodes_of(self, groups: tuple[str, ...], model: Path) -> list[str]:
        from fcos_offline.tune.quantize import conv_groups

        if not groups:
            return []
        by_name = {g.name: g for g in conv_groups(model)}
        return [n for name in groups for n in by_name[name].nodes] if groups else []

    def _open(self, cand: Candidate, model: Path):
        from fcos_offline.engine.backends import EngineOptions, open_engine

        precision = "fp32" if cand.engine == "onnxruntime" else cand.exec_precision
        options = EngineOptions(cand.engine, "cpu", cand.threads, precision, cand.batch_size, cand.opt_level, cand.inter_op_threads)
        return open_engine(model, options)

    def evaluate_engine(self, engine, batch_size: int, tag: str) -> float:
        """COCO bbox mAP (fraction) of ``engine`` on the eval subset through infer + postprocess."""
        from fcos_offline.engine.infer import run_inference
        from fcos_offline.evaluate.postprocess import postprocess

        work = self.out / "work" / "eval" / tag
        shutil.rmtree(work, ignore_errors=True)
        dumps = work / "dumps"
        workers = 0 if len(self.data.items) <= 16 else None  # a worker process only pays off on longer runs
        run_inference(engine, self.data.items, dumps, batch_size, warmup=0, perf_dir=work, workers=workers)
        summary = postprocess(dumps, self.data.jpg_info, work / "eval", self.data.ann_file,
                              self.data.canvas[0], self.data.canvas[1], class_names=self.data.class_names)
        if summary.get("skipped") or summary.get("missing_dumps"):
            raise FcosError(f"evaluation of {tag} skipped images: {summary.get('skipped') or summary.get('missing_dump_files')}")
        shutil.rmtree(work, ignore_errors=True)
        return float(summary["bbox_mAP"])

    def bench(self, engine, batch_size: int) -> dict[str, float]:
        """Median ms per image over repeated runs of one batch (after warm-up)."""
        x = self._bench_batch(batch_size)
        for _ in range(max(0, self.opts.warmup)):
            engine.run(x)
        times: list[float] = []
        t_end = _now() + self.opts.bench_seconds
        while len(times) < max(3, self.opts.bench_runs):
            t0 = _now()
            engine.run(x)
            times.append(_now() - t0)
            if len(times) >= 3 and _now() > t_end:
                break
        ms = float(np.median(times)) * 1000.0 / batch_size
        return {"ms_per_img": ms, "img_per_s": 1000.0 / ms if ms > 0 else 0.0, "runs": len(times),
                "ms_per_batch_min": float(min(times)) * 1000.0}

    # ------------------------------------------------------------------ trials

    def trial(self, cand: Candidate, *, evaluate: bool | None = None, note: str = "") -> dict[str, Any] | None:
        """Run (or reuse) one configuration; ``None`` when skipped or failed."""
        if cand.key in self.trials:
            return self.trials[cand.key]
        if cand.engine not in self.opts.engines and cand.key != self.ref_key:
            return None
        if self.time_left() <= 0 and cand.key != self.ref_key:
            self._skip(cand.key, "time budget")
            return None
        if evaluate is None:
            evaluate = cand.accuracy_id not in self.accuracy
        n = len(self.trials) + 1
        info(f"[{n}] {cand.label()}, threads {cand.threads or 'auto'}, batch {cand.batch_size}" +
             (f", ORT opt {cand.opt_level}" if cand.engine == "onnxruntime" and cand.opt_level != "all" else "") +
             (f" ({note})" if note else ""))
        t0 = _now()
        try:
            model = self._model_file(cand)
            build_s = _now() - t0
            engine = self._open(cand, model)
            t1 = _now()
            if evaluate:
                bbox_map = self.evaluate_engine(engine, cand.batch_size, cand.key.replace("|", "_").replace("/", "_"))
                accuracy_from = cand.key
            else:
                acc = self.accuracy[cand.accuracy_id]
                bbox_map, accuracy_from = acc["bbox_mAP"], acc["from"]
            eval_s = _now() - t1
            speed = self.bench(engine, cand.batch_size)
            described = engine.describe()
        except Exception as exc:  # noqa: BLE001 - one failing candidate must not end the search
            if cand.key == self.ref_key:
                raise
            msg = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            warn(f"{cand.label()} failed: {msg}")
            self._skip(cand.key, f"failed: {msg}")
            return None
        ref = self.trials.get(self.ref_key or "")
        ref_map = bbox_map if ref is None else ref["bbox_mAP"]
        ref_ms = speed["ms_per_img"] if ref is None else ref["ms_per_img"]
        precision = "int8" if cand.quantized else (described.get("execution_precision") or cand.exec_precision)
        record: dict[str, Any] = {
            "key": cand.key, "status": "ok", "label": cand.label(),
            "engine": cand.engine, "precision": precision,
            "float_precision": described.get("execution_precision", "fp32") if cand.quantized else None,
            "exec_precision_option": cand.exec_precision, "build": cand.build,
            "threads": cand.threads, "threads_effective": cand.threads or self.nproc, "inter_op_threads": cand.inter_op_threads,
            "batch_size": cand.batch_size, "ort_opt_level": cand.opt_level if cand.engine == "onnxruntime" else None,
            "float_groups": list(cand.float_groups), "float_nodes": self._nodes_of(cand.float_groups, self.source),
            "bbox_mAP": bbox_map, "map_drop": 100.0 * (ref_map - bbox_map),
            "ms_per_img": speed["ms_per_img"], "img_per_s": speed["img_per_s"], "bench_runs": speed["runs"],
            "speedup_vs_reference": ref_ms / speed["ms_per_img"] if speed["ms_per_img"] > 0 else 0.0,
            "size_mb": _model_size_mb(model), "model": os.path.relpath(model, self.out) if self.out in model.parents else str(model),
            "accuracy_id": cand.accuracy_id, "accuracy_from": accuracy_from,
            "build_s": build_s, "eval_s": eval_s, "note": note, "candidate": dataclasses.asdict(cand),
        }
        record["within_budget"] = record["map_drop"] <= self.opts.max_map_drop + 1e-9
        if evaluate:
            self.accuracy[cand.accuracy_id] = {"bbox_mAP": bbox_map, "from": cand.key}
        self.trials[cand.key] = record
        info(f"    mAP {bbox_map:.4f} (drop {record['map_drop']:+.2f} points), {speed['ms_per_img']:.1f} ms/img, "
             f"{record['speedup_vs_reference']:.2f}x reference")
        self.save()
        return record

    # ------------------------------------------------------------------ search phases

    def candidate_list(self) -> list[Candidate]:
        """The main candidates, most promising first (threads/batch at their defaults).

        OpenVINO int8 models run their remaining float ops in f32 here (the ops returned to float
        by the fallback must really be f32); the sweep tries bf16 for them.
        """
        o = self.opts
        bs = self.base_batch
        methods = [m for m in ("minmax", "percentile", "entropy") if m in o.calib_methods]
        cands = [
            Candidate("openvino", "fp32", "auto", batch_size=bs),
            Candidate("openvino", "nncf:performance", "fp32", batch_size=bs),
        ]
        cands += [Candidate("onnxruntime", f"ort-qdq:u8s8-{m}-pc", batch_size=bs) for m in methods[:1]]
        cands += [Candidate("openvino", "fp32", "fp32", batch_size=bs),
                  Candidate("openvino", "nncf:performance-bc-mm", "fp32", batch_size=bs)]
        cands += [Candidate("onnxruntime", f"ort-qdq:u8s8-{m}-pc", batch_size=bs) for m in methods[1:]]
        if methods:
            cands += [Candidate("openvino", f"ort-qdq:u8s8-{methods[0]}-pc", "fp32", batch_size=bs)]
        cands += [Candidate("openvino", "nncf:mixed-mm", "fp32", batch_size=bs)]
        if methods:
            cands += [Candidate("onnxruntime", f"ort-qdq:s8s8-{methods[0]}-pc", batch_size=bs)]  # what ORT does not fuse
        cands.append(Candidate("openvino", "fp32", "bf16", batch_size=bs))
        cands = [c for c in cands if c.engine in o.engines]
        if o.candidates:
            cands = [c for c in cands if c.model_id in o.candidates or f"{c.engine}/{c.model_id}/{c.exec_precision}" in o.candidates]
        return cands

    def _has_bf16(self) -> bool:
        if "bf16" not in self.state:
            try:
                import openvino as ov

                self.state["bf16"] = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
            except Exception:  # noqa: BLE001 - no OpenVINO: no bf16 either
                self.state["bf16"] = False
        return self.state["bf16"]

    def _ensure_sensitivity(self) -> dict[str, float]:
        from fcos_offline.tune import quantize as q

        if self.sensitivity and self.sensitivity.get("scores"):
            return {k: v["score"] for k, v in self.sensitivity["scores"].items()}
        n = min(self.opts.sensitivity_images, len(self.data.calib_paths))
        info(f"measuring per-layer quantization noise (ONNX Runtime QDQ probe, {n} calibration images)")
        pre = q.preprocess_for_ort(self.source, self.out / "models" / "ort-preprocessed.onnx")
        probe = self._model_file(Candidate("onnxruntime", f"ort-qdq:{ORT_QDQ_DEFAULT}-keepact"))
        groups = q.conv_groups(pre)
        detail = q.layer_sensitivity(pre, probe, self._images_for_calibration(), groups, n)
        scores = {k: v["score"] for k, v in detail.items()}
        order = q.fallback_order(groups, scores)
        self.sensitivity = {
            "method": f"relative MSE of each conv's quantized input (ONNX Runtime {ORT_QDQ_DEFAULT} QDQ probe, {n} calibration "
                      "images) plus that of its per-channel int8 weights, against fp32; max over FPN levels",
            "scores": detail, "order": [g.name for g in order],
        }
        self.save()
        return scores

    def fallback(self, base: Candidate, best_float_ms: float | None) -> dict[str, Any] | None:
        """Return conv groups to float until ``base``'s drop holds the budget (see module doc)."""
        from fcos_offline.tune import quantize as q

        # no shortcut on resume: the walk is cheap (finished steps are cached trials) and the budget may have changed
        scores = self._ensure_sensitivity()
        groups = {g.name: g for g in q.conv_groups(self.source)}
        order = [groups[n] for n in self.sensitivity["order"] if n in groups]  # type: ignore[index]
        steps = q.fallback_steps(order)
        if self.opts.max_fallback_steps is not None:
            steps = steps[: self.opts.max_fallback_steps]
        record: dict[str, Any] = {"base": base.key, "label": base.label(), "steps": [], "done": False}
        info(f"accuracy fallback for {base.label()}: {len(steps)} step(s) at most, head's last convs first")
        result = None
        for i, step in enumerate(steps, 1):
            if self.time_left() <= 0:
                self._skip(f"fallback {base.key} step {i}", "time budget")
                record["stopped"] = "time budget"
                break
            cand = dataclasses.replace(base, float_groups=tuple(g.name for g in step))
            t = self.trial(cand, note=f"fallback step {i}: {len(step)} conv group(s) float")
            if t is None:
                record["stopped"] = "trial failed"
                break
            previous = set(record["steps"][-1]["float_groups"]) if record["steps"] else set()
            added = [g.name for g in step if g.name not in previous]
            record["steps"].append({"key": t["key"], "float_groups": t["float_groups"], "added": added,
                                    "added_scores": {g: scores.get(g, 0.0) for g in added},
                                    "map_drop": t["map_drop"], "ms_per_img": t["ms_per_img"]})
            if t["within_budget"]:
                result = t
                record["stopped"] = "budget holds"
                break
            if best_float_ms is not None and t["ms_per_img"] >= best_float_ms:
                record["stopped"] = "no speedup left (not faster than the best float configuration)"
                break
        else:
            record["stopped"] = "every conv group is float" if len(record["steps"]) == len(q.fallback_steps(order)) else "step limit"
        record["done"] = record.get("stopped") != "time budget"
        record["result_key"] = result["key"] if result else None
        self.fallbacks = [f for f in self.fallbacks if f["base"] != base.key] + [record]
        self.save()
        info(f"  fallback {record['stopped']}" + (f": {len(result['float_groups'])} group(s) float, drop {result['map_drop']:+.2f} points" if result else ""))
        return result

    def sweep(self, bases: list[dict[str, Any]]) -> None:
        """Threads, batch size, ORT optimisation level, OpenVINO float precision for the best bases."""
        o = self.opts
        threads = list(o.threads) if o.threads else sorted({self.nproc, max(1, self.nproc // 2)}, reverse=True)
        for t in bases:
            # from the main-phase form of the configuration, so reruns generate the same keys
            base = dataclasses.replace(Candidate(**t["candidate"]), threads=None, batch_size=self.base_batch,
                                       opt_level="all", inter_op_threads=None)
            variants: list[Candidate] = []
            for th in threads:
                for bs in o.batch_sizes:
                    variants.append(dataclasses.replace(base, threads=th, batch_size=bs))
            if base.engine == "onnxruntime":
                variants += [dataclasses.replace(base, threads=threads[0], opt_level=lvl) for lvl in ("extended", "basic")]
                if self.nproc >= 2:
                    variants.append(dataclasses.replace(base, threads=max(1, self.nproc // 2), inter_op_threads=2))
            elif base.quantized and base.exec_precision == "fp32" and self._has_bf16():
                variants.append(dataclasses.replace(base, exec_precision="bf16", threads=threads[0]))
            for v in variants:
                if self.time_left() <= 0:
                    self._skip(v.key, "time budget")
                    continue
                self.trial(v, note="sweep")

    def confirm(self) -> None:
        """Time the reference and the fastest configurations within the budget again, interleaved.

        On a shared machine a trial's timing can catch a busy moment; round-robin rounds give the
        finalists the same conditions. Their ``ms_per_img`` become the medians of these runs (the
        first measurement stays in ``ms_per_img_first``) and every trial's speedup is taken against
        the re-timed reference.
        """
        k = self.opts.confirm_top
        # finalists by their first measurement, so a rerun picks the same ones and skips this
        within = sorted((t for t in self.trials.values() if t["within_budget"] and t["key"] != self.ref_key),
                        key=lambda t: t.get("ms_per_img_first", t["ms_per_img"]))[:k]
        finalists = [self.trials[self.ref_key]] + within  # type: ignore[index]
        keys = sorted(t["key"] for t in finalists)
        if k <= 0 or len(finalists) < 2 or (self.state.get("confirmation") or {}).get("keys") == keys:
            return
        if self.time_left() <= 0:
            self._skip("confirmation", "time budget")
            return
        info(f"re-timing the reference and {len(within)} finalist(s), interleaved")
        rounds, per_round = 3, max(1, self.opts.bench_runs // 3)
        runners = []
        for t in finalists:
            cand = Candidate(**t["candidate"])
            engine = self._open(cand, self._model_file(cand))
            x = self._bench_batch(cand.batch_size)
            for _ in range(max(1, self.opts.warmup)):
                engine.run(x)
            runners.append((t, engine, x, []))
        for _ in range(rounds):
            for _t, engine, x, times in runners:
                for _ in range(per_round):
                    t0 = _now()
                    engine.run(x)
                    times.append(_now() - t0)
        for t, _engine, x, times in runners:
            ms = float(np.median(times)) * 1000.0 / x.shape[0]
            t.setdefault("ms_per_img_first", t["ms_per_img"])
            t.update(ms_per_img=ms, img_per_s=1000.0 / ms, confirmed_runs=len(times))
        runners.clear()
        ref_ms = self.trials[self.ref_key]["ms_per_img"]  # type: ignore[index]
        for t in self.trials.values():
            t["speedup_vs_reference"] = ref_ms / t["ms_per_img"] if t["ms_per_img"] > 0 else 0.0
        self.state["confirmation"] = {"keys": keys, "rounds": rounds, "runs_per_round": per_round}
        self.save()

    def choose(self) -> dict[str, Any]:
        """The fastest trial within the budget, with the reason."""
        ok = [t for t in self.trials.values() if t["status"] == "ok"]
        within = [t for t in ok if t["within_budget"]]
        ref = self.trials[self.ref_key]  # type: ignore[index]
        best = min(within, key=lambda t: (t["ms_per_img"], t["map_drop"]))
        rejected = sorted((t for t in ok if not t["within_budget"] and t["ms_per_img"] < best["ms_per_img"]), key=lambda t: t["ms_per_img"])
        reason = (f"fastest of {len(within)} measured configurations within the {self.opts.max_map_drop:g}-point mAP budget "
                  f"({len(ok)} measured): {best['ms_per_img']:.1f} ms/img, {best['speedup_vs_reference']:.2f}x ONNX Runtime's "
                  f"default fp32 ({ref['ms_per_img']:.1f} ms/img), mAP {best['bbox_mAP']:.4f} vs {ref['bbox_mAP']:.4f} "
                  f"(drop {best['map_drop']:+.2f} points)")
        if best["float_groups"]:
            reason += f"; {len(best['float_groups'])} conv group(s) kept float by the accuracy fallback: {', '.join(best['float_groups'])}"
        if rejected:
            r = rejected[0]
            reason += f"; faster but over budget: {r['label']} ({r['ms_per_img']:.1f} ms/img, drop {r['map_drop']:+.2f} points)"
        return dict(best, reason=reason)

    # ------------------------------------------------------------------ artifact

    def save_artifact(self, chosen: dict[str, Any]) -> Path:
        """``<output>/best``: the chosen model and ``artifact.json`` with its engine options."""
        from fcos_offline.export.metadata import read_metadata

        best = self.out / BEST_DIR
        tmp = self.out / (BEST_DIR + ".part")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        cand = Candidate(**chosen["candidate"])
        model = self._model_file(cand)  # rebuilt if its files were removed
        if model.suffix == ".xml":
            shutil.copy(model, tmp / "model.xml")
            shutil.copy(model.with_suffix(".bin"), tmp / "model.bin")
            meta = model.with_suffix(".meta.json")
            (tmp / "model.meta.json").write_text(meta.read_text() if meta.is_file() else json.dumps(read_metadata(self.source)))
            model_file = "model.xml"
        else:
            shutil.copy(model, tmp / "model.onnx")
            model_file = "model.onnx"
        metadata = read_metadata(self.source)
        post_file = None
        if metadata.get("nms_in_graph") is False:
            post = self.source.with_name(self.source.name[: -len(".onnx")] + ".post.onnx")
            shutil.copy(post, tmp / "model.post.onnx")
            post_file = "model.post.onnx"
        version = _engine_version(cand.engine)
        engine_options = {"threads": cand.threads, "precision": "fp32" if cand.engine == "onnxruntime" else cand.exec_precision,
                          "ort_opt_level": cand.opt_level, "inter_op_threads": cand.inter_op_threads, "batch_size": cand.batch_size}
        artifact = {
            "engine": cand.engine, "engine_version": version, "batch_size": cand.batch_size,
            "input_shape": [cand.batch_size, 3, *self.data.canvas], "dynamic_batch": True,
            "precision": chosen["precision"], "float_precision": chosen.get("float_precision"),
            "source": str(self.source), "model_file": model_file, "post_file": post_file,
            "tuned": True, "engine_options": engine_options, "trial": chosen["key"],
            "quantization": _quant_description(cand), "float_groups": chosen["float_groups"], "float_nodes": chosen["float_nodes"],
            "bbox_mAP": chosen["bbox_mAP"], "map_drop": chosen["map_drop"], "ms_per_img": chosen["ms_per_img"],
            "infer": f"fcos-offline infer --model {best} --batch-size {cand.batch_size} --images DIR",
        }
        (tmp / "artifact.json").write_text(json.dumps(artifact, indent=2))
        shutil.rmtree(best, ignore_errors=True)
        os.replace(tmp, best)
        return best

    def verify_artifact(self, best: Path, chosen: dict[str, Any]) -> float:
        """mAP of the artifact as ``infer`` runs it (engine options from artifact.json)."""
        from fcos_offline.engine.backends import EngineOptions, open_engine

        engine = open_engine(best, EngineOptions())
        return self.evaluate_engine(engine, chosen["batch_size"], "best")

    # ------------------------------------------------------------------ main

    def save(self) -> None:
        """Write tune.json (atomically) with everything so far."""
        chosen = self.state.get("chosen")
        payload = {
            "version": FORMAT_VERSION, "context": self.context,
            "settings": {
                "max_map_drop": self.opts.max_map_drop, "batch_sizes": list(self.opts.batch_sizes),
                "threads": list(self.opts.threads) if self.opts.threads else None, "engines": list(self.opts.engines),
                "time_budget_s": self.opts.time_budget, "bench_runs": self.opts.bench_runs, "cores": self.nproc,
            },
            "data": self.data.description, "model": str(self.source),
            "reference": {"key": self.ref_key, **({k: self.trials[self.ref_key][k] for k in ("bbox_mAP", "ms_per_img")} if self.ref_key in self.trials else {})},
            "float_by_design": self.state.get("float_by_design"),
            "sensitivity": self.sensitivity,
            "trials": list(self.trials.values()),
            "fallback": self.fallbacks,
            "confirmation": self.state.get("confirmation"),
            "skipped": self.skipped,
            "chosen": chosen,
            "elapsed_s": _now() - self.start,
        }
        _atomic_json(self.out / TUNE_FILE, payload)

    def run(self) -> dict[str, Any]:
        """The whole search; returns the tune.json content."""
        from fcos_offline.export.metadata import read_metadata
        from fcos_offline.tune.quantize import float_by_design

        self._validate()
        self.out.mkdir(parents=True, exist_ok=True)
        demo = not (self.opts.model or self.opts.coco or self.opts.images)
        self.source = self._prepare_model(demo)
        metadata = read_metadata(self.source)
        canvas = tuple(metadata.get("input_shape") or [])
        if len(canvas) != 2:
            import onnx

            dims = onnx.load(str(self.source), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
            canvas = (dims[2].dim_value, dims[3].dim_value)
        self._check_batch(metadata)
        self.data = self._prepare_data(demo, metadata, canvas)  # type: ignore[arg-type]
        self.context = self._context()
        self._load_previous()
        self.state["float_by_design"] = float_by_design(self.source)
        info(f"tuning {self.source} ({canvas[0]}x{canvas[1]}) on {self.data.description}; budget {self.opts.max_map_drop:g} mAP points"
             + (f", time budget {self.opts.time_budget:g} s" if self.opts.time_budget else ""))

        self.base_batch = 1 if 1 in self.opts.batch_sizes else min(self.opts.batch_sizes)
        ref = Candidate("onnxruntime", "fp32", "fp32", batch_size=self.base_batch)
        self.ref_key = ref.key
        if self.trial(ref, note="reference: ONNX Runtime defaults") is None:
            raise FcosError("the reference configuration (ONNX Runtime fp32) failed; see the warning above")
        # the remaining candidates
        for cand in self.candidate_list():
            if cand.build == "fp32" and cand.exec_precision == "bf16":
                auto = self.trials.get(dataclasses.replace(cand, exec_precision="auto").key)
                if not self._has_bf16() or (auto is not None and auto["precision"] == "bf16"):
                    continue  # no bf16 here, or OpenVINO's default already runs bf16
            self.trial(cand)
        # accuracy fallback for int8 models over budget (fastest first)
        if self.opts.fallback:
            self._run_fallbacks()
        if self.opts.sweep:
            within = sorted((t for t in self.trials.values() if t["within_budget"]), key=lambda t: t["ms_per_img"])
            bases, seen = [], set()
            for t in within:
                if t["accuracy_id"] not in seen:
                    seen.add(t["accuracy_id"])
                    bases.append(t)
            self.sweep(bases[: self.opts.sweep_top])
        self.confirm()
        ref_map = self.trials[self.ref_key]["bbox_mAP"]
        while True:
            chosen = self.choose()
            best = self.save_artifact(chosen)
            info(f"verifying {best} through infer + postprocess")
            verified = self.verify_artifact(best, chosen)
            drop = 100.0 * (ref_map - verified)
            chosen.update(trial_bbox_mAP=chosen["bbox_mAP"], bbox_mAP=verified, map_drop=drop, artifact=str(best), verified=True)
            chosen["within_budget"] = drop <= self.opts.max_map_drop + 1e-9
            if abs(verified - chosen["trial_bbox_mAP"]) > 1e-6:
                warn(f"the artifact's mAP {verified:.4f} differs from its trial's {chosen['trial_bbox_mAP']:.4f} (batch/threads numerics)")
            if chosen["within_budget"] or chosen["key"] == self.ref_key:
                break
            # its own numbers put it over budget: record them and choose again
            trial = self.trials[chosen["key"]]
            trial.update(bbox_mAP=verified, map_drop=drop, within_budget=False, accuracy_from="verification")
        art = json.loads((best / "artifact.json").read_text())
        art.update(bbox_mAP=verified, map_drop=chosen["map_drop"])
        (best / "artifact.json").write_text(json.dumps(art, indent=2))
        self.state["chosen"] = chosen
        self.save()
        return json.loads((self.out / TUNE_FILE).read_text())

    def _check_batch(self, metadata: dict[str, Any]) -> None:
        import onnx

        dim = onnx.load(str(self.source), load_external_data=False).graph.input[0].type.tensor_type.shape.dim[0]
        if dim.HasField("dim_value") and dim.dim_value > 0:
            fixed = dim.dim_value
            if set(self.opts.batch_sizes) != {fixed}:
                warn(f"{self.source} has a fixed batch of {fixed}: tuning batch size {fixed} only (export with --dynamic-export for more)")
                self.opts = dataclasses.replace(self.opts, batch_sizes=(fixed,))

    def _run_fallbacks(self) -> None:
        """One fallback per engine/quantizer family over budget, on its most accurate near-fastest model."""
        ok = list(self.trials.values())
        floats = [t for t in ok if t["within_budget"] and not Candidate(**t["candidate"]).quantized]
        best_float_ms = min((t["ms_per_img"] for t in floats), default=None)
        over = [t for t in ok if Candidate(**t["candidate"]).quantized and not t["candidate"]["float_groups"]
                and not t["within_budget"] and t["candidate"]["threads"] is None and t["accuracy_from"] == t["key"]]
        families: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for t in over:
            families.setdefault((t["engine"], t["build"].split(":")[0]), []).append(t)
        order = sorted(families.values(), key=lambda ts: min(t["ms_per_img"] for t in ts))
        for ts in order:
            best_within = min((t["ms_per_img"] for t in self.trials.values() if t["within_budget"]), default=float("inf"))
            fastest = min(t["ms_per_img"] for t in ts)
            if best_within <= 1.1 * fastest:
                continue  # something within budget is about as fast already; float convs only slow this down
            base = min((t for t in ts if t["ms_per_img"] <= 1.1 * fastest), key=lambda t: t["map_drop"])
            cand = Candidate(**base["candidate"])
            if self.time_left() <= 0:
                self._skip(f"fallback {cand.key}", "time budget")
                continue
            self.fallback(cand, best_float_ms)


def _engine_version(engine: str) -> str:
    if engine == "openvino":
        import openvino as ov

        return ov.get_version()
    import onnxruntime as ort

    return ort.__version__


def _quant_description(cand: Candidate) -> dict[str, Any] | None:
    if not cand.quantized:
        return None
    kind, tag = cand.build.split(":", 1)
    if kind == "ort-qdq":
        cfg = _ort_config(tag)
        return {"tool": "onnxruntime.quantization.quantize_static", "format": cfg.quant_format.upper(), **dataclasses.asdict(cfg)}
    return {"tool": "nncf.quantize", "target_device": "CPU", "ignored_scope": "post-processing, head Scale/exp, float_nodes",
            **dataclasses.asdict(_nncf_config(tag))}


def _nncf_config(tag: str):
    """``performance-bc-mm`` -> :class:`NncfConfig` (``bc``: full bias correction instead of the fast one;
    ``mm``: global min/max activation ranges)."""
    from fcos_offline.tune.quantize import NncfConfig

    parts = tag.split("-")
    return NncfConfig(preset=parts[0], fast_bias_correction="bc" not in parts[1:],
                      activation_ranges="minmax" if "mm" in parts[1:] else "mean_minmax")


def _ort_config(tag: str):
    """``u8s8-minmax-pc`` -> :class:`OrtQuantConfig`."""
    from fcos_offline.tune.quantize import OrtQuantConfig

    parts = tag.split("-")
    types, method, gran = parts[:3]
    return OrtQuantConfig(method=method, activation_type=types[:2], weight_type=types[2:], per_channel=gran == "pc",
                          keep_activations="keepact" in parts[3:], quant_format="qoperator" if "qop" in parts[3:] else "qdq")


class _quiet_stdout:
    """Silence libraries that print (ORT's histogram calibrators) while keeping our stderr progress."""

    def __enter__(self):
        import contextlib
        import io

        self._ctx = contextlib.redirect_stdout(io.StringIO())
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)
        return False


def format_table(result: dict[str, Any]):
    """A rich Table of every trial (the chosen one marked)."""
    from rich.table import Table

    chosen_key = (result.get("chosen") or {}).get("key")
    table = Table(title=f"tune: {len(result['trials'])} configurations (budget {result['settings']['max_map_drop']:g} mAP points)")
    for col, just in (("", "left"), ("engine", "left"), ("precision", "left"), ("quantization", "left"), ("float", "right"),
                      ("threads", "right"), ("batch", "right"), ("mAP", "right"), ("Δ mAP", "right"), ("ms/img", "right"),
                      ("img/s", "right"), ("speedup", "right"), ("size MB", "right")):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for t in sorted(result["trials"], key=lambda t: t["ms_per_img"]):
        c = t["candidate"]
        quant = "-" if c["build"] == "fp32" else c["build"].replace("ort-qdq:", "ORT QDQ ").replace("nncf:", "NNCF ")
        prec = t["precision"] + (f" (+{t['float_precision']})" if t.get("float_precision") else "")
        threads = f"{t['threads_effective']}" + ("" if t["threads"] else "*") + (f"+{t['inter_op_threads']}io" if t.get("inter_op_threads") else "")
        opt = f" opt-{t['ort_opt_level']}" if t["engine"] == "onnxruntime" and t["ort_opt_level"] != "all" else ""
        mark = "→" if t["key"] == chosen_key else ("" if t["within_budget"] else "✗")
        table.add_row(mark, t["engine"] + opt, prec, quant, str(len(t["float_groups"])) if t["float_groups"] else "",
                      threads, str(t["batch_size"]), f"{t['bbox_mAP']:.4f}", f"{t['map_drop']:+.2f}",
                      f"{t['ms_per_img']:.1f}", f"{t['img_per_s']:.2f}", f"{t['speedup_vs_reference']:.2f}x", f"{t['size_mb']:.1f}")
    return table


def tune(opts: TuneOptions) -> dict[str, Any]:
    """Run the search (see the module docstring); returns the ``tune.json`` content."""
    return Tuner(opts).run()
