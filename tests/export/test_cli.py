"""``fcos-offline export`` and ``fcos-offline inspect`` end to end through ``fcos_offline.cli.main``."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import make_fcos, param_count, random_canvas, save_mmdet_ckpt, save_torchvision_ckpt

from fcos_offline.cli import main
from fcos_offline.export.metadata import read_metadata
from fcos_offline.export.onnx_export import run_onnx_detector
from fcos_offline.model.config import default_post_config
from fcos_offline.model.match import match_batches
from fcos_offline.model.postprocess import DetectorWithPost

SHAPE = (320, 512)
VERIFY_RE = re.compile(r"verified against PyTorch with ONNX Runtime: (\d+)/(\d+) detections matched \(([\d.]+)%\)")


def run_cli(capsys, *argv):
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def dims(value_info):
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value_info.type.tensor_type.shape.dim]


def assert_verified(out: str) -> int:
    m = VERIFY_RE.search(out)
    assert m, out
    matched, total, pct = int(m[1]), int(m[2]), float(m[3])
    assert total > 0 and matched == total and pct == 100.0
    return total


def assert_match(want, got, min_total):
    stats = match_batches(want[0], want[1], got[0], got[1])
    assert stats.match_rate >= 0.999 and stats.max_score_err <= 1e-4, stats
    assert stats.num_ref >= min_total, stats


@pytest.fixture(scope="module")
def caffe_model():
    return make_fcos(stage_blocks=(2, 1, 3, 1), calib_shape=SHAPE, seed=1)


@pytest.fixture(scope="module")
def caffe_ckpt(caffe_model, tmp_path_factory):
    meta = {"mmdet_version": "1.0rc0+8c5a2e0", "CLASSES": [f"c{i}" for i in range(80)]}
    return save_mmdet_ckpt(caffe_model, tmp_path_factory.mktemp("ckpt") / "fcos_v1.pth", head_names="fcos", meta=meta)


def test_export_dynamic_batch(caffe_model, caffe_ckpt, tmp_path, capsys):
    out_path = tmp_path / "m.onnx"
    rc, out, err = run_cli(capsys, "export", "--checkpoint", caffe_ckpt, "--output", out_path, "--shape", *SHAPE, "--dynamic-export")
    assert rc == 0, err
    assert f"wrote {out_path}" in out and "input [dynamic,3,320,512]" in out
    assert assert_verified(out) >= 50
    model = onnx.load(str(out_path))
    (inp,) = model.graph.input
    assert inp.name == "input" and inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert dims(inp)[0] == "batch" and dims(inp)[1:] == [3, *SHAPE]
    dets, labels = model.graph.output
    assert dets.name == "dets" and dets.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert labels.name == "labels" and labels.type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert dims(dets)[0] == "batch" and dims(dets)[2] == 5 and dims(labels)[0] == "batch"
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
    meta = read_metadata(out_path)
    assert meta["batch"] == "dynamic" and meta["input_shape"] == list(SHAPE)
    assert meta["class_names"] == [f"c{i}" for i in range(80)]
    for batch in (1, 3):
        x = random_canvas(batch, *SHAPE, seed=60 + batch)
        got = run_onnx_detector(out_path, x.numpy())
        assert got[0].shape == (batch, 100, 5) and got[0].dtype == np.float32
        assert got[1].shape == (batch, 100) and got[1].dtype == np.int64
        with torch.no_grad():
            want = DetectorWithPost(caffe_model, default_post_config("mmdet2"))(x)
        assert_match((want[0].numpy(), want[1].numpy()), got, min_total=100 * batch)


def test_export_output_file_alias_fixed_batch(caffe_ckpt, tmp_path, capsys):
    out_path = tmp_path / "fixed.onnx"
    summary = tmp_path / "summary.json"
    rc, out, err = run_cli(
        capsys, "export", "--checkpoint", caffe_ckpt, "--output-file", out_path, "--shape", *SHAPE, "--batch-size", 2, "--summary", summary
    )
    assert rc == 0, err
    assert_verified(out)
    model = onnx.load(str(out_path))
    assert dims(model.graph.input[0]) == [2, 3, *SHAPE]
    assert dims(model.graph.output[0]) == [2, 100, 5] and dims(model.graph.output[1]) == [2, 100]
    data = json.loads(summary.read_text())
    assert data["batch"] == "2" and data["shape"] == list(SHAPE) and data["verify"]["match_rate"] == 1.0
    sess = ort.InferenceSession(str(out_path), providers=["CPUExecutionProvider"])
    dets, labels = sess.run(None, {"input": random_canvas(2, *SHAPE).numpy()})
    assert dets.shape == (2, 100, 5) and labels.shape == (2, 100)
    with pytest.raises(Exception):  # the batch is fixed
        sess.run(None, {"input": random_canvas(1, *SHAPE).numpy()})


def test_export_no_nms(caffe_model, caffe_ckpt, tmp_path, capsys):
    out_path = tmp_path / "raw.onnx"
    rc, out, err = run_cli(capsys, "export", "--checkpoint", caffe_ckpt, "--output", out_path, "--shape", *SHAPE, "--dynamic-export", "--no-nms")
    assert rc == 0, err
    post = tmp_path / "raw.post.onnx"
    assert f"wrote {out_path} and {post}" in out and post.is_file()
    assert_verified(out)
    x = random_canvas(2, *SHAPE, seed=70)
    got = run_onnx_detector(out_path, x.numpy(), post)
    with torch.no_grad():
        want = DetectorWithPost(caffe_model, default_post_config("mmdet2"))(x)
    assert_match((want[0].numpy(), want[1].numpy()), got, min_total=200)


def test_export_with_override_flags(tmp_path, capsys):
    """A GN / pytorch-style / centerness-on-reg / norm_on_bbox model saved without meta: the flags make it right."""
    src = make_fcos(style="pytorch", norm="gn", centerness_on_reg=True, norm_on_bbox=True, seed=3, calib_shape=SHAPE)
    ckpt = save_mmdet_ckpt(src, tmp_path / "gn.pth", meta={})
    rc, out, err = run_cli(capsys, "inspect", ckpt, "--json")
    assert rc == 0, err
    plain = json.loads(out)["config"]
    assert (plain["backbone"]["style"], plain["head"]["norm_on_bbox"], plain["head"]["centerness_on_reg"]) == ("caffe", False, False)
    out_path = tmp_path / "gn.onnx"
    rc, out, err = run_cli(
        capsys,
        "export",
        "--checkpoint",
        ckpt,
        "--output",
        out_path,
        "--shape",
        *SHAPE,
        "--dynamic-export",
        "--style",
        "pytorch",
        "--norm-on-bbox",
        "--centerness-on-reg",
    )
    assert rc == 0, err
    assert_verified(out)
    cfg = read_metadata(out_path)["config"]
    assert (cfg["backbone"]["style"], cfg["head"]["norm_on_bbox"], cfg["head"]["centerness_on_reg"]) == ("pytorch", True, True)
    x = random_canvas(2, *SHAPE, seed=80)
    with torch.no_grad():
        want = DetectorWithPost(src, default_post_config("mmdet2"))(x)
    assert_match((want[0].numpy(), want[1].numpy()), run_onnx_detector(out_path, x.numpy()), min_total=200)


def test_export_refuses_bad_checkpoint_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint at all\n")
    rc, out, err = run_cli(capsys, "export", "--checkpoint", bad, "--output", tmp_path / "x.onnx", "--shape", *SHAPE)
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fcos-offline export: error:") and str(bad) in lines[0]
    assert not (tmp_path / "x.onnx").exists()


# --------------------------------------------------------------------------- inspect


def test_inspect_json_mmdet(caffe_model, caffe_ckpt, capsys):
    rc, out, err = run_cli(capsys, "inspect", caffe_ckpt, "--json")
    assert rc == 0, err
    info = json.loads(out)
    assert info["format"] == "mmdet" and info["mmdet_version"] == "1.0rc0+8c5a2e0"
    assert info["depth"] == "ResNet-23"  # (2+1+3+1) bottlenecks x 3 + 2
    assert info["num_classes"] == 80
    assert info["num_params"] == param_count(caffe_model)
    bn_affine = sum(
        v.numel() for k, v in caffe_model.state_dict().items() if k.startswith("backbone.") and re.search(r"(bn\d|downsample\.1)\.(weight|bias)$", k)
    )
    assert info["num_params"] == sum(p.numel() for p in caffe_model.parameters()) + bn_affine
    assert info["config"]["backbone"]["stage_blocks"] == [2, 1, 3, 1]
    assert info["config"]["post"]["rule"] == "mmdet2"
    assert info["class_names"] == [f"c{i}" for i in range(80)]
    assert info["ignored_pickled_objects"] == []


def test_inspect_json_torchvision(tmp_path, capsys):
    src = make_fcos(layout="torchvision", num_classes=91, seed=5)
    path = save_torchvision_ckpt(src, tmp_path / "tv.pth", old_fpn_names=True)
    rc, out, err = run_cli(capsys, "inspect", path, "--json")
    assert rc == 0, err
    info = json.loads(out)
    assert info["format"] == "torchvision" and info["num_classes"] == 91 and info["depth"] == "ResNet-14"
    assert info["config"]["post"]["rule"] == "torchvision" and info["config"]["input_adapter"] == "torchvision"
    # torchvision counts frozen-BN weight/bias as buffers, not parameters (spec §10: 32,269,600 for R50)
    assert info["num_params"] == sum(p.numel() for p in src.parameters()) < param_count(src)


def test_inspect_flags_in_json(caffe_ckpt, capsys):
    rc, out, err = run_cli(
        capsys, "inspect", caffe_ckpt, "--json", "--style", "pytorch", "--rule", "mmdet3", "--score-thr", "0.1", "--max-per-img", "50"
    )
    assert rc == 0, err
    info = json.loads(out)
    assert info["config"]["backbone"]["style"] == "pytorch" and info["sources"]["style"] == "flag"
    post = info["config"]["post"]
    assert (post["rule"], post["points"], post["score_thr"], post["max_per_img"]) == ("mmdet3", "mmdet3", 0.1, 50)


def test_inspect_table(caffe_ckpt, capsys):
    rc, out, err = run_cli(capsys, "inspect", caffe_ckpt)
    assert rc == 0, err
    assert "ResNet-23" in out and "mmdet2" in out
