"""``fcos-offline compare``: two models (or two dump folders) on the same images, down to the layer.

Each side is a checkpoint (the online PyTorch engine), an ONNX file, an OpenVINO IR, a
``convert``/``tune`` artifact, or a folder of dumps (ours, the recipe's ``_1``/``_2`` or ais_bench's
``_0``/``_1`` naming). Models run through the same preprocessing and ``infer`` path into
``<output>/a`` and ``<output>/b``; then the dumps are compared image by image
(:mod:`fcos_offline.compare.outputs`), evaluated against the annotations when given, the images
that differ most are listed and drawn side by side, and with ``layers`` the intermediate tensors
are compared (:mod:`fcos_offline.compare.layers`). Everything lands in ``<output>/compare.json``;
:attr:`CompareResult.within_tolerance` decides the exit code.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fcos_offline.compare.layers import TensorStat, compare_layers, first_divergence, group_errors
from fcos_offline.compare.outputs import OutputComparison, Tolerance, compare_dumps, differing, outputs_within
from fcos_offline.data.dataset import InputItem
from fcos_offline.data.letterbox import DEFAULT_CANVAS
from fcos_offline.errors import BadFileError, FcosError, UsageError
from fcos_offline.io import OutputLock, atomic_write_json, check_output_apart
from fcos_offline.progress import info
from fcos_offline.render.html import thumbnail, write_compare_html

COMPARE_FILE = "compare.json"


@dataclass
class CompareOptions:
    """What to compare and how strictly."""

    a: str
    b: str
    images: str | None = None
    annotations: str | None = None
    info_file: str | None = None  # a jpg-mode .info (image sizes) when comparing dump folders without --images
    num_images: int | None = None
    output: str = "compare"
    shape: tuple[int, int] | None = None  # canvas for a checkpoint side (default: the other side's, else 800x1333)
    batch_size: int = 1
    iou_thr: float = 0.5
    score_tol: float = 1e-3
    box_tol: float = 1.0  # canvas pixels
    layers: bool = False
    atol: float = 1e-3
    rtol: float = 1e-3
    layer_images: int = 2
    worst: int = 10
    draw: int = 3
    max_map_drop: float | None = None  # points: accept B when its mAP is at most this much below A's (needs annotations)


@dataclass
class Side:
    """One side of the comparison."""

    name: str  # "a" or "b"
    path: Path
    kind: str  # dumps | checkpoint | onnx | openvino-ir | artifact
    canvas: tuple[int, int] | None
    dumps: Path | None = None
    map: dict[str, Any] | None = None

    def describe(self) -> dict[str, Any]:
        """JSON view."""
        return {
            "path": str(self.path),
            "kind": self.kind,
            "canvas": list(self.canvas) if self.canvas else None,
            "dumps": str(self.dumps) if self.dumps else None,
            "mAP": self.map,
        }


@dataclass
class CompareResult:
    """The comparison (what ``compare.json`` holds)."""

    a: Side
    b: Side
    outputs: OutputComparison
    options: CompareOptions
    layers: list[TensorStat] = field(default_factory=list)
    untapped: list[str] = field(default_factory=list)  # convolutions one graph fused or folded away: not compared
    sensitivity: dict[str, float] = field(default_factory=dict)  # int8 B: tune's per-group quantization signal
    pictures: list[str] = field(default_factory=list)

    @property
    def within_tolerance(self) -> bool:
        """Every detection matched, errors within tolerance, no tensor beyond tolerance."""
        tol = Tolerance(self.options.iou_thr, self.options.score_tol, self.options.box_tol)
        return outputs_within(self.outputs.overall(), tol) and first_divergence(self.layers) is None

    @property
    def map_drop_points(self) -> float | None:
        """How much lower B's mAP is than A's, in points (None without mAPs)."""
        if self.a.map is None or self.b.map is None:
            return None
        return 100.0 * (self.a.map["bbox_mAP"] - self.b.map["bbox_mAP"])

    @property
    def accepted(self) -> bool:
        """The verdict: within ``max_map_drop`` points of A's mAP when that budget is given (however the
        detections differ), else :attr:`within_tolerance`."""
        if self.options.max_map_drop is None:
            return self.within_tolerance
        drop = self.map_drop_points
        return drop is not None and drop <= self.options.max_map_drop + 1e-9

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (mAP as fractions)."""
        o = self.options
        first = first_divergence(self.layers)
        out: dict[str, Any] = {
            "a": self.a.describe(),
            "b": self.b.describe(),
            "tolerance": {"iou_thr": o.iou_thr, "score_tol": o.score_tol, "box_tol_px": o.box_tol, "atol": o.atol, "rtol": o.rtol},
            "overall": self.outputs.overall(),
            "per_image": [im.to_dict() for im in self.outputs.images],
            "worst": [im.to_dict() for im in self.outputs.worst(o.worst)],
            "unreadable": self.outputs.unreadable,  # dumps a side could not read: those images count as differing
            "pictures": self.pictures,
            "within_tolerance": self.within_tolerance,
            "max_map_drop_points": o.max_map_drop,
            "map_drop_points": self.map_drop_points,
            "accepted": self.accepted,
            "units": {"mAP": "fraction", "delta_mAP": "fraction (B - A)", "map_drop_points": "mAP points (A - B)", "box_err_px": "canvas pixels"},
        }
        if self.a.map is not None and self.b.map is not None:
            out["delta_mAP"] = self.b.map["bbox_mAP"] - self.a.map["bbox_mAP"]
        if self.layers:
            out["layers"] = {
                "tensors": [s.to_dict() for s in self.layers],
                "first_divergence": first.to_dict() if first else None,
                "not_compared": self.untapped,
                "groups": dict(sorted(group_errors(self.layers).items(), key=lambda kv: -kv[1])),
            }
        if self.sensitivity:
            from fcos_offline.tune.sensitivity import METHOD

            out["quantization_sensitivity"] = {
                "method": "tune's signal (fcos_offline.tune.sensitivity.output_sensitivity): " + METHOD + ", against A",
                "order": sorted(self.sensitivity, key=lambda g: -self.sensitivity[g]),
                "scores": self.sensitivity,
            }
        return out


