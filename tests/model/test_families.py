"""RetinaNet and ATSS beside FCOS: priors, box coders and post-processing against independent numpy
references (``tests/reference_anchors.py``), checkpoints of each layout recognised by their keys."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import reference_anchors as ref
import torch
from conftest import fcos_config, make_fcos, random_canvas, save_mmdet_ckpt, torchvision_retinanet_state_dict

from fcos_offline.errors import BadFileError, UsageError
from fcos_offline.model.checkpoint import ANCHOR_DEFAULTS, ModelOverrides, build_model, load_checkpoint
from fcos_offline.model.coders import decode_delta_mmdet, decode_delta_torchvision
from fcos_offline.model.config import HeadConfig, default_post_config
from fcos_offline.model.heads.spec import SPECS
from fcos_offline.model.postprocess import DetectorWithPost
from fcos_offline.model.priors import base_anchors, level_anchors

RETINA = HeadConfig(family="retinanet", **ANCHOR_DEFAULTS["retinanet"])
ATSS = HeadConfig(family="atss", **ANCHOR_DEFAULTS["atss"])
CANVAS = (256, 384)


# --------------------------------------------------------------------------- priors


def test_mmdet_base_anchors_by_hand() -> None:
    """RetinaNet P3 (stride 8, scale 4, ratio 0.5): 8·4·√2 wide, 8·4/√2 high; ATSS P3: one 64x64 square."""
    a = base_anchors(RETINA, 8, "mmdet3")
    assert a.shape == (9, 4)
    w, h = 32 * math.sqrt(2), 32 / math.sqrt(2)
    np.testing.assert_allclose(a[0].numpy(), [-w / 2, -h / 2, w / 2, h / 2], rtol=1e-6)
    np.testing.assert_allclose(a[4].numpy(), [-0.5 * 32 * 2 ** (1 / 3)] * 2 + [0.5 * 32 * 2 ** (1 / 3)] * 2, rtol=1e-6)  # ratio 1, 2nd scale
    assert base_anchors(ATSS, 8, "mmdet2").tolist() == [[-32.0, -32.0, 32.0, 32.0]]


def test_torchvision_base_anchors_by_hand() -> None:
    """torchvision P3 sizes 32, 40, 50 (int-truncated octaves), corners rounded to whole pixels."""
    a = base_anchors(RETINA, 8, "torchvision").tolist()
    assert a[0] == [-23.0, -11.0, 23.0, 11.0]  # ratio 0.5, size 32: 45.25 x 22.63
    assert a[4] == [-20.0, -20.0, 20.0, 20.0]  # ratio 1, size 40
    assert a[8] == [-18.0, -35.0, 18.0, 35.0]  # ratio 2, size 50: 35.36 x 70.71


@pytest.mark.parametrize("cfg", [RETINA, ATSS], ids=["retinanet", "atss"])
@pytest.mark.parametrize(("hw", "stride"), [((4, 6), 8), ((7, 11), 128), ((3, 5), 64)])
def test_mmdet_anchor_grid_matches_reference(cfg: HeadConfig, hw, stride) -> None:
    got = level_anchors(*hw, stride, cfg, "mmdet3", (800, 1333)).numpy()
    base = ref.base_anchors_mmdet(stride, cfg.octave_base_scale, cfg.scales_per_octave, cfg.anchor_ratios)
    np.testing.assert_array_equal(got, ref.grid(base, *hw, stride, stride))


@pytest.mark.parametrize(("hw", "stride"), [((100, 167), 8), ((13, 21), 64), ((7, 11), 128)])
def test_torchvision_anchor_grid_uses_padded_strides(hw, stride) -> None:
    """800x1333 pads to 800x1344: P6 (13x21) steps 61 px down and 64 across, P7 (7x11) 114 and 122."""
    got = level_anchors(*hw, stride, RETINA, "torchvision", (800, 1333)).numpy()
    sy, sx = ref.torchvision_strides(*hw, (800, 1333))
    np.testing.assert_array_equal(got, ref.grid(ref.base_anchors_torchvision(stride, RETINA.anchor_ratios), *hw, sy, sx))
    if stride == 128:
        assert (sy, sx) == (114, 122)


def _random_boxes(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    xy = rng.uniform(-50, 400, (n, 2)).astype(np.float32)
    wh = rng.uniform(4, 300, (n, 2)).astype(np.float32)
    anchors = np.concatenate([xy, xy + wh], axis=1)
    deltas = rng.normal(0, 1.5, (n, 4)).astype(np.float32)
    deltas[:8, 2:] = [[9, -9], [-9, 9], [4.2, -4.2], [5, 5], [-5, -5], [0, 8], [8, 0], [-8, -8]]  # past both clamps
    return anchors, deltas


def test_mmdet_delta_decode_matches_reference() -> None:
    anchors, deltas = _random_boxes(500)
    stds = (0.1, 0.1, 0.2, 0.2)
    got = decode_delta_mmdet(torch.from_numpy(anchors), torch.from_numpy(deltas), (0.0,) * 4, stds, CANVAS).numpy()
    np.testing.assert_allclose(
        got, ref.decode_mmdet(anchors, deltas, stds, CANVAS), rtol=2e-6, atol=1e-4
    )  # float32 exp differs by an ulp between numpy and torch


def test_torchvision_delta_decode_matches_reference() -> None:
    anchors, deltas = _random_boxes(500, seed=1)
    got = decode_delta_torchvision(torch.from_numpy(anchors), torch.from_numpy(deltas), CANVAS).numpy()
    np.testing.assert_allclose(
        got, ref.decode_torchvision(anchors, deltas, CANVAS), rtol=2e-6, atol=1e-4
    )  # float32 exp differs by an ulp between numpy and torch


def test_the_two_coders_clamp_differently() -> None:
    """mmdet clamps dw to ±4.135 both ways; torchvision only from above (log(1000/16)): a tiny box stays tiny there."""
    anchor = torch.tensor([[100.0, 100.0, 164.0, 164.0]])
    shrink = torch.tensor([[0.0, 0.0, -9.0, -9.0]])
    mm = decode_delta_mmdet(anchor, shrink, (0.0,) * 4, (1.0,) * 4, CANVAS)[0]
    tv = decode_delta_torchvision(anchor, shrink, CANVAS)[0]
    assert float(mm[2] - mm[0]) == pytest.approx(64 * 16 / 1000, rel=1e-4)
    assert float(tv[2] - tv[0]) == pytest.approx(64 * math.exp(-9), rel=1e-3)


# --------------------------------------------------------------------------- post-processing


@functools.cache
def anchor_model(family: str):
    """A random RetinaNet or ATSS with unsaturated class scores (no ties for the order to depend on)."""
    return make_fcos(seed=3, family=family, style="pytorch", cls_std=1.0)


def _reference(model, x, post, rule):
    with torch.no_grad():
        raw = model(x)
    named = dict(zip(SPECS[model.cfg.head.family].outputs, raw))
    cfg = model.cfg.head
    dets = np.zeros((x.shape[0], post.max_per_img, 5), np.float32)
    labels = np.full((x.shape[0], post.max_per_img), -1, np.int64)
    for b in range(x.shape[0]):
        d, lab = ref.anchor_postprocess(
            rule,
            [t[b].numpy() for t in named["cls"]],
            [t[b].numpy() for t in named["reg"]],
            None if "ctr" not in named else [t[b].numpy() for t in named["ctr"]],
            tuple(x.shape[2:]),
            cfg.strides,
            (cfg.octave_base_scale, cfg.scales_per_octave, cfg.anchor_ratios),
            cfg.target_stds,
            post.nms_pre,
            post.score_thr,
            post.iou_thr,
            post.max_per_img,
        )
        dets[b, : len(d)], labels[b, : len(lab)] = d, lab
    return dets, labels


RULE_CASES = [("mmdet2", 1000), ("mmdet2", 60), ("mmdet218", 1000), ("mmdet3", 40)]


@pytest.mark.parametrize(
    ("family", "rule", "nms_pre"), [("retinanet", *c) for c in [*RULE_CASES, ("torchvision", 1000)]] + [("atss", *c) for c in RULE_CASES]
)
def test_anchor_heads_match_the_numpy_reference(family: str, rule: str, nms_pre: int) -> None:
    """Every detection (label, box within 1e-3 px, score within 1e-6) of both images, per rule (torchvision has no ATSS)."""
    model = anchor_model(family)
    post = default_post_config(rule, model.cfg.head.family)  # type: ignore[arg-type]
    post.nms_pre = nms_pre
    x = random_canvas(2, *CANVAS, seed=5)
    with torch.no_grad():
        dets, labels = DetectorWithPost(model, post)(x)
    want_dets, want_labels = _reference(model, x, post, rule)
    assert (want_labels >= 0).sum() > 40  # the check is not vacuous: many detections per image
    np.testing.assert_array_equal(labels.numpy(), want_labels)
    np.testing.assert_allclose(dets.numpy()[..., :4], want_dets[..., :4], rtol=0, atol=1e-3)
    np.testing.assert_allclose(dets.numpy()[..., 4], want_dets[..., 4], rtol=0, atol=1e-6)


def test_atss_mmdet2_ranks_by_score_times_centerness_and_mmdet3_by_score() -> None:
    """The per-level top-k differs between mmdet 2.17 (max_k S·c per anchor) and 2.18+ (S alone, per pair)."""
    model = make_fcos(seed=4, family="atss", style="pytorch")
    x = random_canvas(1, *CANVAS, seed=6)
    outs = {}
    for rule in ("mmdet2", "mmdet218"):
        post = default_post_config(rule, "atss")  # type: ignore[arg-type]
        post.nms_pre = 30
        with torch.no_grad():
            outs[rule] = DetectorWithPost(model, post)(x)
    assert not torch.equal(outs["mmdet2"][0], outs["mmdet218"][0])


# --------------------------------------------------------------------------- checkpoints


RETINA_META = """model = dict(
    type='RetinaNet',
    backbone=dict(type='ResNet', depth=50, style='pytorch'),
    neck=dict(type='FPN', in_channels=[256, 512, 1024, 2048], out_channels=256, start_level=1, add_extra_convs='on_input', num_outs=5),
    bbox_head=dict(
        type='RetinaHead', num_classes=80, in_channels=256, stacked_convs=4, feat_channels=256,
        anchor_generator=dict(type='AnchorGenerator', octave_base_scale=4, scales_per_octave=3, ratios=[0.5, 1.0, 2.0], strides=[8, 16, 32, 64, 128]),
        bbox_coder=dict(type='DeltaXYWHBBoxCoder', target_means=[.0, .0, .0, .0], target_stds=[1.0, 1.0, 1.0, 1.0])),
    test_cfg=dict(nms_pre=1000, min_bbox_size=0, score_thr=0.05, nms=dict(type='nms', iou_threshold=0.5), max_per_img=100))
