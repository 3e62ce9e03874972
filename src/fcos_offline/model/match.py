"""Compare two sets of detections (engine vs engine, PyTorch vs ONNX): match rate and errors."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass
class MatchStats:
    """How well detections B reproduce detections A (A is the reference)."""

    num_ref: int
    num_other: int
    matched: int
    max_box_err: float
    max_score_err: float

    @property
    def match_rate(self) -> float:
        """Fraction of reference detections matched (1.0 when both are empty)."""
        return 1.0 if self.num_ref == 0 and self.num_other == 0 else self.matched / max(self.num_ref, self.num_other)

    def to_dict(self) -> dict:
        """JSON view including the rate."""
        return {**asdict(self), "match_rate": self.match_rate}


#: a box thinner than this (px) in either direction has no meaningful IoU: it matches by its corners instead
DEGENERATE_PX = 0.01


def iou_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of every box of ``a [N,4+]`` with every box of ``b [M,4+]``.

    Where either box of a pair is degenerate (thinner than :data:`DEGENERATE_PX`: a box clipped at
    the canvas edge, which anchor heads keep), IoU is 0/0 or ruled by float noise, so the pair
    counts 1 when every corner agrees within :data:`DEGENERATE_PX`, else 0.
    """
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:4], b[None, :, 2:4])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
    thin_a = np.minimum(a[:, 2] - a[:, 0], a[:, 3] - a[:, 1]) < DEGENERATE_PX
    thin_b = np.minimum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) < DEGENERATE_PX
    thin = thin_a[:, None] | thin_b[None, :]
    if thin.any():
        close = np.abs(a[:, None, :4] - b[None, :, :4]).max(-1) <= DEGENERATE_PX
        iou = np.where(thin, close.astype(float), iou)
    return iou


def greedy_pairs(scores_a: np.ndarray, iou: np.ndarray, ok: np.ndarray) -> list[tuple[int, int]]:
    """One-to-one pairs ``(i, j)``: A's detections in score order each take the free B detection of
    highest IoU among those ``ok[i]`` allows."""
    used = np.zeros(iou.shape[1], dtype=bool)
    pairs = []
    for i in np.argsort(-scores_a, kind="stable"):
        cand = np.flatnonzero(ok[i] & ~used)
        if len(cand):
            j = cand[np.argmax(iou[i, cand])]
            used[j] = True
            pairs.append((int(i), int(j)))
    return pairs


def match_detections(
    dets_a: np.ndarray,
    labels_a: np.ndarray,
    dets_b: np.ndarray,
    labels_b: np.ndarray,
    iou_thr: float = 0.999,
    score_tol: float = 1e-4,
    box_tol: float = 0.05,
) -> MatchStats:
    """Greedy one-to-one matching by score order: same label, |Δscore| <= ``score_tol``, and the same box:
    IoU > ``iou_thr`` or every corner within ``box_tol`` px (a sliver half a pixel thin loses IoU to 0.002 px).

    Inputs are one image's ``dets [N,5]`` / ``labels [N]``; padding rows (label < 0) are ignored.
    """
    keep_a, keep_b = labels_a >= 0, labels_b >= 0
    a, la, b, lb = dets_a[keep_a], labels_a[keep_a], dets_b[keep_b], labels_b[keep_b]
    if len(a) == 0 or len(b) == 0:
        return MatchStats(len(a), len(b), 0, 0.0, 0.0)
    iou = iou_matrix(a, b)
    same_box = (iou > iou_thr) | (np.abs(a[:, None, :4] - b[None, :, :4]).max(-1) <= box_tol)
    ok = (la[:, None] == lb[None, :]) & same_box & (np.abs(a[:, None, 4] - b[None, :, 4]) <= score_tol)
    pairs = greedy_pairs(a[:, 4], iou, ok)
    box_err = max((float(np.abs(a[i, :4] - b[j, :4]).max()) for i, j in pairs), default=0.0)
    score_err = max((float(abs(a[i, 4] - b[j, 4])) for i, j in pairs), default=0.0)
    return MatchStats(len(a), len(b), len(pairs), box_err, score_err)


def match_batches(dets_a: np.ndarray, labels_a: np.ndarray, dets_b: np.ndarray, labels_b: np.ndarray, **kw) -> MatchStats:
    """:func:`match_detections` summed over a batch ``[B,N,5]`` / ``[B,N]``."""
    total = MatchStats(0, 0, 0, 0.0, 0.0)
    for i in range(len(dets_a)):
        s = match_detections(dets_a[i], labels_a[i], dets_b[i], labels_b[i], **kw)
        total = MatchStats(
            total.num_ref + s.num_ref,
            total.num_other + s.num_other,
            total.matched + s.matched,
            max(total.max_box_err, s.max_box_err),
            max(total.max_score_err, s.max_score_err),
        )
    return total