def _side(name: str, path_text: str) -> Side:
    """What ``path_text`` is, and its canvas when it says."""
    from fcos_offline.engine.backends import CHECKPOINT_SUFFIXES, resolve_model

    path = Path(path_text)
    if not path.exists():
        raise FcosError(f"{path}: no such model, artifact or dump folder")
    if path.is_dir() and not (path / "artifact.json").exists():
        if not any(p.suffix in (".bin", ".npy") for p in path.iterdir()):
            raise FcosError(f"{path}: a folder without artifact.json and without dumps (*_1.bin/_2.bin, *_0.bin/_1.bin or .npy)")
        from fcos_offline.evaluate.postprocess import dump_canvas

        recorded = (path / "summary.json").is_file()
        return Side(name, path, "dumps", dump_canvas(path, None, None) if recorded else None, dumps=path)
    if path.suffix.lower() in CHECKPOINT_SUFFIXES:
        from fcos_offline.model.checkpoint import load_checkpoint

        load_checkpoint(path)  # a broken file is named now, not after the other side has run
        return Side(name, path, "checkpoint", None)
    source = resolve_model(path)
    canvas = None
    if source.artifact is not None:
        canvas = source.artifact.canvas
    elif source.metadata.get("input_shape"):
        canvas = (int(source.metadata["input_shape"][0]), int(source.metadata["input_shape"][1]))
    elif source.kind == "onnx":
        import onnx

        dims = onnx.load(str(source.path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
        if dims[2].HasField("dim_value") and dims[3].HasField("dim_value"):
            canvas = (dims[2].dim_value, dims[3].dim_value)
    return Side(name, path, "artifact" if source.artifact else source.kind, canvas)


def _infer(side: Side, items: list[InputItem], out: Path, opts: CompareOptions) -> Path:
    from fcos_offline.engine.backends import EngineOptions, open_engine
    from fcos_offline.engine.infer import cap_batch, run_inference

    dumps = out / side.name / "dumps"
    shutil.rmtree(dumps, ignore_errors=True)
    batch = cap_batch(opts.batch_size, len(items))
    info(f"{side.name.upper()}: running {side.path} on {len(items)} images")
    with open_engine(side.path, EngineOptions(batch_size=batch), side.canvas) as engine:
        run_inference(engine, items, dumps, batch, perf_dir=out / side.name, workers=0 if len(items) <= 16 else None)
    return dumps


def _layers_onnx(side: Side) -> Path | None:
    """The ONNX graph ``--layers`` reads for ``side`` (None: a checkpoint, exported later); refuses other kinds up front."""
    if side.kind == "onnx":
        return side.path
    if side.kind == "artifact" and (side.path / "model.onnx").is_file():
        return side.path / "model.onnx"
    if side.kind == "checkpoint":
        return None
    what = {"artifact": "an artifact without model.onnx (OpenVINO, inductor)", "openvino-ir": "an OpenVINO IR", "dumps": "a dump folder"}
    raise UsageError(
        f"{side.path}: --layers compares ONNX graphs (.onnx files, ONNX Runtime artifacts, checkpoints), not {what.get(side.kind, side.kind)}"
    )


def _static_batch(model: Path | None) -> int | None:
    """The fixed batch of an ONNX graph's input, None when dynamic (or not exported yet)."""
    import onnx

    if model is None:
        return None
    dim = onnx.load(str(model), load_external_data=False).graph.input[0].type.tensor_type.shape.dim[0]
    return dim.dim_value if dim.HasField("dim_value") and dim.dim_value > 0 else None


def _layers_batch(a: Side, b: Side) -> int:
    """The batch both graphs take for ``--layers`` (a fixed one where either has it); checked before anything runs."""
    batches = {n for n in (_static_batch(_layers_onnx(a)), _static_batch(_layers_onnx(b))) if n}
    if len(batches) > 1:
        raise UsageError(f"--layers feeds both graphs the same batch, but they take fixed batches {sorted(batches)}; convert one to the other's")
    return batches.pop() if batches else 1


def _onnx_of(side: Side, out: Path, canvas: tuple[int, int]) -> Path:
    """An ONNX graph with our tensor names for ``--layers``: the file itself, an artifact's, or the checkpoint exported."""
    model = _layers_onnx(side)
    if model is not None:
        return model
    from fcos_offline.export.onnx_export import export_checkpoint

    target = out / side.name / "export.onnx"
    info(f"exporting {side.path} for the layer comparison")
    export_checkpoint(side.path, target, canvas, dynamic_batch=True)
    return target


def _layer_batches(items: list[InputItem], batch: int, canvas: tuple[int, int], count: int) -> list[np.ndarray]:
    from fcos_offline.data.preprocess import preprocess_image, read_image

    tensors = [preprocess_image(read_image(it.path), *canvas)[0] for it in items[: max(1, count)]]
    out = []
    for start in range(0, len(tensors), batch):
        chunk = tensors[start : start + batch]
        chunk += [np.zeros_like(tensors[0])] * (batch - len(chunk))
        out.append(np.stack(chunk))
    return out


def _quantization_sensitivity(fp32: Path, other: Path, items: list[InputItem], canvas: tuple[int, int]) -> dict[str, float]:
    """For an int8 (QDQ) ``other``: tune's per-conv-group quantization signal, computed by tune's own function."""
    import onnx

    from fcos_offline.tune import quantize as q
    from fcos_offline.tune.sensitivity import output_sensitivity

    if not any(n.op_type == "QuantizeLinear" for n in onnx.load(str(other), load_external_data=False).graph.node):
        return {}
    images = q.ImageTensors([it.path for it in items], canvas)
    detail = output_sensitivity(fp32, other, images, q.conv_groups(fp32), len(items))
    return {g: float(v["score"]) for g, v in detail.items()}


def _dump_stem(path: str) -> str:
    """The image a dump file belongs to (``<stem>_<n>.bin``, ``<stem>_dets.npy``); the file's own stem otherwise."""
    stem = Path(path).stem
    return stem.rpartition("_")[0] or stem


def _draw_pair(
    image_path: str, a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], canvas: tuple[int, int], target: Path, names: tuple[str, str]
) -> None:
    import cv2

    from fcos_offline.data.letterbox import boxes_to_original, letterbox_for
    from fcos_offline.data.preprocess import read_image

    img = read_image(image_path)
    lb = letterbox_for(img.shape[1], img.shape[0], *canvas)
    panels = []
    for (labels, dets), name, color in ((a, names[0], (60, 200, 60)), (b, names[1], (60, 60, 230))):
        pic = img.copy()
        keep = labels >= 0
        for lab, box, score in zip(labels[keep], boxes_to_original(dets[keep], lb), dets[keep, 4]):
            x1, y1, x2, y2 = (int(round(v)) for v in box[:4])
            cv2.rectangle(pic, (x1, y1), (x2, y2), color, 1)
            cv2.putText(pic, f"{int(lab)}:{score:.2f}", (x1, max(10, y1 - 2)), cv2.FONT_HERSHEY_SIMPLEX, 0.35, color, 1)
        cv2.putText(pic, name, (4, 14), cv2.FONT_HERSHEY_SIMPLEX, 0.45, color, 1)
        panels.append(pic)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(target), np.hstack(panels)):
        raise FcosError(f"cannot write {target} (disk full or not writable)")


