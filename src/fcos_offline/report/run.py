"""``fcos-offline run``: the whole recipe in one command, with a report.

Steps, in a work folder (each reused when already finished):

1. data: the COCO images + annotations (``--coco``), or the embedded demo set generated on the fly;
2. ``fcos_jpeg.info`` (and, with ``--write-bins``, the recipe's ``.bin`` tensors + ``fcos.info``);
3. export: checkpoint -> ``model.onnx`` (dynamic batch, NMS in the graph, verified);
4. offline: per engine and batch size, ``infer`` -> dumps -> ``postprocess`` -> COCO mAP;
5. online: the PyTorch eager baseline through the same dumps and post-processing;
6. ``report.json`` / ``report.md``, PR-curve / per-class AP / speed plots, drawn detections.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fcos_offline.errors import FcosError, UsageError
from fcos_offline.progress import info, warn

DEMO_CHECKPOINT = Path(__file__).resolve().parent.parent / "assets" / "fcos_demo.pth"


@dataclass
class RunOptions:
    """Everything ``run`` needs; the defaults run the embedded demo."""

    checkpoint: str | None = None
    model: str | None = None
    coco: str | None = None
    images: str | None = None
    annotations: str | None = None
    shape: tuple[int, int] | None = None
    batch_sizes: tuple[int, ...] = (1, 4)
    engines: tuple[str, ...] = ("onnxruntime", "openvino")
    precision: str = "fp32"
    workdir: str | None = None
    num_images: int | None = None
    online: bool = True
    write_bins: bool = False
    threads: int | None = None
    vis_images: int = 4
    overrides: Any = None
    demo_images: int | None = None


@dataclass
class _Paths:
    root: Path
    images: Path = field(init=False)
    ann_file: Path = field(init=False)

    def sub(self, *parts: str) -> Path:
        p = self.root.joinpath(*parts)
        p.mkdir(parents=True, exist_ok=True)
        return p


class WorkdirLock:
    """A lock file so two runs never interleave outputs in one work folder."""

    def __init__(self, root: Path) -> None:
        self.path = root / ".lock"

    def __enter__(self) -> "WorkdirLock":
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pid = self.path.read_text().strip() or "?"
            if pid.isdigit() and not _alive(int(pid)):
                self.path.unlink()
                return self.__enter__()
            raise FcosError(f"{self.path.parent} is in use by another run (pid {pid}); wait for it or remove {self.path}") from None
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return self

    def __exit__(self, *exc: object) -> None:
        self.path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _prepare_data(opts: RunOptions, paths: _Paths, demo: bool) -> tuple[Path, Path]:
    """Image folder and annotation file (a subset when ``num_images`` limits the run)."""
    from fcos_offline.evaluate.coco import find_annotation_file

    if demo:
        from fcos_offline.demo.synthetic import DEMO_VAL_IMAGES, DEMO_VAL_SEED, make_demo_data

        n = opts.num_images or opts.demo_images or DEMO_VAL_IMAGES
        data_root = paths.root / "data"
        marker = data_root / f".done_{n}_{DEMO_VAL_SEED}"
        if not marker.exists():
            shutil.rmtree(data_root, ignore_errors=True)
            info(f"generating {n} demo images (seed {DEMO_VAL_SEED}) in {data_root}")
            make_demo_data(data_root, split="val", num_images=n, seed=DEMO_VAL_SEED)
            marker.touch()
        return data_root / "val2017", find_annotation_file(data_root / "annotations")
    if opts.coco:
        coco = Path(opts.coco)
        images = next((coco / d for d in ("val2017", "images/val2017", "images") if (coco / d).is_dir()), None)
        if images is None:
            raise FcosError(f"{coco}: expected a val2017/ image folder inside")
        ann = find_annotation_file(coco / "annotations")
    else:
        if not (opts.images and opts.annotations):
            raise UsageError("give --coco DIR, or both --images DIR and --annotations FILE (or nothing, for the demo)")
        images, ann = Path(opts.images), find_annotation_file(opts.annotations)
    if opts.num_images:
        from fcos_offline.evaluate.coco import load_annotations

        data = load_annotations(ann)
        keep = sorted(data["images"], key=lambda i: i["file_name"])[: opts.num_images]
        ids = {i["id"] for i in keep}
        data["images"] = keep
        data["annotations"] = [a for a in data.get("annotations", []) if a["image_id"] in ids]
        subset = paths.sub("annotations") / f"subset_{opts.num_images}.json"
        _write_atomic(subset, json.dumps(data))
        ann = subset
    return Path(images), Path(ann)


def _image_items(images: Path, ann_file: Path, missing: list[str] | None = None):
    from fcos_offline.engine.infer import InputItem
    from fcos_offline.evaluate.coco import load_annotations

    data = load_annotations(ann_file)
    items = []
    for img in sorted(data["images"], key=lambda i: i["file_name"]):
        p = images / img["file_name"]
        if not p.is_file():
            warn(f"annotated image {p} is missing; it counts as having no detections")
            if missing is not None:
                missing.append(str(p))
            continue
        items.append(InputItem(p.stem, str(p), "image"))
    return items


def _write_atomic(path: Path, text: str) -> None:
    from fcos_offline.data.preprocess import atomic_write_bytes

    atomic_write_bytes(path, text.encode())


def _read_stamp(stamp: Path) -> dict[str, Any]:
    """The export stamp, or {} when absent or unreadable (then the model is exported again)."""
    try:
        data = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and "result" in data else {}


def _write_info_files(items, paths: _Paths, shape: tuple[int, int], write_bins: bool):
    """``fcos_jpeg.info`` always; ``.bin`` tensors + ``fcos.info`` with ``write_bins``."""
    from fcos_offline.data.info import make_info
    from fcos_offline.engine.infer import InputItem

    listing = paths.sub("lists")
    jpg_info = listing / "fcos_jpeg.info"
    image_dir = paths.sub("lists", "images")
    for item in items:  # the info maker lists a folder: link exactly the run's images into one
        link = image_dir / Path(item.path).name
        if not link.exists():
            os.symlink(os.path.abspath(item.path), link)
    make_info("jpg", image_dir, jpg_info)
    if not write_bins:
        return jpg_info, items
    from fcos_offline.data.preprocess import preprocess_folder

    bin_dir = paths.root / "val2017_bin"
    preprocess_folder(image_dir, bin_dir, shape[0], shape[1])
    bin_info = listing / "fcos.info"
    make_info("bin", bin_dir, bin_info, width=shape[1], height=shape[0])
    bin_items = [InputItem(Path(i.path).stem, str(bin_dir / f"{Path(i.path).stem}.bin"), "bin") for i in items]
    return jpg_info, [b for b in bin_items if Path(b.path).is_file()]


def _export(checkpoint: Path, paths: _Paths, shape: tuple[int, int], overrides) -> tuple[Path, dict[str, Any]]:
    from fcos_offline.export.metadata import read_metadata

    onnx_path = paths.sub("model") / "model.onnx"
    stamp = paths.root / "model" / "export.json"
    key = {"checkpoint": str(checkpoint.resolve()), "mtime": checkpoint.stat().st_mtime, "shape": list(shape),
           "overrides": overrides.__dict__ if overrides else None}
    previous = _read_stamp(stamp)
    if onnx_path.is_file() and previous.get("key") == key:
        info(f"reusing {onnx_path}")
        return onnx_path, previous["result"]
    stamp.unlink(missing_ok=True)  # the model file is rewritten below: never reuse a half-written one
    from fcos_offline.export.cli import export_checkpoint

    info(f"exporting {checkpoint} -> {onnx_path} ({shape[0]}x{shape[1]}, dynamic batch)")
    result = export_checkpoint(str(checkpoint), str(onnx_path), shape, dynamic_batch=True, overrides=overrides)
    result["metadata_class_names"] = read_metadata(onnx_path).get("class_names")
    _write_atomic(stamp, json.dumps({"key": key, "result": result}))
    return onnx_path, result


def _class_names(from_meta: list[str] | None, onnx_path: Path, ann_file: Path) -> list[str] | None:
    """Names for the model's labels: its own, COCO's (80 or torchvision's 91), else the annotation file's."""
    from fcos_offline.evaluate.coco import coco91_names, load_annotations
    from fcos_offline.export.metadata import read_metadata

    if from_meta:
        return from_meta
    num_classes = read_metadata(onnx_path)["config"]["head"]["num_classes"]
    if num_classes == 80:
        return None
    if num_classes == 91:
        return coco91_names()
    cats = sorted(load_annotations(ann_file)["categories"], key=lambda c: c["id"])
    return [c["name"] for c in cats] if len(cats) == num_classes else [str(i) for i in range(num_classes)]


def _evaluate(dump_dir: Path, eval_dir: Path, jpg_info: Path, ann_file: Path, shape, class_names, show: bool) -> dict[str, Any]:
    from fcos_offline.evaluate.postprocess import postprocess

    return postprocess(dump_dir, jpg_info, eval_dir, ann_file, shape[0], shape[1], class_names=class_names, show=show)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> dict[str, str | None]:
    import importlib.metadata as md

    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in ("fcos-offline", "onnxruntime", "openvino", "torch", "onnx", "numpy", "opencv-python-headless", "faster-coco-eval"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def run(opts: RunOptions) -> dict[str, Any]:
    """Run the whole recipe; returns the report dict (also written to ``report.json``)."""
    from fcos_offline.engine.backends import EngineOptions, open_engine
    from fcos_offline.engine.infer import run_inference

    demo = not (opts.checkpoint or opts.coco or opts.images)
    if not demo and not opts.checkpoint:
        raise UsageError("--coco/--images need --checkpoint (the demo model only fits the demo data)")
    if opts.checkpoint and not (opts.coco or opts.images):
        raise UsageError("--checkpoint needs --coco DIR (or --images and --annotations)")
    if any(b < 1 for b in opts.batch_sizes):  # usage errors first, before any file is looked at
        raise UsageError("batch sizes must be >= 1")
    checkpoint = Path(opts.checkpoint) if opts.checkpoint else DEMO_CHECKPOINT
    if not checkpoint.is_file():
        raise FcosError(f"{checkpoint}: no such checkpoint")
    if demo:
        from fcos_offline.demo.synthetic import DEMO_CANVAS

        shape = tuple(opts.shape or DEMO_CANVAS)
    else:
        shape = tuple(opts.shape or (800, 1333))
    root = Path(opts.workdir or Path("runs") / _dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    root.mkdir(parents=True, exist_ok=True)
    paths = _Paths(root)
    with WorkdirLock(root):
        images, ann_file = _prepare_data(opts, paths, demo)
        missing_images: list[str] = []
        items = _image_items(images, ann_file, missing_images)
        if not items:
            raise FcosError(f"no images to run in {images}")
        jpg_info, run_items = _write_info_files(items, paths, shape, opts.write_bins)
        onnx_path, export_result = _export(checkpoint, paths, shape, opts.overrides)
        class_names = _class_names(export_result.get("metadata_class_names"), onnx_path, ann_file)
        offline_model, engines, model_precision = onnx_path, opts.engines, None
        if opts.model:  # a convert/tune artifact (or another ONNX/IR) replaces the exported model offline
            from fcos_offline.engine.backends import resolve_model

            artifact = resolve_model(opts.model).artifact
            offline_model = Path(opts.model)
            engines = (artifact["engine"],) if artifact.get("engine") else opts.engines
            model_precision = artifact.get("precision")
        configs = [("offline", e, b) for e in engines for b in opts.batch_sizes]
        if opts.online:
            configs += [("online", "torch", b) for b in opts.batch_sizes]
        entries = []
        first_eval = True
        for mode, engine_name, bs in configs:
            tag = f"{mode}_{engine_name}_bs{bs}"
            model = checkpoint if engine_name == "torch" else offline_model
            engine = open_engine(model, EngineOptions(engine_name, "cpu", opts.threads,
                                                      "fp32" if engine_name == "torch" else opts.precision, bs),
                                 shape, opts.overrides)
            dump_dir = paths.sub("result", tag, "dumpOutput_device0")
            s = run_inference(engine, run_items, dump_dir, bs, resume=True, perf_dir=dump_dir.parent)
            ev = _evaluate(dump_dir, paths.sub("eval", tag), jpg_info, ann_file, shape, class_names, show=first_eval)
            first_eval = False
            lat = s.latency_ms
            entries.append({
                "mode": mode, "engine": engine_name,
                "precision": (model_precision if mode == "offline" and model_precision else
                              engine.describe().get("execution_precision", engine.options.precision)),
                "batch_size": bs, "bbox_mAP": ev["bbox_mAP"], "bbox_mAP_50": ev["bbox_mAP_50"], "bbox_mAP_75": ev["bbox_mAP_75"],
                "fps": s.throughput_fps, "engine_fps": s.infer_fps,
                "latency_ms_p50": lat["e2e"]["median"], "latency_ms_p99": lat["e2e"]["p99"],
                "infer_latency_ms_p50": lat["infer"]["median"], "infer_latency_ms_p99": lat["infer"]["p99"],
                "num_images": s.num_images - len(s.skipped), "resumed": s.num_resumed, "skipped": s.skipped + ev.get("skipped", []),
                "engine_info": s.engine, "dumps": str(dump_dir), "perf_file": s.perf_file, "eval": str(paths.root / "eval" / tag),
            })
        from fcos_offline.report.report import write_report

        report = write_report(paths.root, entries, {
            "checkpoint": str(checkpoint), "demo": demo, "images": str(images), "annotations": str(ann_file),
            "shape": list(shape), "num_images": len(items), "export": export_result, "onnx": str(onnx_path),
            "offline_model": str(offline_model),
            "streaming": not opts.write_bins, "versions": _versions(), "cpu": _cpu_name(), "cores": os.cpu_count(),
            "missing_images": missing_images,
        }, opts.vis_images)
    return report
