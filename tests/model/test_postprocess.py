"""Eager post-processing (DetectorWithPost) against the independent numpy references (spec §5–§7, §10)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import reference_postprocess as ref
import torch
from conftest import assert_padding_contract, make_fcos, nms_case, random_canvas, sparse_fcos

from fcos_offline.model.config import DetectorConfig, PostConfig, default_post_config
from fcos_offline.model.match import match_batches
from fcos_offline.model.postprocess import DensePostProcess, DetectorWithPost, nms_topk

CANVAS = (256, 384)  # P3 is 32x48 = 1536 points > 1000: the per-level top-k rule is exercised

CASES = {
    # name: (make_fcos kwargs, rule)
    "caffe-r50-narrow/mmdet2": (dict(stage_blocks=(3, 4, 6, 3), stacked_convs=4), "mmdet2"),
    "gn-pytorch-ctr-on-reg-norm-bbox/mmdet2": (dict(style="pytorch", norm="gn", centerness_on_reg=True, norm_on_bbox=True, seed=3), "mmdet2"),
    "3-class/mmdet2": (dict(num_classes=3, seed=4), "mmdet2"),
    "caffe/mmdet218": (dict(seed=6), "mmdet218"),
    "gn-norm-bbox/mmdet3": (dict(norm="gn", norm_on_bbox=True, centerness_on_reg=True, seed=8), "mmdet3"),
    "torchvision-91/torchvision": (dict(layout="torchvision", num_classes=91, seed=5), "torchvision"),
}


def raw_numpy(model, x):
    with torch.no_grad():
        cls, dist, ctr = model(x)
    return [t.numpy() for t in cls], [t.numpy() for t in dist], [t.numpy() for t in ctr]


def reference(rule, model, x, post: PostConfig):
    return ref.reference_batch(
        rule,
        raw_numpy(model, x),
        tuple(x.shape[2:]),
        model.cfg.head.strides,
        nms_pre=post.nms_pre,
        score_thr=post.score_thr,
        iou_thr=post.iou_thr,
        max_per_img=post.max_per_img,
    )


def eager(model, x, post: PostConfig):
    with torch.no_grad():
        dets, labels = DetectorWithPost(model, post)(x)
    return dets.numpy(), labels.numpy()


def assert_match(a, b, min_rate=0.999):
    stats = match_batches(a[0], a[1], b[0], b[1])
    assert stats.num_ref == stats.num_other, stats
    assert stats.match_rate >= min_rate, stats
    assert stats.max_score_err <= 1e-4, stats
    return stats


@pytest.fixture(scope="module")
def models():
    return {name: make_fcos(calib_shape=CANVAS, **kw) for name, (kw, _) in CASES.items()}


@pytest.fixture(scope="module")
def x():
    return random_canvas(2, *CANVAS, seed=21)


@pytest.mark.parametrize("case", list(CASES))
def test_eager_matches_numpy_reference(models, x, case):
    model, rule = models[case], CASES[case][1]
    post = default_post_config(rule)
    got = eager(model, x, post)
    want = reference(rule, model, x, post)
    stats = assert_match(want, got)
    assert stats.num_ref == 2 * post.max_per_img  # > 100 survivors per image: the cut at 100 is tested too
    assert_padding_contract(*got)
    assert got[1].max() < model.cfg.head.num_classes


@pytest.fixture(scope="module")
def sparse_model():
    return sparse_fcos()


@pytest.mark.parametrize("rule", ["mmdet2", "mmdet218", "mmdet3"])
def test_sparse_detections_threshold_and_padding(sparse_model, x, rule):
    post = default_post_config(rule)
    got = eager(sparse_model, x, post)
    want = reference(rule, sparse_model, x, post)
    assert_match(want, got)
    n = (got[1] >= 0).sum(axis=1)
    assert (n > 0).all() and (n < 100).all(), n
    assert_padding_contract(*got)
    # the 0.05 threshold is on the raw sigmoid S, not on the output score S·c
    assert (got[0][..., 4][got[1] >= 0] < post.score_thr).any()


@pytest.mark.parametrize("rule", ["mmdet2", "mmdet218"])
def test_every_survivor_with_small_nms_pre(models, x, rule):
    """max_per_img 3000 shows all NMS survivors; nms_pre 150 makes the per-level cut bite everywhere.

    Here the two rules' candidate sets (top points by max S·c vs top (point, class) pairs by S)
    visibly differ, and a missing per-level cut would change the result too.
    """
    model = models["3-class/mmdet2"]
    post = dataclasses.replace(default_post_config(rule), nms_pre=150, max_per_img=3000)
    got = eager(model, x, post)
    want = reference(rule, model, x, post)
    assert_match(want, got)
    n = int((got[1] >= 0).sum())
    assert 300 < n < 2 * 3000
    no_cut = reference(rule, model, x, dataclasses.replace(post, nms_pre=10**9))
    assert int((no_cut[1] >= 0).sum()) != n
    other = "mmdet218" if rule == "mmdet2" else "mmdet2"
    other_out = reference(other, model, x, dataclasses.replace(default_post_config(other), nms_pre=150, max_per_img=3000))
    assert match_batches(want[0], want[1], other_out[0], other_out[1]).match_rate < 0.99


# --------------------------------------------------------------------------- synthetic raw outputs


def _levels(canvas, num_classes, fill=-20.0, strides=(8, 16, 32, 64, 128)):
    """All-negative logits on every level of a canvas (sizes as the network would give them)."""
    h, w = canvas
    sizes = []
    for _ in strides:
        h, w = (h + 1) // 2 if sizes else h // 8, (w + 1) // 2 if sizes else w // 8
        sizes.append((h, w))
    cls = [torch.full((1, num_classes, hh, ww), fill) for hh, ww in sizes]
    dist = [torch.full((1, 4, hh, ww), 10.0) for hh, ww in sizes]
    ctr = [torch.zeros((1, 1, hh, ww)) for hh, ww in sizes]
    return cls, dist, ctr, sizes


def _logit(p):
    return float(np.log(p / (1 - p)))


def test_mmdet2_threshold_on_raw_sigmoid():
    cls, dist, ctr, _ = _levels((64, 64), 2)
    cls[0][0, 1, 2, 3] = _logit(0.06)  # S 0.06 > 0.05, c 0.5 -> score 0.03: kept
    ctr[0][0, 0, 2, 3] = 0.0
    cls[0][0, 0, 5, 5] = _logit(0.04)  # S 0.04: dropped although c = 1
    ctr[0][0, 0, 5, 5] = 30.0
    post = DensePostProcess(DetectorConfig(post=default_post_config("mmdet2")))
    dets, labels = post((cls, dist, ctr), (64, 64))
    assert labels[0, :2].tolist() == [1, -1]
    px, py = 3 * 8 + 4, 2 * 8 + 4
    np.testing.assert_allclose(dets[0, 0].numpy(), [px - 10, py - 10, px + 10, py + 10, 0.03], rtol=1e-5)


def test_size_filter_only_in_mmdet3():
    """Zero-width boxes (ReLU distances l = r = 0) are dropped by mmdet3 only (spec §7.3)."""
    cls, dist, ctr, _ = _levels((64, 64), 1)
    cls[0][0, 0, 1, 1] = 5.0
    dist[0][0, :, 1, 1] = torch.tensor([0.0, 6.0, 0.0, 6.0])
    cls[0][0, 0, 6, 6] = 4.0
    results = {}
    for rule in ("mmdet2", "mmdet218", "mmdet3"):
        dets, labels = DensePostProcess(DetectorConfig(post=default_post_config(rule)))((cls, dist, ctr), (64, 64))
        results[rule] = int((labels >= 0).sum())
    assert results == {"mmdet2": 2, "mmdet218": 2, "mmdet3": 1}


def test_torchvision_rule_points_and_score():
    """P7 anchor centre = (x·(W//W7), y·(H//H7)) (stride 106 for H 320, not 128); score √(S·c) > 0.2."""
    cls, dist, ctr, sizes = _levels((320, 512), 91)
    assert sizes[4] == (3, 4)
    cls[4][0, 17, 2, 3] = _logit(0.09)  # √(0.09·0.5) = 0.212 > 0.2 although S·c = 0.045
    dist[4][0, :, 2, 3] = torch.tensor([10.0, 20.0, 30.0, 40.0])
    cls[3][0, 5, 1, 1] = _logit(0.07)  # √(0.07·0.5) = 0.187: dropped
    dets, labels = DensePostProcess(DetectorConfig(post=default_post_config("torchvision")))((cls, dist, ctr), (320, 512))
    assert labels[0, :2].tolist() == [17, -1]
    cx, cy = 3 * (512 // 4), 2 * (320 // 3)
    assert (cx, cy) == (384, 212)
    np.testing.assert_allclose(dets[0, 0].numpy(), [cx - 10, cy - 20, cx + 30, cy + 40, np.sqrt(0.045)], rtol=1e-5)


def test_nms_iou_convention():
    boxes, scores, (exp_scores, exp_labels) = nms_case()
    dets, labels = nms_topk(boxes, scores, 0.5, 10)
    assert dets.shape == (1, 10, 5) and labels.shape == (1, 10) and labels.dtype == torch.int64
    np.testing.assert_allclose(dets[0, :4, 4].numpy(), exp_scores, rtol=1e-6)
    assert labels[0].tolist() == exp_labels + [-1] * 6
    assert (dets[0, 4:] == 0).all()
    want, want_labels = ref.classwise_nms_topk(
        boxes[0, :5].numpy(), np.array([0.9, 0.8, 0.7, 0.6, 0.5], np.float32), np.array([0, 0, 0, 0, 1]), 0.5, 10
    )
    np.testing.assert_allclose(dets[0, :4].numpy(), want, rtol=1e-6)
    assert labels[0, :4].tolist() == want_labels.tolist()


def test_nms_keeps_top_max_per_img_sorted():
    g = torch.Generator().manual_seed(0)
    n = 300
    xy = torch.arange(n, dtype=torch.float32) * 20  # disjoint boxes
    boxes = torch.stack([xy, xy, xy + 10, xy + 10], 1)[None]
    scores = torch.rand((1, 3, n), generator=g)
    dets, labels = nms_topk(boxes, scores, 0.5, 100)
    # class-wise: identical boxes of different classes do not suppress each other -> 900 survivors
    top = torch.sort(scores.flatten(), descending=True).values[:100]
    torch.testing.assert_close(dets[0, :, 4], top)
    assert (labels[0] >= 0).all()
