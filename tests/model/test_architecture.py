"""Architecture facts of the pure-PyTorch FCOS (spec §2–§5, §10), checked on narrow random models."""

from __future__ import annotations

import numpy as np
import pytest
import reference_postprocess as ref
import torch
import torch.nn.functional as F
from conftest import fcos_config, make_fcos, param_count, random_canvas

from fcos_offline.model.backbone import BasicBlock, Bottleneck, FrozenBatchNorm2d
from fcos_offline.model.checkpoint import describe_depth, mmdet_state_dict
from fcos_offline.model.coders import decode_distance as decode
from fcos_offline.model.config import BackboneConfig, DetectorConfig, HeadConfig, default_post_config
from fcos_offline.model.detector import Detector
from fcos_offline.model.priors import level_points

SIZES_800x1333 = [(100, 167), (50, 84), (25, 42), (13, 21), (7, 11)]


@pytest.fixture(scope="module")
def caffe_model():
    return make_fcos(stage_blocks=(2, 1, 3, 1), stacked_convs=2)


@pytest.fixture(scope="module")
def big_input():
    return random_canvas(1, 800, 1333, seed=3)


# --------------------------------------------------------------------------- backbone


@pytest.mark.parametrize("style", ["caffe", "pytorch"])
def test_bottleneck_stride_placement(style):
    """caffe: stage stride on conv1 (1x1), conv2 stride 1; pytorch: on conv2 (3x3) (spec §2)."""
    model = Detector(fcos_config(style=style, stage_blocks=(2, 2, 2, 2)))
    for stage in range(1, 5):
        layer = getattr(model.backbone, f"layer{stage}")
        for b, block in enumerate(layer):
            assert isinstance(block, Bottleneck)
            s = 2 if (b == 0 and stage > 1) else 1
            assert block.conv1.kernel_size == (1, 1) and block.conv2.kernel_size == (3, 3)
            assert block.conv3.kernel_size == (1, 1) and block.conv3.stride == (1, 1)
            if style == "caffe":
                assert block.conv1.stride == (s, s) and block.conv2.stride == (1, 1)
            else:
                assert block.conv1.stride == (1, 1) and block.conv2.stride == (s, s)
            if b == 0:  # downsample on block 0 of every stage, layer1 included (8 != 32 channels)
                assert block.downsample is not None and block.downsample[0].stride == (s, s)
                assert block.downsample[0].kernel_size == (1, 1) and block.downsample[0].bias is None
            else:
                assert block.downsample is None
    stem = model.backbone.conv1
    assert (stem.kernel_size, stem.stride, stem.padding, stem.bias) == ((7, 7), (2, 2), (3, 3), None)


def test_caffe_and_pytorch_styles_compute_different_features():
    """Same weights, different stride placement: same shapes, different numbers."""
    caffe = make_fcos(style="caffe")
    pytorch = Detector(fcos_config(style="pytorch")).eval()
    pytorch.load_state_dict(caffe.state_dict())
    x = random_canvas(1, 128, 192)
    with torch.no_grad():
        a, b = caffe.backbone(x), pytorch.backbone(x)
    assert [t.shape for t in a] == [t.shape for t in b]
    assert not torch.allclose(a[-1], b[-1], atol=1e-3)


def test_backbone_stage_shapes(caffe_model):
    x = random_canvas(1, 320, 512)
    with torch.no_grad():
        feats = caffe_model.backbone(x)
    assert [tuple(f.shape) for f in feats] == [(1, 32, 80, 128), (1, 64, 40, 64), (1, 128, 20, 32), (1, 256, 10, 16)]


def test_basic_block_backbone():
    """ResNet-18-style: 3x3 -> 3x3 blocks, stride on conv1, outputs = planes."""
    model = make_fcos(block="basic", stage_blocks=(2, 2, 2, 2), planes=(8, 16, 32, 64))
    assert describe_depth(model.cfg) == "ResNet-18"
    block = model.backbone.layer2[0]
    assert isinstance(block, BasicBlock) and not hasattr(block, "conv3")
    assert block.conv1.stride == (2, 2) and block.conv2.stride == (1, 1)
    assert model.backbone.layer1[0].downsample is None  # 8 -> 8 channels, stride 1
    with torch.no_grad():
        feats = model.backbone(random_canvas(1, 128, 128))
    assert [f.shape[1] for f in feats] == [8, 16, 32, 64]


