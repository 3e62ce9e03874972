"""Checkpoint loading: mmdet v1/v2/v3 and torchvision layouts, meta config, overrides, bad files, unsafe pickles."""

from __future__ import annotations

import json
import os
import sys
import textwrap

import pytest
import torch
from badinputs import record, reliability_log  # noqa: F401 - session fixture writing the reliability table
from conftest import V2_GN_CONFIG, make_fcos, param_count, random_canvas, save_mmdet_ckpt, save_torchvision_ckpt, torchvision_state_dict

from fcos_offline.cli import main
from fcos_offline.errors import FcosError
from fcos_offline.model.checkpoint import (
    ModelOverrides,
    describe_depth,
    load_checkpoint,
    load_model,
)
from fcos_offline.model.meta import settings_from_meta

# The v1 model-zoo config (spec S2), abridged.
V1_CONFIG = textwrap.dedent("""\
    model = dict(
        type='FCOS',
        pretrained='open-mmlab://resnet50_caffe',
        backbone=dict(type='ResNet', depth=50, num_stages=4, out_indices=(0, 1, 2, 3), frozen_stages=1,
                      norm_cfg=dict(type='BN', requires_grad=False), style='caffe'),
        neck=dict(type='FPN', in_channels=[256, 512, 1024, 2048], out_channels=256, start_level=1,
                  add_extra_convs=True, extra_convs_on_inputs=False, num_outs=5, relu_before_extra_convs=True),
        bbox_head=dict(type='FCOSHead', num_classes=81, in_channels=256, stacked_convs=4, feat_channels=256,
                       strides=[8, 16, 32, 64, 128]))
    train_cfg = dict(assigner=dict(type='MaxIoUAssigner', pos_iou_thr=0.5, neg_iou_thr=0.4), debug=False)
    test_cfg = dict(nms_pre=1000, min_bbox_size=0, score_thr=0.05, nms=dict(type='nms', iou_thr=0.5), max_per_img=100)
    """)


def raw_outputs(model, x):
    with torch.no_grad():
        return model(x)


def assert_same_outputs(a, b, x):
    """Bit-identical raw head outputs: every tensor landed in the right place."""
    for ta, tb in zip((t for part in raw_outputs(a, x) for t in part), (t for part in raw_outputs(b, x) for t in part)):
        assert torch.equal(ta, tb)


def outputs_close(a, b, x) -> bool:
    return all(
        torch.allclose(ta, tb, atol=1e-4)
        for ta, tb in zip((t for part in raw_outputs(a, x) for t in part), (t for part in raw_outputs(b, x) for t in part))
    )


def run_cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


@pytest.fixture(scope="module")
def x():
    return random_canvas(1, 128, 192, seed=9)


@pytest.fixture(scope="module")
def caffe3():
    """Caffe R-23-ish narrow model, depths (2,1,3,1), 3 classes, 2 stacked convs."""
    return make_fcos(stage_blocks=(2, 1, 3, 1), num_classes=3, stacked_convs=2)


@pytest.fixture(scope="module")
def gn_model():
    """mmdet pytorch style, GN head, centerness on reg, norm_on_bbox."""
    return make_fcos(style="pytorch", norm="gn", centerness_on_reg=True, norm_on_bbox=True, seed=3)


@pytest.fixture(scope="module")
def tv_model():
    return make_fcos(layout="torchvision", num_classes=91, stacked_convs=4, stage_blocks=(3, 4, 6, 3), seed=5)


# --------------------------------------------------------------------------- mmdet layouts


