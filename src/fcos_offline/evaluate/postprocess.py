"""Dumps -> boxes on the original images -> COCO bbox mAP (the recipe's fcos_pth_postprocess.py step).

For every image of the annotation file (stem of ``file_name`` = dump stem): read its dumps, undo
the letterbox with the image size from the jpg-mode ``.info`` (``pad_rule`` "exact" or "recipe",
see :mod:`fcos_offline.data.letterbox`), clip to ``[0, w] x [0, h]`` ("exact" only: the recipe's
script does not clip, so "recipe" reproduces its numbers), drop padded rows.
Images without dumps count as images with no detections (``missing_dumps``); detections with an
inverted box or one far off the canvas are dropped and counted per image (``implausible_boxes``).

Files written to ``det_results_path``:

- ``bbox_results.json``: COCO results list (bbox = x, y, w, h);
- ``<stem>.txt``: one line per detection, ``label_name score x1 y1 x2 y2`` (spaces in class
  names become ``_``; score 6 decimals, coordinates 2);
- ``summary.json``: ``bbox_mAP*`` (fractions), ``stats``, ``classwise``, ``num_images``,
  ``skipped`` ([{path, problem}]), ``missing_dumps`` and more;
- ``pr_curves.json``: per-class precision/recall curves (see :func:`fcos_offline.evaluate.coco.pr_curves`);
- ``vis/<stem>.jpg`` with ``show=True``: boxes scoring at least ``show_score_thr`` drawn on the image.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from fcos_offline.data.annotations import COCO80_NAMES, find_annotation_file, label_to_category, load_annotations
from fcos_offline.data.dataset import class_names_for
from fcos_offline.data.draw import draw_detections
from fcos_offline.data.dumps import read_dumps
from fcos_offline.data.info import InfoEntry, read_info
from fcos_offline.data.letterbox import DEFAULT_CANVAS, RULES, boxes_to_original, letterbox_for
from fcos_offline.data.preprocess import read_image
from fcos_offline.errors import BadFileError, FcosError, UsageError
from fcos_offline.evaluate.coco import detections_to_coco, evaluate_bbox
from fcos_offline.io import atomic_write_bytes, atomic_write_json, read_json_bounded, read_stamp
from fcos_offline.progress import progress_bar, warn

RESULTS_FILE = "bbox_results.json"
SUMMARY_FILE = "summary.json"
PR_CURVES_FILE = "pr_curves.json"
VIS_DIR = "vis"


def _detection_lines(labels: np.ndarray, boxes: np.ndarray, names: list[str]) -> str:
    keep = (labels >= 0) & (boxes[:, 4] > 0)
    lines = []
    for label, (x1, y1, x2, y2, score) in zip(labels[keep].tolist(), boxes[keep].tolist()):
        name = names[label].replace(" ", "_") if label < len(names) else str(label)
        lines.append(f"{name} {score:.6f} {x1:.2f} {y1:.2f} {x2:.2f} {y2:.2f}\n")
    return "".join(lines)


def recorded_engine(dump_dir: str | os.PathLike) -> dict[str, Any]:
    """What ``infer`` recorded of its engine and model in the dumps' ``summary.json`` ({} for other dumps)."""
    summary = Path(dump_dir) / "summary.json"
    if not summary.is_file():
        return {}
    try:
        engine = read_json_bounded(summary, 256 << 20, "summary").get("engine")
    except (FcosError, AttributeError):
        return {}
    return engine if isinstance(engine, dict) else {}


def implausible_rows(labels: np.ndarray, dets: np.ndarray, canvas_hw: tuple[int, int]) -> np.ndarray:
    """Detections (rows of canvas-pixel ``dets``) no engine output can hold: x2 < x1 or y2 < y1, or a
    coordinate more than 4 canvas sides off it (3e38: an overflow). Clipping would turn either into a
    plausible-looking, wrong box."""
    far = 4 * max(canvas_hw)
    x1, y1, x2, y2 = (dets[:, i] for i in range(4))
    real = (labels >= 0) & (dets[:, 4] > 0)
    return np.asarray(real & ((x2 < x1) | (y2 < y1) | (np.abs(dets[:, :4]) > far).any(axis=1)))


