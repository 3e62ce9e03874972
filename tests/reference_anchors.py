"""Independent numpy references of anchor-head post-processing (RetinaNet, ATSS), written from the
libraries' documented maths (mmdet ``AnchorGenerator``/``DeltaXYWHBBoxCoder``, torchvision
``AnchorGenerator``/``BoxCoder``) and the spec's rules §7.2/§7.3/§10 with a score factor of 1
(RetinaNet) or sigmoid(centerness) (ATSS). Nothing here imports ``fcos_offline``.

Inputs are one image's raw outputs per level: ``cls [A*C,H,W]`` logits, ``reg [A*4,H,W]`` deltas,
``ctr [A,H,W]`` logits or None. Prior ``i`` of a level is location ``i // A`` (row-major, y outer),
anchor ``i % A``; its class logits are channels ``a*C .. a*C+C-1``.
"""

from __future__ import annotations

import math

import numpy as np
from reference_postprocess import F32, _pair_topk, classwise_nms_topk, sigmoid


def _flat(t: np.ndarray, per_prior: int) -> np.ndarray:
    """``[A*k,H,W]`` -> ``[H*W*A, k]``."""
    hw = t.shape[1] * t.shape[2]
    return np.ascontiguousarray(t.reshape(t.shape[0], hw).T).reshape(hw * (t.shape[0] // per_prior), per_prior)


def base_anchors_mmdet(stride: int, octave_base: int, per_octave: int, ratios) -> np.ndarray:
    """w = h = stride; for each ratio r (outer) and scale s (inner): w·s/√r wide, h·s·√r high, centred on 0."""
    out = []
    for r in ratios:
        hr = np.sqrt(F32(r))
        wr = F32(1) / hr
        for i in range(per_octave):
            s = F32(octave_base * 2 ** (i / per_octave))
            w, h = F32(stride) * wr * s, F32(stride) * hr * s
            out.append([-F32(0.5) * w, -F32(0.5) * h, F32(0.5) * w, F32(0.5) * h])
    return np.array(out, dtype=F32)


def base_anchors_torchvision(stride: int, ratios) -> np.ndarray:
    """sizes int(4·stride·2^(i/3)); half-extents rounded to whole pixels (half to even)."""
    out = []
    for r in ratios:
        hr = np.sqrt(F32(r))
        wr = F32(1) / hr
        for i in range(3):
            size = F32(int(4 * stride * 2 ** (i / 3)))
            w, h = wr * size, hr * size
            out.append(np.round(np.array([-w, -h, w, h], dtype=F32) / F32(2)))
    return np.array(out, dtype=F32)


def grid(base: np.ndarray, h: int, w: int, stride_y: int, stride_x: int) -> np.ndarray:
    """Every location (y outer, x inner) shifted by (x·sx, y·sy), then its anchors."""
    rows = []
    for y in range(h):
        for x in range(w):
            for a in base:
                rows.append(a + np.array([x * stride_x, y * stride_y, x * stride_x, y * stride_y], dtype=F32))
    return np.array(rows, dtype=F32).reshape(-1, 4)


def torchvision_strides(h: int, w: int, canvas_hw: tuple[int, int]) -> tuple[int, int]:
    """Padded batch size // feature size, per axis."""
    h_pad, w_pad = (int(np.ceil(n / 32)) * 32 for n in canvas_hw)
    return h_pad // h, w_pad // w


def decode_mmdet(anchors, deltas, stds, canvas_hw) -> np.ndarray:
    """mmdet delta2bbox: denormalise, clamp dw/dh to ±|log(16/1000)|, centre + size·d, size·exp(d), clip."""
    d = deltas.astype(F32) * np.array(stds, F32)
    px, py = (anchors[:, 0] + anchors[:, 2]) * F32(0.5), (anchors[:, 1] + anchors[:, 3]) * F32(0.5)
    pw, ph = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    lim = F32(abs(math.log(16 / 1000)))
    dw, dh = np.clip(d[:, 2], -lim, lim), np.clip(d[:, 3], -lim, lim)
    gx, gy = px + pw * d[:, 0], py + ph * d[:, 1]
    gw, gh = pw * np.exp(dw), ph * np.exp(dh)
    h, w = canvas_hw
    boxes = [gx - gw * F32(0.5), gy - gh * F32(0.5), gx + gw * F32(0.5), gy + gh * F32(0.5)]
    return np.stack([np.clip(boxes[0], 0, w), np.clip(boxes[1], 0, h), np.clip(boxes[2], 0, w), np.clip(boxes[3], 0, h)], axis=1).astype(F32)


def decode_torchvision(anchors, deltas, canvas_hw) -> np.ndarray:
    """torchvision BoxCoder (weights 1): centre x1 + 0.5·w; dw, dh <= log(1000/16); clip."""
    wa, ha = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    cx, cy = anchors[:, 0] + F32(0.5) * wa, anchors[:, 1] + F32(0.5) * ha
    lim = F32(math.log(1000 / 16))
    dw, dh = np.minimum(deltas[:, 2], lim), np.minimum(deltas[:, 3], lim)
    px, py = deltas[:, 0] * wa + cx, deltas[:, 1] * ha + cy
    hw_, hh = F32(0.5) * (np.exp(dw) * wa), F32(0.5) * (np.exp(dh) * ha)
    h, w = canvas_hw
    return np.stack([np.clip(px - hw_, 0, w), np.clip(py - hh, 0, h), np.clip(px + hw_, 0, w), np.clip(py + hh, 0, h)], axis=1).astype(F32)


def anchor_postprocess(rule, cls_levels, reg_levels, ctr_levels, canvas_hw, strides, anchors_cfg, stds, nms_pre, score_thr, iou_thr, max_per_img):
    """One image through ``rule`` (mmdet2, mmdet218, mmdet3, torchvision); ``ctr_levels`` None without a score factor."""
    octave_base, per_octave, ratios = anchors_cfg
    boxes_l, scores_l, labels_l = [], [], []
    for lvl, (cls, reg) in enumerate(zip(cls_levels, reg_levels)):
        h, w = cls.shape[1:]
        a = reg.shape[0] // 4
        probs = sigmoid(_flat(cls, cls.shape[0] // a))
        factor = np.ones(len(probs), F32) if ctr_levels is None else sigmoid(_flat(ctr_levels[lvl], 1))[:, 0]
        deltas = _flat(reg, 4).astype(F32)
        if rule == "torchvision":
            sy, sx = torchvision_strides(h, w, canvas_hw)
            anchors = grid(base_anchors_torchvision(strides[lvl], ratios), h, w, sy, sx)
        else:
            anchors = grid(base_anchors_mmdet(strides[lvl], octave_base, per_octave, ratios), h, w, strides[lvl], strides[lvl])
        if rule == "mmdet2":  # top priors by max_k(S·c) when the level has more, then raw S > thr
            if len(probs) > nms_pre:
                top = np.argsort(-(probs * factor[:, None]).max(axis=1), kind="stable")[:nms_pre]
                probs, factor, deltas, anchors = probs[top], factor[top], deltas[top], anchors[top]
            pi, lab = np.nonzero(probs > score_thr)
            scores = (probs[pi, lab] * factor[pi]).astype(F32)
        else:
            pi, lab = _pair_topk(probs, score_thr, nms_pre)
            scores = probs[pi, lab] if rule == "torchvision" else (probs[pi, lab] * factor[pi]).astype(F32)
        decode = (
            decode_torchvision(anchors[pi], deltas[pi], canvas_hw)
            if rule == "torchvision"
            else decode_mmdet(anchors[pi], deltas[pi], stds, canvas_hw)
        )
        ok = np.ones(len(pi), bool)
        if rule == "mmdet3":
            ok = (decode[:, 2] > decode[:, 0]) & (decode[:, 3] > decode[:, 1])
        boxes_l.append(decode[ok])
        scores_l.append(scores[ok])
        labels_l.append(lab[ok])
    return classwise_nms_topk(np.concatenate(boxes_l), np.concatenate(scores_l), np.concatenate(labels_l), iou_thr, max_per_img)
