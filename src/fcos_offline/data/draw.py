"""Drawing detections on an image: one look for ``predict`` and ``postprocess --ifShowDetObj`` (``run --vis-images``).

(``report.html`` draws its boxes in the page, as SVG, so that its image browser can filter them.)

* One colour per class from a deterministic palette (:func:`class_colour`, BGR).
* A label ``<class name> <score>`` on a filled tab in the box's colour, placed above the box, else inside
  its top (or below it) when there is no room, and always kept inside the image.
* Line width and font scale grow with the image (:func:`line_width`), so a 4000-pixel photo and a
  200-pixel thumbnail both read.

Boxes are ``x1, y1, x2, y2`` in the image's own pixels, with a fifth column for the score when there is one.
"""

from __future__ import annotations

import colorsys
from collections.abc import Sequence

import cv2
import numpy as np

BGR = tuple[int, int, int]

_FONT = cv2.FONT_HERSHEY_SIMPLEX
#: the golden ratio's fraction: hues stepped by it stay far apart for any number of classes
_HUE_STEP = 0.618033988749895


def class_colour(label: int) -> BGR:
    """The colour (B, G, R) of class ``label``: a deterministic palette, neighbouring labels far apart in hue.

    Hues step by the golden ratio; saturation and value alternate over three levels so that labels a
    full turn apart still differ. Every process, image and report gets the same colour for a label.
    """
    label = int(label)
    hue = (label * _HUE_STEP) % 1.0
    sat = (0.85, 0.65, 1.0)[(label // 3) % 3]
    val = (0.95, 0.8, 1.0)[label % 3]
    r, g, b = colorsys.hsv_to_rgb(hue, sat, val)
    return int(round(b * 255)), int(round(g * 255)), int(round(r * 255))


def line_width(height: int, width: int) -> int:
    """Box line width for an image of this size: 1 px up to ~330 px per side, 2 at 640x480, 3 at 1333x800."""
    return max(1, int(round((height + width) / 2 * 0.003)))


def _text_colour(bgr: BGR) -> BGR:
    """Black on light tabs, white on dark ones (perceived luminance)."""
    b, g, r = bgr
    return (0, 0, 0) if 0.299 * r + 0.587 * g + 0.114 * b > 140 else (255, 255, 255)


def label_origin(box: tuple[int, int, int, int], size: tuple[int, int], image_hw: tuple[int, int]) -> tuple[int, int]:
    """Top-left corner of a ``size`` (w, h) label tab for ``box`` (x1, y1, x2, y2) on an image of ``image_hw``.

    Above the box where it fits; else inside the box's top when the box is tall enough, else just below
    it; then shifted to lie wholly inside the image (right-aligned against the right edge).
    """
    x1, y1, _, y2 = box
    w, h = size
    height, width = image_hw
    if y1 - h >= 0:
        top = y1 - h
    elif y2 - y1 >= 2 * h or y2 + h > height:
        top = y1
    else:
        top = y2
    left = min(x1, width - w)
    return max(0, left), max(0, min(top, height - h))


def draw_label(image: np.ndarray, text: str, box: tuple[int, int, int, int], colour: BGR, lw: int) -> None:
    """``text`` on a filled tab of ``colour`` beside ``box`` (see :func:`label_origin`)."""
    scale = max(0.4, lw / 3)
    thickness = max(1, lw - 1)
    (tw, th), base = cv2.getTextSize(text, _FONT, scale, thickness)
    pad = max(1, lw)
    size = (tw + 2 * pad, th + base + 2 * pad)
    left, top = label_origin(box, size, image.shape[:2])
    cv2.rectangle(image, (left, top), (left + size[0] - 1, top + size[1] - 1), colour, cv2.FILLED)
    cv2.putText(image, text, (left + pad, top + pad + th), _FONT, scale, _text_colour(colour), thickness, cv2.LINE_AA)


def label_text(label: int, names: Sequence[str], score: float | None = None) -> str:
    """``<class name> <score>`` (the label's number when ``names`` does not name it)."""
    name = names[label] if 0 <= label < len(names) else str(label)
    return name if score is None else f"{name} {score:.2f}"


def draw_detections(
    image: np.ndarray,
    labels: np.ndarray | Sequence[int],
    boxes: np.ndarray,
    names: Sequence[str],
    score_thr: float = 0.0,
    *,
    show_labels: bool = True,
) -> np.ndarray:
    """Draw boxes on ``image`` (BGR uint8, in place; returned).

    ``boxes``: ``[N, 4]`` (ground truth) or ``[N, 5]`` with the score; rows with a negative label, a score
    of 0 (padding) or one below ``score_thr`` are not drawn. Higher scores are drawn last, so their labels
    are on top.
    """
    labels = np.asarray(labels).reshape(-1)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(len(labels), -1) if len(labels) else np.zeros((0, 4))
    scored = boxes.shape[1] >= 5
    height, width = image.shape[:2]
    lw = line_width(height, width)
    rows = [i for i in range(len(labels)) if labels[i] >= 0 and (not scored or (boxes[i, 4] > 0 and boxes[i, 4] >= score_thr))]
    if scored:
        rows.sort(key=lambda i: boxes[i, 4])
    for i in rows:
        label = int(labels[i])
        colour = class_colour(label)
        x1, y1, x2, y2 = (int(round(v)) for v in boxes[i, :4])
        x1, x2 = max(0, min(x1, width - 1)), max(0, min(x2, width - 1))
        y1, y2 = max(0, min(y1, height - 1)), max(0, min(y2, height - 1))
        cv2.rectangle(image, (x1, y1), (x2, y2), colour, lw)
        if show_labels:
            draw_label(image, label_text(label, names, float(boxes[i, 4]) if scored else None), (x1, y1, x2, y2), colour, lw)
    return image