def dump_canvas(dump_dir: str | os.PathLike, height: int | None, width: int | None) -> tuple[int, int]:
    """The canvas the dumps' boxes are in: given, else recorded by ``infer`` in ``summary.json``.

    Dumps without that record (another tool's, or an ``infer`` killed before writing it) need
    both sides given: a guessed canvas maps every box back wrong and gives a plausible, wrong mAP.
    A given canvas that contradicts the recorded one is an error for the same reason.
    """
    try:
        hw = recorded_engine(dump_dir)["input_hw"]
        recorded: tuple[int, int] | None = (int(hw[0]), int(hw[1]))
    except (KeyError, TypeError, ValueError, IndexError):
        recorded = None
    if recorded is None:
        if height is None or width is None:
            raise UsageError(
                f"{dump_dir}: no summary.json of infer records the canvas these dumps were made on; give it with "
                f"--net_input_height and --net_input_width (the recipe's: {DEFAULT_CANVAS[0]} and {DEFAULT_CANVAS[1]})"
            )
        return height, width
    given = (height or recorded[0], width or recorded[1])
    if recorded is not None and given != recorded:
        raise FcosError(
            f"{dump_dir}: the dumps were made on a {recorded[0]}x{recorded[1]} canvas (its summary.json) but "
            f"{given[0]}x{given[1]} was given; boxes would be mapped back wrong (drop --net-input-height/-width)"
        )
    return given