def test_frozen_bn_arithmetic():
    """mmdet: (x-μ)/√(σ²+eps)·γ+β; torchvision: x·scale + (β−μ·scale); both eps 1e-5 (spec §2)."""
    torch.manual_seed(0)
    c = 6
    x = torch.randn(2, c, 5, 7) * 3
    stats = dict(weight=torch.rand(c) + 0.5, bias=torch.randn(c), running_mean=torch.randn(c), running_var=torch.rand(c) * 1e-4)
    outs = {}
    for impl in ("mmdet", "torchvision"):
        bn = FrozenBatchNorm2d(c, impl=impl)
        assert bn.eps == 1e-5
        for k, v in stats.items():
            getattr(bn, k).copy_(v)
        outs[impl] = bn(x)
    r = lambda t: t.reshape(1, -1, 1, 1)  # noqa: E731
    textbook = (x - r(stats["running_mean"])) / torch.sqrt(r(stats["running_var"]) + 1e-5) * r(stats["weight"]) + r(stats["bias"])
    torch.testing.assert_close(outs["mmdet"], textbook, rtol=1e-5, atol=1e-5)
    scale = stats["weight"] * (stats["running_var"] + 1e-5).rsqrt()
    tv = x * r(scale) + r(stats["bias"] - stats["running_mean"] * scale)
    torch.testing.assert_close(outs["torchvision"], tv, rtol=0, atol=0)
    torch.testing.assert_close(outs["mmdet"], outs["torchvision"], rtol=1e-4, atol=1e-4)
    # eps matters at this variance: 1e-3 instead of 1e-5 would change the result visibly
    wrong = (x - r(stats["running_mean"])) / torch.sqrt(r(stats["running_var"]) + 1e-3) * r(stats["weight"]) + r(stats["bias"])
    assert not torch.allclose(outs["mmdet"], wrong, atol=1e-2)


def test_random_bn_statistics_matter(caffe_model):
    """The test models' BN layers are not identities: resetting them changes the output."""
    x = random_canvas(1, 128, 192)
    with torch.no_grad():
        before = caffe_model(x)[0][0]
    plain = Detector(caffe_model.cfg).eval()
    sd = {k: v for k, v in caffe_model.state_dict().items()}
    for k in sd:
        if k.endswith("running_var"):
            sd[k] = torch.ones_like(sd[k])
        elif k.endswith("running_mean"):
            sd[k] = torch.zeros_like(sd[k])
    plain.load_state_dict(sd)
    with torch.no_grad():
        after = plain(x)[0][0]
    assert not torch.allclose(before, after, atol=1e-2)


# --------------------------------------------------------------------------- FPN


def test_head_output_shapes_800x1333(caffe_model, big_input):
    """Size-based nearest upsampling makes 800x1333 work: P3..P7 = 100x167 … 7x11 (spec §3)."""
    with torch.no_grad():
        cls, dist, ctr = caffe_model(big_input)
    assert [tuple(t.shape[2:]) for t in cls] == SIZES_800x1333
    assert [tuple(t.shape) for t in cls] == [(1, 80, h, w) for h, w in SIZES_800x1333]
    assert [tuple(t.shape) for t in dist] == [(1, 4, h, w) for h, w in SIZES_800x1333]
    assert [tuple(t.shape) for t in ctr] == [(1, 1, h, w) for h, w in SIZES_800x1333]
    assert all(t.dtype == torch.float32 for t in dist)
    assert all(bool(torch.isfinite(t).all()) for t in (*cls, *dist, *ctr))