def test_v1_checkpoint_fcos_names(tmp_path, caffe3, x):
    """mmdet v1: ``fcos_*`` head names, num_batches_tracked, {'state_dict','meta'}; numbers from shapes."""
    meta = {"mmdet_version": "1.0rc0+8c5a2e0", "config": V1_CONFIG, "CLASSES": ("cat", "dog", "bird")}
    path = save_mmdet_ckpt(caffe3, tmp_path / "v1.pth", head_names="fcos", meta=meta)
    raw = torch.load(path, weights_only=True)
    assert "bbox_head.fcos_cls.weight" in raw["state_dict"] and "backbone.bn1.num_batches_tracked" in raw["state_dict"]
    ckpt = load_checkpoint(path)
    cfg = ckpt.config
    assert ckpt.format == "mmdet"
    assert cfg.backbone.stage_blocks == (2, 1, 3, 1)
    assert cfg.backbone.stage_planes == (8, 16, 32, 64)
    assert cfg.backbone.stage_out_channels == (32, 64, 128, 256)
    assert cfg.backbone.stem_channels == 8 and cfg.backbone.block == "bottleneck" and cfg.backbone.style == "caffe"
    assert cfg.neck.in_channels == (64, 128, 256) and cfg.neck.out_channels == 32
    assert cfg.neck.start_level == 1 and cfg.neck.num_outs == 5 and cfg.neck.extra_on == "output"
    assert cfg.head.num_classes == 3 and cfg.head.stacked_convs == 2 and cfg.head.norm == "none"
    assert cfg.head.feat_channels == 32 and cfg.head.conv_bias and cfg.head.use_scale
    assert not cfg.head.norm_on_bbox and not cfg.head.centerness_on_reg
    assert cfg.head.strides == (8, 16, 32, 64, 128)
    assert (cfg.post.rule, cfg.post.nms_pre, cfg.post.score_thr, cfg.post.iou_thr, cfg.post.max_per_img) == ("mmdet2", 1000, 0.05, 0.5, 100)
    assert ckpt.class_names == ["cat", "dog", "bird"]
    assert ckpt.sources["mmdet_version"] == "1.0rc0+8c5a2e0"
    assert "bbox_head.conv_cls.weight" in ckpt.state_dict
    assert not any(k.endswith("num_batches_tracked") or ".fcos_" in k for k in ckpt.state_dict)
    model, _ = load_model(path)
    assert_same_outputs(model, caffe3, x)
    assert ckpt.num_params == param_count(caffe3)


@pytest.mark.parametrize(
    "head_names,wrap,prefix,nbt",
    [
        ("conv", True, "", True),
        ("conv", False, "", False),
        ("conv", False, "module.", True),
        ("fcos", True, "module.", False),
        ("fcos", False, "", True),
    ],
    ids=["v2-wrapped", "v2-bare", "bare-module-prefix", "v1-wrapped-module-prefix", "v1-bare"],
)
def test_mmdet_state_dict_variants(tmp_path, caffe3, x, head_names, wrap, prefix, nbt):
    path = save_mmdet_ckpt(caffe3, tmp_path / "m.pth", head_names=head_names, wrap=wrap, prefix=prefix, num_batches_tracked=nbt, meta={})
    model, ckpt = load_model(path)
    assert ckpt.format == "mmdet" and ckpt.config.head.num_classes == 3
    assert ckpt.config.backbone.stage_blocks == (2, 1, 3, 1)
    assert_same_outputs(model, caffe3, x)


def test_meta_config_sets_what_shapes_cannot(tmp_path, gn_model, x):
    """GN head read from shapes; style, norm_on_bbox, centerness_on_reg and test cfg read from meta text."""
    path = save_mmdet_ckpt(gn_model, tmp_path / "gn.pth", meta={"mmdet_version": "2.10.0", "config": V2_GN_CONFIG})
    model, ckpt = load_model(path)
    cfg = ckpt.config
    assert cfg.head.norm == "gn" and cfg.head.gn_groups == 32 and not cfg.head.conv_bias
    assert cfg.backbone.style == "pytorch" and cfg.head.norm_on_bbox and cfg.head.centerness_on_reg
    assert cfg.neck.extra_on == "output" and cfg.neck.relu_before_extra
    assert (cfg.post.nms_pre, cfg.post.score_thr, cfg.post.iou_thr, cfg.post.max_per_img) == (700, 0.07, 0.45, 60)
    for k in ("style", "norm_on_bbox", "centerness_on_reg", "nms_pre", "score_thr", "iou_thr", "max_per_img"):
        assert ckpt.sources[k] == "meta config", k
    assert ckpt.sources["mmdet_version"] == "2.10.0"
    assert_same_outputs(model, gn_model, x)


