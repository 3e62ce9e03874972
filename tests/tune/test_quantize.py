"""NNCF builds for the machine and the model: the first conv's weights in 7 bits only where int8 dot
products can saturate (``-vnni``), GroupNorm's input float (``-gn``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fcos_offline.errors import FcosError
from fcos_offline.tune import quantize as q
from fcos_offline.tune.space import Candidate, candidate_list, nncf_config, ort_config

CANVAS = (160, 256)


@pytest.mark.parametrize(
    ("flags", "vnni"),
    [
        (["avx2"], False),
        (["avx2", "avx512f"], False),
        (["avx2", "avx512f", "avx512_vnni"], True),
        (["avx_vnni"], True),
        (["amx_int8"], True),
        ([], False),
    ],
)
def test_vnni_cpus_are_told_apart(flags: list[str], vnni: bool) -> None:
    assert q.vnni_cpu(flags) is vnni


def test_nncf_tag_round_trip() -> None:
    cfg = nncf_config("performance-bc-mm-vnni")
    assert not cfg.overflow_fix and not cfg.fast_bias_correction and cfg.activation_ranges == "minmax" and not cfg.norm_float
    assert cfg.tag() == "nncf-performance-bc-mm-vnni"
    assert nncf_config("mixed").overflow_fix and nncf_config("mixed").tag() == "nncf-mixed"
    gn = nncf_config("mixed-vnni-gn")
    assert gn.norm_float and not gn.overflow_fix and gn.tag() == "nncf-mixed-vnni-gn"
    assert nncf_config("performance-gn").tag() == "nncf-performance-gn"
    with pytest.raises(FcosError, match="bad NNCF build tag"):
        nncf_config("performance-ln")
    ort = ort_config("u8s8-minmax-pc-gn")
    assert ort.norm_float and ort.tag() == "u8s8-minmax-pc-gn" and not ort_config("u8s8-minmax-pc").norm_float


def test_candidates_keep_groupnorm_float_and_on_a_vnni_cpu_every_weight_in_8_bits() -> None:
    plain = candidate_list(("onnxruntime", "openvino"), q.CALIB_METHODS, 1)
    vnni = candidate_list(("onnxruntime", "openvino"), q.CALIB_METHODS, 1, vnni=True)
    assert len(plain) == len(vnni) and any(c.kind == "nncf" for c in plain)
    for a, b in zip(plain, vnni):
        assert a.build.endswith("-gn") == a.quantized  # every int8 build keeps GroupNorm float
        assert b.build == (a.build.removesuffix("-gn") + "-vnni-gn" if a.kind == "nncf" else a.build)
    assert not any(c.build.endswith("-vnni-gn") for c in plain)
    # a restriction names builds with or without the suffixes
    only = candidate_list(("openvino",), q.CALIB_METHODS, 1, only=("nncf-performance",), vnni=True)
    assert [c.build for c in only] == ["nncf:performance-vnni-gn"]
    again = candidate_list(("openvino",), q.CALIB_METHODS, 1, only=("openvino/nncf-mixed-bc-mm-vnni/fp32",), vnni=False)
    assert [(c.build, c.exec_precision) for c in again] == [("nncf:mixed-bc-mm-gn", "fp32")]
    named = candidate_list(("openvino",), q.CALIB_METHODS, 1, only=("nncf-performance-bc-mm-gn", "openvino/fp32/fp32"))
    assert [c.model_id for c in named] == ["fp32", "nncf-performance-bc-mm-gn"]
    assert Candidate("openvino", "nncf:mixed-bc-mm-gn").model_id == "nncf-mixed-bc-mm-gn"


@pytest.fixture(scope="module")
def demo_onnx(tmp_path_factory) -> tuple[Path, q.ImageTensors]:
    """The demo model exported at a small canvas, and 4 calibration images."""
    from fcos_offline.data.preprocess import list_images
    from fcos_offline.demo import DEMO_CHECKPOINT
    from fcos_offline.demo.synthetic import make_demo_data
    from fcos_offline.export.onnx_export import export_checkpoint

    pytest.importorskip("nncf")
    tmp = tmp_path_factory.mktemp("demo")
    export_checkpoint(DEMO_CHECKPOINT, tmp / "demo.onnx", CANVAS, dynamic_batch=True)
    make_demo_data(tmp / "calib", "train", 4, seed=0)
    return tmp / "demo.onnx", q.ImageTensors([str(p) for p in list_images(tmp / "calib" / "train2017")], CANVAS)


def test_nncf_first_conv_weights_7_bits_by_default_8_bits_without_the_overflow_fix(tmp_path, demo_onnx) -> None:
    """What ``-vnni`` changes in the model: the stem conv's int8 weights span [-63, 63] with NNCF's overflow
    fix and the full [-127, 127] without; every other conv has full 8-bit weights either way."""
    import openvino as ov

    onnx_path, images = demo_onnx
    spans = {}
    for tag in ("performance", "performance-vnni"):
        xml = q.nncf_quantize(onnx_path, tmp_path / tag / "model.xml", images, nncf_config(tag))
        model = ov.Core().read_model(xml)
        weights = [op.get_data() for op in model.get_ordered_ops() if op.get_type_name() == "Constant" and op.get_element_type() == ov.Type.i8]
        assert weights[0].shape[1] == 3  # the first int8 weights are the stem conv's (3 input channels)
        spans[tag] = [int(np.abs(w).max()) for w in weights]
    assert spans["performance"][0] == 63 and spans["performance-vnni"][0] == 127
    assert all(s == 127 for s in spans["performance"][1:]) and all(s == 127 for s in spans["performance-vnni"][1:])
    assert Candidate("openvino", "nncf:performance-vnni").label() == "openvino int8 nncf performance-vnni, fp32 rest"


def _groupnorm_quantizers(xml: Path) -> dict[str, tuple[int, int]]:
    """Per GroupNorm (MVN) of an OpenVINO IR, named by the conv it normalises: the FakeQuantize ops
    between that conv and the MVN, and between the MVN and its affine Multiply."""
    import openvino as ov

    counts: dict[str, tuple[int, int]] = {}
    for op in ov.Core().read_model(xml).get_ordered_ops():
        if op.get_type_name() != "MVN":
            continue
        node, before = op.input_value(0).get_node(), 0
        while node.get_type_name() in ("Reshape", "FakeQuantize"):
            before += node.get_type_name() == "FakeQuantize"
            node = node.input_value(0).get_node()
        after, nxt = 0, op
        while nxt.get_type_name() != "Multiply":
            (nxt,) = [t.get_node() for t in nxt.output(0).get_target_inputs() if t.get_node().get_type_name() != "ShapeOf"]
            after += nxt.get_type_name() == "FakeQuantize"
        counts[node.get_friendly_name()] = (before, after)
    return counts


def _fake_quantizes(xml: Path) -> int:
    import openvino as ov

    return sum(op.get_type_name() == "FakeQuantize" for op in ov.Core().read_model(xml).get_ordered_ops())


def test_nncf_groupnorm_float_with_gn_and_behind_a_float_head_conv(tmp_path, demo_onnx) -> None:
    """``-gn``: no GroupNorm's input (the head conv output it normalises) or normalised output is
    quantized; without it every one is, both. A head conv the fallback returns to float takes its
    GroupNorm's input quantizer with it (else the float conv's output would still be rounded to
    int8), and only that conv's."""
    onnx_path, images = demo_onnx
    default_xml = q.nncf_quantize(onnx_path, tmp_path / "d" / "model.xml", images, nncf_config("performance"))
    gn_xml = q.nncf_quantize(onnx_path, tmp_path / "g" / "model.xml", images, nncf_config("performance-gn"))
    default, gn = _groupnorm_quantizers(default_xml), _groupnorm_quantizers(gn_xml)
    assert len(default) == len(gn) == 20  # the demo head: 2 cls + 2 reg convs with GroupNorm, on 5 FPN levels
    assert set(default.values()) == {(1, 1)} and set(gn.values()) == {(0, 0)}
    assert _fake_quantizes(default_xml) - _fake_quantizes(gn_xml) == 40  # those two per GroupNorm, nothing else

    head = next(g for g in q.conv_groups(onnx_path) if g.name == "bbox_head.cls_convs.0.conv")
    assert len(head.nodes) == 5  # one shared conv, run once per FPN level
    one = _groupnorm_quantizers(q.nncf_quantize(onnx_path, tmp_path / "f" / "model.xml", images, nncf_config("performance"), head.nodes))
    assert sorted(n for n, (before, _) in one.items() if before == 0) == sorted(head.nodes)