"""


def test_mmdet_retinanet_checkpoint_recognised_and_read(tmp_path) -> None:
    model = make_fcos(seed=1, family="retinanet", style="pytorch", extra_on="input")
    path = save_mmdet_ckpt(model, tmp_path / "retina.pth", meta={"config": RETINA_META, "mmdet_version": "2.28.2"})
    ckpt = load_checkpoint(path)
    head = ckpt.config.head
    assert (ckpt.format, head.family, head.num_anchors, head.num_classes) == ("mmdet", "retinanet", 9, 80)
    assert (ckpt.config.backbone.style, ckpt.config.neck.extra_on, ckpt.config.neck.relu_before_extra) == ("pytorch", "input", False)
    assert (ckpt.config.post.rule, ckpt.sources["octave_base_scale"]) == ("mmdet218", "meta config")
    x = random_canvas(1, *CANVAS)
    with torch.no_grad():
        want, got = model(x), build_model(ckpt)(x)
    assert all(torch.equal(a, b) for wa, ga in zip(want, got) for a, b in zip(wa, ga))


def test_mmdet_atss_defaults_without_meta_and_meta_anchor_settings(tmp_path) -> None:
    model = make_fcos(seed=2, family="atss", style="pytorch", norm="gn")
    ckpt = load_checkpoint(save_mmdet_ckpt(model, tmp_path / "atss.pth"))
    head, post = ckpt.config.head, ckpt.config.post
    assert (head.family, head.norm, head.use_scale, head.target_stds, post.iou_thr) == ("atss", "gn", True, (0.1, 0.1, 0.2, 0.2), 0.6)
    assert ckpt.sources["target_stds"] == "default (mmdet ATSS)"
    meta = "model = dict(type='ATSS', bbox_head=dict(anchor_generator=dict(octave_base_scale=6, scales_per_octave=1, ratios=[1.0]), "
    meta += "bbox_coder=dict(target_means=[0.0, 0.0, 0.0, 0.0], target_stds=[0.2, 0.2, 0.1, 0.1])))"
    ckpt = load_checkpoint(save_mmdet_ckpt(model, tmp_path / "atss_meta.pth", meta={"config": meta}))
    assert (ckpt.config.head.octave_base_scale, ckpt.config.head.target_stds) == (6, (0.2, 0.2, 0.1, 0.1))


def test_anchor_settings_that_contradict_the_head_are_refused(tmp_path) -> None:
    model = make_fcos(seed=1, family="retinanet", style="pytorch")
    meta = "model = dict(type='RetinaNet', bbox_head=dict(anchor_generator=dict(octave_base_scale=4, scales_per_octave=2, ratios=[0.5, 1.0, 2.0])))"
    with pytest.raises(BadFileError, match="predicts 9 anchors per location, but its anchor settings give 6"):
        load_checkpoint(save_mmdet_ckpt(model, tmp_path / "r.pth", meta={"config": meta}))


def test_anchor_layouts_are_never_guessed(tmp_path) -> None:
    """A head with other anchors per location than the family's defaults needs a meta config saying which (an FSAF
    file without one has RetinaNet's keys and 1 anchor); it was guessed (ratios 1.0, 1 scale) and loaded."""
    from fcos_offline.model.detector import Detector

    cfg = fcos_config(family="retinanet", style="pytorch")
    cfg.head.anchor_ratios, cfg.head.scales_per_octave = (1.0,), 1
    path = save_mmdet_ckpt(Detector(cfg).eval(), tmp_path / "one_anchor.pth")
    with pytest.raises(BadFileError, match=r"predicts 1 anchors per location.*give 9.*no meta config saying which anchors"):
        load_checkpoint(path)
    meta = "model = dict(type='RetinaNet', bbox_head=dict(anchor_generator=dict(octave_base_scale=4, scales_per_octave=1, ratios=[1.0])))"
    ckpt = load_checkpoint(save_mmdet_ckpt(Detector(cfg).eval(), tmp_path / "said.pth", meta={"config": meta}))
    assert (ckpt.config.head.num_anchors, ckpt.sources["anchor_ratios"]) == (1, "meta config")