def test_without_meta_defaults_then_override_flags(tmp_path, gn_model, x):
    """No meta: mmdet defaults (caffe, exp, centerness on cls) give a different network; flags fix it."""
    path = save_mmdet_ckpt(gn_model, tmp_path / "gn_nometa.pth", meta={})
    plain, ckpt = load_model(path)
    assert ckpt.config.backbone.style == "caffe"
    assert not ckpt.config.head.norm_on_bbox and not ckpt.config.head.centerness_on_reg
    assert ckpt.sources["style"] == "default (mmdet FCOS)"
    assert not outputs_close(plain, gn_model, x)
    flagged, ckpt2 = load_model(path, ModelOverrides(style="pytorch", norm_on_bbox=True, centerness_on_reg=True))
    assert ckpt2.sources["style"] == ckpt2.sources["norm_on_bbox"] == ckpt2.sources["centerness_on_reg"] == "flag"
    assert_same_outputs(flagged, gn_model, x)


def test_override_flags_win_over_meta(tmp_path, gn_model):
    path = save_mmdet_ckpt(gn_model, tmp_path / "gn.pth", meta={"config": V2_GN_CONFIG})
    ov = ModelOverrides(style="caffe", norm_on_bbox=False, centerness_on_reg=False, score_thr=0.3, nms_pre=123, iou_thr=0.55, max_per_img=7)
    cfg = load_checkpoint(path, ov).config
    assert cfg.backbone.style == "caffe" and not cfg.head.norm_on_bbox and not cfg.head.centerness_on_reg
    assert (cfg.post.score_thr, cfg.post.nms_pre, cfg.post.iou_thr, cfg.post.max_per_img) == (0.3, 123, 0.55, 7)
    cfg3 = load_checkpoint(path, ModelOverrides(rule="mmdet3")).config
    assert (cfg3.post.rule, cfg3.post.points) == ("mmdet3", "mmdet3")
    with pytest.raises(FcosError, match="unknown post-processing rule"):
        load_checkpoint(path, ModelOverrides(rule="yolo"))


def test_settings_from_meta_texts():
    v1 = settings_from_meta({"config": V1_CONFIG})
    assert v1["style"] == "caffe" and v1["extra_on"] == "output" and v1["relu_before_extra_convs"] is True
    assert v1["iou_thr"] == 0.5 and v1["score_thr"] == 0.05 and v1["nms_pre"] == 1000 and v1["max_per_img"] == 100
    assert "norm_on_bbox" not in v1 and "centerness_on_reg" not in v1
    v2 = settings_from_meta({"config": V2_GN_CONFIG})
    assert v2["style"] == "pytorch" and v2["norm_on_bbox"] is True and v2["centerness_on_reg"] is True
    assert v2["iou_thr"] == 0.45  # not the assigner's pos_iou_thr=0.7
    v3 = settings_from_meta({"cfg": "model = dict(backbone=dict(style='caffe'), neck=dict(add_extra_convs='on_input'))"})
    assert v3 == {"style": "caffe", "extra_on": "input"}
    assert settings_from_meta({}) == {} and settings_from_meta({"config": ""}) == {}


def test_mmdet3_style_meta_class_names(tmp_path, caffe3):
    meta = {"cfg": "model = dict(backbone=dict(style='caffe'))", "dataset_meta": {"classes": ("a", "b", "c")}}
    ckpt = load_checkpoint(save_mmdet_ckpt(caffe3, tmp_path / "v3.pth", meta=meta))
    assert ckpt.class_names == ["a", "b", "c"]


