"""Box coders of dense heads: distances from a point (FCOS) and anchor deltas (RetinaNet, ATSS).

Every decoder clips to the canvas ``[0, W] x [0, H]`` (the recipe's ONNX clips to the padded
input, spec §6); its float operations follow the library it reproduces, in the same order.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: mmdet DeltaXYWHBBoxCoder's wh_ratio_clip: |dw|, |dh| <= |log(16/1000)|
MMDET_MAX_RATIO = abs(math.log(16 / 1000))
#: torchvision BoxCoder's bbox_xform_clip: dw, dh <= log(1000/16) (no lower bound)
TORCHVISION_XFORM_CLIP = math.log(1000.0 / 16)


def _clip(x1: Tensor, y1: Tensor, x2: Tensor, y2: Tensor, canvas_hw: tuple[int, int]) -> Tensor:
    h, w = canvas_hw
    return torch.stack((x1.clamp(0, w), y1.clamp(0, h), x2.clamp(0, w), y2.clamp(0, h)), dim=-1)


def decode_distance(points: Tensor, dist: Tensor, canvas_hw: tuple[int, int]) -> Tensor:
    """Distances (l,t,r,b) ``[...,4]`` at ``points [...,2]`` -> boxes clipped to the canvas."""
    return _clip(
        points[..., 0] - dist[..., 0], points[..., 1] - dist[..., 1], points[..., 0] + dist[..., 2], points[..., 1] + dist[..., 3], canvas_hw
    )


def decode_delta_mmdet(anchors: Tensor, deltas: Tensor, means: tuple[float, ...], stds: tuple[float, ...], canvas_hw: tuple[int, int]) -> Tensor:
    """mmdet ``delta2bbox`` (2.18+ and 3.x order): denormalise, clamp dw/dh to ±|log(16/1000)|, corners, clip."""
    d = deltas * deltas.new_tensor(stds) + deltas.new_tensor(means)
    px = (anchors[..., 0] + anchors[..., 2]) * 0.5
    py = (anchors[..., 1] + anchors[..., 3]) * 0.5
    pw = anchors[..., 2] - anchors[..., 0]
    ph = anchors[..., 3] - anchors[..., 1]
    dw = d[..., 2].clamp(min=-MMDET_MAX_RATIO, max=MMDET_MAX_RATIO)
    dh = d[..., 3].clamp(min=-MMDET_MAX_RATIO, max=MMDET_MAX_RATIO)
    gx = px + pw * d[..., 0]
    gy = py + ph * d[..., 1]
    gw = pw * dw.exp()
    gh = ph * dh.exp()
    return _clip(gx - gw * 0.5, gy - gh * 0.5, gx + gw * 0.5, gy + gh * 0.5, canvas_hw)


def decode_delta_torchvision(anchors: Tensor, deltas: Tensor, canvas_hw: tuple[int, int]) -> Tensor:
    """torchvision ``BoxCoder.decode_single`` (weights 1,1,1,1): centre + 0.5·size, dw/dh <= log(1000/16), clip."""
    widths = anchors[..., 2] - anchors[..., 0]
    heights = anchors[..., 3] - anchors[..., 1]
    ctr_x = anchors[..., 0] + 0.5 * widths
    ctr_y = anchors[..., 1] + 0.5 * heights
    dw = deltas[..., 2].clamp(max=TORCHVISION_XFORM_CLIP)
    dh = deltas[..., 3].clamp(max=TORCHVISION_XFORM_CLIP)
    cx = deltas[..., 0] * widths + ctr_x
    cy = deltas[..., 1] * heights + ctr_y
    half_w = 0.5 * (dw.exp() * widths)
    half_h = 0.5 * (dh.exp() * heights)
    return _clip(cx - half_w, cy - half_h, cx + half_w, cy + half_h, canvas_hw)
