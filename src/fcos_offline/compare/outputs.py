"""Final outputs of two runs, image by image: which detections match, and by how much they differ.

A detection of A matches one of B when the labels are equal and their IoU is at least
``iou_thr``; pairs are formed greedily in A's score order, each B detection used once. For the
matched pairs the score error and the box error (largest coordinate difference, canvas pixels)
are collected; the rest are "only in A" / "only in B".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from fcos_offline.model.match import greedy_pairs, iou_matrix

Dumps = dict[str, tuple[np.ndarray, np.ndarray]]  # stem -> (labels [K], dets [K,5])


@dataclass
class ImageComparison:
    """One image: detections matched and the errors of the matched pairs."""

    stem: str
    num_a: int
    num_b: int
    matched: int
    max_score_err: float = 0.0
    max_box_err: float = 0.0
    score_errs: list[float] = field(default_factory=list, repr=False)
    box_errs: list[float] = field(default_factory=list, repr=False)

    @property
    def only_a(self) -> int:
        """Detections of A without a partner in B."""
        return self.num_a - self.matched

    @property
    def only_b(self) -> int:
        """Detections of B without a partner in A."""
        return self.num_b - self.matched

    @property
    def match_rate(self) -> float:
        """Matched / the larger side (1.0 when both are empty)."""
        return 1.0 if self.num_a == self.num_b == 0 else self.matched / max(self.num_a, self.num_b)

    def to_dict(self) -> dict[str, Any]:
        """JSON view (without the per-pair lists)."""
        out = {k: v for k, v in asdict(self).items() if k not in ("score_errs", "box_errs")}
        return {**out, "only_a": self.only_a, "only_b": self.only_b, "match_rate": self.match_rate}


def differing(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], tol: Tolerance) -> tuple[np.ndarray, np.ndarray]:
    """Per detection of each side (padding rows left out): True where it has no partner on the other side, or its
    partner's score or box is beyond ``tol`` — what a side-by-side picture marks."""
    la, da = a[0][a[0] >= 0], a[1][a[0] >= 0]
    lb, db = b[0][b[0] >= 0], b[1][b[0] >= 0]
    flags_a, flags_b = np.ones(len(la), bool), np.ones(len(lb), bool)
    if len(la) and len(lb):
        iou = iou_matrix(da, db)
        for i, j in greedy_pairs(da[:, 4], iou, (la[:, None] == lb[None, :]) & (iou >= tol.iou_thr)):
            same = abs(da[i, 4] - db[j, 4]) <= tol.score_tol and float(np.abs(da[i, :4] - db[j, :4]).max()) <= tol.box_tol
            flags_a[i] = flags_b[j] = not same
    return flags_a, flags_b


def compare_image(stem: str, a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray], iou_thr: float) -> ImageComparison:
    """Match one image's detections (padding rows, label < 0, are ignored)."""
    la, da = a[0][a[0] >= 0], a[1][a[0] >= 0]
    lb, db = b[0][b[0] >= 0], b[1][b[0] >= 0]
    result = ImageComparison(stem, len(la), len(lb), 0)
    if len(la) == 0 or len(lb) == 0:
        return result
    iou = iou_matrix(da, db)
    pairs = greedy_pairs(da[:, 4], iou, (la[:, None] == lb[None, :]) & (iou >= iou_thr))
    result.matched = len(pairs)
    result.score_errs = [float(abs(da[i, 4] - db[j, 4])) for i, j in pairs]
    result.box_errs = [float(np.abs(da[i, :4] - db[j, :4]).max()) for i, j in pairs]
    result.max_score_err = max(result.score_errs, default=0.0)
    result.max_box_err = max(result.box_errs, default=0.0)
    return result