def test_basic_block_resnet18_style(tmp_path, x):
    model = make_fcos(block="basic", stage_blocks=(2, 2, 2, 2), planes=(8, 16, 32, 64), seed=11)
    loaded, ckpt = load_model(save_mmdet_ckpt(model, tmp_path / "r18.pth"))
    assert ckpt.config.backbone.block == "basic" and ckpt.config.backbone.stage_blocks == (2, 2, 2, 2)
    assert ckpt.config.backbone.stage_out_channels == (8, 16, 32, 64)
    assert ckpt.config.neck.in_channels == (16, 32, 64)
    assert describe_depth(ckpt.config) == "ResNet-18"
    assert_same_outputs(loaded, model, x)


def test_extra_convs_on_input_inferred_from_shapes(tmp_path, x):
    from fcos_offline.model.detector import Detector

    src = make_fcos(seed=2)
    cfg = src.cfg
    cfg.neck.extra_on = "input"
    model = Detector(cfg).eval()
    sd = src.state_dict()
    sd["neck.fpn_convs.3.conv.weight"] = torch.randn(32, 256, 3, 3) * 0.02
    model.load_state_dict(sd)
    loaded, ckpt = load_model(save_mmdet_ckpt(model, tmp_path / "oninput.pth"))
    assert ckpt.config.neck.extra_on == "input"
    assert_same_outputs(loaded, model, x)


# --------------------------------------------------------------------------- torchvision layout


@pytest.mark.parametrize("old_fpn_names", [False, True], ids=["fpn-0.13-names", "fpn-old-names"])
def test_torchvision_layout(tmp_path, tv_model, x, old_fpn_names):
    sd = torchvision_state_dict(tv_model, old_fpn_names=old_fpn_names)
    mid = "" if old_fpn_names else "0."
    for key in (
        "backbone.body.layer4.2.conv3.weight",
        f"backbone.fpn.inner_blocks.2.{mid}weight",
        f"backbone.fpn.layer_blocks.0.{mid}bias",
        "backbone.fpn.extra_blocks.p6.weight",
        "backbone.fpn.extra_blocks.p7.bias",
        "head.classification_head.conv.9.weight",
        "head.classification_head.conv.10.bias",
        "head.regression_head.conv.4.weight",
        "head.regression_head.bbox_reg.weight",
        "head.regression_head.bbox_ctrness.bias",
    ):
        assert key in sd, key
    assert tuple(sd["head.classification_head.cls_logits.weight"].shape) == (91, 32, 3, 3)
    assert not any(k.endswith("num_batches_tracked") for k in sd)
    path = save_torchvision_ckpt(tv_model, tmp_path / "tv.pth", old_fpn_names=old_fpn_names)
    model, ckpt = load_model(path)
    cfg = ckpt.config
    assert ckpt.format == "torchvision"
    assert cfg.backbone.style == "pytorch" and cfg.backbone.bn_impl == "torchvision"
    assert cfg.head.norm == "gn" and cfg.head.conv_bias and not cfg.head.use_scale and cfg.head.stacked_convs == 4
    assert cfg.head.norm_on_bbox and cfg.head.centerness_on_reg and cfg.head.num_classes == 91
    assert (cfg.post.rule, cfg.post.points, cfg.post.score_thr, cfg.post.iou_thr, cfg.post.nms_pre) == ("torchvision", "torchvision", 0.2, 0.6, 1000)
    assert cfg.input_adapter == "torchvision" and cfg.neck.extra_on == "output"
    assert_same_outputs(model, tv_model, x)


# --------------------------------------------------------------------------- errors (one line, exit != 0)


def _assert_one_line_error(rc, out, err, *needles):
    assert rc != 0
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err and "Traceback" not in out
    assert lines[0].startswith("fcos-offline inspect: error:")
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def test_missing_key_error(tmp_path, caffe3, capsys):
    path = save_mmdet_ckpt(caffe3, tmp_path / "miss.pth", drop=("backbone.layer2.0.bn2.running_var",))
    line = _assert_one_line_error(*run_cli(capsys, "inspect", path), "missing", "backbone.layer2.0.bn2.running_var")
    assert "unexpected" not in line


