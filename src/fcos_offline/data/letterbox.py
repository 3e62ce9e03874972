"""Letterbox geometry: one description of the keep-ratio resize + centred padding, both directions.

Forward (spec §8.2, Huawei ``fcos_pth_preprocess.py``) for an image of ``w x h`` on a
``W x H`` canvas::

    s      = min(W / w, H / h)                 # Python float64, box fit
    w', h' = floor(w * s), floor(h * s)        # resized image size
    left   = floor((W - w') / 2)               # integer pads, the rest goes right/bottom
    top    = floor((H - h') / 2)
    x_c    = left + x * (w' / w)               # a point in original pixels -> canvas pixels
    y_c    = top  + y * (h' / h)

``cv2.resize`` maps the continuous coordinate ``x`` to ``x * w'/w`` (pixel-centre convention with
half-pixel offsets cancelling), so the per-axis ratios above are the true forward map.

Two inverses (canvas -> original pixels):

=========================  ==========================================  =========================
                           ``rule="exact"`` (default)                  ``rule="recipe"`` (§9)
=========================  ==========================================  =========================
pad subtracted             integer pads ``left``, ``top`` of §8.2      ``floor((W - w*s)/2)``,
                                                                       ``floor((H - h*s)/2)``
                                                                       from the *unfloored* size
divisor                    per-axis ratios ``w'/w``, ``h'/h``          the scalar ``s``, both axes
exactness                  exact inverse of the forward map            off by less than ``1/s``
                                                                       original pixels per
                                                                       coordinate (the float pad
                                                                       can be 1 px smaller, and
                                                                       ``s >= w'/w``)
=========================  ==========================================  =========================

The recipe rule reproduces Huawei's ``fcos_pth_postprocess.py`` numbers; the exact rule is the
mathematically right one. Neither clips: clipping to the image is the caller's choice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fcos_offline.errors import FcosError

RULES = ("exact", "recipe")
#: the recipe's model input, (height, width)
DEFAULT_CANVAS = (800, 1333)


@dataclass(frozen=True)
class Letterbox:
    """Where an ``orig_w x orig_h`` image lands on a ``canvas_w x canvas_h`` canvas."""

    orig_w: int
    orig_h: int
    canvas_w: int
    canvas_h: int
    scale: float
    new_w: int
    new_h: int
    pad_left: int
    pad_top: int

    @property
    def ratio_x(self) -> float:
        """Exact horizontal scale of the resize, ``new_w / orig_w``."""
        return self.new_w / self.orig_w

    @property
    def ratio_y(self) -> float:
        """Exact vertical scale of the resize, ``new_h / orig_h``."""
        return self.new_h / self.orig_h


def letterbox_for(orig_w: int, orig_h: int, canvas_h: int, canvas_w: int) -> Letterbox:
    """Geometry of spec §8.2 for one image (note the canvas is given height first, like the CLI)."""
    if min(orig_w, orig_h, canvas_w, canvas_h) <= 0:
        raise FcosError(f"image {orig_w}x{orig_h} and canvas {canvas_w}x{canvas_h} must be positive")
    scale = min(canvas_w / orig_w, canvas_h / orig_h)
    new_w = int(math.floor(orig_w * scale))
    new_h = int(math.floor(orig_h * scale))
    if new_w < 1 or new_h < 1:
        raise FcosError(f"image {orig_w}x{orig_h} shrinks to {new_w}x{new_h} on a {canvas_w}x{canvas_h} canvas")
    return Letterbox(
        orig_w=int(orig_w),
        orig_h=int(orig_h),
        canvas_w=int(canvas_w),
        canvas_h=int(canvas_h),
        scale=scale,
        new_w=new_w,
        new_h=new_h,
        pad_left=(canvas_w - new_w) // 2,
        pad_top=(canvas_h - new_h) // 2,
    )


def _as_boxes(boxes: np.ndarray) -> np.ndarray:
    arr = np.array(boxes, dtype=np.float64, copy=True)
    if arr.ndim != 2 or arr.shape[1] < 4:
        raise ValueError(f"boxes must have shape (N, 4+), got {arr.shape}")
    return arr


def boxes_to_canvas(boxes: np.ndarray, lb: Letterbox) -> np.ndarray:
    """Map x1,y1,x2,y2 (extra columns kept) from original pixels to canvas pixels, float64."""
    out = _as_boxes(boxes)
    out[:, [0, 2]] = out[:, [0, 2]] * lb.ratio_x + lb.pad_left
    out[:, [1, 3]] = out[:, [1, 3]] * lb.ratio_y + lb.pad_top
    return out


def boxes_to_original(boxes_xyxy: np.ndarray, lb: Letterbox, rule: str = "exact") -> np.ndarray:
    """Map x1,y1,x2,y2 (extra columns kept) from canvas pixels back to original pixels, float64.

    ``rule`` is ``"exact"`` (inverse of :func:`boxes_to_canvas`) or ``"recipe"`` (Huawei's
    float-pad, scalar-scale inverse); see the module docstring. No clipping.
    """
    out = _as_boxes(boxes_xyxy)
    off_x: float
    off_y: float
    div_x: float
    div_y: float
    if rule == "exact":
        off_x, off_y, div_x, div_y = lb.pad_left, lb.pad_top, lb.ratio_x, lb.ratio_y
    elif rule == "recipe":
        off_x = (lb.canvas_w - lb.orig_w * lb.scale) // 2
        off_y = (lb.canvas_h - lb.orig_h * lb.scale) // 2
        div_x = div_y = lb.scale
    else:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    out[:, [0, 2]] = (out[:, [0, 2]] - off_x) / div_x
    out[:, [1, 3]] = (out[:, [1, 3]] - off_y) / div_y
    return out


#: the largest canvas side and area a model may declare (a 100000x100000 input is a broken file)
MAX_CANVAS_SIDE = 16384
MAX_CANVAS_PIXELS = 64_000_000


def check_canvas(path: object, height: int, width: int) -> tuple[int, int]:
    """A sane input canvas, or one line saying why not."""
    if height < 1 or width < 1 or height > MAX_CANVAS_SIDE or width > MAX_CANVAS_SIDE or height * width > MAX_CANVAS_PIXELS:
        raise FcosError(
            f"{path}: input canvas {height}x{width} is out of range (1..{MAX_CANVAS_SIDE} per side, at most {MAX_CANVAS_PIXELS:,} pixels)"
        )
    return height, width
