"""A minimal FCOS trainer for the demo model (CPU, synthetic shapes), its evaluation and saving.

The network is this project's :class:`~fcos_offline.model.detector.Detector` at reduced width/depth
(GroupNorm in the head's stacked convs: without it the regression branch diverged); it is trained with BatchNorm on batch statistics (each ``FrozenBatchNorm2d`` swapped for an
``nn.BatchNorm2d`` with the same state-dict names), the running statistics are re-estimated at
the end ("precise BN"), and the weights are copied back into a plain frozen-BN ``FCOS`` that is
evaluated and saved in mmdet checkpoint layout — the same file shape a real checkpoint has.

Training recipe (Detector, Tian et al. 2019, with the common "improvements"):

* inputs: spec §8.2 letterbox onto the demo canvas (``data.preprocess.preprocess_image``),
  horizontal flip with p = 0.5; a fixed synthetic train split, reshuffled every epoch;
* targets: points (mmdet 2.x locations) inside a GT box — centre sampling radius 1.5 strides —
  whose largest distance lies in the level's regress range; the smallest-area GT wins;
  the ranges are mmdet's (−1, 64, 128, 256, 512, ∞) scaled by 0.4 = 320/800 for the
  320-pixel-high canvas: (−1, 25.6, 51.2, 102.4, 204.8, ∞);
* losses: sigmoid focal loss (α 0.25, γ 2) / #positives; GIoU loss on the decoded distances
  weighted by the centerness target / its sum; centerness BCE / #positives;
* AdamW, linear warm-up then cosine decay; cls bias initialised to the prior 0.01; during
  training the log-distances are capped at ln 4096 so ``exp`` cannot overflow.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fcos_offline.data.letterbox import boxes_to_canvas, boxes_to_original
from fcos_offline.data.preprocess import preprocess_image, read_image
from fcos_offline.demo.synthetic import (
    CLASSES,
    DEMO_CANVAS,
    DEMO_VAL_SEED,
    Sample,
    decode_sample,
    render_sample,
)
from fcos_offline.model.backbone import FrozenBatchNorm2d
from fcos_offline.model.config import (
    BackboneConfig,
    DetectorConfig,
    HeadConfig,
    NeckConfig,
    PostConfig,
)
from fcos_offline.model.detector import Detector
from fcos_offline.model.heads.base import Scale
from fcos_offline.model.heads.fcos import FCOSHead
from fcos_offline.model.postprocess import DetectorWithPost
from fcos_offline.model.priors import level_points
from fcos_offline.progress import info

REGRESS_RANGES: tuple[tuple[float, float], ...] = (
    (-1.0, 25.6),
    (25.6, 51.2),
    (51.2, 102.4),
    (102.4, 204.8),
    (204.8, math.inf),
)
CENTER_RADIUS = 1.5
MAX_LOG_DIST = math.log(4096.0)  # training-time cap of the log-distance: exp() can never overflow
TRAIN_SEED = 0
VAL_SEED = DEMO_VAL_SEED
INF = 1e8

Batch = tuple[Tensor, list[Tensor], list[Tensor]]
"""images ``[B,3,H,W]``, per image GT boxes ``[G,4]`` (canvas x1,y1,x2,y2) and labels ``[G]``."""


@dataclass
class DemoArch:
    """The width/depth knobs of the demo network (the rest is the real model's family)."""

    stem_channels: int = 16
    stage_planes: tuple[int, ...] = (16, 32, 64, 128)
    stage_blocks: tuple[int, ...] = (1, 1, 2, 1)
    fpn_channels: int = 64
    stacked_convs: int = 2
    head_norm: Literal["none", "gn"] = "gn"  # GroupNorm(32) in the stacked head convs: without it training diverges


def demo_config(arch: DemoArch | None = None, num_classes: int = len(CLASSES)) -> DetectorConfig:
    """FCOS config of the demo network: caffe bottlenecks, FPN P6-on-P5 + ReLU, FCOS head."""
    arch = arch or DemoArch()
    outs = tuple(4 * p for p in arch.stage_planes)
    return DetectorConfig(
        backbone=BackboneConfig(
            stage_blocks=arch.stage_blocks,
            stage_planes=arch.stage_planes,
            stage_out_channels=outs,
            stem_channels=arch.stem_channels,
            block="bottleneck",
            style="caffe",
        ),
        neck=NeckConfig(in_channels=outs[1:], out_channels=arch.fpn_channels, start_level=1, num_outs=5),
        head=HeadConfig(
            num_classes=num_classes,
            in_channels=arch.fpn_channels,
            feat_channels=arch.fpn_channels,
            stacked_convs=arch.stacked_convs,
            norm=arch.head_norm,
            conv_bias=arch.head_norm == "none",
        ),
        post=PostConfig(),
    )


# --------------------------------------------------------------------------- model for training


class _CappedScale(Scale):
    """Training-only ``Scale`` whose output is capped at :data:`MAX_LOG_DIST` (same state dict)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x).clamp(max=MAX_LOG_DIST)


def make_trainable(model: Detector) -> Detector:
    """Swap every FrozenBatchNorm2d for a trainable BatchNorm2d, cap the head's log-distances and
    initialise the head (in place)."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, FrozenBatchNorm2d):
                bn = nn.BatchNorm2d(child.weight.numel(), eps=child.eps)
                setattr(module, child_name, bn)
    head = cast(FCOSHead, model.bbox_head)  # the demo detector is an FCOS
    scales = cast(nn.ModuleList, head.scales)  # the demo head uses scales (HeadConfig.use_scale)
    for i in range(len(scales)):
        scales[i] = _CappedScale()
    for conv in [m.conv for m in (*head.cls_convs, *head.reg_convs)] + [head.conv_cls, head.conv_reg, head.conv_centerness]:
        nn.init.normal_(conv.weight, std=0.01)
        if conv.bias is not None:
            nn.init.zeros_(conv.bias)
    assert head.conv_cls.bias is not None  # conv_cls is built with bias=True
    nn.init.constant_(head.conv_cls.bias, -math.log((1 - 0.01) / 0.01))
    return model


def to_frozen(model: Detector) -> Detector:
    """A fresh eval-mode ``FCOS`` (FrozenBatchNorm2d) holding ``model``'s trained values."""
    frozen = Detector(model.cfg)
    state = {k: v.detach().clone() for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    frozen.load_state_dict(state, strict=True)
    return frozen.eval()


# --------------------------------------------------------------------------- targets and losses


def assign_targets(
    points: list[Tensor],
    strides: tuple[int, ...],
    boxes: Tensor,
    labels: Tensor,
    num_classes: int,
    regress_ranges: tuple[tuple[float, float], ...] = REGRESS_RANGES,
    center_radius: float | None = CENTER_RADIUS,
) -> tuple[Tensor, Tensor]:
    """FCOS targets for one image.

    ``points`` per level ``[N_l, 2]`` (x, y); ``boxes [G, 4]`` x1,y1,x2,y2; ``labels [G]``.
    Returns ``labels [N]`` (``num_classes`` = background) and distances ``[N, 4]`` (l, t, r, b)
    to the assigned box, over the concatenated levels. A point is positive for a box when it lies
    inside it (and, with ``center_radius``, within ``radius * stride`` of its centre), and the
    largest of its four distances is within the level's range ``(lo, hi]``; among several such
    boxes the one of smallest area wins.
    """
    pts = torch.cat(points)
    n = pts.shape[0]
    if boxes.numel() == 0:
        return torch.full((n,), num_classes, dtype=torch.long), torch.zeros((n, 4))
    lo = torch.cat([torch.full((len(p),), r[0]) for p, r in zip(points, regress_ranges)])
    hi = torch.cat([torch.full((len(p),), r[1]) for p, r in zip(points, regress_ranges)])
    stride = torch.cat([torch.full((len(p),), float(s)) for p, s in zip(points, strides)])
    x, y = pts[:, 0:1], pts[:, 1:2]  # [N,1]
    x1, y1, x2, y2 = boxes.unbind(1)  # [G]
    dist = torch.stack((x - x1, y - y1, x2 - x, y2 - y), dim=2)  # [N,G,4]
    inside = dist.min(dim=2).values > 0
    if center_radius:
        cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
        r = stride[:, None] * center_radius
        cdist = torch.stack(
            (x - torch.maximum(cx - r, x1), y - torch.maximum(cy - r, y1), torch.minimum(cx + r, x2) - x, torch.minimum(cy + r, y2) - y), dim=2
        )
        inside = cdist.min(dim=2).values > 0
    max_dist = dist.max(dim=2).values
    in_range = (max_dist > lo[:, None]) & (max_dist <= hi[:, None])
    area = ((x2 - x1) * (y2 - y1)).expand(n, -1)
    area = torch.where(inside & in_range, area, torch.full_like(area, INF))
    best_area, best = area.min(dim=1)
    out_labels = labels[best].clone()
    out_labels[best_area >= INF] = num_classes
    return out_labels, dist[torch.arange(n), best]


def focal_loss(logits: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Summed sigmoid focal loss; ``logits [N,K]``, ``labels [N]`` with ``K`` = background."""
    target = F.one_hot(labels, logits.shape[1] + 1)[:, :-1].to(logits.dtype)
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    a_t = alpha * target + (1 - alpha) * (1 - target)
    return (a_t * (1 - p_t) ** gamma * ce).sum()


def giou_loss(pred: Tensor, target: Tensor) -> Tensor:
    """Per-point ``1 - GIoU`` of two boxes given as distances (l, t, r, b) from the same point."""
    pred_area = (pred[:, 0] + pred[:, 2]) * (pred[:, 1] + pred[:, 3])
    target_area = (target[:, 0] + target[:, 2]) * (target[:, 1] + target[:, 3])
    lo, hi = torch.minimum(pred, target), torch.maximum(pred, target)
    inter = (lo[:, 0] + lo[:, 2]) * (lo[:, 1] + lo[:, 3])
    union = pred_area + target_area - inter
    enclose = (hi[:, 0] + hi[:, 2]) * (hi[:, 1] + hi[:, 3])
    eps = 1e-6
    iou = inter / (union + eps)
    return 1 - (iou - (enclose - union) / (enclose + eps))


def centerness_target(dist: Tensor) -> Tensor:
    """FCOS centerness ``sqrt(min(l,r)/max(l,r) * min(t,b)/max(t,b))`` of ``[P,4]`` distances."""
    lr, tb = dist[:, [0, 2]], dist[:, [1, 3]]
    return torch.sqrt((lr.min(1).values / lr.max(1).values) * (tb.min(1).values / tb.max(1).values))


def fcos_loss(
    outputs: tuple[list[Tensor], list[Tensor], list[Tensor]],
    boxes: list[Tensor],
    labels: list[Tensor],
    canvas_hw: tuple[int, int],
    strides: tuple[int, ...],
) -> dict[str, Tensor]:
    """Focal + GIoU + centerness losses of a batch of raw head outputs (see module docstring)."""
    cls_logits, dists, ctr_logits = outputs
    num_classes = cls_logits[0].shape[1]
    points = [level_points(c.shape[2], c.shape[3], s, "mmdet2", canvas_hw) for c, s in zip(cls_logits, strides)]

    def flat(maps: list[Tensor]) -> Tensor:  # [B,C,H,W] per level -> [B, N, C]
        return torch.cat([m.permute(0, 2, 3, 1).flatten(1, 2) for m in maps], dim=1)

    cls, dist, ctr = flat(cls_logits), flat(dists), flat(ctr_logits).squeeze(-1)
    targets = [assign_targets(points, strides, b, lab, num_classes) for b, lab in zip(boxes, labels)]
    t_labels = torch.stack([t[0] for t in targets])
    t_dist = torch.stack([t[1] for t in targets])
    pos = t_labels < num_classes
    num_pos = max(int(pos.sum()), 1)
    loss_cls = focal_loss(cls.flatten(0, 1), t_labels.flatten()) / num_pos
    if not pos.any():
        zero = dist.sum() * 0 + ctr.sum() * 0
        return {"cls": loss_cls, "box": zero, "ctr": zero}
    ctr_t = centerness_target(t_dist[pos])
    loss_box = (giou_loss(dist[pos], t_dist[pos]) * ctr_t).sum() / ctr_t.sum().clamp(min=1e-6)
    loss_ctr = F.binary_cross_entropy_with_logits(ctr[pos], ctr_t, reduction="sum") / num_pos
    return {"cls": loss_cls, "box": loss_box, "ctr": loss_ctr}


# --------------------------------------------------------------------------- data


def samples_batch(samples: list[Sample], canvas_hw: tuple[int, int], flips: list[bool] | None = None) -> Batch:
    """Decode and letterbox (§8.2) rendered samples; ``flips[i]`` mirrors image ``i`` horizontally."""
    images, boxes, labels = [], [], []
    for i, sample in enumerate(samples):
        tensor, lb = preprocess_image(decode_sample(sample), *canvas_hw)
        b = boxes_to_canvas(sample.boxes, lb).astype(np.float32).reshape(-1, 4)
        if flips is not None and flips[i]:
            tensor = tensor[:, :, ::-1]
            b = np.stack((canvas_hw[1] - b[:, 2], b[:, 1], canvas_hw[1] - b[:, 0], b[:, 3]), axis=1)
        images.append(torch.from_numpy(np.ascontiguousarray(tensor)))
        boxes.append(torch.from_numpy(b))
        labels.append(torch.from_numpy(sample.labels))
    return torch.stack(images), boxes, labels


def epoch_batches(samples: list[Sample], batch_size: int, iters: int, canvas_hw: tuple[int, int], seed: int) -> Iterator[Batch]:
    """``iters`` batches over ``samples``: a fresh permutation per epoch, random flips (p = 0.5)."""
    rng = np.random.default_rng(seed)
    order: list[int] = []
    for _ in range(iters):
        while len(order) < batch_size:
            order.extend(rng.permutation(len(samples)).tolist())
        chosen, order = order[:batch_size], order[batch_size:]
        flips = (rng.random(batch_size) < 0.5).tolist()
        yield samples_batch([samples[i] for i in chosen], canvas_hw, flips)


# --------------------------------------------------------------------------- training loop


def _lr_factor(it: int, iters: int, warmup: int) -> float:
    if it < warmup:
        return 0.1 + 0.9 * it / warmup
    return 0.5 * (1 + math.cos(math.pi * (it - warmup) / max(iters - warmup, 1)))


def train_steps(
    model: Detector, batches: Iterable[Batch], iters: int, lr: float = 2e-3, weight_decay: float = 0.05, warmup: int = 100, log_every: int = 0
) -> list[float]:
    """One AdamW step per batch of ``batches`` (``iters`` of them, for the schedule); returns each step's loss.

    Runs in channels-last memory format (about 4x faster convolutions on CPU).
    """
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=lr)
    strides = model.cfg.head.strides
    model.train().to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    losses: list[float] = []
    start = time.perf_counter()
    seen = 0
    running: dict[str, float] = {}
    for it, (images, boxes, labels) in enumerate(batches):
        if it == iters:
            break
        for group in opt.param_groups:
            group["lr"] = lr * _lr_factor(it, iters, warmup)
        images = images.contiguous(memory_format=torch.channels_last)
        parts = fcos_loss(model(images), boxes, labels, (images.shape[2], images.shape[3]), strides)
        loss = cast(Tensor, sum(parts.values()))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {it}: { {k: float(v) for k, v in parts.items()} }")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
        losses.append(float(loss.detach()))
        seen += images.shape[0]
        for k, v in parts.items():
            running[k] = running.get(k, 0.0) + float(v.detach())
        if log_every and ((it + 1) % log_every == 0 or it + 1 == iters):
            elapsed = time.perf_counter() - start
            n = (it % log_every) + 1
            avg = " ".join(f"{k} {v / n:.3f}" for k, v in running.items())
            info(
                f"iter {it + 1}/{iters}  loss {sum(running.values()) / n:.3f} ({avg})  "
                f"lr {opt.param_groups[0]['lr']:.2e}  {seen / elapsed:.1f} img/s  {elapsed:.0f} s"
            )
            running = {}
    return losses


@torch.no_grad()
def recalibrate_bn(model: Detector, batches: list[Batch]) -> None:
    """Replace BN running statistics by their exact average over ``batches`` (precise BN)."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average
    model.train()
    for images, _, _ in batches:
        model(images)
    model.eval()


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate_demo_model(
    model: Detector, image_dir: str | Path, ann_file: str | Path, canvas_hw: tuple[int, int] = DEMO_CANVAS, batch_size: int = 8
) -> dict:
    """COCO bbox eval of ``model`` + its own post-processing (mmdet2 rule) on a COCO folder.

    Images go through spec §8.2 preprocessing; boxes are mapped back with the exact inverse
    letterbox and clipped to the image. Returns ``{"stats": [12 COCO numbers], "bbox_mAP": …,
    "num_images": …, "seconds": …}``.
    """
    import json

    from fcos_offline.evaluate.coco import detections_to_coco, evaluate_bbox

    start = time.perf_counter()
    data = json.loads(Path(ann_file).read_text())
    cat_ids = sorted(c["id"] for c in data["categories"])
    detector = DetectorWithPost(model.eval())
    results = []
    images = data["images"]
    for i in range(0, len(images), batch_size):
        chunk = images[i : i + batch_size]
        prepped = [preprocess_image(read_image(Path(image_dir) / im["file_name"]), *canvas_hw) for im in chunk]
        dets, labels = detector(torch.from_numpy(np.stack([p[0] for p in prepped])))
        for im, (_, lb), d, lab in zip(chunk, prepped, dets.numpy(), labels.numpy()):
            keep = lab >= 0
            boxes = boxes_to_original(d[keep, :4], lb)
            boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, im["width"])
            boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, im["height"])
            results.extend(detections_to_coco(im["id"], lab[keep], np.concatenate([boxes, d[keep, 4:5]], 1), cat_ids))
    stats = [float(v) for v in evaluate_bbox(data, results)["stats"]]
    return {"stats": stats, "bbox_mAP": stats[0], "num_images": len(images), "seconds": time.perf_counter() - start}


# --------------------------------------------------------------------------- saving


def mmdet_config_text(cfg: DetectorConfig, canvas_hw: tuple[int, int] = DEMO_CANVAS) -> str:
    """mmdet-2.x-style config text describing the demo model (read back by ``load_checkpoint``)."""
    b, n, h, p = cfg.backbone, cfg.neck, cfg.head, cfg.post
    ranges = ", ".join(f"({lo}, {'INF' if math.isinf(hi) else hi})" for lo, hi in REGRESS_RANGES)
    return f"""# fcos-offline demo model (synthetic shapes); trained by `fcos-offline train-demo`
INF = 1e8
model = dict(
    type='FCOS',
    backbone=dict(
        type='ResNet',
        stem_channels={b.stem_channels},
        base_channels={b.stage_planes[0]},
        stage_blocks={b.stage_blocks},
        num_stages={len(b.stage_blocks)},
        out_indices={tuple(range(len(b.stage_blocks)))},
        frozen_stages=-1,
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=True,
        style='{b.style}'),
    neck=dict(
        type='FPN',
        in_channels={list(n.in_channels)},
        out_channels={n.out_channels},
        start_level={n.start_level},
        add_extra_convs='on_output',
        num_outs={n.num_outs},
        relu_before_extra_convs={n.relu_before_extra}),
    bbox_head=dict(
        type='FCOSHead',
        num_classes={h.num_classes},
        in_channels={h.in_channels},
        stacked_convs={h.stacked_convs},
        feat_channels={h.feat_channels},
        strides={list(h.strides)},
        regress_ranges=({ranges}),
        norm_cfg={"dict(type='GN', num_groups=32, requires_grad=True)" if h.norm == "gn" else None},
        norm_on_bbox={h.norm_on_bbox},
        centerness_on_reg={h.centerness_on_reg},
        center_sampling=True,
        center_sample_radius={CENTER_RADIUS},
        loss_cls=dict(type='FocalLoss', use_sigmoid=True, gamma=2.0, alpha=0.25, loss_weight=1.0),
        loss_bbox=dict(type='GIoULoss', loss_weight=1.0),
        loss_centerness=dict(type='CrossEntropyLoss', use_sigmoid=True, loss_weight=1.0)),
    test_cfg=dict(
        nms_pre={p.nms_pre},
        min_bbox_size=0,
        score_thr={p.score_thr},
        nms=dict(type='nms', iou_threshold={p.iou_thr}),
        max_per_img={p.max_per_img}))
img_norm_cfg = dict(mean=[102.9801, 115.9465, 122.7717], std=[1.0, 1.0, 1.0], to_rgb=False)
# input: keep-ratio box-fit resize onto a centred zero-padded {canvas_hw[0]}x{canvas_hw[1]} (HxW) canvas
dataset_type = 'CocoDataset'
classes = {tuple(CLASSES)}
"""


def save_demo_checkpoint(model: Detector, path: str | Path, canvas_hw: tuple[int, int] = DEMO_CANVAS) -> Path:
    """Write ``{'state_dict', 'meta'}`` in mmdet layout (frozen-BN ``model``)."""
    from fcos_offline.model.checkpoint import mmdet_state_dict

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "mmdet_version": "2.x-compatible (fcos-offline demo)",
        "config": mmdet_config_text(model.cfg, canvas_hw),
        "CLASSES": tuple(CLASSES),
    }
    torch.save({"state_dict": mmdet_state_dict(model), "meta": meta}, path)
    return path


