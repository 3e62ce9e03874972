"""``predict``: see what the detector sees. Images in, drawn images and COCO-format detections out.

:func:`predict` runs the model through :func:`fcos_offline.engine.job.infer` (the same feed, engines,
batching and timing as ``fcos-offline infer``; a checkpoint is exported first through the export cache
``run`` and ``tune`` use), with the dumps in a working folder ``<output>/work/dumps``, then maps every
detection back to its original image with the letterbox's exact inverse (clipped to the image, as
``postprocess`` does) and writes into ``output``:

- ``<stem>.jpg``: the image with the detections scoring at least ``score_thr`` drawn
  (:func:`fcos_offline.data.draw.draw_detections`);
- ``predictions.json``: COCO results (``image_id``, ``file_name``, ``category_id``, ``bbox`` [x, y, w, h] in
  original pixels, ``score``) for **every** detection the model returned, whatever its score: the same
  detections ``postprocess`` evaluates, so ``evaluate_bbox`` on them gives its mAP;
- ``labels/<stem>.txt`` (``save_txt``): one line per drawn detection, ``class_id class_name score x1 y1 x2 y2``
  (``class_id``: the model's 0-based label; spaces in names become ``_``);
- ``predict.json``: the summary (images, detections, skipped images, speed as ``infer`` measures it).

``image_id`` is the number a file is named by when every input is named by one (COCO's ``000000000139.jpg``
is 139), else the image's position in the input list (0-based). ``category_id`` follows the label mapping
``postprocess`` uses: COCO's ids for an 80-class model, the label itself for torchvision's 91, else label + 1.
Images that cannot be read are named in one line and skipped (listed in ``predict.json``).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from fcos_offline.data.annotations import COCO80_CATEGORY_IDS, COCO80_NAMES, coco91_names, read_class_names
from fcos_offline.data.dataset import InputItem
from fcos_offline.data.draw import draw_detections
from fcos_offline.data.dumps import read_dumps
from fcos_offline.data.letterbox import DEFAULT_CANVAS, boxes_to_original, letterbox_for
from fcos_offline.data.preprocess import read_image
from fcos_offline.engine.base import EngineOptions
from fcos_offline.errors import BadFileError, FcosError, UsageError
from fcos_offline.io import OutputLock, atomic_write_bytes, atomic_write_json, check_output_apart, read_stamp
from fcos_offline.progress import progress_bar, warn

PREDICTIONS_FILE = "predictions.json"
SUMMARY_FILE = "predict.json"
LABELS_DIR = "labels"
WORK_DIR = "work"
#: JPEG quality of the drawn images
JPEG_QUALITY = 90


@dataclass
class PredictRequest:
    """One ``predict`` run (see the module docstring)."""

    model: str | os.PathLike  # ONNX, OpenVINO .xml, a convert/tune folder, or a checkpoint (.pth: exported at ``shape``)
    images: list[str | os.PathLike]  # folders (their images, not subfolders) and/or image files
    output: str | os.PathLike = "predictions"
    score_thr: float = 0.3  # drawn and written to labels/*.txt at or above; predictions.json holds every detection
    class_names: str | os.PathLike | None = None  # a file, one name per line; None: the model's own, else COCO's 80
    save_txt: bool = False
    shape: tuple[int, int] | None = None  # a checkpoint's canvas (default 800x1333); an exported model's is its own
    options: EngineOptions = field(default_factory=EngineOptions)
    workers: int | None = None  # feed processes (None: infer's default)


def gather_images(entries: list[str | os.PathLike]) -> list[InputItem]:
    """Items of every image file given and every image directly in every folder given, in that order (a file
    given twice is listed once). Files are taken as given: one that is not an image is skipped when read."""
    from fcos_offline.engine.infer import items_from_images

    items: list[InputItem] = []
    seen: set[str] = set()
    for entry in entries:
        p = Path(entry)
        if p.is_dir():
            found = items_from_images(p)
            if not found:
                warn(f"{p}: no images (.jpg, .jpeg, .png, .bmp) directly in this folder")
        elif p.exists():
            found = [InputItem(p.stem, str(p), "image")]
        else:
            raise FcosError(f"{p}: no such image or folder")
        for item in found:
            key = os.path.realpath(item.path)
            if key not in seen:
                seen.add(key)
                items.append(item)
    if not items:
        raise FcosError(f"no images in {', '.join(str(e) for e in entries)}")
    return items


def image_ids(items: list[InputItem]) -> list[int]:
    """COCO ids from the file names when every one is a number (and no two are the same), else positions."""
    if all(i.stem.isdigit() for i in items):
        ids = [int(i.stem) for i in items]
        if len(set(ids)) == len(ids):
            return ids
    return list(range(len(items)))


def category_id(label: int, num_classes: int) -> int:
    """The COCO category of a model label (``postprocess``'s mapping; label + 1 for a model of its own classes)."""
    if num_classes == 80 and label < 80:
        return COCO80_CATEGORY_IDS[label]
    if num_classes == 91:
        return label
    return label + 1


def model_class_names(engine: dict[str, Any], given: list[str] | None) -> tuple[list[str], int]:
    """Names and class count: ``given`` (a file's), else the model's recorded ones, else COCO's 80 (or torchvision's 91)."""
    recorded = engine.get("class_names") or None
    num = engine.get("num_classes")
    num_classes = int(num) if isinstance(num, int) else len(given or recorded or COCO80_NAMES)
    if given is not None:
        if len(given) != num_classes:
            warn(f"the class-name list has {len(given)} names but the model has {num_classes} classes; labels past the list are shown by number")
        return given, num_classes
    if recorded:
        return [str(n) for n in recorded], num_classes
    if num_classes == 91:
        return coco91_names(), 91
    if num_classes != 80:
        warn(f"the model records no class names for its {num_classes} classes; labels are shown by number (give --class-names FILE)")
        return [str(i) for i in range(num_classes)], num_classes
    return list(COCO80_NAMES), 80


def _implausible(labels: np.ndarray, dets: np.ndarray, canvas_hw: tuple[int, int]) -> np.ndarray:
    """Rows no engine output can hold (``postprocess.implausible_rows``: inverted, or 4 canvas sides off it)."""
    far = 4 * max(canvas_hw)
    real = (labels >= 0) & (dets[:, 4] > 0)
    inverted = (dets[:, 2] < dets[:, 0]) | (dets[:, 3] < dets[:, 1])
    return np.asarray(real & (inverted | (np.abs(dets[:, :4]) > far).any(axis=1)))


def _encode_jpeg(path: Path, image: np.ndarray) -> None:
    ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise FcosError(f"cannot encode {path} as JPEG")
    atomic_write_bytes(path, data.tobytes())


def _txt_lines(labels: np.ndarray, boxes: np.ndarray, names: list[str]) -> str:
    lines = []
    for label, (x1, y1, x2, y2, score) in zip(labels.tolist(), boxes.tolist()):
        name = (names[label] if label < len(names) else str(label)).replace(" ", "_")
        lines.append(f"{label} {name} {score:.6f} {x1:.2f} {y1:.2f} {x2:.2f} {y2:.2f}\n")
    return "".join(lines)


def _model_to_run(req: PredictRequest, work: Path) -> tuple[dict[str, Any], str | None]:
    """The infer request's model fields and, for a checkpoint exported here, the exported file."""
    from fcos_offline.engine.backends import backend, resolve_model

    source = resolve_model(req.model)
    if source.kind != "checkpoint":
        return {"model": str(req.model), "shape": req.shape}, None
    shape = req.shape or DEFAULT_CANVAS
    engine = req.options.engine
    if engine is not None and "checkpoint" in backend(engine).MODEL_KINDS:  # the online engine runs it as it is
        return {"checkpoint": str(req.model), "shape": shape}, None
    if engine is not None and "onnx" not in backend(engine).MODEL_KINDS:
        raise UsageError(f"--engine {engine} runs a converted folder: 'fcos-offline convert --engine {engine} --checkpoint X.pth' first")
    from fcos_offline.export.cache import cached_export

    onnx_path, _ = cached_export(Path(req.model), work / "model", shape)
    return {"model": str(onnx_path), "shape": None}, str(onnx_path)


def check_request(req: PredictRequest) -> None:
    """Usage errors before any work: the threshold, and an output that overlaps an input."""
    if not 0.0 <= req.score_thr <= 1.0:
        raise UsageError(f"the score threshold must be in [0, 1], got {req.score_thr}")
    if not req.images:
        raise UsageError("give at least one image or folder of images")
    check_output_apart([req.output], [req.model, req.class_names])  # never inside a model folder: an artifact verifies every file
    check_output_apart([req.output], list(req.images))  # drawn images inside an image folder would be read as inputs next time


def predict(req: PredictRequest) -> dict[str, Any]:
    """Run ``req`` (see the module docstring); returns the summary, also written as ``<output>/predict.json``."""
    from fcos_offline.engine.job import InferRequest, infer

    start = time.perf_counter()
    check_request(req)
    given_names = read_class_names(req.class_names) if req.class_names else None
    items = gather_images(list(req.images))
    ids = image_ids(items)
    out = Path(req.output)
    with OutputLock(out, "predict"):
        work = out / WORK_DIR
        model_fields, exported = _model_to_run(req, work)
        s = infer(InferRequest(items=items, output=work / "dumps", options=req.options, workers=req.workers, **model_fields))
        names, num_classes = model_class_names(s.engine, given_names)
        canvas = (int(s.engine["input_hw"][0]), int(s.engine["input_hw"][1]))
        skipped: list[dict[str, str]] = list(s.skipped)
        bad_dumps: list[BadFileError] = []
        dumps = read_dumps(work / "dumps", skipped=bad_dumps)
        earlier = read_stamp(out / SUMMARY_FILE).get("files") or []
        if req.save_txt:
            (out / LABELS_DIR).mkdir(exist_ok=True)
        results: list[dict[str, Any]] = []
        files: list[str] = []
        drawn = implausible = 0
        inferred = {i.path for i in items} - {e["path"] for e in s.skipped}
        todo = [(item, image_id) for item, image_id in zip(items, ids) if item.path in inferred]
        draw_start = time.perf_counter()
        with progress_bar(len(todo), "predict: drawing", unit="img") as advance:
            for item, image_id in todo:
                advance(1)
                if item.stem not in dumps:
                    problem = next((e.problem for e in bad_dumps if Path(e.path).name.startswith(item.stem)), "no dumps written")
                    warn(f"skipped {item.path}: {problem}", kind="skipped")
                    skipped.append({"path": item.path, "problem": problem})
                    continue
                try:
                    image = read_image(item.path)
                except BadFileError as exc:  # changed since it was inferred
                    warn(f"skipped {item.path}: {exc.problem}", kind="skipped")
                    skipped.append({"path": item.path, "problem": exc.problem})
                    continue
                labels, dets = dumps[item.stem]
                odd = _implausible(labels, dets, canvas)
                implausible += int(odd.sum())
                labels = np.where(odd, -1, labels)
                height, width = image.shape[:2]
                boxes = boxes_to_original(dets, letterbox_for(width, height, *canvas), "exact")
                boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, width)
                boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, height)
                keep = (labels >= 0) & (boxes[:, 4] > 0)
                labels, boxes = labels[keep], boxes[keep]
                name = Path(item.path).name
                for label, (x1, y1, x2, y2, score) in zip(labels.tolist(), boxes.tolist()):
                    results.append(
                        {
                            "image_id": image_id,
                            "file_name": name,
                            "category_id": category_id(label, num_classes),
                            "bbox": [x1, y1, x2 - x1, y2 - y1],
                            "score": score,
                        }
                    )
                shown = boxes[:, 4] >= req.score_thr
                drawn += int(shown.sum())
                _encode_jpeg(out / f"{item.stem}.jpg", draw_detections(image, labels, boxes, names, req.score_thr))
                files.append(f"{item.stem}.jpg")
                if req.save_txt:
                    atomic_write_bytes(out / LABELS_DIR / f"{item.stem}.txt", _txt_lines(labels[shown], boxes[shown], names).encode())
                    files.append(f"{LABELS_DIR}/{item.stem}.txt")
        draw_s = time.perf_counter() - draw_start
        for stale in set(earlier) - set(files):  # an earlier run's drawings and labels for images not drawn now
            if (
                isinstance(stale, str)
                and stale.endswith((".jpg", ".txt"))
                and Path(stale).parts in ((Path(stale).name,), (LABELS_DIR, Path(stale).name))
            ):
                (out / stale).unlink(missing_ok=True)
        if implausible:
            warn(f"{implausible} detection(s) with an inverted box or one far off the {canvas[0]}x{canvas[1]} canvas were dropped")
        atomic_write_json(out / PREDICTIONS_FILE, results, indent=1)
        lat = s.latency_ms["infer"]
        drawn_images = sum(1 for f in files if f.endswith(".jpg"))
        summary: dict[str, Any] = {
            "images": len(items),
            "drawn_images": drawn_images,
            "detections": len(results),
            "detections_drawn": drawn,
            "score_thr": req.score_thr,
            "skipped": sorted(skipped, key=lambda e: e["path"]),
            "implausible_boxes": implausible,
            "model": str(req.model),
            "exported_model": exported,
            "engine": s.engine,
            "batch_size": s.batch_size,
            "canvas": list(canvas),
            "num_classes": num_classes,
            "class_names": names,
            "engine_img_per_s": s.infer_fps,
            "engine_spread_pct": s.engine_spread_pct,
            "e2e_img_per_s": s.throughput_fps,
            "engine_ms_per_batch": {"median": lat["median"], "p90": lat["p90"], "p99": lat["p99"]},
            "draw_img_per_s": drawn_images / draw_s if draw_s > 0 else 0.0,
            "wall_s": time.perf_counter() - start,
            "output": str(out),
            "predictions_file": str(out / PREDICTIONS_FILE),
            "dump_dir": str(work / "dumps"),
            "files": files,
        }
        atomic_write_json(out / SUMMARY_FILE, summary)
    return summary