def test_unexpected_key_error(tmp_path, caffe3, capsys):
    path = save_mmdet_ckpt(caffe3, tmp_path / "unexp.pth", extra={"bbox_head.conv_extra.weight": torch.zeros(3, 3)})
    line = _assert_one_line_error(*run_cli(capsys, "inspect", path), "unexpected", "bbox_head.conv_extra.weight")
    assert "missing" not in line


def test_missing_head_tensor_error(tmp_path, caffe3, capsys):
    path = save_mmdet_ckpt(caffe3, tmp_path / "nocls.pth", drop=("bbox_head.conv_cls.weight", "bbox_head.conv_cls.bias"))
    _assert_one_line_error(*run_cli(capsys, "inspect", path), "bbox_head.conv_cls.weight")


def test_wrong_shape_error(tmp_path, caffe3, capsys):
    path = save_mmdet_ckpt(caffe3, tmp_path / "shape.pth", extra={"bbox_head.conv_reg.weight": torch.zeros(4, 16, 3, 3)})
    _assert_one_line_error(*run_cli(capsys, "inspect", path), "bbox_head.conv_reg.weight")


@pytest.mark.parametrize(
    "content",
    [
        b"hello world\n",
        b"model = dict(type='FCOS', backbone=dict(depth=50))\n",
        b"a,b,c\n1,2,3\n",
        b'{"state_dict": {}}\n',
    ],
    ids=["text", "python-config", "csv", "json"],
)
def test_text_file_named_pth(tmp_path, capsys, content):
    path = tmp_path / "model.pth"
    path.write_bytes(content)
    line = _assert_one_line_error(*run_cli(capsys, "inspect", path), str(path))
    assert "checkpoint" in line and "Error:" not in line.split(str(path))[0]  # a BadFileError, not a generic crash


@pytest.fixture
def jpeg_as_pth(tmp_path, coco_sample_dir):
    src = sorted((coco_sample_dir / "val2017").glob("*.jpg"))[0]
    path = tmp_path / "photo.pth"
    path.write_bytes(src.read_bytes())
    return path


def test_jpeg_named_pth(jpeg_as_pth, capsys):
    line = _assert_one_line_error(*run_cli(capsys, "inspect", jpeg_as_pth), str(jpeg_as_pth))
    assert "checkpoint" in line


def test_jpeg_error_gives_no_weights_only_advice(jpeg_as_pth, capsys):
    _, _, err = run_cli(capsys, "inspect", jpeg_as_pth)
    assert "weights_only" not in err


def test_truncated_checkpoint(tmp_path, caffe3, capsys):
    good = save_mmdet_ckpt(caffe3, tmp_path / "good.pth")
    data = good.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    line = _assert_one_line_error(*run_cli(capsys, "inspect", cut), str(cut))
    assert "truncated" in line and line.endswith(")")  # torch's reason in one whole sentence, not cut mid-word
    assert "If you are seeing this error" not in line


def test_empty_file(tmp_path, capsys):
    path = tmp_path / "empty.pth"
    path.write_bytes(b"")
    _assert_one_line_error(*run_cli(capsys, "inspect", path), str(path), "empty")


def test_missing_file(tmp_path, capsys):
    _assert_one_line_error(*run_cli(capsys, "inspect", tmp_path / "nope.pth"), "no such checkpoint file")
    _assert_one_line_error(*run_cli(capsys, "inspect", tmp_path), "a folder, not a checkpoint file")


