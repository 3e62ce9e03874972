"""ONNX export: ONNX Runtime and OpenVINO reproduce PyTorch; NMS in graph vs --no-nms; numpy references."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
import reference_postprocess as ref
import torch
from conftest import V2_GN_CONFIG, assert_padding_contract, make_fcos, nms_case, random_canvas, save_mmdet_ckpt, save_torchvision_ckpt, sparse_fcos

from fcos_offline.export.metadata import read_metadata
from fcos_offline.export.onnx_export import export_onnx, run_onnx_detector
from fcos_offline.model.checkpoint import load_model
from fcos_offline.model.config import DetectorConfig, PostConfig
from fcos_offline.model.heads.spec import SPECS
from fcos_offline.model.match import match_batches
from fcos_offline.model.postprocess import DetectorWithPost, nms_topk

CANVAS = (256, 384)  # P3 32x48 = 1536 points > 1000


@dataclass
class Exported:
    name: str
    source: torch.nn.Module  # the model the checkpoint was written from
    post: PostConfig  # the post-processing the loaded checkpoint chose
    config: DetectorConfig
    path: Path
    class_names: list | None


def _export(tmp: Path, name: str, source, ckpt_path: Path, **kw) -> Exported:
    network, ckpt = load_model(ckpt_path)
    out = tmp / f"{name}.onnx"
    export_onnx(network, out, CANVAS, dynamic_batch=True, verify=False, class_names=ckpt.class_names, **kw)
    return Exported(name, source, ckpt.config.post, ckpt.config, out, ckpt.class_names)


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Exported]:
    """Each variant goes source model -> checkpoint file -> load_model -> dynamic-batch ONNX."""
    tmp = tmp_path_factory.mktemp("onnx")
    out: dict[str, Exported] = {}
    # (a) mmdet caffe R50 (3,4,6,3) at narrow width, v1 names
    a = make_fcos(stage_blocks=(3, 4, 6, 3), stacked_convs=4, calib_shape=CANVAS)
    out["a-caffe-r50"] = _export(tmp, "a", a, save_mmdet_ckpt(a, tmp / "a.pth", head_names="fcos"))
    # (b) pytorch style, GN head, centerness_on_reg, norm_on_bbox — told by the meta config text
    b = make_fcos(style="pytorch", norm="gn", centerness_on_reg=True, norm_on_bbox=True, seed=3, calib_shape=CANVAS)
    out["b-gn-meta"] = _export(tmp, "b", b, save_mmdet_ckpt(b, tmp / "b.pth", meta={"mmdet_version": "2.10.0", "config": V2_GN_CONFIG}))
    # (c) torchvision layout, 91 classes
    c = make_fcos(layout="torchvision", num_classes=91, stage_blocks=(3, 4, 6, 3), stacked_convs=4, seed=5, calib_shape=CANVAS)
    out["c-torchvision"] = _export(tmp, "c", c, save_torchvision_ckpt(c, tmp / "c.pth"))
    # (d) 3 classes, class names in meta
    d = make_fcos(num_classes=3, stage_blocks=(2, 1, 3, 1), seed=4, calib_shape=CANVAS)
    out["d-3class"] = _export(tmp, "d", d, save_mmdet_ckpt(d, tmp / "d.pth", meta={"CLASSES": ["x", "y", "z"]}))
    # (e) an mmdet 3.x file: §7.3 pairs + size filter, chosen from meta
    e = make_fcos(norm="gn", norm_on_bbox=True, centerness_on_reg=True, style="pytorch", seed=8, calib_shape=CANVAS)
    out["e-mmdet3"] = _export(
        tmp,
        "e",
        e,
        save_mmdet_ckpt(
            e, tmp / "e.pth", num_batches_tracked=False, meta={"mmdet_version": "3.1.0", "cfg": V2_GN_CONFIG.replace("nms_pre=700", "nms_pre=1000")}
        ),
    )
    return out


VARIANTS = ["a-caffe-r50", "b-gn-meta", "c-torchvision", "d-3class", "e-mmdet3"]
#: detections per image the inputs must give at least (3 classes do not always fill 100 slots)
MIN_DETS = {"d-3class": 50}


@pytest.fixture(scope="module")
def inputs():
    return {1: random_canvas(1, *CANVAS, seed=41), 4: random_canvas(4, *CANVAS, seed=42)}


def eager(model, post, x):
    with torch.no_grad():
        dets, labels = DetectorWithPost(model, post)(x)
    return dets.numpy(), labels.numpy()


def assert_match(want, got, min_per_image=100):
    stats = match_batches(want[0], want[1], got[0], got[1])
    assert stats.match_rate >= 0.999, stats
    assert stats.max_score_err <= 1e-4, stats
    assert stats.num_ref >= min_per_image * len(want[0]), stats  # non-trivial: full 100-detection outputs
    return stats


# --------------------------------------------------------------------------- PyTorch vs ONNX Runtime


def test_variants_pick_the_expected_settings(exports):
    assert exports["a-caffe-r50"].config.backbone.style == "caffe"
    b = exports["b-gn-meta"].config
    assert (b.backbone.style, b.head.norm, b.head.norm_on_bbox, b.head.centerness_on_reg) == ("pytorch", "gn", True, True)
    assert b.post.rule == "mmdet2" and b.post.nms_pre == 700 and b.post.iou_thr == 0.45
    assert exports["c-torchvision"].post.rule == "torchvision" and exports["c-torchvision"].config.head.num_classes == 91
    assert exports["d-3class"].config.head.num_classes == 3
    assert exports["e-mmdet3"].post.rule == "mmdet3"


@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("variant", VARIANTS)
def test_onnxruntime_matches_pytorch(exports, inputs, variant, batch):
    """One dynamic-batch file, batch 1 and 4; reference = the *source* model in eager PyTorch."""
    ex = exports[variant]
    x = inputs[batch]
    got = run_onnx_detector(ex.path, x.numpy())
    k = ex.post.max_per_img  # 100, or what the meta test_cfg says (60 for b and e)
    assert got[0].shape == (batch, k, 5) and got[0].dtype == np.float32
    assert got[1].shape == (batch, k) and got[1].dtype == np.int64
    assert_match(eager(ex.source, ex.post, x), got, min_per_image=MIN_DETS.get(variant, k))


@pytest.mark.parametrize("variant", VARIANTS)
def test_numpy_reference_matches_onnx(exports, inputs, variant):
    """The independent spec reference of each rule on the raw head outputs equals the ONNX graph's output."""
    ex = exports[variant]
    x = inputs[4]
    with torch.no_grad():
        raw = [[t.numpy() for t in part] for part in ex.source(x)]
    p = ex.post
    want = ref.reference_batch(
        p.rule, raw, CANVAS, ex.config.head.strides, nms_pre=p.nms_pre, score_thr=p.score_thr, iou_thr=p.iou_thr, max_per_img=p.max_per_img
    )
    assert_match(want, run_onnx_detector(ex.path, x.numpy()), min_per_image=MIN_DETS.get(variant, p.max_per_img))


