"""Demo trainer: target assignment, losses, BN swap, a tiny training run, and the shipped model."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from fcos_offline.cli import main
from fcos_offline.demo.synthetic import CLASSES, render_sample
from fcos_offline.demo.train import (
    DEMO_CANVAS,
    DemoArch,
    assign_targets,
    centerness_target,
    demo_config,
    epoch_batches,
    evaluate_demo_model,
    focal_loss,
    giou_loss,
    make_trainable,
    recalibrate_bn,
    samples_batch,
    save_demo_checkpoint,
    to_frozen,
    train_steps,
)
from fcos_offline.model.backbone import FrozenBatchNorm2d
from fcos_offline.model.checkpoint import load_model
from fcos_offline.model.detector import Detector

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "src" / "fcos_offline" / "assets" / "fcos_demo.pth"
TINY = DemoArch(stem_channels=8, stage_planes=(4, 8, 12, 16), stage_blocks=(1, 1, 1, 1), fpn_channels=32, stacked_convs=2)
TINY_CANVAS = (64, 96)
K = 6  # background label = number of classes


def _batch(seed: int, n: int, flips: list[bool] | None = None):
    return samples_batch([render_sample(seed, i) for i in range(n)], TINY_CANVAS, flips)


def _pts(*xy: tuple[float, float]) -> torch.Tensor:
    return torch.tensor(xy, dtype=torch.float32).reshape(-1, 2)


# --------------------------------------------------------------------------- targets


def test_point_inside_gets_class_and_distances_outside_is_background() -> None:
    boxes = torch.tensor([[0.0, 0.0, 40.0, 20.0]])
    labels, dist = assign_targets([_pts((10, 5), (60, 5))], (8,), boxes, torch.tensor([3]), K, regress_ranges=((-1, math.inf),), center_radius=None)
    assert labels.tolist() == [3, K]
    assert dist[0].tolist() == [10.0, 5.0, 30.0, 15.0]


def test_smallest_box_wins_on_overlap() -> None:
    big, small = [0.0, 0.0, 40.0, 40.0], [5.0, 5.0, 25.0, 25.0]
    for order in ([big, small], [small, big]):  # independent of annotation order
        gt_labels = torch.tensor([1, 4] if order[0] is big else [4, 1])
        labels, dist = assign_targets(
            [_pts((10, 10), (35, 35))], (8,), torch.tensor(order), gt_labels, K, regress_ranges=((-1, math.inf),), center_radius=None
        )
        assert labels.tolist() == [4, 1]  # (35, 35) is only inside the big box
        assert dist[0].tolist() == [5.0, 5.0, 15.0, 15.0]
        assert dist[1].tolist() == [35.0, 35.0, 5.0, 5.0]


def test_regress_ranges_pick_the_level() -> None:
    boxes = torch.tensor([[0.0, 0.0, 40.0, 40.0]])
    # the same location on two levels: max distance 30 belongs to the second level's range
    labels, dist = assign_targets(
        [_pts((30, 30)), _pts((30, 30))], (8, 16), boxes, torch.tensor([2]), K, regress_ranges=((-1, 25), (25, math.inf)), center_radius=None
    )
    assert labels.tolist() == [K, 2]
    assert dist[1].tolist() == [30.0, 30.0, 10.0, 10.0]


def test_center_sampling_limits_positives_to_the_centre() -> None:
    boxes = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    points = [_pts((50, 50), (60, 50), (90, 90))]  # stride 8, radius 1.5 -> |dx|,|dy| < 12
    labels, _ = assign_targets(points, (8,), boxes, torch.tensor([0]), K, regress_ranges=((-1, math.inf),))
    assert labels.tolist() == [0, 0, K]
    labels, _ = assign_targets(points, (8,), boxes, torch.tensor([0]), K, regress_ranges=((-1, math.inf),), center_radius=None)
    assert labels.tolist() == [0, 0, 0]


def test_no_boxes_means_all_background() -> None:
    labels, dist = assign_targets([_pts((1, 1), (2, 2))], (8,), torch.zeros((0, 4)), torch.zeros(0, dtype=torch.long), K)
    assert labels.tolist() == [K, K] and dist.abs().sum() == 0


# --------------------------------------------------------------------------- losses


def test_focal_loss_values() -> None:
    logits = torch.zeros(2, 3)
    # background row: 3 negatives at p=0.5: each (1-alpha) * 0.5^2 * ln 2
    assert float(focal_loss(logits[:1], torch.tensor([3]))) == pytest.approx(3 * 0.75 * 0.25 * math.log(2), rel=1e-5)
    # class-1 row: one positive alpha * 0.5^2 * ln 2 + two negatives
    expected = 0.25 * 0.25 * math.log(2) + 2 * 0.75 * 0.25 * math.log(2)
    assert float(focal_loss(logits[1:], torch.tensor([1]))) == pytest.approx(expected, rel=1e-5)
    confident = torch.tensor([[-10.0, 10.0, -10.0]])
    assert float(focal_loss(confident, torch.tensor([1]))) < 1e-8
    assert float(focal_loss(-confident, torch.tensor([1]))) > 1.0


def test_giou_and_centerness_values() -> None:
    same = torch.tensor([[3.0, 4.0, 5.0, 6.0]])
    assert float(giou_loss(same, same)) == pytest.approx(0.0, abs=1e-6)
    # 2x2 box inside a 4x4 box around the same point: IoU 1/4, enclosure = union
    assert float(giou_loss(torch.tensor([[1.0, 1, 1, 1]]), torch.tensor([[2.0, 2, 2, 2]]))) == pytest.approx(0.75)
    # offset boxes: pred (l,t,r,b) = (1,1,3,1) area 8, target (3,1,1,1) area 8, inter 2x2, enclosure 6x2
    loss = float(giou_loss(torch.tensor([[1.0, 1, 3, 1]]), torch.tensor([[3.0, 1, 1, 1]])))
    iou, union, enclose = 4 / 12, 12, 12
    assert loss == pytest.approx(1 - (iou - (enclose - union) / enclose))
    assert centerness_target(torch.tensor([[2.0, 2, 2, 2], [1.0, 1, 3, 1]])).tolist() == pytest.approx([1.0, math.sqrt(1 / 3)])


# --------------------------------------------------------------------------- model plumbing and training


def test_bn_swap_and_back_keeps_the_function() -> None:
    torch.manual_seed(0)
    model = make_trainable(Detector(demo_config(TINY)))
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules()) > 0
    assert float(model.bbox_head.conv_cls.bias[0].detach()) == pytest.approx(-math.log(99), rel=1e-6)  # prior 0.01
    batch = _batch(5, 2)
    recalibrate_bn(model, [batch])  # non-trivial running statistics
    frozen = to_frozen(model)
    assert any(isinstance(m, FrozenBatchNorm2d) for m in frozen.modules())
    with torch.no_grad():
        for a, b in zip(model.eval()(batch[0]), frozen(batch[0])):
            for x, y in zip(a, b):
                torch.testing.assert_close(x, y)


def test_trainable_model_caps_distances_so_exp_cannot_overflow() -> None:
    model = make_trainable(Detector(demo_config(TINY)))
    with torch.no_grad():
        model.bbox_head.conv_reg.bias.fill_(1000.0)
        images = _batch(5, 2)[0]
        dists = model.eval()(images)[1]
        assert all(torch.isfinite(d).all() and float(d.max()) == pytest.approx(4096.0) for d in dists)
        frozen = to_frozen(model)  # the saved model is the plain FCOS: no cap
        assert all(torch.isinf(d).all() for d in frozen(images)[1])


@pytest.fixture
def one_thread():
    """One torch thread: on a busy 2-core machine two OpenMP threads spin-wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_tiny_training_reduces_the_loss(one_thread: None) -> None:
    torch.manual_seed(0)
    model = make_trainable(Detector(demo_config(TINY)))
    samples = [render_sample(11, i) for i in range(8)]
    losses = train_steps(model, epoch_batches(samples, 8, 20, TINY_CANVAS, seed=0), 20, lr=3e-3, warmup=5)
    assert len(losses) == 20 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3