def _source(producers: dict, tensor: str):
    """The node that computes ``tensor``, through QuantizeLinear / DequantizeLinear."""
    node = producers.get(tensor)
    while node is not None and node.op_type in ("QuantizeLinear", "DequantizeLinear"):
        node = producers.get(node.input[0])
    return node


def test_ort_gn_keeps_groupnorm_affine_float_and_every_conv_int8(tmp_path, demo_onnx) -> None:
    """ONNX Runtime ``-gn``: no quantizer between a GroupNorm's gamma (Mul) and beta (Add), where the
    default build has one per GroupNorm; every conv is still int8 (its output quantized for QLinearConv)."""
    import onnx

    onnx_path, images = demo_onnx
    pre = q.preprocess_for_ort(onnx_path, tmp_path / "pre.onnx")
    counts = {}
    for tag in ("u8s8-minmax-pc", "u8s8-minmax-pc-gn"):
        model = onnx.load(str(q.ort_quantize(pre, tmp_path / f"{tag}.onnx", images, ort_config(tag), cache_dir=tmp_path / "cal")))
        producers = {o: n for n in model.graph.node for o in n.output}
        network = [n for n in model.graph.node if n.name.startswith("/network/")]
        affine_adds = [n for n in network if n.op_type == "Add" and (m := _source(producers, n.input[0])) is not None and m.op_type == "Mul"]
        quantized_between = sum(producers[n.input[0]].op_type == "DequantizeLinear" for n in affine_adds)
        convs = [n for n in network if n.op_type == "Conv"]
        int8_convs = sum(producers[n.input[1]].op_type == "DequantizeLinear" for n in convs)
        counts[tag] = (len(affine_adds), quantized_between, len(convs), int8_convs)
    # the demo head: 4 GroupNorms on 5 FPN levels
    assert counts["u8s8-minmax-pc"][:2] == (20, 20) and counts["u8s8-minmax-pc-gn"][:2] == (20, 0)
    n_convs, int8 = counts["u8s8-minmax-pc"][2:]
    assert n_convs == int8 > 0 and counts["u8s8-minmax-pc-gn"][2:] == (n_convs, int8)
