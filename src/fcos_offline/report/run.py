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
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fcos_offline.cpu import cpu_description
from fcos_offline.data.dataset import (
    EvalSet,
    InputItem,
    class_names_for,
    prepare_eval_set,
    resolve_source,
)
from fcos_offline.data.letterbox import DEFAULT_CANVAS
from fcos_offline.demo import DEMO_CHECKPOINT
from fcos_offline.engine.base import ModelSource
from fcos_offline.engine.infer import InferSummary
from fcos_offline.errors import FcosError, UsageError
from fcos_offline.io import OutputLock, atomic_write_json, file_digest, json_digest, read_stamp
from fcos_offline.progress import info, warn
from fcos_offline.render.html import write_run_html
from fcos_offline.units import JSON_UNITS

#: the engine of the recipe's "online" baseline: PyTorch eager on the checkpoint
ONLINE_ENGINE = "torch"
#: the offline engines run when none are named, per device kind (ONNX Runtime's CUDA provider is opt-in: --engines)
DEFAULT_ENGINES = {"cpu": ("onnxruntime", "openvino"), "cuda": ("inductor",)}


def default_engines(device: str) -> tuple[str, ...]:
    """The offline engines ``run`` uses on ``device`` when none are named (those installed here)."""
    from fcos_offline.engine.backends import BACKENDS

    return tuple(name for name in DEFAULT_ENGINES[device.lower().split(":")[0]] if BACKENDS[name].available())


@dataclass
class RunOptions:
    """Everything ``run`` needs; the defaults run the embedded demo."""

    checkpoint: str | None = None
    model: str | None = None
    coco: str | None = None
    images: str | None = None
    annotations: str | None = None
    shape: tuple[int, int] | None = None
    batch_sizes: tuple[int, ...] | None = None  # None: the artifact's (--model), else (1, 4)
    engines: tuple[str, ...] | None = None  # None: default_engines(device)
    device: str | None = None  # where every engine runs: cpu (None), or cuda for the online baseline and the GPU engines
    precision: str | None = None  # offline execution precision; None: the artifact's, else fp32
    workdir: str | None = None
    num_images: int | None = None
    online: bool = True
    write_bins: bool = False
    threads: int | None = None
    vis_images: int = 4
    html_images: int = 60  # pictures in report.html's image browser (the worst first)
    score_thr: float = 0.3  # report.html's operating point: per-class precision/recall, confusion matrix, what is drawn
    compare: bool = False  # compare the first offline configuration's dumps with the online baseline's
    ray: str | None = None  # run every configuration on Ray ("auto": a local cluster; else a cluster address)
    ray_actors: int = 1
    ray_cpus_per_actor: float = 1.0
    ray_gpus_per_actor: float = 0.0
    overrides: Any = None


@dataclass
class _Paths:
    root: Path

    def sub(self, *parts: str) -> Path:
        p = self.root.joinpath(*parts)
        p.mkdir(parents=True, exist_ok=True)
        return p


def _bin_items(eval_set: EvalSet, paths: _Paths, shape: tuple[int, ...]) -> list[InputItem]:
    """The recipe's ``.bin`` tensors and ``fcos.info`` (``--write-bins``); items read from them."""
    from fcos_offline.data.info import make_info
    from fcos_offline.data.preprocess import preprocess_folder

    bin_dir = paths.root / "val2017_bin"
    shutil.rmtree(bin_dir, ignore_errors=True)  # tensors of exactly this set and canvas
    preprocess_folder(eval_set.jpg_info.parent / "images", bin_dir, shape[0], shape[1])
    make_info("bin", bin_dir, paths.sub("lists") / "fcos.info", width=shape[1], height=shape[0])
    bin_items = [InputItem(i.stem, str(bin_dir / f"{i.stem}.bin"), "bin") for i in eval_set.items]
    return [b for b in bin_items if Path(b.path).is_file()]


