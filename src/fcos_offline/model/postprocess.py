"""Test-time dense-head post-processing in PyTorch, exportable to standard ONNX ops.

One module serves the eager "online" baseline and the ONNX export: in eager mode non-maximum
suppression runs a greedy PyTorch loop; under ``torch.onnx.export`` it becomes the standard
``NonMaxSuppression`` op, so ONNX Runtime and OpenVINO run the graph with no custom op.

Rules (``PostConfig.rule``), spec §7.2 / §7.3 / §10, for every head family: S is the class
probability, c the head's score factor (FCOS and ATSS centerness; 1 for RetinaNet), a prior is a
point (FCOS) or an anchor (RetinaNet, ATSS) decoded by the head's box coder.

* ``mmdet2``: per level keep the ``nms_pre`` priors with the largest max_k(S·c) (only when a
  level has more priors), decode, clip; candidates are (prior, class) pairs with raw S > thr
  (strict), scored S·c; class-wise NMS (IoU > iou_thr suppressed); top ``max_per_img``.
* ``mmdet218`` (2.18 <= mmdet < 3): per level the ``nms_pre`` (prior, class) pairs with the
  largest S > thr; score S·c; class-wise NMS; top ``max_per_img``.
* ``mmdet3``: as ``mmdet218``, and boxes with w <= 0 or h <= 0 are dropped before NMS.
* ``torchvision``: like ``mmdet218`` with no size filter; FCOS ranks and scores by √(S·c) > thr,
  RetinaNet by S.

Outputs follow the recipe's contract: ``dets [B,K,5]`` float32 (x1,y1,x2,y2,score, canvas
pixels, zero rows after the last detection) and ``labels [B,K]`` int64 (−1 after the last).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor, nn

from fcos_offline.model.coders import decode_delta_mmdet, decode_delta_torchvision, decode_distance
from fcos_offline.model.config import DetectorConfig, PostConfig
from fcos_offline.model.heads.spec import head_spec
from fcos_offline.model.priors import level_priors


def _box_iou_one(box: Tensor, boxes: Tensor) -> Tensor:
    """IoU of one box ``[4]`` with ``[P,4]`` (no +1; mmcv offset 0 / ONNX semantics)."""
    iw = (torch.minimum(box[2], boxes[:, 2]) - torch.maximum(box[0], boxes[:, 0])).clamp(min=0)
    ih = (torch.minimum(box[3], boxes[:, 3]) - torch.maximum(box[1], boxes[:, 1])).clamp(min=0)
    inter = iw * ih
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / (area + areas - inter)


def greedy_nms(boxes: Tensor, scores: Tensor, iou_thr: float, score_thr: float, max_total: int) -> Tensor:
    """Class-wise greedy NMS over ``boxes [B,M,4]``, ``scores [B,C,M]``.

    Returns ``[K,3]`` (batch, class, box) rows, at most ``max_total`` per image: the
    highest-scoring survivors, which is all a global top-``max_total`` needs. Candidates are
    visited in descending score order; each kept box suppresses later boxes of its own class.
    """
    rows = []
    for b in range(boxes.shape[0]):
        cls_idx, box_idx = (scores[b] > score_thr).nonzero(as_tuple=True)
        order = scores[b, cls_idx, box_idx].argsort(descending=True, stable=True)
        cls_idx, box_idx = cls_idx[order], box_idx[order]
        cand = boxes[b, box_idx]
        alive = torch.ones(len(order), dtype=torch.uint8)
        by_class = cls_idx.argsort(stable=True)  # positions grouped by class, ascending within a class
        counts = torch.bincount(cls_idx, minlength=scores.shape[1]).tolist()
        members = dict(zip(range(len(counts)), by_class.split(counts)))
        kept: list[int] = []
        start = 0
        while len(kept) < max_total and start < len(alive):
            i = start + int(alive[start:].argmax())
            if not alive[i]:
                break
            kept.append(i)
            same = members[int(cls_idx[i])]
            later = same[same > i]
            alive[later[_box_iou_one(cand[i], cand[later]) > iou_thr]] = 0
            start = i + 1
        keep = torch.tensor(kept, dtype=torch.long)
        rows.append(torch.stack((torch.full_like(keep, b), cls_idx[keep], box_idx[keep]), dim=1))
    return torch.cat(rows) if rows else torch.zeros((0, 3), dtype=torch.long)


def _iou_matrix(a: Tensor) -> Tensor:
    """IoU of every pair of boxes ``[m,4]``, with the very operations of :func:`_box_iou_one` (bit-identical)."""
    iw = (torch.minimum(a[:, None, 2], a[None, :, 2]) - torch.maximum(a[:, None, 0], a[None, :, 0])).clamp(min=0)
    ih = (torch.minimum(a[:, None, 3], a[None, :, 3]) - torch.maximum(a[:, None, 1], a[None, :, 1])).clamp(min=0)
    inter = iw * ih
    area = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    return inter / (area[:, None] + area[None, :] - inter)


def parallel_nms(boxes: Tensor, scores: Tensor, iou_thr: float, score_thr: float, max_total: int) -> Tensor:
    """:func:`greedy_nms`, exactly, without a Python loop per kept box: for devices (GPUs) where that loop is slow.

    Per class, the matrix ``U[i, j]`` (candidate ``i`` before ``j`` in score order, IoU > thr) is
    applied to a keep vector until it stops changing: ``keep_j = not any_i(keep_i and U_ij)``,
    starting from all kept. Its fixed point is unique and is the greedy result (Cluster-NMS,
    Zheng et al. 2020); the iterations are bounded by the longest suppression chain. The same
    candidate order (stable descending score), the same IoU arithmetic and the same cut to the
    first ``max_total`` survivors make the output identical to the loop's.
    """
    rows = []
    device = boxes.device
    for b in range(boxes.shape[0]):
        cls_idx, box_idx = (scores[b] > score_thr).nonzero(as_tuple=True)
        order = scores[b, cls_idx, box_idx].argsort(descending=True, stable=True)
        cls_idx, box_idx = cls_idx[order], box_idx[order]
        kept_positions = []
        for c in torch.unique(cls_idx).tolist():
            pos = (cls_idx == c).nonzero(as_tuple=True)[0]  # ascending: score order within the class
            later = torch.triu(_iou_matrix(boxes[b, box_idx[pos]]) > iou_thr, diagonal=1)
            keep = torch.ones(len(pos), dtype=torch.bool, device=device)
            for _ in range(len(pos)):
                new = ~(later & keep[:, None]).any(dim=0)
                if torch.equal(new, keep):
                    break
                keep = new
            kept_positions.append(pos[keep])
        kept = torch.cat(kept_positions).sort().values[:max_total] if kept_positions else torch.zeros(0, dtype=torch.long, device=device)
        rows.append(torch.stack((torch.full_like(kept, b), cls_idx[kept], box_idx[kept]), dim=1))
    return torch.cat(rows) if rows else torch.zeros((0, 3), dtype=torch.long, device=device)


class _NonMaxSuppression(torch.autograd.Function):
    """Greedy NMS in eager mode; ONNX ``NonMaxSuppression`` when exported."""

    @staticmethod
    def forward(ctx, boxes: Tensor, scores: Tensor, max_total: int, iou_thr: float, score_thr: float) -> Tensor:
        nms = greedy_nms if boxes.device.type == "cpu" else parallel_nms  # the same result; no host loop on a device
        return nms(boxes, scores, iou_thr, score_thr, max_total)

    @staticmethod
    def symbolic(g, boxes, scores, max_total: int, iou_thr: float, score_thr: float):
        # Per class, ONNX keeps up to max_total boxes: a superset of what a global top-max_total needs.
        return g.op(
            "NonMaxSuppression",
            boxes,
            scores,
            g.op("Constant", value_t=torch.tensor([max_total], dtype=torch.long)),
            g.op("Constant", value_t=torch.tensor([iou_thr], dtype=torch.float32)),
            g.op("Constant", value_t=torch.tensor([score_thr], dtype=torch.float32)),
        )


def nms_topk(boxes: Tensor, scores: Tensor, iou_thr: float, max_per_img: int) -> tuple[Tensor, Tensor]:
    """Class-wise NMS then the global top-``max_per_img`` by score.

    ``boxes [B,M,4]``, ``scores [B,C,M]`` (negative = not a candidate) ->
    ``dets [B,max_per_img,5]``, ``labels [B,max_per_img]`` (zero rows / −1 labels as padding).
    """
    num_classes, num_boxes = scores.shape[1], scores.shape[2]
    selected = _NonMaxSuppression.apply(boxes, scores, max_per_img, iou_thr, 0.0)
    b, c, m = selected[:, 0], selected[:, 1], selected[:, 2]
    flat = torch.full_like(scores.flatten(1), -1.0)
    flat = flat.index_put((b, c * num_boxes + m), scores[b, c, m])
    k = min(max_per_img, num_classes * num_boxes)
    top_scores, top_idx = flat.topk(k, dim=1)
    valid = top_scores >= 0
    labels = torch.where(valid, top_idx // num_boxes, torch.full_like(top_idx, -1))
    top_boxes = torch.gather(boxes, 1, (top_idx % num_boxes).unsqueeze(-1).expand(-1, -1, 4))
    dets = torch.cat((top_boxes, top_scores.unsqueeze(-1)), dim=-1)
    dets = torch.where(valid.unsqueeze(-1), dets, torch.zeros_like(dets))
    if k < max_per_img:
        dets = nn.functional.pad(dets, (0, 0, 0, max_per_img - k))
        labels = nn.functional.pad(labels, (0, max_per_img - k), value=-1)
    return dets, labels


class DensePostProcess(nn.Module):
    """Raw per-level head outputs -> (dets ``[B,K,5]``, labels ``[B,K]``) in canvas pixels, for any head family.

    In the manner of mmdet's ``BaseDenseHead.predict_by_feat``: per level, class probabilities
    ``S [B,N,C]`` (N = locations × priors), the optional score factor ``c [B,N]`` (1 without one),
    box regressions and the level's priors; then the rule's top-k, the head's box coder, and
    class-wise NMS with the global top ``max_per_img``.
    """

    def __init__(self, config: DetectorConfig, post: PostConfig | None = None) -> None:
        super().__init__()
        self.spec = head_spec(config.head.family)
        self.head = config.head
        self.post = post or config.post

    def forward(self, raw: Sequence[list[Tensor]], canvas_hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """``raw``: one list per ``HeadSpec.outputs`` entry (per level); ``canvas_hw``: the input's (H, W)."""
        named = dict(zip(self.spec.outputs, raw))
        factor = named.get(self.spec.score_factor) if self.spec.score_factor else None
        levels = [
            self._level_tensors(named["cls"][lvl], named["reg"][lvl], None if factor is None else factor[lvl], lvl, canvas_hw)
            for lvl in range(len(named["cls"]))
        ]
        if self.post.rule == "mmdet2":
            boxes, scores = self._point_candidates(levels, canvas_hw)
        else:
            boxes, scores = self._pair_candidates(levels, canvas_hw)
        return nms_topk(boxes, scores, self.post.iou_thr, self.post.max_per_img)

    def _level_tensors(self, cls: Tensor, reg: Tensor, ctr: Tensor | None, level: int, canvas_hw: tuple[int, int]):
        h, w = cls.shape[2], cls.shape[3]
        num_classes = cls.shape[1] // (reg.shape[1] // 4)  # channels per prior
        probs = cls.permute(0, 2, 3, 1).reshape(cls.shape[0], -1, num_classes).sigmoid()  # [B,N,C]
        factor = None if ctr is None else ctr.permute(0, 2, 3, 1).reshape(ctr.shape[0], -1, 1).sigmoid()  # [B,N,1]
        reg = reg.permute(0, 2, 3, 1).reshape(reg.shape[0], -1, 4)  # [B,N,4]
        priors = level_priors(self.head, self.spec.priors, level, h, w, self.post.points, canvas_hw).to(reg.device)
        return probs, factor, reg, priors

    def _decode(self, priors: Tensor, reg: Tensor, canvas_hw: tuple[int, int]) -> Tensor:
        if self.spec.coder == "distance":
            return decode_distance(priors, reg, canvas_hw)
        if self.post.rule == "torchvision":
            return decode_delta_torchvision(priors, reg, canvas_hw)
        return decode_delta_mmdet(priors, reg, self.head.target_means, self.head.target_stds, canvas_hw)

    def _point_candidates(self, levels, canvas_hw):
        """spec §7.2: per-level top priors by max_k(S·c); candidates S > thr, score S·c."""
        all_boxes, all_scores = [], []
        for probs, factor, reg, priors in levels:
            if probs.shape[1] > self.post.nms_pre > 0:
                ranked = probs if factor is None else probs * factor
                _, idx = ranked.max(dim=2).values.topk(self.post.nms_pre, dim=1)
                probs = torch.gather(probs, 1, idx.unsqueeze(-1).expand(-1, -1, probs.shape[2]))
                factor = None if factor is None else torch.gather(factor, 1, idx.unsqueeze(-1))
                reg = torch.gather(reg, 1, idx.unsqueeze(-1).expand(-1, -1, 4))
                priors = priors[idx]
            all_boxes.append(self._decode(priors, reg, canvas_hw))
            scored = probs if factor is None else probs * factor
            all_scores.append(torch.where(probs > self.post.score_thr, scored, torch.full_like(probs, -1.0)))
        return torch.cat(all_boxes, dim=1), torch.cat(all_scores, dim=1).transpose(1, 2)

    def _pair_candidates(self, levels, canvas_hw):
        """spec §7.3 / §10: per-level top (prior, class) pairs above the threshold."""
        all_boxes, all_scores, all_labels = [], [], []
        torchvision = self.post.rule == "torchvision"
        for probs, factor, reg, priors in levels:
            num_classes = probs.shape[2]
            rank = torch.sqrt(probs * factor) if torchvision and factor is not None else probs
            rank = rank.flatten(1)  # [B, N*C], prior-major
            masked = torch.where(rank > self.post.score_thr, rank, torch.full_like(rank, -1.0))
            k = min(self.post.nms_pre, masked.shape[1])
            top, idx = masked.topk(k, dim=1)
            prior_idx, labels = idx // num_classes, idx % num_classes
            if factor is None or torchvision:
                score = top
            else:
                score = top * torch.gather(factor.squeeze(-1), 1, prior_idx)
            boxes = self._decode(priors[prior_idx], torch.gather(reg, 1, prior_idx.unsqueeze(-1).expand(-1, -1, 4)), canvas_hw)
            valid = top >= 0
            if self.post.rule == "mmdet3":
                valid = valid & (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
            all_boxes.append(boxes)
            all_scores.append(torch.where(valid, score, torch.full_like(score, -1.0)))
            all_labels.append(labels)
        boxes, scores, labels = (torch.cat(t, dim=1) for t in (all_boxes, all_scores, all_labels))
        num_classes = levels[0][0].shape[2]
        dense = torch.full((scores.shape[0], num_classes, scores.shape[1]), -1.0, dtype=scores.dtype, device=scores.device)
        dense = dense.scatter(1, labels.unsqueeze(1), scores.unsqueeze(1))
        return boxes, dense


class DetectorWithPost(nn.Module):
    """Network + post-processing: ``images [B,3,H,W]`` -> ``(dets, labels)`` (the ONNX contract)."""

    def __init__(self, network: nn.Module, post: PostConfig | None = None) -> None:
        super().__init__()
        self.network = network
        self.postprocess = DensePostProcess(cast(DetectorConfig, network.cfg), post)

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        return self.postprocess(self.network(images), (int(images.shape[2]), int(images.shape[3])))
