"""COCO bbox evaluation with faster-coco-eval, reported the way mmdetection's ``classwise=True`` does.

Annotation files are read and checked, and model labels mapped to categories, in
:mod:`fcos_offline.data.annotations`.

Metrics are fractions (0.357, not 35.7). ``stats`` are the 12 standard COCO numbers
(AP, AP50, AP75, APs, APm, APl, AR1, AR10, AR100, ARs, ARm, ARl) with COCO's default
``maxDets = [1, 10, 100]``; -1 means "no ground truth in that range", as in COCO. (mmdetection 2.x
evaluates with maxDets [100, 300, 1000]: the AP numbers are identical when a model keeps at most
100 detections per image, the AR labels differ.)
"""

from __future__ import annotations

import contextlib
import io
from typing import Any

import numpy as np

from fcos_offline.data.annotations import AnnotationSource, load_annotations
from fcos_offline.errors import FcosError

STAT_NAMES = (
    "AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)  # fmt: skip
SUMMARY_KEYS = ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75", "bbox_mAP_s", "bbox_mAP_m", "bbox_mAP_l")


def detections_to_coco(image_id: int, labels: np.ndarray, dets: np.ndarray, cat_ids: list[int]) -> list[dict[str, Any]]:
    """COCO result entries of one image; padded rows (label -1 or score 0) are dropped.

    ``dets`` rows are x1, y1, x2, y2, score in original-image pixels; the JSON bbox is
    [x, y, x2 - x, y2 - y] computed in float64 from the stored values.
    """
    labels = np.asarray(labels).reshape(-1)
    dets = np.asarray(dets, dtype=np.float64).reshape(-1, 5)
    keep = (labels >= 0) & (dets[:, 4] > 0)
    out = []
    for label, (x1, y1, x2, y2, score) in zip(labels[keep].tolist(), dets[keep].tolist()):
        if label >= len(cat_ids):
            raise FcosError(f"label {label} out of range for a {len(cat_ids)}-class model (image {image_id})")
        out.append(
            {
                "image_id": int(image_id),
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "score": score,
                "category_id": int(cat_ids[label]),
            }
        )
    return out


def _undefined_to_none(values: np.ndarray) -> list[float | None]:
    return [None if v < 0 else float(v) for v in values.tolist()]


def evaluate_bbox(ann: AnnotationSource, results: list[dict[str, Any]]) -> dict[str, Any]:
    """COCO bbox evaluation of ``results`` against ``ann`` (path or dict) with faster-coco-eval.

    Returns ``bbox_mAP, bbox_mAP_50, bbox_mAP_75, bbox_mAP_s, bbox_mAP_m, bbox_mAP_l`` (fractions),
    ``stats`` (the 12 COCO numbers), ``classwise`` (``[{category_id, name, AP}]``, AP null when a
    category has no ground truth), ``num_images`` and ``pr_curves`` (precision at the 101 recall
    thresholds per category, for plotting; see :func:`pr_curves`).
    """
    from faster_coco_eval import COCO, COCOeval_faster

    data = load_annotations(ann)
    gt = COCO(data)
    # loadRes adds keys to the dicts it gets: hand it copies
    dt = gt.loadRes([dict(r, bbox=list(r["bbox"])) for r in results])
    evaluator = COCOeval_faster(gt, dt, iouType="bbox", print_function=lambda *a, **k: None)
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = [float(v) for v in np.asarray(evaluator.stats)[:12]]
    precision = np.asarray(evaluator.eval["precision"])  # [T iou, R recall, K cat, A area, M maxDets]
    cat_ids = [int(c) for c in evaluator.params.catIds]
    names = {c["id"]: c["name"] for c in data["categories"]}
    classwise = []
    for k, cat_id in enumerate(cat_ids):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        ap = float(p.mean()) if p.size else None
        classwise.append({"category_id": cat_id, "name": names.get(cat_id, str(cat_id)), "AP": ap})
    report: dict[str, Any] = dict(zip(SUMMARY_KEYS, stats[:6]))
    report.update(
        stats=stats,
        classwise=classwise,
        num_images=len(evaluator.params.imgIds),
        pr_curves=pr_curves(precision, evaluator.params, cat_ids, names),
    )
    return report


def map_difference_spread(
    ann: AnnotationSource, reference: list[dict[str, Any]], candidate: list[dict[str, Any]], rounds: int = 20, seed: int = 0
) -> dict[str, Any]:
    """How much ``reference`` mAP - ``candidate`` mAP (two results on the same images) owes to the image sample.

    Half-sample (delete-d jackknife, d = n/2) estimate of its standard error: the difference is
    recomputed on ``rounds`` random halves of the images, and the spread of those values is the
    standard error of the full-set difference (for d = n/2 the jackknife factor (n-d)/d is 1).
    Returns ``se`` (mAP fraction), ``difference`` (on all images), ``rounds``, ``images`` and ``method``.
    """
    from faster_coco_eval import COCO, COCOeval_faster

    data = load_annotations(ann)
    gt = COCO(data)
    image_ids = sorted(int(i) for i in gt.getImgIds())
    if len(image_ids) < 4:
        raise FcosError(f"the spread of an mAP difference needs at least 4 images ({len(image_ids)} given)")
    dts = [gt.loadRes([dict(r, bbox=list(r["bbox"])) for r in results]) if results else None for results in (reference, candidate)]

    def mean_ap(dt: Any, ids: list[int]) -> float:
        if dt is None:
            return 0.0
        evaluator = COCOeval_faster(gt, dt, iouType="bbox", print_function=lambda *a, **k: None)
        evaluator.params.imgIds = ids
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        return max(0.0, float(np.asarray(evaluator.stats)[0]))

    rng = np.random.default_rng(seed)
    half = len(image_ids) // 2
    diffs = []
    for _ in range(rounds):
        ids = sorted(int(i) for i in rng.choice(image_ids, half, replace=False))
        diffs.append(mean_ap(dts[0], ids) - mean_ap(dts[1], ids))
    return {
        "difference": mean_ap(dts[0], image_ids) - mean_ap(dts[1], image_ids),
        "se": float(np.std(diffs, ddof=1)),
        "rounds": rounds,
        "images": len(image_ids),
        "method": f"half-sample jackknife: the difference on {rounds} random halves of the {len(image_ids)} images",
    }


def pr_curves(precision: np.ndarray, params: Any, cat_ids: list[int], names: dict[int, str]) -> dict[str, Any]:
    """Per-category precision/recall curves (area all, maxDets 100) from COCOeval's precision array.

    Returns ``{"recall": [101 thresholds], "classes": [{category_id, name, iou50, iou75, mean}]}``;
    each curve is 101 precisions (null where undefined), ``mean`` averages over IoU 0.50:0.95.
    """
    iou_thrs = np.asarray(params.iouThrs)
    i50 = int(np.argmin(np.abs(iou_thrs - 0.5)))
    i75 = int(np.argmin(np.abs(iou_thrs - 0.75)))
    classes = []
    for k, cat_id in enumerate(cat_ids):
        p = precision[:, :, k, 0, -1]  # [T, R]
        valid = p > -1
        counts = valid.sum(axis=0)
        mean = np.where(counts > 0, np.where(valid, p, 0).sum(axis=0) / np.maximum(counts, 1), -1)
        classes.append(
            {
                "category_id": cat_id,
                "name": names.get(cat_id, str(cat_id)),
                "iou50": _undefined_to_none(p[i50]),
                "iou75": _undefined_to_none(p[i75]),
                "mean": _undefined_to_none(mean),
            }
        )
    return {"recall": [float(r) for r in np.asarray(params.recThrs)], "classes": classes}
