"""Error analysis of COCO bbox results: a per-class table, a confusion matrix and TIDE's error breakdown.

:func:`analyse` takes a COCO instances dict and a COCO results list (as ``bbox_results.json``) and
returns a JSON-able dict for the HTML report; its ``method`` entry states the rules in words. The
error kinds and their fixes follow TIDE (Bolya et al., "TIDE: A General Toolbox for Identifying
Object Detection Errors", ECCV 2020); the code is our own, numpy only, plus faster-coco-eval for
the COCO AP/AR columns.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, NamedTuple

import numpy as np

from fcos_offline.data.annotations import check_instances
from fcos_offline.errors import FcosError

BG_IOU = 0.1  # TIDE's background IoU t_b
MAX_DETS = 100  # per image and class, as COCOeval's maxDets
RECALL_THRS = np.linspace(0.0, 1.0, 101)  # COCO's recall thresholds
DET_KINDS = ("tp", "cls", "loc", "both", "dupe", "bkg", "ignored")  # detection codes 0..6
TP, CLS, LOC, BOTH, DUPE, BKG, IGNORED = range(7)
DET_ERRORS = {"cls": CLS, "loc": LOC, "both": BOTH, "dupe": DUPE, "bkg": BKG}  # TIDE's errors of a detection


class _Image(NamedTuple):
    """Matching of one image's detections (sorted by descending score) to its ground truth."""

    kind: np.ndarray  # [D] code into DET_KINDS
    fixable: np.ndarray  # [D] a Cls/Loc error that TIDE's fix turns into a true positive
    target_cls: np.ndarray  # [D] class index of the GT a Cls/Loc error targets (-1 otherwise)
    gt_det: np.ndarray  # [G] index of the detection matching each GT (-1: none)
    missed: np.ndarray  # [G] TIDE's Missed error