def compare(opts: CompareOptions) -> CompareResult:
    """Run the comparison (see the module docstring); writes ``<output>/compare.json``.

    The output folder (whose ``a/`` and ``b/`` are cleared) must not be or hold an input, and has
    one writer at a time.
    """
    if opts.max_map_drop is not None and not opts.annotations:
        raise UsageError("--max-map-drop judges B by its mAP: give --annotations (and --images, or --info for dump folders)")
    out = Path(opts.output)
    check_output_apart([out], [opts.a, opts.b])  # never inside a side: an artifact verifies every file in its folder
    check_output_apart([out], [opts.images, opts.annotations, opts.info_file], inside_ok=True)  # inputs: never listed below
    with OutputLock(out, "compare"):
        return _compare(opts, out)


def _compare(opts: CompareOptions, out: Path) -> CompareResult:
    from fcos_offline.data.annotations import find_annotation_file
    from fcos_offline.data.dataset import prepare_eval_set
    from fcos_offline.data.dumps import read_dumps
    from fcos_offline.engine.infer import gather_items
    from fcos_offline.evaluate.postprocess import postprocess

    a, b = _side("a", opts.a), _side("b", opts.b)
    needs_images = a.kind != "dumps" or b.kind != "dumps" or opts.layers
    if needs_images and not opts.images:
        raise UsageError("give --images DIR: a model side (or --layers) needs the images to run on")
    canvas = a.canvas or b.canvas or opts.shape or DEFAULT_CANVAS
    if opts.shape and (a.canvas or b.canvas) and tuple(opts.shape) != canvas:
        raise UsageError(f"--shape {opts.shape[0]} {opts.shape[1]} contradicts the models' canvas {canvas[0]}x{canvas[1]}")
    if a.canvas and b.canvas and a.canvas != b.canvas:
        raise FcosError(
            f"the two sides have different canvases ({a.canvas[0]}x{a.canvas[1]} vs {b.canvas[0]}x{b.canvas[1]}); "
            "their detections are not comparable pixel for pixel"
        )
    a.canvas = b.canvas = canvas
    layers_batch = _layers_batch(a, b) if opts.layers else 1
    eval_set = None
    items: list[InputItem] = []
    if opts.images and opts.annotations:
        eval_set = prepare_eval_set(out / "data", Path(opts.images), find_annotation_file(opts.annotations), opts.num_images)
        items = eval_set.items
    elif opts.images:
        items = gather_items(opts.images, None)[: opts.num_images or None]
    for side in (a, b):
        if side.kind != "dumps":
            side.dumps = _infer(side, items, out, opts)
    bad: dict[str, list[BadFileError]] = {"a": [], "b": []}
    dumps_a, dumps_b = read_dumps(a.dumps, skipped=bad["a"]), read_dumps(b.dumps, skipped=bad["b"])  # type: ignore[arg-type]
    unreadable = [{"side": s, "stem": _dump_stem(e.path), "path": e.path, "problem": e.problem} for s, errors in bad.items() for e in errors]
    if items:
        wanted = {it.stem for it in items}
        dumps_a = {k: v for k, v in dumps_a.items() if k in wanted}
        dumps_b = {k: v for k, v in dumps_b.items() if k in wanted}
        unreadable = [u for u in unreadable if u["stem"] in wanted]
    elif opts.num_images:
        keep = sorted(set(dumps_a) | set(dumps_b) | {u["stem"] for u in unreadable})[: opts.num_images]
        dumps_a, dumps_b = {k: dumps_a[k] for k in keep if k in dumps_a}, {k: dumps_b[k] for k in keep if k in dumps_b}
        unreadable = [u for u in unreadable if u["stem"] in keep]
    outputs = compare_dumps(dumps_a, dumps_b, opts.iou_thr, unreadable)
    result = CompareResult(a, b, outputs, opts)
    if opts.annotations:
        jpg_info = eval_set.jpg_info if eval_set else (Path(opts.info_file) if opts.info_file else None)
        ann = eval_set.ann_file if eval_set else find_annotation_file(opts.annotations)
        if jpg_info is None:
            raise UsageError("--annotations needs the images' sizes: give --images DIR or --info FILE (a jpg-mode .info)")
        for side in (a, b):
            s = postprocess(side.dumps, jpg_info, out / side.name / "eval", ann, *canvas)  # type: ignore[arg-type]
            side.map = {k: s[k] for k in ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75")}
    if opts.layers:
        model_a, model_b = _onnx_of(a, out, canvas), _onnx_of(b, out, canvas)
        info(f"comparing intermediate tensors on {min(len(items), max(1, opts.layer_images))} image(s)")
        result.layers, result.untapped = compare_layers(
            model_a, model_b, _layer_batches(items, layers_batch, canvas, opts.layer_images), opts.atol, opts.rtol
        )
        result.sensitivity = _quantization_sensitivity(model_a, model_b, items[: opts.layer_images], canvas)
    paths = {it.stem: it.path for it in items}
    for im in outputs.worst(opts.draw):
        if im.stem in paths:
            target = out / "worst" / f"{im.stem}.jpg"
            _draw_pair(paths[im.stem], dumps_a[im.stem], dumps_b[im.stem], canvas, target, ("A: " + a.path.name, "B: " + b.path.name))
            result.pictures.append(str(target))
    document = result.to_dict()
    atomic_write_json(out / COMPARE_FILE, document)
    tol = Tolerance(opts.iou_thr, opts.score_tol, opts.box_tol)
    pairs = [_pair(paths[im.stem], dumps_a[im.stem], dumps_b[im.stem], canvas, tol) for im in outputs.worst(opts.draw) if im.stem in paths]
    write_compare_html(out, document, [p for p in pairs if p is not None], (str(a.path), str(b.path)))
    return result


def _pair(
    image_path: str, a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], canvas: tuple[int, int], tol: Tolerance
) -> dict[str, Any] | None:
    """One image of the HTML side by side: its picture and both sides' detections in its pixels, those that differ flagged."""
    from fcos_offline.data.letterbox import boxes_to_original, letterbox_for

    pic = thumbnail(image_path)
    if pic is None:
        return None
    lb = letterbox_for(pic["width"], pic["height"], *canvas)
    flags = differing(a, b, tol)
    sides = {}
    for side, (labels, dets), differs in zip(("a", "b"), (a, b), flags):
        keep = labels >= 0
        boxes = boxes_to_original(dets[keep], lb)
        sides[side] = [
            {"bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)], "name": f"label {int(k)}", "score": float(sc), "differs": bool(d)}
            for (x1, y1, x2, y2), k, sc, d in zip(boxes[:, :4], labels[keep], dets[keep, 4], differs)
        ]
    return {**pic, "file_name": Path(image_path).name, **sides}


def compare_dump_folders(a: Path, b: Path, output: Path, iou_thr: float = 0.5) -> dict[str, Any]:
    """Two dump folders only (what ``run --compare`` does for offline vs online); returns the JSON document."""
    return compare(CompareOptions(a=str(a), b=str(b), output=str(output), iou_thr=iou_thr, draw=0)).to_dict()