def test_plain_resnet_checkpoint(tmp_path, capsys):
    """A classification ResNet (no FPN, no head) is not a dense-detector checkpoint."""
    from conftest import fcos_config

    from fcos_offline.model.backbone import ResNet

    resnet = ResNet(fcos_config().backbone)
    sd = dict(resnet.state_dict())
    sd["fc.weight"], sd["fc.bias"] = torch.zeros(10, 256), torch.zeros(10)
    path = tmp_path / "resnet.pth"
    torch.save(sd, path)
    _assert_one_line_error(*run_cli(capsys, "inspect", path), "not a dense-detector checkpoint")
    # the same backbone under mmdet's 'backbone.' prefix, still without neck/head
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in sd.items()}}, path)
    _assert_one_line_error(*run_cli(capsys, "inspect", path), "not a dense-detector checkpoint")


# --------------------------------------------------------------------------- unsafe / foreign pickles


class _RunsShell:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


class _RunsEval:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (eval, (f"open({str(self.target)!r}, 'w').close()",))


@pytest.mark.parametrize("payload", [_RunsShell, _RunsEval], ids=["os.system", "builtins.eval"])
def test_code_executing_pickle_is_refused(tmp_path, caffe3, capsys, payload):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": caffe3.state_dict(), "meta": {"hook": payload(marker)}}, path)
    assert not marker.exists()
    rc, out, err = run_cli(capsys, "inspect", path)
    line = _assert_one_line_error(rc, out, err, "refused")
    assert "system" in line or "eval" in line
    assert not marker.exists(), "the pickled payload ran"
    with pytest.raises(FcosError):
        load_checkpoint(path)
    assert not marker.exists()


def test_foreign_meta_object_is_ignored_and_listed(tmp_path, caffe3, x, capsys, monkeypatch):
    """An object of a class that is not importable at load time is replaced by an inert placeholder."""
    mod_dir = tmp_path / "mods"
    mod_dir.mkdir()
    (mod_dir / "throwaway_hub_mod.py").write_text(
        "SIDE_EFFECTS = []\n"
        "class MessageHub:\n"
        "    def __init__(self, n):\n"
        "        self.n = n\n"
        "    def __setstate__(self, state):\n"
        "        SIDE_EFFECTS.append('setstate')\n"
        "        self.__dict__.update(state)\n"
    )
    monkeypatch.syspath_prepend(str(mod_dir))
    import throwaway_hub_mod

    meta = {"mmdet_version": "2.10.0", "hub": throwaway_hub_mod.MessageHub(3)}
    path = save_mmdet_ckpt(caffe3, tmp_path / "foreign.pth", meta=meta)
    monkeypatch.undo()  # the module is gone from sys.path …
    del sys.modules["throwaway_hub_mod"]  # … and from the import cache
    (mod_dir / "throwaway_hub_mod.py").unlink()
    with pytest.raises(ImportError):
        __import__("throwaway_hub_mod")

    model, ckpt = load_model(path)
    assert ckpt.ignored_objects == ["throwaway_hub_mod.MessageHub"]
    assert type(ckpt.meta["hub"]).__module__ == "throwaway_hub_mod"
    assert "throwaway_hub_mod" not in sys.modules
    assert_same_outputs(model, caffe3, x)

    rc, out, err = run_cli(capsys, "inspect", path, "--json")
    assert rc == 0, err
    assert json.loads(out)["ignored_pickled_objects"] == ["throwaway_hub_mod.MessageHub"]


# --------------------------------------------------------------------------- what the meta's mmdet version implies


