"""Independent numpy references of FCOS test-time post-processing, written from the spec.

``shared/spec/fcos-reference.md`` §5–§7.2 (mmdet 2.x < 2.18), §7.3 (mmdet >= 2.18, ``mmdet218``,
and 3.x, ``mmdet3``, which adds the w/h > 0 filter) and
§10 (torchvision). Nothing here imports ``fcos_offline``: the inputs are one image's raw head
outputs as numpy arrays, per level ``cls [C,H,W]`` logits, ``dist [4,H,W]`` (l,t,r,b in pixels,
exactly what the head produced) and ``ctr [1,H,W]`` logits. The outputs are ``dets [n,5]``
(x1,y1,x2,y2,score) and ``labels [n]`` sorted by descending score, n <= max_per_img.

The code deliberately follows the spec's own description rather than the implementation's
tensors: flat (point, class) candidate lists, per-class greedy NMS with the
``inter > thr * union`` test of mmcv (offset 0), survivors merged by score.
"""

from __future__ import annotations

import numpy as np

F32 = np.float32


def sigmoid(x: np.ndarray) -> np.ndarray:
    """float32 logistic."""
    x = x.astype(F32)
    return (F32(1) / (F32(1) + np.exp(-x))).astype(F32)


def _flat(t: np.ndarray) -> np.ndarray:
    """``[K,H,W]`` -> ``[H*W, K]`` (row-major points, y outer)."""
    return np.ascontiguousarray(t.reshape(t.shape[0], -1).T)


# --------------------------------------------------------------------------- points (§5, §10)