def test_mmdet_1x_anchors_are_refused(tmp_path) -> None:
    """mmdet 1.x (and 2.x's Legacy* emulation) centred anchors at (stride-1)/2 and decoded with +1 widths: such
    files loaded with 2.x maths. The version alone decides nothing (v2.0's model zoo files say 1.x)."""
    model = make_fcos(seed=1, family="retinanet", style="pytorch")
    v1 = "model = dict(type='RetinaNet', bbox_head=dict(type='RetinaHead', octave_base_scale=4, scales_per_octave=3, "
    v1 += "anchor_ratios=[0.5, 1.0, 2.0], anchor_strides=[8, 16, 32, 64, 128]))"
    legacy = "model = dict(type='RetinaNet', bbox_head=dict(anchor_generator=dict(type='LegacyAnchorGenerator', center_offset=0.5)))"
    for name, config in (("v1", v1), ("legacy", legacy)):
        path = save_mmdet_ckpt(model, tmp_path / f"{name}.pth", meta={"mmdet_version": "1.0rc0+d3ca926", "config": config})
        with pytest.raises(BadFileError, match=r"uses mmdet 1.x anchors \((anchor_strides|LegacyAnchorGenerator)"):
            load_checkpoint(path)
    v2_zoo = save_mmdet_ckpt(model, tmp_path / "zoo.pth", meta={"mmdet_version": "1.0.0+d3ca926", "config": RETINA_META})
    assert load_checkpoint(v2_zoo).config.head.num_anchors == 9