def test_flip_mirrors_image_and_boxes() -> None:
    flips = [True, False, True]
    plain, flipped = _batch(2, 3), _batch(2, 3, flips)
    w = TINY_CANVAS[1]
    for i, flip in enumerate(flips):
        b = plain[1][i]
        if flip:
            torch.testing.assert_close(flipped[0][i], plain[0][i].flip(-1))
            torch.testing.assert_close(flipped[1][i], torch.stack((w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]), 1))
        else:
            assert torch.equal(flipped[0][i], plain[0][i]) and torch.equal(flipped[1][i], b)
        assert torch.equal(flipped[2][i], plain[2][i])


def test_epoch_batches_cover_every_sample_once_per_epoch() -> None:
    samples = [render_sample(9, i) for i in range(6)]
    batches = list(epoch_batches(samples, 3, 4, TINY_CANVAS, seed=0))  # two epochs
    assert len(batches) == 4
    for epoch in (batches[:2], batches[2:]):
        labels = sorted(tuple(t.tolist()) for b in epoch for t in b[2])
        assert labels == sorted(tuple(s.labels.tolist()) for s in samples)


def test_saved_checkpoint_reloads_identically(tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = make_trainable(Detector(demo_config(TINY)))
    recalibrate_bn(model, [_batch(5, 2)])
    frozen = to_frozen(model)
    path = save_demo_checkpoint(frozen, tmp_path / "m.pth", TINY_CANVAS)
    obj = torch.load(path, weights_only=True)
    assert set(obj) == {"state_dict", "meta"}
    assert "backbone.layer1.0.bn1.num_batches_tracked" in obj["state_dict"]
    assert obj["meta"]["CLASSES"] == tuple(CLASSES)
    loaded, ckpt = load_model(path)
    assert ckpt.format == "mmdet" and ckpt.class_names == list(CLASSES)
    assert ckpt.sources["style"] == ckpt.sources["norm_on_bbox"] == ckpt.sources["centerness_on_reg"] == "meta config"
    assert ckpt.config.to_dict() == frozen.cfg.to_dict()
    x = _batch(6, 2)[0]
    with torch.no_grad():
        for a, b in zip(frozen(x), loaded(x)):
            for p, q in zip(a, b):
                assert torch.equal(p, q)


# --------------------------------------------------------------------------- the shipped demo model


def _readme_arch() -> dict[str, str]:
    text = (ROOT / "demo" / "README.md").read_text()
    return dict(re.findall(r"^- (\w[\w ]*\w): `([^`]*)`", text, flags=re.M))


def test_shipped_model_loads_and_matches_readme() -> None:
    assert SHIPPED.stat().st_size <= 10 * 1024 * 1024
    model, ckpt = load_model(SHIPPED)
    cfg = ckpt.config
    arch = _readme_arch()
    assert arch["stem channels"] == str(cfg.backbone.stem_channels)
    assert arch["stage planes"] == str(cfg.backbone.stage_planes)
    assert arch["stage blocks"] == str(cfg.backbone.stage_blocks)
    assert arch["FPN channels"] == str(cfg.neck.out_channels)
    assert arch["stacked head convs"] == str(cfg.head.stacked_convs)
    assert arch["head norm"] == cfg.head.norm
    assert arch["canvas"] == f"{DEMO_CANVAS[0]}x{DEMO_CANVAS[1]}"
    assert cfg.backbone.style == "caffe" and cfg.backbone.block == "bottleneck"
    assert not cfg.head.norm_on_bbox and not cfg.head.centerness_on_reg
    assert cfg.neck.extra_on == "output" and cfg.neck.relu_before_extra
    assert (cfg.post.rule, cfg.post.nms_pre, cfg.post.score_thr, cfg.post.iou_thr, cfg.post.max_per_img) == ("mmdet2", 1000, 0.05, 0.5, 100)
    assert ckpt.class_names == list(CLASSES)
    assert ckpt.config.to_dict() == demo_config().to_dict()


def test_shipped_model_detects_shapes(tmp_path: Path) -> None:
    from fcos_offline.demo.synthetic import make_demo_data

    torch.set_num_threads(2)
    model, _ = load_model(SHIPPED)
    data = make_demo_data(tmp_path, "val", 12, seed=4242)
    result = evaluate_demo_model(model, data["image_dir"], data["ann_file"])
    assert len(result["stats"]) == 12
    assert result["bbox_mAP"] > 0.45  # 0.56 on these 12 images; README: 0.585 on the 100-image val split


def test_cli_train_demo_rejects_equal_seeds(tmp_path: Path) -> None:
    assert main(["train-demo", "--out", str(tmp_path / "m.pth"), "--seed", "5", "--val_seed", "5"]) == 2
    assert not (tmp_path / "m.pth").exists()