@dataclass
class OutputComparison:
    """Every image of two dump sets compared, plus the overall figures."""

    images: list[ImageComparison]
    only_in_a_set: list[str]  # stems dumped by A only
    only_in_b_set: list[str]
    iou_thr: float
    unreadable: list[dict[str, str]] = field(default_factory=list)  # dumps a side could not read (NaN, truncated): images that differ

    def overall(self) -> dict[str, Any]:
        """Totals, match rate and score/box error max and p99 over every matched pair."""
        score = np.array([e for im in self.images for e in im.score_errs]) if self.images else np.zeros(0)
        box = np.array([e for im in self.images for e in im.box_errs]) if self.images else np.zeros(0)
        num_a = sum(im.num_a for im in self.images)
        num_b = sum(im.num_b for im in self.images)
        matched = sum(im.matched for im in self.images)
        return {
            "images": len(self.images),
            "detections_a": num_a,
            "detections_b": num_b,
            "matched": matched,
            "only_a": num_a - matched,
            "only_b": num_b - matched,
            "match_rate": 1.0 if num_a == num_b == 0 else matched / max(num_a, num_b),
            "score_err_max": float(score.max()) if score.size else 0.0,
            "score_err_p99": float(np.percentile(score, 99)) if score.size else 0.0,
            "box_err_px_max": float(box.max()) if box.size else 0.0,
            "box_err_px_p99": float(np.percentile(box, 99)) if box.size else 0.0,
            "images_only_in_a": self.only_in_a_set,
            "images_only_in_b": self.only_in_b_set,
            "images_unreadable": sorted({u["stem"] for u in self.unreadable}),
            "iou_thr": self.iou_thr,
        }

    def worst(self, n: int) -> list[ImageComparison]:
        """The ``n`` images that differ most: unmatched detections first, then the largest score error."""
        ranked = sorted(self.images, key=lambda im: (im.only_a + im.only_b, im.max_score_err, im.max_box_err), reverse=True)
        return [im for im in ranked[:n] if im.only_a + im.only_b or im.max_score_err or im.max_box_err]


def compare_dumps(a: Dumps, b: Dumps, iou_thr: float = 0.5, unreadable: list[dict[str, str]] | None = None) -> OutputComparison:
    """Compare the images both sides dumped; the others are listed. ``unreadable``: dumps either side could not
    read (``{"side", "stem", "path", "problem"}``); those images count as differing, whatever the other side holds."""
    bad = {u["stem"] for u in unreadable or []}
    a, b = {k: v for k, v in a.items() if k not in bad}, {k: v for k, v in b.items() if k not in bad}
    common = sorted(set(a) & set(b))
    return OutputComparison(
        [compare_image(s, a[s], b[s], iou_thr) for s in common], sorted(set(a) - set(b)), sorted(set(b) - set(a)), iou_thr, list(unreadable or [])
    )


@dataclass(frozen=True)
class Tolerance:
    """When two runs' outputs count as the same (``compare``'s exit code, and ``tune``'s accuracy check by agreement)."""

    iou_thr: float = 0.5
    score_tol: float = 1e-3
    box_tol: float = 1.0  # canvas pixels

    def describe(self) -> str:
        """The rule in words."""
        return f"every detection matched (same label, IoU >= {self.iou_thr:g}), score error <= {self.score_tol:g}, box error <= {self.box_tol:g} px"


def outputs_within(overall: dict[str, Any], tol: Tolerance) -> bool:
    """Do the figures of :meth:`OutputComparison.overall` hold ``tol``: nothing unmatched, errors within it?"""
    return (
        overall["only_a"] == 0
        and overall["only_b"] == 0
        and not overall["images_only_in_a"]
        and not overall["images_only_in_b"]
        and not overall.get("images_unreadable")
        and overall["score_err_max"] <= tol.score_tol
        and overall["box_err_px_max"] <= tol.box_tol
    )


def agreement(a: Dumps, b: Dumps, tol: Tolerance) -> dict[str, Any]:
    """How closely B's outputs agree with A's: the overall figures and whether they hold ``tol`` (``within_tolerance``)."""
    overall = compare_dumps(a, b, tol.iou_thr).overall()
    return {**overall, "within_tolerance": outputs_within(overall, tol), "tolerance": tol.describe()}