def test_a_rule_from_the_other_library_is_refused_for_anchor_heads(tmp_path) -> None:
    """--rule torchvision on an mmdet ATSS decoded with torchvision's coder (no 0.1/0.2 stds) and rounded anchors."""
    atss = save_mmdet_ckpt(make_fcos(seed=2, family="atss", style="pytorch", norm="gn"), tmp_path / "atss.pth")
    with pytest.raises(UsageError, match=r"--rule torchvision decodes with torchvision's anchors and box coder.*mmdet ATSS"):
        load_checkpoint(atss, ModelOverrides(rule="torchvision"))
    assert load_checkpoint(atss, ModelOverrides(rule="mmdet3")).config.post.rule == "mmdet3"
    tv = tmp_path / "tv.pth"
    torch.save(torchvision_retinanet_state_dict(make_fcos(seed=5, family="retinanet", layout="torchvision", num_classes=91)), tv)
    with pytest.raises(UsageError, match=r"--rule mmdet3 decodes with mmdet's anchors.*torchvision RetinaNet: choose torchvision"):
        load_checkpoint(tv, ModelOverrides(rule="mmdet3"))


def test_lookalike_detectors_and_foreign_flags_are_refused(tmp_path) -> None:
    model = make_fcos(seed=1, family="retinanet", style="pytorch")
    fsaf = save_mmdet_ckpt(model, tmp_path / "fsaf.pth", meta={"config": "model = dict(type='FSAF', bbox_head=dict(type='FSAFHead'))"})
    with pytest.raises(BadFileError, match="FSAF checkpoint"):
        load_checkpoint(fsaf)
    plain = save_mmdet_ckpt(model, tmp_path / "r.pth")
    with pytest.raises(UsageError, match="--norm-on-bbox applies to FCOS heads; this checkpoint's head is RetinaNet"):
        load_checkpoint(plain, ModelOverrides(norm_on_bbox=True))