@pytest.mark.parametrize("variant", VARIANTS)
def test_openvino_matches_onnxruntime(exports, inputs, variant):
    ov = pytest.importorskip("openvino", reason="openvino is not installed")
    ex = exports[variant]
    x = inputs[4].numpy()
    compiled = ov.Core().compile_model(str(ex.path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    res = compiled([x])
    dets, labels = res[compiled.output("dets")], res[compiled.output("labels")]
    k = ex.post.max_per_img
    assert dets.shape == (4, k, 5) and labels.shape == (4, k)
    got = (np.asarray(dets), np.asarray(labels).astype(np.int64))
    assert_match(run_onnx_detector(ex.path, x), got, min_per_image=MIN_DETS.get(variant, k))
    assert_match(eager(ex.source, ex.post, inputs[4]), got, min_per_image=MIN_DETS.get(variant, k))


# --------------------------------------------------------------------------- graph contract


def _dims(value_info):
    return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value_info.type.tensor_type.shape.dim]


@pytest.mark.parametrize("variant", VARIANTS)
def test_standard_onnx_ops_only(exports, variant):
    model = onnx.load(str(exports[variant].path))
    onnx.checker.check_model(model)
    assert {op.domain for op in model.opset_import} <= {"", "ai.onnx"}
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    ops = {n.op_type for n in model.graph.node}
    assert "NonMaxSuppression" in ops and "TopK" in ops


def test_graph_inputs_and_outputs(exports):
    model = onnx.load(str(exports["a-caffe-r50"].path))
    (inp,) = model.graph.input
    assert inp.name == "input" and inp.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    dims = _dims(inp)
    assert isinstance(dims[0], str) and dims[1:] == [3, *CANVAS]
    dets, labels = model.graph.output
    assert (dets.name, labels.name) == ("dets", "labels")
    assert dets.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert labels.type.tensor_type.elem_type == onnx.TensorProto.INT64
    assert isinstance(_dims(dets)[0], str) and _dims(dets)[2] == 5
    assert isinstance(_dims(labels)[0], str) and len(_dims(labels)) == 2


def test_dynamic_export_declares_100_detections(exports):
    model = onnx.load(str(exports["a-caffe-r50"].path))
    dets, labels = model.graph.output
    assert _dims(dets)[1:] == [100, 5] and _dims(labels)[1:] == [100]


def test_metadata(exports):
    for variant in ("a-caffe-r50", "d-3class", "c-torchvision"):
        ex = exports[variant]
        meta = read_metadata(ex.path)
        assert DetectorConfig.from_dict(meta["config"]) == ex.config
        assert meta["input_shape"] == list(CANVAS) and meta["batch"] == "dynamic" and meta["nms_in_graph"] is True
        assert meta["class_names"] == ex.class_names
    assert read_metadata(exports["d-3class"].path)["class_names"] == ["x", "y", "z"]


# --------------------------------------------------------------------------- --no-nms


@pytest.fixture(scope="module")
def no_nms_export(exports, tmp_path_factory):
    ex = exports["a-caffe-r50"]
    path = tmp_path_factory.mktemp("nonms") / "raw.onnx"
    network, _ = load_model(ex.path.with_name("a.pth"))
    result = export_onnx(network, path, CANVAS, dynamic_batch=True, nms=False, verify=False)
    return ex, result


def test_no_nms_export_matches_nms_in_graph(no_nms_export, inputs):
    ex, result = no_nms_export
    post = Path(result.post_path)
    assert post.name == "raw.post.onnx" and post.is_file()
    for batch in (1, 4):
        x = inputs[batch].numpy()
        got = run_onnx_detector(result.path, x, post)
        assert got[0].shape == (batch, 100, 5) and got[1].shape == (batch, 100)
        assert_match(run_onnx_detector(ex.path, x), got)
        assert_match(eager(ex.source, ex.post, inputs[batch]), got)


def test_no_nms_raw_head_outputs(no_nms_export, inputs):
    import onnxruntime as ort

    ex, result = no_nms_export
    model = onnx.load(result.path)
    names = [o.name for o in model.graph.output]
    assert names == SPECS["fcos"].raw_names(5) and names[:3] == ["cls_0", "reg_0", "ctr_0"]
    assert "NonMaxSuppression" not in {n.op_type for n in model.graph.node}
    post_model = onnx.load(result.post_path)
    assert [i.name for i in post_model.graph.input] == names
    assert "NonMaxSuppression" in {n.op_type for n in post_model.graph.node}
    assert {n.domain for n in post_model.graph.node} <= {"", "ai.onnx"}
    assert read_metadata(result.post_path)["nms_in_graph"] is False
    sess = ort.InferenceSession(result.path, providers=["CPUExecutionProvider"])
    outs = sess.run(None, {"input": inputs[4].numpy()})
    with torch.no_grad():
        cls, dist, ctr = ex.source(inputs[4])
    for got, want in zip(outs, [t for level in zip(cls, dist, ctr) for t in level]):
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-3, atol=1e-3)


