"""Priors of dense heads: FCOS points (spec §5, §10) and RetinaNet/ATSS anchors (mmdet and torchvision).

Every generator returns one level's priors flattened row-major over the feature map (y outer)
and, for anchors, anchor-minor within a location: the order of a head's
``permute(0, 2, 3, 1).reshape(B, -1, k)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fcos_offline.model.config import HeadConfig


def padded_to_32(n: int) -> int:
    """``n`` rounded up to a multiple of 32: torchvision's padded batch size along one axis (spec §10)."""
    return -(-n // 32) * 32


def _torchvision_strides(h: int, w: int, canvas_hw: tuple[int, int]) -> tuple[int, int]:
    """torchvision's level strides (y, x): padded batch size // feature size (P6 of an 800-high canvas: 61)."""
    return padded_to_32(canvas_hw[0]) // h, padded_to_32(canvas_hw[1]) // w


def level_points(h: int, w: int, stride: int, rule: str, canvas_hw: tuple[int, int]) -> Tensor:
    """Point locations ``[h*w, 2]`` (x, y), row-major like the (H, W) flattening of the maps."""
    ys = torch.arange(h, dtype=torch.float32)
    xs = torch.arange(w, dtype=torch.float32)
    if rule == "torchvision":  # strides from the batch tensor torchvision pads to multiples of 32
        sy, sx = _torchvision_strides(h, w, canvas_hw)
        xs = xs * sx
        ys = ys * sy
    elif rule == "mmdet3":
        xs = (xs + 0.5) * stride
        ys = (ys + 0.5) * stride
    else:  # mmdet 1.x / 2.x < 2.18
        xs = xs * stride + stride // 2
        ys = ys * stride + stride // 2
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack((xx.reshape(-1), yy.reshape(-1)), dim=-1)


def base_anchors(cfg: HeadConfig, stride: int, rule: str) -> Tensor:
    """One location's anchors ``[A,4]`` centred on (0, 0), ratio-major then scale.

    mmdet ``AnchorGenerator`` (centre offset 0, ``scale_major``): sizes ``stride · octave_base_scale
    · 2^(i/scales_per_octave)`` in float32, half-extents ``0.5·w``. torchvision: integer sizes
    ``int(4·stride · 2^(i/3))`` (32, 40, 50 at P3), corners ``round(±w/2)``.
    """
    ratios = torch.tensor(cfg.anchor_ratios, dtype=torch.float32)
    h_ratios = torch.sqrt(ratios)
    w_ratios = 1 / h_ratios
    if rule == "torchvision":
        base = cfg.octave_base_scale * stride
        sizes = torch.tensor([int(base * 2 ** (i / cfg.scales_per_octave)) for i in range(cfg.scales_per_octave)], dtype=torch.int64)
        ws = (w_ratios[:, None] * sizes[None, :]).view(-1)
        hs = (h_ratios[:, None] * sizes[None, :]).view(-1)
        return (torch.stack([-ws, -hs, ws, hs], dim=1) / 2).round()
    scales = torch.tensor([2 ** (i / cfg.scales_per_octave) for i in range(cfg.scales_per_octave)], dtype=torch.float64) * cfg.octave_base_scale
    scales = scales.float()
    ws = (stride * w_ratios[:, None] * scales[None, :]).view(-1)
    hs = (stride * h_ratios[:, None] * scales[None, :]).view(-1)
    return torch.stack([0.0 - 0.5 * ws, 0.0 - 0.5 * hs, 0.0 + 0.5 * ws, 0.0 + 0.5 * hs], dim=-1)


def level_anchors(h: int, w: int, stride: int, cfg: HeadConfig, rule: str, canvas_hw: tuple[int, int]) -> Tensor:
    """Anchors ``[h*w*A, 4]`` (x1,y1,x2,y2): base anchors shifted to every location (offset 0)."""
    base = base_anchors(cfg, stride, rule)
    if rule == "torchvision":
        sy, sx = _torchvision_strides(h, w, canvas_hw)
        shift_x = torch.arange(w, dtype=torch.int32) * sx
        shift_y = torch.arange(h, dtype=torch.int32) * sy
    else:
        shift_x = torch.arange(w).to(torch.float32) * stride
        shift_y = torch.arange(h).to(torch.float32) * stride
    yy, xx = torch.meshgrid(shift_y, shift_x, indexing="ij")
    xx, yy = xx.reshape(-1), yy.reshape(-1)
    shifts = torch.stack((xx, yy, xx, yy), dim=-1)
    return (shifts[:, None, :] + base[None, :, :]).reshape(-1, 4)


def level_priors(cfg: HeadConfig, family_priors: str, level: int, h: int, w: int, rule: str, canvas_hw: tuple[int, int]) -> Tensor:
    """One level's priors: points ``[h*w, 2]`` or anchors ``[h*w*A, 4]`` (``family_priors`` from the HeadSpec)."""
    stride = cfg.strides[level]
    if family_priors == "points":
        return level_points(h, w, stride, rule, canvas_hw)
    return level_anchors(h, w, stride, cfg, rule, canvas_hw)