def postprocess(
    bin_data_path: str | os.PathLike,
    test_annotation: str | os.PathLike,
    det_results_path: str | os.PathLike,
    annotations_path: str | os.PathLike,
    net_input_height: int | None = None,
    net_input_width: int | None = None,
    net_out_num: int | None = None,
    pad_rule: str = "exact",
    show: bool = False,
    class_names: Sequence[str] | None = None,
    show_score_thr: float = 0.3,
    num_dets: int | None = None,
) -> dict[str, Any]:
    """Evaluate engine dumps against COCO annotations; write and return the summary (see module doc).

    ``net_out_num`` None detects the dump naming by file size (recipe ``_1``/``_2``, ais_bench
    ``_0``/``_1``); ``class_names`` None means the model's labels as ``infer`` recorded them beside the
    dumps (torchvision's 91, a custom model's own), else the 80 COCO classes. Bad dumps and images that
    cannot be mapped are skipped and listed in ``summary["skipped"]``.
    """
    if pad_rule not in RULES:
        raise FcosError(f"pad_rule must be one of {RULES}, got {pad_rule!r}")
    net_input_height, net_input_width = dump_canvas(bin_data_path, net_input_height, net_input_width)
    ann_file = find_annotation_file(annotations_path)
    data = load_annotations(ann_file)
    if class_names is None:  # the labels of the model infer recorded (torchvision's 91, a custom model's own), else COCO's 80
        recorded = recorded_engine(bin_data_path)
        if recorded.get("class_names") or isinstance(recorded.get("num_classes"), int):
            model = {"class_names": recorded.get("class_names"), "config": {"head": {"num_classes": recorded.get("num_classes") or 80}}}
            class_names = class_names_for(model, data)
    names = list(COCO80_NAMES if class_names is None else class_names)
    cat_ids = label_to_category(data, len(names))
    unknown = [c for c in data["categories"] if c["id"] not in set(cat_ids)]
    if unknown:
        warn(
            f"{ann_file}: {len(unknown)} categor{'y' if len(unknown) == 1 else 'ies'} the model does not predict "
            f"(first: id {unknown[0]['id']} {unknown[0].get('name', '')!r}); their ground truth counts as missed (AP 0)"
        )
    if not data["annotations"]:
        warn(f"{ann_file}: no annotations; mAP is undefined (-1, COCO's 'no ground truth'), detections are still written to {RESULTS_FILE}")
    by_stem: dict[str, str] = {}
    for img in data["images"]:
        stem = Path(img["file_name"]).stem
        if by_stem.setdefault(stem, img["file_name"]) != img["file_name"]:
            raise FcosError(
                f"{ann_file}: images {by_stem[stem]} and {img['file_name']} share the name {stem!r}; dumps are named "
                "by file stem, so one image's detections would be credited to both"
            )
    sizes: dict[str, InfoEntry] = {Path(e.path).stem: e for e in read_info(test_annotation)}
    if sizes and all(Path(e.path).suffix.lower() == ".bin" for e in sizes.values()):
        raise UsageError(
            f"{test_annotation} is a bin-mode .info (tensor paths, every size the canvas); boxes go back to each "
            "image's own size: give the jpg-mode one (fcos-offline get-info jpg IMAGES fcos_jpeg.info)"
        )
    skipped: list[BadFileError] = []
    dumps = read_dumps(bin_data_path, num_dets=num_dets, net_out_num=net_out_num, skipped=skipped)

    out_dir = Path(det_results_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    if show:
        (out_dir / VIS_DIR).mkdir(exist_ok=True)
    images = sorted(data["images"], key=lambda img: img["id"])
    earlier_texts = read_stamp(out_dir / SUMMARY_FILE).get("text_files") or []  # what a run into this folder wrote before
    texts: list[str] = []
    results: list[dict[str, Any]] = []
    missing: list[str] = []
    size_mismatch: list[str] = []
    implausible: dict[str, int] = {}  # stem -> detections dropped (inverted, or far off the canvas)
    evaluated = 0  # images whose dumps were read and mapped (with or without detections)
    with progress_bar(len(images), "postprocess") as advance:
        for img in images:
            advance(1)
            stem = Path(img["file_name"]).stem
            if stem not in dumps:
                missing.append(img["file_name"])
                continue
            labels, dets = dumps[stem]
            entry = sizes.get(stem)
            if entry is None:
                skipped.append(BadFileError(Path(bin_data_path) / stem, f"no image size in {test_annotation}"))
                continue
            if (entry.width, entry.height) != (img.get("width", entry.width), img.get("height", entry.height)):
                size_mismatch.append(stem)
            odd = implausible_rows(labels, dets, (net_input_height, net_input_width))
            if odd.any():
                implausible[stem] = int(odd.sum())
                labels = np.where(odd, -1, labels)
            lb = letterbox_for(entry.width, entry.height, net_input_height, net_input_width)
            boxes = boxes_to_original(dets, lb, pad_rule)
            if pad_rule == "exact":  # spec §9: the recipe keeps boxes reaching into the letterbox pad
                boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, entry.width)
                boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, entry.height)
            try:
                results.extend(detections_to_coco(img["id"], labels, boxes, cat_ids))
            except FcosError as exc:
                skipped.append(BadFileError(Path(bin_data_path) / stem, str(exc)))
                continue
            evaluated += 1
            atomic_write_bytes(out_dir / f"{stem}.txt", _detection_lines(labels, boxes, names).encode())
            texts.append(f"{stem}.txt")
            if show:
                try:
                    picture = draw_detections(read_image(entry.path), labels, boxes, names, show_score_thr)
                except BadFileError as exc:
                    skipped.append(exc)
                    continue
                vis_path = out_dir / VIS_DIR / f"{stem}.jpg"
                if not cv2.imwrite(str(vis_path), picture):  # OpenCV reports no reason: a full disk, mostly
                    vis_path.unlink(missing_ok=True)
                    raise FcosError(f"cannot write {vis_path} (disk full or not writable)")
    if images and not evaluated:
        first = f"; first problem: {skipped[0].path}: {skipped[0].problem}" if skipped else ""
        raise FcosError(
            f"{bin_data_path}: no usable dumps for any of the {len(images)} annotated images (looked for <stem>_1.bin/_2.bin, "
            f"ais_bench's _0/_1 or .npy{', from --net_out_num ' + str(net_out_num) if net_out_num else ''}){first}"
        )
    if size_mismatch:
        warn(
            f"{len(size_mismatch)} image(s) have a different size in {test_annotation} than in the "
            f"annotation file (first: {size_mismatch[0]}); boxes use the .info size"
        )
    if implausible:
        first = next(iter(implausible))
        warn(
            f"{sum(implausible.values())} detection(s) in {len(implausible)} image(s) have an inverted box or one far "
            f"off the {net_input_height}x{net_input_width} canvas (first: {first}); not evaluated, counted per image in "
            f"{SUMMARY_FILE} 'implausible_boxes'"
        )
    if missing:
        warn(
            f"{len(missing)} annotated image(s) have no usable dumps and count as having no detections "
            f"(first: {missing[0]}; all in {SUMMARY_FILE} 'missing_dump_files')"
        )

    for name in set(earlier_texts) - set(texts):  # an earlier run's files for images not evaluated now: not this result
        if isinstance(name, str) and Path(name).name == name and name.endswith(".txt"):
            (out_dir / name).unlink(missing_ok=True)
    atomic_write_json(out_dir / RESULTS_FILE, results, indent=1)
    metrics = evaluate_bbox(data, results)
    atomic_write_json(out_dir / PR_CURVES_FILE, metrics.pop("pr_curves"), indent=1)
    summary: dict[str, Any] = {
        **metrics,
        "annotation_file": str(ann_file),
        "dump_dir": str(bin_data_path),
        "pad_rule": pad_rule,
        "canvas": [net_input_height, net_input_width],
        "num_detections": len(results),
        "missing_dumps": len(missing),
        "missing_dump_files": missing,
        "implausible_boxes": implausible,
        "dumps_not_annotated": sorted(set(dumps) - {Path(i["file_name"]).stem for i in images}),
        "skipped": [{"path": e.path, "problem": e.problem} for e in sorted(skipped, key=lambda e: e.path)],
        "text_files": texts,
    }
    atomic_write_json(out_dir / SUMMARY_FILE, summary, indent=1)
    return summary