# --------------------------------------------------------------------------- padding, NMS semantics


def test_padding_contract_with_few_detections(tmp_path, inputs):
    model = sparse_fcos()
    path = tmp_path / "sparse.onnx"
    export_onnx(model, path, CANVAS, batch_size=4, verify=False)
    x = inputs[4]
    got = run_onnx_detector(path, x.numpy())
    n = (got[1] >= 0).sum(axis=1)
    assert (n > 0).all() and (n < 100).all(), n
    assert_padding_contract(*got)
    want = eager(model, model.cfg.post, x)
    assert_padding_contract(*want)
    assert_match(want, got, min_per_image=1)
    np.testing.assert_array_equal((got[1] >= 0).sum(axis=1), (want[1] >= 0).sum(axis=1))


class _NMSOnly(torch.nn.Module):
    def forward(self, boxes, scores):
        return nms_topk(boxes, scores, 0.5, 10)


@pytest.fixture(scope="module")
def nms_onnx(tmp_path_factory):
    import warnings

    boxes, scores, _ = nms_case()
    path = tmp_path_factory.mktemp("nms") / "nms.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about the eager NMS loop
        torch.onnx.export(
            _NMSOnly(), (boxes, scores), str(path), input_names=["boxes", "scores"], output_names=["dets", "labels"], opset_version=17, dynamo=False
        )
    return path