def _nearest_to(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Spec §3: src = min(⌊dst·in/out⌋, in−1), written with integer index arithmetic."""
    in_h, in_w = x.shape[2:]
    iy = torch.clamp(torch.arange(size[0]) * in_h // size[0], max=in_h - 1)
    ix = torch.clamp(torch.arange(size[1]) * in_w // size[1], max=in_w - 1)
    return x[:, :, iy][:, :, :, ix]


def test_fpn_top_down_and_extra_levels(caffe_model, big_input):
    """P3..P5 from size-based nearest top-down; P6 = conv(P5 output); P7 = conv(ReLU(P6)) (spec §3)."""
    neck = caffe_model.neck
    with torch.no_grad():
        c2, c3, c4, c5 = caffe_model.backbone(big_input)
        outs = neck([c2, c3, c4, c5])
        lat = [neck.lateral_convs[i].conv(c) for i, c in enumerate((c3, c4, c5))]
        l5 = lat[2]
        l4 = lat[1] + _nearest_to(l5, lat[1].shape[2:])
        l3 = lat[0] + _nearest_to(l4, lat[0].shape[2:])
        assert tuple(l4.shape[2:]) == (50, 84) and tuple(l3.shape[2:]) == (100, 167)  # 84 -> 167 is not 2x
        p3, p4, p5 = (neck.fpn_convs[i].conv(t) for i, t in enumerate((l3, l4, l5)))
        p6 = neck.fpn_convs[3].conv(p5)
        p7 = neck.fpn_convs[4].conv(F.relu(p6))
    for got, want in zip(outs, (p3, p4, p5, p6, p7)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert neck.fpn_convs[3].conv.stride == (2, 2) and neck.fpn_convs[4].conv.stride == (2, 2)
    # the alternatives would give different numbers here
    assert bool((outs[3] < 0).any()), "P6 has negative values, so ReLU before P7 matters"
    with torch.no_grad():
        assert not torch.allclose(outs[4], neck.fpn_convs[4].conv(outs[3]), atol=1e-4)
        scale2 = F.interpolate(l4, scale_factor=2.0, mode="nearest")
    assert tuple(scale2.shape[2:]) == (100, 168)  # a fixed 2x upsample would not even fit P3's 100x167


def test_fpn_extra_on_input_uses_c5():
    model = make_fcos()
    cfg = model.cfg
    cfg_in = fcos_config()
    cfg_in.neck.extra_on = "input"
    m_in = Detector(cfg_in).eval()
    assert m_in.neck.fpn_convs[3].conv.in_channels == cfg.backbone.stage_out_channels[-1]
    x = random_canvas(1, 128, 128)
    with torch.no_grad():
        feats = m_in.backbone(x)
        outs = m_in.neck(feats)
        torch.testing.assert_close(outs[3], m_in.neck.fpn_convs[3].conv(feats[-1]))


# --------------------------------------------------------------------------- head


def _capture(module, store: list):
    return module.register_forward_hook(lambda m, i, o: store.append(o.detach().clone()))


@pytest.mark.parametrize("variant", ["exp", "norm_on_bbox", "torchvision"])
def test_head_distance_encoding(variant):
    """exp(s_l·x) by default; ReLU(s_l·x)·stride with norm_on_bbox; ReLU(x)·anchor size in torchvision (spec §4, §10)."""
    kw = {"exp": {}, "norm_on_bbox": {"norm_on_bbox": True}, "torchvision": {"layout": "torchvision", "num_classes": 91}}[variant]
    model = make_fcos(**kw)
    raw: list = []
    h = _capture(model.bbox_head.conv_reg, raw)
    with torch.no_grad():
        _, dist, _ = model(random_canvas(1, 256, 256))
    h.remove()
    strides = (8, 16, 32, 64, 128)
    for lvl, (d, r) in enumerate(zip(dist, raw)):
        if variant == "torchvision":
            assert model.bbox_head.scales is None
            want = F.relu(r) * strides[lvl]
        else:
            s = model.bbox_head.scales[lvl].scale
            assert float(s.detach()) != 1.0  # random scales, so a missing Scale would show
            want = (r * s).exp() if variant == "exp" else F.relu(r * s) * strides[lvl]
        torch.testing.assert_close(d, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("on_reg", [False, True])
def test_centerness_branch(on_reg):
    """Centerness from cls_feat by default, from reg_feat with centerness_on_reg (spec §4)."""
    model = make_fcos(centerness_on_reg=on_reg)
    x = random_canvas(1, 128, 128)
    with torch.no_grad():
        cls0, dist0, ctr0 = model(x)
        for p in model.bbox_head.reg_convs.parameters():
            p.mul_(1.5)
        cls1, dist1, ctr1 = model(x)
    assert all(torch.equal(a, b) for a, b in zip(cls0, cls1))  # cls never depends on reg_convs
    assert not all(torch.allclose(a, b) for a, b in zip(dist0, dist1))
    same_ctr = all(torch.equal(a, b) for a, b in zip(ctr0, ctr1))
    assert same_ctr is (not on_reg)


def test_gn_head_modules():
    model = make_fcos(norm="gn", stacked_convs=3)
    for branch in (model.bbox_head.cls_convs, model.bbox_head.reg_convs):
        assert len(branch) == 3
        for cm in branch:
            assert isinstance(cm.gn, torch.nn.GroupNorm) and cm.gn.num_groups == 32 and cm.gn.eps == 1e-5
            assert cm.conv.bias is None  # mmdet: conv has a bias only without norm
    plain = make_fcos()
    assert all(cm.gn is None and cm.conv.bias is not None for cm in plain.bbox_head.cls_convs)


def test_torchvision_input_adapter():
    """BGR caffe-mean input -> RGB ImageNet-normalised input (spec §8.1 vs §10 transform)."""
    model = Detector(fcos_config(layout="torchvision", num_classes=91))
    bgr_minus_mean = torch.randn(1, 3, 4, 5) * 50
    caffe_mean_bgr = torch.tensor([102.9801, 115.9465, 122.7717]).reshape(1, 3, 1, 1)
    rgb01 = (bgr_minus_mean + caffe_mean_bgr).flip(1) / 255.0
    want = (rgb01 - torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)
    out = model.input_adapter(bgr_minus_mean)
    torch.testing.assert_close(out[..., :4, :5], want, rtol=1e-5, atol=1e-5)
    assert out.shape == (1, 3, 32, 32) and not out[..., 4:, :].any() and not out[..., :, 5:].any()  # zero pad to 32


# --------------------------------------------------------------------------- points / decode


def test_points_first_locations():
    """Stride 8: mmdet2 starts at 4 (x·s+⌊s/2⌋), mmdet3 at 4.0 ((x+0.5)·s), torchvision at 0 (spec §5, §10)."""
    p2 = level_points(3, 5, 8, "mmdet2", (24, 40))
    p3 = level_points(3, 5, 8, "mmdet3", (24, 40))
    tv = level_points(4, 8, 8, "torchvision", (32, 64))
    assert p2[0].tolist() == [4, 4] and p2[1].tolist() == [12, 4] and p2[5].tolist() == [4, 12]  # row-major, x fastest
    assert p3[0].tolist() == [4.0, 4.0] and p3.dtype == torch.float32
    assert tv[0].tolist() == [0, 0] and tv[1].tolist() == [8, 0] and tv[8].tolist() == [0, 8]
    assert level_points(2, 2, 128, "mmdet2", (256, 256))[0].tolist() == [64, 64]
    # ⌊s/2⌋ vs 0.5·s only differ for odd strides
    assert level_points(1, 2, 5, "mmdet2", (5, 10))[1].tolist() == [7, 2]
    assert level_points(1, 2, 5, "mmdet3", (5, 10))[1].tolist() == [7.5, 2.5]


@pytest.mark.parametrize("hw,stride", [((100, 167), 8), ((13, 21), 64), ((7, 11), 128), ((3, 4), 16)])
def test_points_match_reference(hw, stride):
    canvas = (800, 1333)
    h, w = hw
    np.testing.assert_array_equal(level_points(h, w, stride, "mmdet2", canvas).numpy(), ref.points_mmdet2(h, w, stride))
    np.testing.assert_array_equal(level_points(h, w, stride, "mmdet3", canvas).numpy(), ref.points_mmdet3(h, w, stride))
    np.testing.assert_array_equal(level_points(h, w, stride, "torchvision", canvas).numpy(), ref.points_torchvision(h, w, canvas))


def test_torchvision_strides_from_padded_size():
    """Strides = padded batch size // map size (spec §10): H_pad 800 -> P6 (13 rows) 61, P7 (7 rows)
    114; W 1333 pads to 1344 -> P3 (168 cols) 8, P6 (21 cols) 64, P7 (11 cols) 122."""
    p3 = level_points(100, 168, 8, "torchvision", (800, 1333))
    p6 = level_points(13, 21, 64, "torchvision", (800, 1333))
    p7 = level_points(7, 11, 128, "torchvision", (800, 1333))
    assert p3[167].tolist() == [167 * 8, 0] and p3[168].tolist() == [0, 8]
    assert p6[21].tolist() == [0, 61] and p6[1].tolist() == [64, 0]
    assert p7[11].tolist() == [0, 114] and p7[1].tolist() == [122, 0]


def test_torchvision_layout_pads_input_to_multiples_of_32():
    """torchvision's backbone sees the batch padded bottom/right to multiples of 32 with zeros in
    its normalised space, so the maps have its sizes (W 200 -> 224: P3 28 cols, not 25) and the
    canvas's content gives the same features as an input already that size."""
    model = make_fcos(layout="torchvision", num_classes=91, seed=3).eval()
    x = torch.randn(1, 3, 160, 200) * 50
    with torch.no_grad():
        cls, _, _ = model(x)
        assert [tuple(c.shape[2:]) for c in cls] == [(20, 28), (10, 14), (5, 7), (3, 4), (2, 2)]
        # a canvas whose extra columns already map to zero after the adapter gives identical outputs
        zero_after_adapter = -(model.input_adapter.add / model.input_adapter.mul).flip(1)
        wide = torch.cat([x, zero_after_adapter.expand(1, 3, 160, 24)], dim=3)
        cls_wide, _, _ = model(wide)
    for a, b in zip(cls, cls_wide):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_decode_and_clip():
    pts = torch.tensor([[4.0, 4.0], [100.0, 60.0]])
    dist = torch.tensor([[10.0, 2.0, 3.0, 1.0], [5.0, 200.0, 500.0, 7.0]])
    boxes = decode(pts, dist, (64, 128))
    assert boxes.tolist() == [[0.0, 2.0, 7.0, 5.0], [95.0, 0.0, 128.0, 64.0]]


# --------------------------------------------------------------------------- full-size layout (spec §1, §10)


def test_full_size_mmdet_r50_layout_counts():
    """Spec §1: 308 entries without num_batches_tracked, 361 with; 32,293,274 elements excl. running stats."""
    with torch.device("meta"):
        model = Detector(DetectorConfig())
    with_nbt = mmdet_state_dict(model, head_names="fcos", with_num_batches_tracked=True)
    without = mmdet_state_dict(model, head_names="fcos", with_num_batches_tracked=False)
    assert len(with_nbt) == 361 and len(without) == 308
    n = sum(v.numel() for k, v in without.items() if not k.endswith(("running_mean", "running_var")))
    assert n == 32_293_274
    assert tuple(with_nbt["bbox_head.fcos_cls.weight"].shape) == (80, 256, 3, 3)
    assert tuple(with_nbt["neck.lateral_convs.2.conv.weight"].shape) == (256, 2048, 1, 1)
    assert tuple(with_nbt["backbone.layer3.5.conv3.weight"].shape) == (1024, 256, 1, 1)
    assert describe_depth(model.cfg) == "ResNet-50"


def test_full_size_torchvision_param_count():
    """Spec §10: fcos_resnet50_fpn has 32,269,600 parameters (frozen-BN affine are buffers there)."""
    cfg = DetectorConfig(
        backbone=BackboneConfig(style="pytorch", bn_impl="torchvision"),
        head=HeadConfig(num_classes=91, norm="gn", conv_bias=True, use_scale=False, norm_on_bbox=True, centerness_on_reg=True),
        post=default_post_config("torchvision"),
        input_adapter="torchvision",
    )
    with torch.device("meta"):
        model = Detector(cfg)
    assert sum(p.numel() for p in model.parameters()) == 32_269_600
    bn_affine = sum(m.weight.numel() + m.bias.numel() for m in model.modules() if isinstance(m, FrozenBatchNorm2d))
    assert param_count(model) == 32_269_600 + bn_affine