@pytest.mark.parametrize(
    "meta,rule,points",
    [
        ({}, "mmdet2", "mmdet2"),
        ({"mmdet_version": "1.0rc0+8c5a2e0"}, "mmdet2", "mmdet2"),
        ({"mmdet_version": "2.17.0"}, "mmdet2", "mmdet2"),
        ({"mmdet_version": "2.18.0"}, "mmdet218", "mmdet3"),
        ({"mmdet_version": "2.28.2"}, "mmdet218", "mmdet3"),
        ({"mmdet_version": "3.3.0"}, "mmdet3", "mmdet3"),
        ({"mmengine_version": "0.10.3"}, "mmdet3", "mmdet3"),
    ],
)
def test_rule_follows_mmdet_version(tmp_path, caffe3, meta, rule, points):
    """mmdet < 2.18 -> §7.2 points (+⌊s/2⌋); 2.18+ -> §7.3 pairs; 3.x adds the w/h > 0 filter (spec §5, §7)."""
    ckpt = load_checkpoint(save_mmdet_ckpt(caffe3, tmp_path / "v.pth", meta=meta))
    assert (ckpt.config.post.rule, ckpt.config.post.points) == (rule, points)
    forced = load_checkpoint(save_mmdet_ckpt(caffe3, tmp_path / "v.pth", meta=meta), ModelOverrides(rule="mmdet2"))
    assert (forced.config.post.rule, forced.config.post.points, forced.sources["rule"]) == ("mmdet2", "mmdet2", "flag")


def test_gn_groups_from_meta(tmp_path, x):
    """Shapes cannot tell GroupNorm's group count; the meta's num_groups can."""
    from conftest import fcos_config

    from fcos_offline.model.detector import Detector

    donor = make_fcos(norm="gn", seed=13)
    cfg = fcos_config(norm="gn")
    cfg.head.gn_groups = 8
    model = Detector(cfg).eval()
    model.load_state_dict(donor.state_dict())
    text = "bbox_head=dict(type='FCOSHead', norm_cfg=dict(type='GN', num_groups=8, requires_grad=True))"
    loaded, ckpt = load_model(save_mmdet_ckpt(model, tmp_path / "gn8.pth", meta={"config": text}))
    assert ckpt.config.head.gn_groups == 8
    assert_same_outputs(loaded, model, x)
    default, ckpt32 = load_model(save_mmdet_ckpt(model, tmp_path / "gn.pth", meta={}))
    assert ckpt32.config.head.gn_groups == 32
    assert not outputs_close(default, model, x)


# --------------------------------------------------------------------------- meta values out of range


@pytest.mark.parametrize(
    "setting, bad",
    [("score_thr=0.05", "score_thr=1.5"), ("iou_thr=0.5", "iou_thr=-3"), ("max_per_img=100", "max_per_img=0"), ("nms_pre=1000", "nms_pre=0")],
)
def test_out_of_range_meta_post_setting_is_refused_naming_file_and_key(tmp_path, caffe3, setting: str, bad: str) -> None:
    """A meta config value outside the CLI flag's range is one line naming the file and the key, not a silent mAP of 0."""
    meta = {"mmdet_version": "1.0rc0+8c5a2e0", "config": V1_CONFIG.replace(setting, bad)}
    path = save_mmdet_ckpt(caffe3, tmp_path / "bad_meta.pth", head_names="fcos", meta=meta)
    key = bad.split("=")[0]
    with pytest.raises(FcosError) as err:
        load_checkpoint(path)
    message = str(err.value)
    record(f"checkpoint meta: {bad}", "load (library)", None, message, "refused in one line naming the file and the key; the flag overrides it")
    assert str(path) in message and key in message and "\n" not in message
    # the flag that fixes it overrides the file's value
    good = {"score_thr": 0.3, "iou_thr": 0.6, "max_per_img": 50, "nms_pre": 500}[key]
    assert getattr(load_checkpoint(path, ModelOverrides(**{key: good})).config.post, key) == good


def test_cli_flags_and_file_checks_share_one_range_table() -> None:
    """The argparse types of the post-processing flags take their limits from the model layer's table."""
    import argparse

    from fcos_offline.cli.common import add_model_flags
    from fcos_offline.model.config import POST_RANGES

    parser = argparse.ArgumentParser()
    add_model_flags(parser)
    types = {a.dest: a.type for a in parser._actions if a.dest in POST_RANGES}
    assert set(types) == set(POST_RANGES)
    for name, allowed in POST_RANGES.items():
        parse = types[name]
        assert (parse.low, parse.high, parse.low_open) == (allowed.low, allowed.high, allowed.low_open), name