def _iou(dets: np.ndarray, gts: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """IoU [D, G] of [x, y, w, h] boxes; for a crowd GT, intersection over the detection's area (COCO)."""
    ix = np.minimum(dets[:, None, 0] + dets[:, None, 2], gts[None, :, 0] + gts[None, :, 2]) - np.maximum(dets[:, None, 0], gts[None, :, 0])
    iy = np.minimum(dets[:, None, 1] + dets[:, None, 3], gts[None, :, 1] + gts[None, :, 3]) - np.maximum(dets[:, None, 1], gts[None, :, 1])
    inter = np.clip(ix, 0, None) * np.clip(iy, 0, None)
    det_area = (dets[:, 2] * dets[:, 3])[:, None]
    union = np.where(crowd[None, :], det_area, det_area + (gts[:, 2] * gts[:, 3])[None, :] - inter)
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _match_image(iou: np.ndarray, d_cls: np.ndarray, g_cls: np.ndarray, crowd: np.ndarray, iou_thr: float) -> _Image:
    """Greedy same-class matching, then TIDE's error kind of every other detection."""
    n_det, n_gt = iou.shape
    same = d_cls[:, None] == g_cls[None, :]
    iou_nc = np.where(crowd[None, :], 0.0, iou)  # errors look at non-crowd GT only
    candidate = same & (iou_nc >= iou_thr) & ~crowd[None, :]
    kind = np.full(n_det, BKG)  # until told otherwise: TP, ignored, or the error kind found below
    gt_det = np.full(n_gt, -1)
    for d in np.flatnonzero(candidate.any(axis=1)):
        row = np.where(candidate[d] & (gt_det < 0), iou_nc[d], -1.0)
        j = int(np.argmax(row))
        if row[j] >= 0:
            kind[d], gt_det[j] = TP, d
    unmatched = kind != TP
    kind[unmatched & (same & crowd[None, :] & (iou >= iou_thr)).any(axis=1)] = IGNORED

    matched = gt_det >= 0
    same_iou = np.where(same, iou_nc, 0.0)
    other_iou = np.where(same, 0.0, iou_nc)
    same_max = same_iou.max(axis=1, initial=0.0)
    error = kind == BKG
    loc = error & (same_max >= BG_IOU) & (same_max < iou_thr)
    cls = error & ~loc & (other_iou.max(axis=1, initial=0.0) >= iou_thr)
    dupe = error & ~loc & ~cls & (np.where(matched[None, :], same_iou, 0.0).max(axis=1, initial=0.0) >= iou_thr)
    both = error & ~loc & ~cls & ~dupe & (iou_nc.max(axis=1, initial=0.0) >= BG_IOU)
    kind[loc], kind[cls], kind[dupe], kind[both] = LOC, CLS, DUPE, BOTH

    # a Cls/Loc error targets its best-overlapping GT; TIDE fixes the highest-scoring one per unmatched GT
    target = np.full(n_det, -1)
    if n_gt:
        target[loc] = same_iou[loc].argmax(axis=1)
        target[cls] = other_iou[cls].argmax(axis=1)
    usable = target >= 0
    target_cls = np.full(n_det, -1)
    target_cls[usable] = g_cls[target[usable]]
    usable[usable] = ~matched[target[usable]]
    fixable = np.zeros(n_det, bool)
    fixable[np.flatnonzero(usable)[np.unique(target[usable], return_index=True)[1]]] = True
    missed = ~crowd & ~matched
    missed[target[usable]] = False
    return _Image(kind, fixable, target_cls, gt_det, missed)


def _confusion_image(
    iou: np.ndarray, g_cls: np.ndarray, crowd: np.ndarray, d_cls: np.ndarray, kind: np.ndarray, iou_thr: float, matrix: np.ndarray
) -> None:
    """Add one image to ``matrix`` (rows true class, columns predicted class, last row/column background).

    Detections (already at or above the score threshold, by descending score) take the not yet taken
    non-crowd GT of any class they overlap most, if IoU >= ``iou_thr``; one left over counts as
    background unless a crowd region of its class ignores it; a GT nobody took counts as missed.
    """
    bg = matrix.shape[0] - 1
    overlap = (iou >= iou_thr) & ~crowd[None, :]
    taken = np.zeros(len(g_cls), bool)
    assigned = np.zeros(len(d_cls), bool)
    for d in np.flatnonzero(overlap.any(axis=1)):
        row = np.where(overlap[d] & ~taken, iou[d], -1.0)
        j = int(np.argmax(row))
        if row[j] >= 0:
            taken[j] = assigned[d] = True
            matrix[g_cls[j], d_cls[d]] += 1
    np.add.at(matrix[bg], d_cls[~assigned & (kind != IGNORED)], 1)
    np.add.at(matrix[:, bg], g_cls[~taken & ~crowd], 1)


def _ap(tp: np.ndarray, n_gt: int) -> float:
    """COCO's 101-point interpolated AP of detections sorted by descending score (``tp``: true positive or not)."""
    ctp = np.cumsum(tp)
    precision = np.maximum.accumulate((ctp / np.arange(1, len(tp) + 1))[::-1])[::-1]
    idx = np.searchsorted(ctp / n_gt, RECALL_THRS, side="left")
    return float(precision[idx[idx < len(tp)]].sum() / len(RECALL_THRS))


def _mean_ap(cls: np.ndarray, tp: np.ndarray, n_gt: np.ndarray) -> float | None:
    """Mean AP over classes with ground truth; detections in descending score order."""
    order = np.argsort(cls, kind="stable")
    bounds = np.searchsorted(cls[order], np.arange(len(n_gt) + 1))
    aps = [_ap(tp[order[bounds[k] : bounds[k + 1]]], int(n_gt[k])) for k in np.flatnonzero(n_gt > 0)]
    return float(np.mean(aps)) if aps else None


def _coco_columns(gt: dict, results: list[dict]) -> dict[int, tuple[float | None, ...]]:
    """Category id -> (AP, AP50, AP75, AR100) from faster-coco-eval (area all, 100 detections); None: no GT."""
    from faster_coco_eval import COCO, COCOeval_faster

    coco_gt = COCO(gt)
    # loadRes adds keys to the dicts it gets: hand it copies
    coco_dt = coco_gt.loadRes([dict(r, bbox=list(r["bbox"])) for r in results])
    evaluator = COCOeval_faster(coco_gt, coco_dt, iouType="bbox", print_function=lambda *a, **k: None)
    evaluator.params.areaRng, evaluator.params.areaRngLbl = [evaluator.params.areaRng[0]], ["all"]  # the others are not needed
    evaluator.params.maxDets = [MAX_DETS]
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
    precision = np.asarray(evaluator.eval["precision"])[:, :, :, 0, -1]  # [T, R, K]
    recall = np.asarray(evaluator.eval["recall"])[:, :, 0, -1]  # [T, K]
    iou_thrs = np.asarray(evaluator.params.iouThrs)
    i50, i75 = (int(np.argmin(np.abs(iou_thrs - t))) for t in (0.5, 0.75))

    def mean(values: np.ndarray) -> float | None:
        valid = values[values > -1]
        return float(valid.mean()) if valid.size else None

    columns: dict[int, tuple[float | None, ...]] = {}
    for k, cat_id in enumerate(int(c) for c in evaluator.params.catIds):
        p = precision[:, :, k]
        columns[cat_id] = (mean(p), mean(p[i50]), mean(p[i75]), mean(recall[:, k]))
    return columns


#: what analysis.json's numbers are (the page shows the same ones as percent and points)
ANALYSIS_UNITS = {
    "AP, AP50, AP75, AR100, precision, recall, ap, tide.ap, tide.delta_ap": "fractions (0.357 = 35.7%; a delta_ap of 0.012 = 1.2 points)",
    "score_thr, iou_thr": "a score and an IoU, 0 to 1",
    "bbox": "x, y, width, height in the image's own pixels (COCO)",
    "tp, fp, fn, counts, confusion.matrix, num_gt": "counts of boxes",
}


def _worst_first(row: dict[str, Any]) -> tuple[float, int]:
    """Sort key of an image: its AP (no objects: 0 when anything is detected on it, else 1), then more false positives first."""
    ap = row["ap"] if row["ap"] is not None else (0.0 if row["dets"] else 1.0)
    return ap, -sum(d["kind"] != "tp" for d in row["dets"])


def _method(score_thr: float, iou_thr: float) -> str:
    return (
        f"Error kinds and their fixes follow TIDE (Bolya et al., ECCV 2020). Matching: in each image, detections of a class (at most "
        f"{MAX_DETS} per image and class, as COCO) take, by descending score, the not yet matched non-crowd ground truth (GT) of their "
        f"class they overlap most if IoU >= {iou_thr}; a detection left over that covers a crowd region of its class (intersection over "
        f"its own area >= {iou_thr}, as COCO) is ignored. AP is COCO's 101-point interpolated AP at IoU {iou_thr}, averaged over the "
        f"classes with non-crowd GT. Every other detection, at any score, is one error, tested in TIDE's order against non-crowd GT with "
        f"t_f = {iou_thr}, t_b = {BG_IOU}: Loc if its best IoU with a GT of its class is in [t_b, t_f); else Cls if IoU >= t_f with a GT "
        f"of another class; else Dupe if IoU >= t_f with an already matched GT of its class; else Bkg if IoU < t_b with every GT; else "
        f"Both (IoU in [t_b, t_f) with a GT of another class only). A GT left unmatched is Missed unless a Cls or Loc error targets it. "
        f"ΔAP of a kind is the AP with only that kind fixed minus the base AP (negative values set to 0, as TIDE): a Cls (Loc) error "
        f"becomes a true positive, relabelled to its GT's class (box moved onto its GT), if it is the highest-scoring Cls or Loc error "
        f"targeting an unmatched GT, and is removed otherwise; Dupe, Bkg and Both errors are removed; Missed GT are taken out of the GT "
        f"count (a class left without GT drops out of the mean). Differences from TIDE: TIDE's mAP also averages classes with detections "
        f"but no GT, keeps {MAX_DETS} detections per image rather than per image and class, and its Loc and Bkg bounds include t_f and "
        f"t_b. The class table's AP (IoU 0.50:0.95), AP50, AP75 and AR100 are COCO's (faster-coco-eval); its precision, recall, tp, fp "
        f"and fn use the matching above restricted to detections scoring >= {score_thr}. Confusion matrix (scores >= {score_thr}): by "
        f"descending score each detection takes the not yet taken non-crowd GT of any class it overlaps most with IoU >= {iou_thr} "
        f"(row: the GT's class, column: the detection's class); a detection taking none is a background row entry unless a crowd region "
        f"of its class ignores it, and a GT nobody took is a background column entry. Per-image AP is the AP at IoU {iou_thr} over the "
        f"image's classes with GT."
    )


def _gt_arrays(anns: list[dict], image_index: dict[int, int], cat_index: dict[int, int]) -> tuple[np.ndarray, ...]:
    """Image index, class index, box, crowd flag of the annotations COCO evaluates (listed image and category),
    sorted by image (then file order)."""
    anns = [a for a in anns if a["image_id"] in image_index and a["category_id"] in cat_index]
    img = np.array([image_index[a["image_id"]] for a in anns], dtype=np.int64)
    order = np.argsort(img, kind="stable")
    cls = np.array([cat_index[a["category_id"]] for a in anns], dtype=np.int64)
    box = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(-1, 4)
    crowd = np.array([bool(a.get("iscrowd", 0)) for a in anns], dtype=bool)
    return img[order], cls[order], box[order], crowd[order]


def _det_arrays(results: list[dict], image_index: dict[int, int], cat_index: dict[int, int]) -> tuple[np.ndarray, ...]:
    """Image index, class index, box and score of the results COCO evaluates: sorted by image, then by
    descending score (ties in file order), at most MAX_DETS per image and class. Results of a category the
    ground truth does not list are left out, as COCO evaluates only its categories (an 80-class model on an
    annotation file listing some of them); a result of an unknown image is an error, as in COCO."""
    for r in results:
        if r["image_id"] not in image_index:
            raise FcosError(f"a result names image id {r['image_id']}, which the ground truth does not list")
    results = [r for r in results if r["category_id"] in cat_index]
    img = np.array([image_index[r["image_id"]] for r in results], dtype=np.int64)
    cls = np.array([cat_index[r["category_id"]] for r in results], dtype=np.int64)
    score = np.array([r["score"] for r in results], dtype=np.float64)
    order = np.argsort(-score, kind="stable")
    order = order[np.argsort(img[order], kind="stable")]
    group = img[order] * len(cat_index) + cls[order]
    by_group = np.argsort(group, kind="stable")
    starts = np.searchsorted(group[by_group], group[by_group])
    rank = np.empty(len(order), dtype=np.int64)
    rank[by_group] = np.arange(len(order)) - starts
    order = order[rank < MAX_DETS]
    box = np.array([r["bbox"] for r in results], dtype=np.float64).reshape(-1, 4)
    return img[order], cls[order], box[order], score[order]


def analyse(gt: dict, results: list[dict], names: dict[int, str] | None = None, score_thr: float = 0.3, iou_thr: float = 0.5) -> dict:
    """Per-class table, confusion matrix, TIDE error breakdown and per-image errors of COCO ``results`` on ``gt``.

    Returns ``method`` (the rules in words), ``score_thr``, ``iou_thr``, ``classes`` (rows of
    ``category_id, name, num_gt, AP, AP50, AP75, AR100, precision, recall, tp, fp, fn``, None where
    undefined), ``confusion`` (``labels``, ``category_ids`` and ``matrix``: rows true class, columns
    predicted class, last row/column background), ``tide`` (``ap``, ``delta_ap`` and ``counts`` per
    error kind) and ``images`` (worst per-image AP first, images without GT last; each with ``gt``
    boxes flagged ``detected`` (matched at or above ``score_thr``) and ``error`` ("missed" or None),
    and ``dets`` at or above ``score_thr`` with their ``kind``; detections ignored by a crowd region
    are left out).
    """
    check_instances(gt, "ground truth")
    cat_names = {c["id"]: c["name"] for c in gt["categories"]}
    cat_names.update(names or {})
    cat_ids = sorted(c["id"] for c in gt["categories"])
    cat_index = {c: k for k, c in enumerate(cat_ids)}
    images = sorted(gt["images"], key=lambda im: im["id"])
    image_index = {im["id"]: i for i, im in enumerate(images)}
    g_img, g_cls, g_box, g_crowd = _gt_arrays(gt["annotations"], image_index, cat_index)
    d_img, d_cls, d_box, d_score = _det_arrays(results, image_index, cat_index)

    present = np.zeros(len(cat_ids), bool)
    present[g_cls] = present[d_cls] = True
    label_of = np.cumsum(present) - 1  # class index -> confusion row/column
    n_labels = int(present.sum())
    matrix = np.zeros((n_labels + 1, n_labels + 1), dtype=np.int64)

    g_bounds = np.searchsorted(g_img, np.arange(len(images) + 1))
    d_bounds = np.searchsorted(d_img, np.arange(len(images) + 1))
    kind = np.empty(len(d_img), dtype=np.int64)
    fixable = np.zeros(len(d_img), bool)
    target_cls = np.empty(len(d_img), dtype=np.int64)
    gt_det = np.empty(len(g_img), dtype=np.int64)
    missed = np.zeros(len(g_img), bool)
    for i in range(len(images)):
        gs, ds = slice(g_bounds[i], g_bounds[i + 1]), slice(d_bounds[i], d_bounds[i + 1])
        iou = _iou(d_box[ds], g_box[gs], g_crowd[gs])
        m = _match_image(iou, d_cls[ds], g_cls[gs], g_crowd[gs], iou_thr)
        kind[ds], fixable[ds], target_cls[ds], missed[gs] = m.kind, m.fixable, m.target_cls, m.missed
        gt_det[gs] = np.where(m.gt_det >= 0, m.gt_det + ds.start, -1)
        at_thr = d_score[ds] >= score_thr
        _confusion_image(iou[at_thr], label_of[g_cls[gs]], g_crowd[gs], label_of[d_cls[ds][at_thr]], m.kind[at_thr], iou_thr, matrix)

    n_gt = np.bincount(g_cls[~g_crowd], minlength=len(cat_ids))
    counted = kind != IGNORED
    by_score = np.flatnonzero(counted)[np.argsort(-d_score[counted], kind="stable")]
    s_cls, s_kind, s_fixable, s_target = d_cls[by_score], kind[by_score], fixable[by_score], target_cls[by_score]
    base = _mean_ap(s_cls, s_kind == TP, n_gt)
    delta: dict[str, float | None] = {}
    for name, code in DET_ERRORS.items():
        keep = (s_kind != code) | s_fixable
        fixed_cls = np.where((s_kind == CLS) & s_fixable, s_target, s_cls) if code == CLS else s_cls
        fixed = _mean_ap(fixed_cls[keep], (s_kind[keep] == TP) | (s_kind[keep] == code), n_gt)
        delta[name] = None if base is None or fixed is None else max(fixed - base, 0.0)
    fixed = _mean_ap(s_cls, s_kind == TP, n_gt - np.bincount(g_cls[missed], minlength=len(cat_ids)))
    delta["missed"] = None if base is None or fixed is None else max(fixed - base, 0.0)
    counts = {name: int((kind == code).sum()) for name, code in DET_ERRORS.items()}
    counts["missed"] = int(missed.sum())

    above = d_score >= score_thr
    tp = np.bincount(d_cls[above & (kind == TP)], minlength=len(cat_ids))
    fp = np.bincount(d_cls[above & (kind != TP) & (kind != IGNORED)], minlength=len(cat_ids))
    coco = _coco_columns(gt, results)
    classes = []
    for k in np.flatnonzero(present):
        cat_id = cat_ids[k]
        ap, ap50, ap75, ar100 = coco[cat_id]
        classes.append(
            {
                "category_id": cat_id,
                "name": cat_names[cat_id],
                "num_gt": int(n_gt[k]),
                "AP": ap,
                "AP50": ap50,
                "AP75": ap75,
                "AR100": ar100,
                "precision": float(tp[k] / (tp[k] + fp[k])) if tp[k] + fp[k] else None,
                "recall": float(tp[k] / n_gt[k]) if n_gt[k] else None,
                "tp": int(tp[k]),
                "fp": int(fp[k]),
                "fn": int(n_gt[k] - tp[k]),
            }
        )

    detected = np.zeros(len(g_img), bool)
    hit = gt_det >= 0
    detected[hit] = above[gt_det[hit]]
    g_cat = np.asarray(cat_ids, dtype=np.int64)[g_cls].tolist()
    gt_rows = [
        {"bbox": box, "category_id": c, "name": cat_names[c], "crowd": crowd, "detected": found, "error": "missed" if miss else None}
        for box, c, crowd, found, miss in zip(g_box.tolist(), g_cat, g_crowd.tolist(), detected.tolist(), missed.tolist())
    ]
    shown = np.flatnonzero(above & (kind != IGNORED))
    det_rows = [
        {"bbox": box, "category_id": c, "name": cat_names[c], "score": score, "kind": DET_KINDS[k]}
        for box, c, score, k in zip(
            d_box[shown].tolist(), np.asarray(cat_ids, dtype=np.int64)[d_cls[shown]].tolist(), d_score[shown].tolist(), kind[shown].tolist()
        )
    ]
    s_bounds = np.searchsorted(shown, d_bounds)
    image_rows = []
    for i, im in enumerate(images):
        gs, ds = slice(g_bounds[i], g_bounds[i + 1]), slice(d_bounds[i], d_bounds[i + 1])
        img_counted = np.flatnonzero(counted[ds]) + ds.start
        image_rows.append(
            {
                "image_id": im["id"],
                "file_name": im["file_name"],
                "width": im.get("width"),
                "height": im.get("height"),
                "ap": _mean_ap(d_cls[img_counted], kind[img_counted] == TP, np.bincount(g_cls[gs][~g_crowd[gs]], minlength=len(cat_ids))),
                "gt": gt_rows[gs],
                "dets": det_rows[s_bounds[i] : s_bounds[i + 1]],
            }
        )
    image_rows.sort(key=_worst_first)

    return {
        "units": ANALYSIS_UNITS,
        "method": _method(score_thr, iou_thr),
        "score_thr": score_thr,
        "iou_thr": iou_thr,
        "results_of_unlisted_categories": sum(r["category_id"] not in cat_index for r in results),
        "classes": classes,
        "confusion": {
            "labels": [cat_names[cat_ids[k]] for k in np.flatnonzero(present)] + ["background"],
            "category_ids": [cat_ids[k] for k in np.flatnonzero(present)],
            "matrix": matrix.tolist(),
        },
        "tide": {"ap": base, "delta_ap": delta, "counts": counts},
        "images": image_rows,
    }