def test_onnx_nms_iou_convention(nms_onnx):
    """ONNX Runtime's NonMaxSuppression: no +1, IoU == 0.5 kept (strict >), like eager and mmcv."""
    import onnxruntime as ort

    boxes, scores, (exp_scores, exp_labels) = nms_case()
    sess = ort.InferenceSession(str(nms_onnx), providers=["CPUExecutionProvider"])
    dets, labels = sess.run(None, {"boxes": boxes.numpy(), "scores": scores.numpy()})
    np.testing.assert_allclose(dets[0, :4, 4], exp_scores, rtol=1e-6)
    assert labels[0].tolist() == exp_labels + [-1] * 6
    eager_dets, _ = nms_topk(boxes, scores, 0.5, 10)
    np.testing.assert_allclose(dets, eager_dets.numpy(), rtol=1e-6)


def _openvino_nms(path, boxes, scores):
    ov = pytest.importorskip("openvino", reason="openvino is not installed")
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    res = compiled([boxes.numpy(), scores.numpy()])
    return res[compiled.output("dets")], res[compiled.output("labels")]


def test_openvino_nms_iou_convention_off_ties(nms_onnx):
    """OpenVINO agrees with eager when no IoU equals the threshold exactly (box C moved off the tie)."""
    boxes, scores, _ = nms_case()
    boxes[0, 2] = torch.tensor([5.1, 0, 10, 10])  # IoU(A, C) .49: kept
    boxes[0, 3] = torch.tensor([0, 0, 10, 5.2])  # IoU(A, D) .52: suppressed
    dets, labels = _openvino_nms(nms_onnx, boxes, scores)
    eager_dets, eager_labels = nms_topk(boxes, scores, 0.5, 10)
    np.testing.assert_allclose(dets, eager_dets.numpy(), rtol=1e-6)
    assert labels.tolist() == eager_labels.tolist()
    assert int((eager_labels >= 0).sum()) == 4


@pytest.mark.xfail(
    strict=False,
    reason="OpenVINO CPU NonMaxSuppression suppresses IoU == iou_threshold "
    "(ONNX Runtime, mmcv, torchvision and the eager loop keep it): exact ties differ",
)
def test_openvino_nms_exact_tie(nms_onnx):
    boxes, scores, (exp_scores, _) = nms_case()
    dets, _ = _openvino_nms(nms_onnx, boxes, scores)
    np.testing.assert_allclose(dets[0, :4, 4], exp_scores, rtol=1e-6)


# --------------------------------------------------------------------------- the full 800x1333 canvas


@pytest.mark.slow
def test_800x1333_more_than_1000_points_and_100_detections(exports, tmp_path):
    """P3 is 100x167 = 16,700 points (> 1000 per level) and > 100 detections survive NMS."""
    ex = exports["a-caffe-r50"]
    canvas = (800, 1333)
    path = tmp_path / "big.onnx"
    export_onnx(ex.source, path, canvas, batch_size=1, verify=False)
    x = random_canvas(1, *canvas, seed=77)
    with torch.no_grad():
        raw_t = ex.source(x)
    assert [tuple(t.shape[2:]) for t in raw_t[0]] == [(100, 167), (50, 84), (25, 42), (13, 21), (7, 11)]
    raw = [[t.numpy() for t in part] for part in raw_t]
    p = ex.post
    strides = ex.config.head.strides
    more = ref.reference_batch("mmdet2", raw, canvas, strides, nms_pre=p.nms_pre, max_per_img=101)
    assert int((more[1] >= 0).sum()) == 101  # more than 100 detections survive NMS
    want = ref.reference_batch("mmdet2", raw, canvas, strides, nms_pre=p.nms_pre, score_thr=p.score_thr, iou_thr=p.iou_thr, max_per_img=p.max_per_img)
    got = run_onnx_detector(path, x.numpy())
    assert_match(want, got)
    assert_match(eager(ex.source, ex.post, x), got)
    ov = pytest.importorskip("openvino", reason="openvino is not installed")
    compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    res = compiled([x.numpy()])
    assert_match(want, (res[compiled.output("dets")], res[compiled.output("labels")].astype(np.int64)))