# --------------------------------------------------------------------------- the whole recipe


def train_demo(
    out_path: str | Path,
    *,
    iters: int = 3200,
    batch_size: int = 4,
    train_images: int = 1600,
    lr: float = 1e-3,
    warmup: int = 300,
    seed: int = TRAIN_SEED,
    val_seed: int = VAL_SEED,
    val_images: int = 100,
    val_dir: str | Path | None = None,
    canvas_hw: tuple[int, int] = DEMO_CANVAS,
    arch: DemoArch | None = None,
    threads: int = 1,
    log_every: int = 25,
) -> dict:
    """Train the demo FCOS on synthetic split ``seed``, evaluate on split ``val_seed``, save it.

    The train split is ``render_sample(seed, i)`` for ``i < train_images``, rendered once and
    kept encoded in memory; :func:`epoch_batches` shuffles and flips it (``seed``), weights are
    initialised from ``torch.manual_seed(seed)``. The val split (``val_images`` images) is
    written to ``val_dir`` (default: a temporary folder).
    Returns ``{"out", "seconds", "train_seconds", "iters", "images_seen", "eval", "final_loss"}``.
    """
    import tempfile

    from fcos_offline.demo.synthetic import make_demo_data
    from fcos_offline.model.checkpoint import load_model

    if seed == val_seed:
        raise ValueError("train and val seeds must differ")
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # tiny focal-loss gradients would hit slow denormal arithmetic
    torch.manual_seed(seed)
    start = time.perf_counter()
    model = make_trainable(Detector(demo_config(arch)))
    info(
        f"train-demo: {sum(p.numel() for p in model.parameters()):,} parameters, canvas {canvas_hw[0]}x{canvas_hw[1]}, "
        f"{iters} iters x {batch_size} images over {train_images} train images (seed {seed})"
    )
    samples = [render_sample(seed, i) for i in range(train_images)]
    info(f"train-demo: rendered the train split in {time.perf_counter() - start:.0f} s")
    losses = train_steps(model, epoch_batches(samples, batch_size, iters, canvas_hw, seed), iters, lr=lr, warmup=warmup, log_every=log_every)
    calib = [samples_batch(samples[k : k + batch_size], canvas_hw) for k in range(0, 8 * batch_size, batch_size)]
    recalibrate_bn(model, calib)
    train_seconds = time.perf_counter() - start
    frozen = to_frozen(model)
    out = save_demo_checkpoint(frozen, out_path, canvas_hw)
    loaded, _ = load_model(out)
    probe = calib[0][0][:2]
    with torch.no_grad():
        same = all(torch.equal(a, b) for x, y in zip(frozen(probe), loaded(probe)) for a, b in zip(x, y))
    if not same:
        raise RuntimeError(f"{out}: reloaded model's outputs differ from the trained model's")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(val_dir) if val_dir else Path(tmp)
        data = make_demo_data(root, "val", val_images, val_seed)
        result = evaluate_demo_model(loaded, data["image_dir"], data["ann_file"], canvas_hw)
    stats = result["stats"]
    info(
        f"train-demo: saved {out} ({out.stat().st_size / 1e6:.2f} MB); bbox mAP {stats[0]:.3f} "
        f"(AP50 {stats[1]:.3f}, AP75 {stats[2]:.3f}) on {val_images} val images (seed {val_seed})"
    )
    return {
        "out": str(out),
        "seconds": time.perf_counter() - start,
        "train_seconds": train_seconds,
        "iters": iters,
        "images_seen": iters * batch_size,
        "eval": result,
        "final_loss": float(np.mean(losses[-25:])),
    }