def _evaluate(dump_dir: Path, eval_dir: Path, jpg_info: Path, ann_file: Path, shape, class_names, show: bool) -> dict[str, Any]:
    from fcos_offline.evaluate.postprocess import postprocess

    return postprocess(dump_dir, jpg_info, eval_dir, ann_file, shape[0], shape[1], class_names=class_names, show=show)


def _versions() -> dict[str, str | None]:
    import importlib.metadata as md

    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in ("fcos-offline", "onnxruntime", "openvino", "torch", "onnx", "numpy", "opencv-python-headless", "faster-coco-eval"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _accelerator(device: str) -> dict[str, Any] | None:
    """GPU name, capability, memory, CUDA/cuDNN and driver versions for a CUDA run (None on CPU)."""
    if not device.lower().startswith("cuda"):
        return None
    from fcos_offline.engine.torch_runtime import device_info

    return device_info(device.lower())


def _compiled_model(checkpoint: Path, engine: str, bs: int, opts: RunOptions, shape: tuple[int, int], folder: Path) -> Path:
    """The checkpoint compiled for ``engine`` (``convert --engine inductor``) at batch ``bs``; reused while its inputs are the same."""
    from fcos_offline.engine.backends import backend
    from fcos_offline.engine.base import ConvertRequest
    from fcos_offline.engine.convert import convert
    from fcos_offline.export.cache import GRAPH_REVISION

    precision, device = opts.precision or "fp32", opts.device or "cpu"
    request = ConvertRequest(precision=precision, batch_size=bs, device=device, shape=shape, overrides=opts.overrides)
    key = json_digest(
        {
            "checkpoint": file_digest(checkpoint),
            "request": repr(request),
            "engine": engine,
            "version": backend(engine).version(),
            "graph_revision": GRAPH_REVISION,
        }
    )
    out = folder / f"{engine}_bs{bs}_{precision}_{device.replace(':', '')}"
    stamp = folder / f"{out.name}.key.json"
    if out.is_dir() and read_stamp(stamp).get("key") == key:
        return out
    info(f"compiling the checkpoint for {engine} (batch {bs}, {precision}, {device}); reused on the next run")
    convert(checkpoint, engine, out, request)
    atomic_write_json(stamp, {"key": key})
    return out


def _result_key(model: Path, engine: str, bs: int, opts: RunOptions, eval_set: EvalSet, shape: tuple[int, int]) -> str:
    """Everything that determines a configuration's dumps: model bytes, engine options, canvas, exact inputs."""

    files = [model] if model.is_file() else sorted(p for p in model.iterdir() if p.is_file())
    return json_digest(
        {
            "model": [file_digest(f) for f in files],
            "engine": engine,
            "batch_size": bs,
            "precision": opts.precision,
            "threads": opts.threads,
            "device": opts.device,
            "shape": list(shape),
            "overrides": opts.overrides.__dict__ if opts.overrides else None,
            "inputs": eval_set.digest,
            "write_bins": opts.write_bins,
        }
    )


def _fresh_result_dir(root: Path, key: str) -> Path:
    """The dump folder of one configuration; emptied when it holds another key's dumps."""

    stamp = root / "key.json"
    dump_dir = root / "dumpOutput_device0"
    previous = read_stamp(stamp).get("key")
    if previous != key and root.exists():
        if previous is not None or any(root.iterdir()):
            info(f"recomputing {root.name}: model, canvas, settings or images changed since its dumps were written")
        shutil.rmtree(root)
    dump_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(stamp, {"key": key})
    return dump_dir


def model_defaults(source: ModelSource | None) -> tuple[tuple[int, int] | None, tuple[int, ...] | None]:
    """The canvas and batch sizes ``run --model`` takes from the model when no flag says otherwise
    (an artifact's recorded ones, else what the file fixes; None where it leaves them open)."""
    if source is None:
        return None, None
    if source.artifact is not None:
        return source.artifact.canvas, (source.artifact.batch_size,)
    shape = source.metadata.get("input_shape")
    canvas = (int(shape[0]), int(shape[1])) if shape else None
    return canvas, (source.fixed_batch,) if source.fixed_batch else None


def _precision_label(stored: str | None, executed: str) -> str:
    """What a row is called: the execution precision, an int8 model's with its float ops' (``int8+bf16``)."""
    return f"int8+{executed}" if stored == "int8" and executed != "int8" else executed


def run(opts: RunOptions) -> dict[str, Any]:
    """Run the whole recipe; returns the report dict (also written to ``report.json``).

    Every configuration is one :class:`~fcos_offline.engine.job.InferRequest` through
    :func:`~fcos_offline.engine.job.infer`, the path ``infer`` takes (local or Ray, flag > artifact >
    default). With ``--model``, the model's canvas, batch, precision and threads apply wherever no
    flag is given, and the checkpoint (for the online baseline and the export check) is exported
    at the model's canvas.
    """
    from fcos_offline.cpu import machine_load
    from fcos_offline.engine.backends import backend, resolve_model
    from fcos_offline.engine.base import EngineOptions, settings_flags
    from fcos_offline.engine.infer import cap_batch
    from fcos_offline.engine.job import InferRequest, RayPlan, infer
    from fcos_offline.engine.timing import busy_note
    from fcos_offline.export.cache import cached_export
    from fcos_offline.export.metadata import read_metadata

    demo = not (opts.checkpoint or opts.coco or opts.images)
    if not demo and not opts.checkpoint:
        raise UsageError("--coco/--images need --checkpoint (the demo model only fits the demo data)")
    if opts.checkpoint and not (opts.coco or opts.images):
        raise UsageError("--checkpoint needs --coco DIR (or --images and --annotations)")
    given = settings_flags(opts.overrides)
    if opts.model and given:  # the online side would differ from the artifact's built-in ones
        raise UsageError(
            f"{' '.join(given)} with --model: {opts.model} has its settings built in; "
            "export or convert it with them, or drop --model to export the checkpoint with them"
        )
    if opts.batch_sizes is not None and any(b < 1 for b in opts.batch_sizes):  # usage errors first, before any file is looked at
        raise UsageError("batch sizes must be >= 1")
    source = resolve_model(opts.model) if opts.model else None  # before any data is made or exported
    recorded = source.artifact.engine_options if source and source.artifact else None
    device = opts.device or (recorded.device if recorded else None) or "cpu"  # the online side runs where the artifact runs
    if device.lower().split(":")[0] not in DEFAULT_ENGINES:
        raise UsageError(f"run --device takes cpu or cuda (cuda:N), not {device!r}")
    engines = opts.engines or default_engines(device)
    compiled = [e for e in engines if backend(e).CONVERT_FROM == "checkpoint"]
    if device.lower().startswith("cuda") and (opts.online or compiled):  # no CUDA for torch: say so before exporting anything
        from fcos_offline.engine.torch_runtime import torch_device

        torch_device(device)
    checkpoint = Path(opts.checkpoint) if opts.checkpoint else DEMO_CHECKPOINT
    if not checkpoint.is_file():
        raise FcosError(f"{checkpoint}: no such checkpoint")
    model_canvas, model_batches = model_defaults(source)
    if opts.shape and model_canvas and tuple(opts.shape) != model_canvas:
        raise UsageError(
            f"{opts.model} takes {model_canvas[0]}x{model_canvas[1]} inputs (its canvas is set at export), not the "
            f"{opts.shape[0]}x{opts.shape[1]} asked (--shape); drop --shape to run it at its own"
        )
    if demo:
        from fcos_offline.demo.synthetic import (
            DEMO_CANVAS,
            DEMO_VAL_IMAGES,
            DEMO_VAL_SEED,
            demo_split,
        )

        shape: tuple[int, int] = opts.shape or model_canvas or DEMO_CANVAS
    else:
        shape = opts.shape or model_canvas or DEFAULT_CANVAS
    load = machine_load()  # before this run adds its own
    root = Path(opts.workdir or Path("runs") / _dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    root.mkdir(parents=True, exist_ok=True)
    paths = _Paths(root)
    with OutputLock(root, "run"):
        if demo:
            n = opts.num_images or DEMO_VAL_IMAGES
            data_root = demo_split(paths.root / "data", "val", n, DEMO_VAL_SEED)
            images, ann = data_root / "val2017", data_root / "annotations" / "instances_val2017.json"
        else:
            images, ann = resolve_source(opts.coco, opts.images, opts.annotations)
        eval_set = prepare_eval_set(paths.sub("lists"), images, ann, opts.num_images, demo)
        ann_file, jpg_info = eval_set.ann_file, eval_set.jpg_info
        run_items = _bin_items(eval_set, paths, shape) if opts.write_bins else eval_set.items
        onnx_path, export_result = cached_export(checkpoint, paths.sub("model"), shape, opts.overrides)
        cached_names = export_result.get("metadata_class_names")
        class_names = class_names_for({"class_names": cached_names} if cached_names else read_metadata(onnx_path), ann_file)
        offline_model: Path = onnx_path
        artifact = source.artifact if source else None
        if opts.model:  # a convert/tune artifact (or another ONNX/IR) replaces the exported model offline
            offline_model = Path(opts.model)
            engines = (artifact.engine,) if artifact else engines
        asked = opts.batch_sizes or model_batches or (1, 4)
        fixed = source is not None and (source.fixed_batch is not None or (artifact is not None and not artifact.dynamic_batch))
        batch_sizes = list(dict.fromkeys(asked if fixed else (cap_batch(b, len(run_items)) for b in asked)))
        configs = [("offline", e, b) for e in engines for b in batch_sizes]
        if opts.online:
            configs += [("online", ONLINE_ENGINE, b) for b in batch_sizes]
        ray = RayPlan(opts.ray, opts.ray_actors, opts.ray_cpus_per_actor, opts.ray_gpus_per_actor) if opts.ray else None
        entries = []
        first_eval = True
        for mode, engine_name, bs in configs:
            tag = f"{mode}_{engine_name}_bs{bs}"
            online = mode == "online"  # the online baseline runs the checkpoint itself, in fp32
            model = checkpoint if online else offline_model
            if not online and not opts.model and backend(engine_name).CONVERT_FROM == "checkpoint":
                model = _compiled_model(checkpoint, engine_name, bs, opts, shape, paths.sub("model"))
            # offline: None = the artifact's recorded option, else the default (flag > artifact > default)
            options = (
                EngineOptions(engine_name, device, opts.threads, "fp32", bs)
                if online
                else EngineOptions(engine_name, opts.device, opts.threads, opts.precision, bs)
            )
            dump_dir = _fresh_result_dir(paths.root / "result" / tag, _result_key(model, engine_name, bs, opts, eval_set, shape))
            s = infer(
                InferRequest(
                    model=None if online else str(model),
                    checkpoint=str(model) if online else None,
                    items=run_items,
                    output=dump_dir,
                    options=options,
                    shape=shape,
                    overrides=opts.overrides if online else None,  # exported and compiled models have them built in
                    resume=True,
                    perf_dir=dump_dir.parent,
                    ray=ray,
                )
            )
            ev = _evaluate(dump_dir, paths.sub("eval", tag), jpg_info, ann_file, shape, class_names, show=first_eval)
            first_eval = False
            for item in ev.get("skipped", []):  # postprocess's own skips; infer's and the evaluation set's were said already
                warn(f"skipped {item['path']}: {item['problem']} (evaluating {tag}; listed in report.json)", kind="skipped")
            executed = s.engine["execution_precision"]
            stored = artifact.precision if artifact is not None and not online else None
            entries.append(
                {
                    "mode": mode,
                    "engine": engine_name,
                    "precision": _precision_label(stored, executed),
                    "stored_precision": stored,
                    "execution_precision": executed,
                    "batch_size": bs,
                    "bbox_mAP": ev["bbox_mAP"],
                    "bbox_mAP_50": ev["bbox_mAP_50"],
                    "bbox_mAP_75": ev["bbox_mAP_75"],
                    **speed_figures(s),
                    "num_images": s.num_images - len(s.skipped),
                    "resumed": s.num_resumed,
                    "skipped": eval_set.missing + s.skipped + ev.get("skipped", []),
                    "engine_info": s.engine,
                    "dumps": str(dump_dir),
                    "perf_file": s.perf_file,
                    "eval": str(paths.root / "eval" / tag),
                }
            )
        comparison = None
        if opts.compare:
            online_entry = next((e for e in entries if e["mode"] == "online"), None)
            offline_entry = next((e for e in entries if e["mode"] == "offline"), None)
            if online_entry is None or offline_entry is None:
                raise UsageError("--compare needs an offline engine and the online baseline (drop --no-online)")
            from fcos_offline.compare.run import compare_dump_folders

            comparison = compare_dump_folders(Path(online_entry["dumps"]), Path(offline_entry["dumps"]), paths.root / "compare")
        from fcos_offline.report.report import write_report

        report = write_report(
            paths.root,
            entries,
            {
                "workdir": str(paths.root),
                "checkpoint": str(checkpoint),
                "demo": demo,
                "images": str(images),
                "annotations": str(ann_file),
                "shape": list(shape),
                "num_images": len(eval_set.items) + len(eval_set.missing),
                "export": export_result,
                "onnx": str(onnx_path),
                "offline_model": str(offline_model),
                "streaming": not opts.write_bins,
                "versions": _versions(),
                **cpu_description(),  # cpu, cores (this process's), features
                "machine_load": busy_note(load, {f"{e['mode']} {e['engine']} bs{e['batch_size']}": e["engine_spread_pct"] for e in entries}),
                "device": device,
                "accelerator": _accelerator(device),
                "missing_images": [m["path"] for m in eval_set.missing],
                "missing_image_problems": eval_set.missing,
                "compare": comparison,
                "units": JSON_UNITS,
            },
            opts.vis_images,
        )
        write_run_html(root, report, _analysis(root, entries, ann_file, opts.score_thr), images, opts.html_images)
    return report


def _analysis(root: Path, entries: list[dict[str, Any]], ann_file: Path, score_thr: float) -> dict[str, Any]:
    """What report.html explains, for the first offline configuration: per class, confusion, error kinds, per image
    (``analysis.json`` beside report.json: the same figures as JSON)."""
    from fcos_offline.data.annotations import load_annotations
    from fcos_offline.evaluate.errors import analyse
    from fcos_offline.evaluate.postprocess import RESULTS_FILE

    reference = next((e for e in entries if e["mode"] == "offline"), entries[0])
    results = json.loads((Path(reference["eval"]) / RESULTS_FILE).read_text())
    analysis = {
        "configuration": f"{reference['mode']} {reference['engine']} bs{reference['batch_size']}",
        **analyse(load_annotations(ann_file), results, score_thr=score_thr),
    }
    atomic_write_json(root / "analysis.json", analysis)
    return analysis


def speed_figures(s: InferSummary) -> dict[str, Any]:
    """The three speed figures of one configuration, each named for what it measures (see docs/measurement.md).

    ``engine_img_per_s``: images / time inside the engine call; ``e2e_img_per_s``: images / wall time
    from the first file read to the last dump written; ``engine_ms_per_batch``: the engine call's
    latency per batch (service time) p50/p90/p99; ``engine_spread_pct``: how much the timed batches
    vary. ``read_to_dump_ms``: an image's time from being queued for reading to its dumps on disk,
    read-ahead queueing included (not a latency of the model).
    """
    lat = s.latency_ms
    return {
        "engine_img_per_s": s.infer_fps,
        "e2e_img_per_s": s.throughput_fps,
        "engine_ms_per_batch": {k: lat["infer"][k] for k in ("median", "p90", "p99", "count")},
        "engine_spread_pct": s.engine_spread_pct,
        "read_to_dump_ms": {k: lat["e2e"][k] for k in ("median", "p99")},
    }