def points_mmdet2(h: int, w: int, stride: int) -> np.ndarray:
    """§5 mmdet v1 / v2 < 2.18: (x·s + ⌊s/2⌋, y·s + ⌊s/2⌋), ``[h*w, 2]`` (x, y)."""
    pts = [(x * stride + stride // 2, y * stride + stride // 2) for y in range(h) for x in range(w)]
    return np.array(pts, dtype=F32).reshape(-1, 2)


def points_mmdet3(h: int, w: int, stride: int) -> np.ndarray:
    """§5 mmdet >= 2.18 / 3.x: ((x + 0.5)·s, (y + 0.5)·s)."""
    pts = [((x + 0.5) * stride, (y + 0.5) * stride) for y in range(h) for x in range(w)]
    return np.array(pts, dtype=F32).reshape(-1, 2)


def points_torchvision(h: int, w: int, canvas_hw: tuple[int, int]) -> np.ndarray:
    """§10: anchor centres (x·sw, y·sh), sw = W_pad // W_l, sh = H_pad // H_l (offset 0).

    W_pad, H_pad: the batch tensor, the canvas zero-padded bottom/right to multiples of 32.
    """
    h_pad, w_pad = (int(np.ceil(n / 32)) * 32 for n in canvas_hw)
    sh, sw = h_pad // h, w_pad // w
    pts = [(x * sw, y * sh) for y in range(h) for x in range(w)]
    return np.array(pts, dtype=F32).reshape(-1, 2)


# --------------------------------------------------------------------------- decode / NMS


def decode_clip(points: np.ndarray, dist: np.ndarray, canvas_hw: tuple[int, int]) -> np.ndarray:
    """§6: x1 = px − l, y1 = py − t, x2 = px + r, y2 = py + b; clip to [0,W]×[0,H]."""
    h, w = canvas_hw
    x1 = np.clip(points[:, 0] - dist[:, 0], 0, w)
    y1 = np.clip(points[:, 1] - dist[:, 1], 0, h)
    x2 = np.clip(points[:, 0] + dist[:, 2], 0, w)
    y2 = np.clip(points[:, 1] + dist[:, 3], 0, h)
    return np.stack([x1, y1, x2, y2], axis=1).astype(F32)


def _suppressed_by(box: np.ndarray, kept: np.ndarray, iou_thr: float) -> bool:
    """mmcv ``nms`` with offset 0 (no +1): suppressed iff inter > thr·union against any kept box."""
    if len(kept) == 0:
        return False
    b = box.astype(np.float64)
    k = kept.astype(np.float64)
    iw = np.clip(np.minimum(b[2], k[:, 2]) - np.maximum(b[0], k[:, 0]), 0, None)
    ih = np.clip(np.minimum(b[3], k[:, 3]) - np.maximum(b[1], k[:, 1]), 0, None)
    inter = iw * ih
    union = (b[2] - b[0]) * (b[3] - b[1]) + (k[:, 2] - k[:, 0]) * (k[:, 3] - k[:, 1]) - inter
    return bool(((union > 0) & (inter > iou_thr * union)).any())


def classwise_nms_topk(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou_thr: float, max_per_img: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy NMS inside each class, survivors by descending score, the first ``max_per_img``.

    Candidates are visited once in descending score order (ties: lower index first); a candidate
    survives unless a kept box *of its class* overlaps it with IoU > thr. A box's fate depends
    only on higher-scored boxes of its class, so this equals per-class NMS followed by a global
    sort, and it may stop as soon as ``max_per_img`` boxes are kept.
    """
    order = np.lexsort((np.arange(len(scores)), -scores.astype(np.float64)))
    kept_by_class: dict[int, list[int]] = {}
    kept: list[int] = []
    for i in order:
        if len(kept) >= max_per_img:
            break
        same = kept_by_class.setdefault(int(labels[i]), [])
        if not _suppressed_by(boxes[i], boxes[same], iou_thr):
            same.append(int(i))
            kept.append(int(i))
    idx = np.array(kept, dtype=np.int64)
    dets = np.concatenate([boxes[idx].reshape(-1, 4), scores[idx].reshape(-1, 1)], axis=1).astype(F32)
    return dets, labels[idx].astype(np.int64)


# --------------------------------------------------------------------------- rules


def mmdet2_postprocess(cls_levels, dist_levels, ctr_levels, canvas_hw, strides, nms_pre=1000, score_thr=0.05, iou_thr=0.5, max_per_img=100):
    """§7.2 (mmdet 2.x < 2.18) on one image, boxes clipped to the canvas (ONNX-export convention)."""
    all_boxes, all_probs, all_ctr = [], [], []
    for cls, dist, ctr, stride in zip(cls_levels, dist_levels, ctr_levels, strides):
        h, w = cls.shape[1:]
        probs = sigmoid(_flat(cls))  # [N, C]
        cness = sigmoid(_flat(ctr))[:, 0]  # [N]
        d = _flat(dist).astype(F32)  # [N, 4]
        pts = points_mmdet2(h, w, stride)
        if probs.shape[0] > nms_pre:  # top points by max_k(S·c), only when N > nms_pre
            rank = (probs * cness[:, None]).max(axis=1)
            top = np.argsort(-rank, kind="stable")[:nms_pre]
            probs, cness, d, pts = probs[top], cness[top], d[top], pts[top]
        all_boxes.append(decode_clip(pts, d, canvas_hw))
        all_probs.append(probs)
        all_ctr.append(cness)
    boxes = np.concatenate(all_boxes)
    probs = np.concatenate(all_probs)
    cness = np.concatenate(all_ctr)
    point_idx, label = np.nonzero(probs > score_thr)  # raw S > thr, strict
    scores = (probs[point_idx, label] * cness[point_idx]).astype(F32)
    return classwise_nms_topk(boxes[point_idx], scores, label, iou_thr, max_per_img)


def _pair_topk(rank: np.ndarray, thr: float, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(point, class) pairs with rank > thr, the top ``k`` by rank: (point idx, class idx)."""
    point_idx, label = np.nonzero(rank > thr)
    vals = rank[point_idx, label]
    order = np.argsort(-vals, kind="stable")[:k]
    return point_idx[order], label[order]


def mmdet3_postprocess(
    cls_levels, dist_levels, ctr_levels, canvas_hw, strides, nms_pre=1000, score_thr=0.05, iou_thr=0.5, max_per_img=100, size_filter=True
):
    """§7.3 (mmdet >= 2.18 / 3.x): per-level top pairs above thr, S·c; v3 (``size_filter``) drops
    boxes with w <= 0 or h <= 0 before NMS, 2.18+ does not."""
    boxes_l, scores_l, labels_l = [], [], []
    for cls, dist, ctr, stride in zip(cls_levels, dist_levels, ctr_levels, strides):
        h, w = cls.shape[1:]
        probs = sigmoid(_flat(cls))
        cness = sigmoid(_flat(ctr))[:, 0]
        pi, lab = _pair_topk(probs, score_thr, nms_pre)
        boxes = decode_clip(points_mmdet3(h, w, stride)[pi], _flat(dist).astype(F32)[pi], canvas_hw)
        scores = (probs[pi, lab] * cness[pi]).astype(F32)
        ok = (boxes[:, 2] - boxes[:, 0] > 0) & (boxes[:, 3] - boxes[:, 1] > 0)
        if not size_filter:
            ok[:] = True
        boxes_l.append(boxes[ok])
        scores_l.append(scores[ok])
        labels_l.append(lab[ok])
    return classwise_nms_topk(np.concatenate(boxes_l), np.concatenate(scores_l), np.concatenate(labels_l), iou_thr, max_per_img)


def torchvision_postprocess(cls_levels, dist_levels, ctr_levels, canvas_hw, score_thr=0.2, topk=1000, iou_thr=0.6, max_per_img=100):
    """§10: √(σ(cls)·σ(ctr)) > thr per level, top-k pairs, offset-0 anchors, NMS 0.6, keep 100.

    ``dist`` is already ReLU(reg)·anchor size (what the head returns), so decode is a plain
    centre ± distance.
    """
    boxes_l, scores_l, labels_l = [], [], []
    for cls, dist, ctr in zip(cls_levels, dist_levels, ctr_levels):
        h, w = cls.shape[1:]
        score = np.sqrt(sigmoid(_flat(cls)) * sigmoid(_flat(ctr))).astype(F32)  # [N, C]
        pi, lab = _pair_topk(score, score_thr, topk)
        boxes_l.append(decode_clip(points_torchvision(h, w, canvas_hw)[pi], _flat(dist).astype(F32)[pi], canvas_hw))
        scores_l.append(score[pi, lab])
        labels_l.append(lab)
    return classwise_nms_topk(np.concatenate(boxes_l), np.concatenate(scores_l), np.concatenate(labels_l), iou_thr, max_per_img)


def reference_batch(rule: str, raw, canvas_hw, strides, **kw) -> tuple[np.ndarray, np.ndarray]:
    """Run a rule over a batch of raw outputs ``(cls_list, dist_list, ctr_list)`` of ``[B,...]`` arrays.

    Returns padded ``dets [B,K,5]`` (zero rows) and ``labels [B,K]`` (−1), K = max_per_img.
    """
    cls_l, dist_l, ctr_l = ([np.asarray(t) for t in part] for part in raw)
    k = kw.get("max_per_img", 100)
    batch = cls_l[0].shape[0]
    dets = np.zeros((batch, k, 5), F32)
    labels = np.full((batch, k), -1, np.int64)
    for b in range(batch):
        args = ([t[b] for t in cls_l], [t[b] for t in dist_l], [t[b] for t in ctr_l], canvas_hw)
        if rule == "mmdet2":
            d, lab = mmdet2_postprocess(*args, strides, **kw)
        elif rule in ("mmdet3", "mmdet218"):
            d, lab = mmdet3_postprocess(*args, strides, size_filter=(rule == "mmdet3"), **kw)
        elif rule == "torchvision":
            kw2 = {("topk" if n == "nms_pre" else n): v for n, v in kw.items()}
            d, lab = torchvision_postprocess(*args, **kw2)
        else:
            raise ValueError(rule)
        dets[b, : len(d)] = d
        labels[b, : len(lab)] = lab
    return dets, labels