@pytest.mark.parametrize(("version", "old_layout"), [("v1", False), ("v1", True), ("v2", False)])
def test_torchvision_retinanet_state_dicts(tmp_path, version: str, old_layout: bool) -> None:
    """v1: P6 from P5, plain head, frozen BN with eps 0; v2: P6 from C5, GN head, BatchNorm; both ReLU before P7."""
    v2 = version == "v2"
    model = make_fcos(
        seed=5, family="retinanet", layout="torchvision", num_classes=91, norm="gn" if v2 else "none", extra_on="input" if v2 else "output"
    )
    path = tmp_path / "tv.pth"
    sd = torchvision_retinanet_state_dict(model, old_layout=old_layout)
    if v2:  # saved from nn.BatchNorm2d, which keeps a batch counter; FrozenBatchNorm2d has none
        sd.update({k.replace("running_var", "num_batches_tracked"): torch.tensor(0) for k in list(sd) if k.endswith("running_var")})
    torch.save(sd, path)
    ckpt = load_checkpoint(path)
    cfg = ckpt.config
    assert (ckpt.format, cfg.head.family, cfg.head.num_classes, cfg.head.num_anchors) == ("torchvision", "retinanet", 91, 9)
    assert (cfg.neck.extra_on, cfg.neck.relu_before_extra, cfg.input_adapter) == ("input" if v2 else "output", True, "torchvision")
    assert (cfg.backbone.bn_impl, cfg.backbone.bn_eps) == (("mmdet", 1e-5) if v2 else ("torchvision", 0.0))
    assert (cfg.post.rule, cfg.post.score_thr, cfg.post.iou_thr, cfg.post.max_per_img) == ("torchvision", 0.05, 0.5, 300)
    build_model(ckpt)  # every tensor used, every shape fits


def test_boxes_clipped_to_a_line_match_by_their_corners() -> None:
    """Anchor heads keep boxes clipped to zero width at the canvas edge: float noise of 1e-5 px between two
    engines must not make them different detections (their IoU is 0/0), while a real difference still does."""
    from fcos_offline.model.match import match_detections

    a = np.array([[0.0, 50.70168, 0.0, 71.28046, 0.9], [10, 10, 50, 60, 0.8]], np.float32)
    b = a.copy()
    b[0, 1] += 1e-5
    b[0, 2] = 1e-5  # zero width vs 1e-5 px: area 0 vs a sliver
    labels = np.array([3, 4])
    assert match_detections(a, labels, b, labels).matched == 2
    b[0, 3] += 0.5  # the line ends half a pixel lower: not the same box
    assert match_detections(a, labels, b, labels).matched == 1


def test_a_sliver_box_with_float_noise_is_the_same_detection() -> None:
    """Anchor heads give boxes a third of a pixel wide; 0.002 px of float noise drops their IoU to 0.993. Export's
    check (IoU > 0.999) called these different detections and refused a correct RetinaNet export."""
    from fcos_offline.model.match import match_detections

    a = np.array([[155.0143, 761.2705, 155.3764, 761.9946, 0.9], [10, 10, 50, 60, 0.8]], np.float32)
    b = a + np.array([[0.0005, 0.0017, 0.0004, 0.0017, 0.0], [0, 0, 0, 0, 0]], np.float32)
    labels = np.array([14, 3])
    assert match_detections(a, labels, b, labels).matched == 2
    b[0, 2] += 0.2  # a fifth of a pixel wider: a different box
    assert match_detections(a, labels, b, labels).matched == 1


def test_inspect_names_the_family(tmp_path, capsys) -> None:
    import json

    from fcos_offline.cli import main

    model = make_fcos(seed=1, family="atss", style="pytorch", norm="gn")
    path = save_mmdet_ckpt(model, tmp_path / "atss.pth", meta={"mmdet_version": "2.28.2"})
    assert main(["inspect", str(path)]) == 0
    table = capsys.readouterr().out
    assert "ATSS" in table and "anchors:" in table  # the detector row and the anchor settings (rich wraps long cells)
    assert main(["inspect", str(path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["family"], info["title"], info["config"]["head"]["target_stds"]) == ("atss", "ATSS", [0.1, 0.1, 0.2, 0.2])
    assert (info["priors"], info["coder"], info["score_factor"], info["head_flags"]) == ("anchors", "delta_xywh", "ctr", {})
    assert set(info["raw_outputs"]) == {"cls", "reg", "ctr"} and "per anchor" in info["raw_outputs"]["reg"]
