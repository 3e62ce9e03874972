"""NNCF's overflow fix follows the CPU: the first conv's weights in 7 bits only where int8 dot products can saturate."""

from __future__ import annotations

import numpy as np
import pytest

from fcos_offline.tune import quantize as q
from fcos_offline.tune.space import Candidate, candidate_list, nncf_config

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


def test_vnni_tag_round_trip() -> None:
    cfg = nncf_config("performance-bc-mm-vnni")
    assert not cfg.overflow_fix and not cfg.fast_bias_correction and cfg.activation_ranges == "minmax"
    assert cfg.tag() == "nncf-performance-bc-mm-vnni"
    assert nncf_config("mixed").overflow_fix and nncf_config("mixed").tag() == "nncf-mixed"


def test_candidates_on_a_vnni_cpu_keep_every_weight_in_8_bits() -> None:
    plain = candidate_list(("onnxruntime", "openvino"), q.CALIB_METHODS, 1)
    vnni = candidate_list(("onnxruntime", "openvino"), q.CALIB_METHODS, 1, vnni=True)
    assert len(plain) == len(vnni)
    for a, b in zip(plain, vnni):
        assert b.build == (a.build + "-vnni" if a.kind == "nncf" else a.build)
    assert not any(c.build.endswith("-vnni") for c in plain)
    # a restriction names builds either way
    only = candidate_list(("openvino",), q.CALIB_METHODS, 1, only=("nncf-performance",), vnni=True)
    assert [c.build for c in only] == ["nncf:performance-vnni"]
    again = candidate_list(("openvino",), q.CALIB_METHODS, 1, only=("openvino/nncf-mixed-bc-mm-vnni/fp32",), vnni=False)
    assert [(c.build, c.exec_precision) for c in again] == [("nncf:mixed-bc-mm", "fp32")]


def test_nncf_first_conv_weights_7_bits_by_default_8_bits_without_the_overflow_fix(tmp_path) -> None:
    """What ``-vnni`` changes in the model: the stem conv's int8 weights span [-63, 63] with NNCF's overflow
    fix and the full [-127, 127] without; every other conv has full 8-bit weights either way."""
    pytest.importorskip("nncf")
    import openvino as ov

    from fcos_offline.data.preprocess import list_images
    from fcos_offline.demo import DEMO_CHECKPOINT
    from fcos_offline.demo.synthetic import make_demo_data
    from fcos_offline.export.onnx_export import export_checkpoint

    export_checkpoint(DEMO_CHECKPOINT, tmp_path / "demo.onnx", CANVAS, dynamic_batch=True)
    make_demo_data(tmp_path / "calib", "train", 4, seed=0)
    images = q.ImageTensors([str(p) for p in list_images(tmp_path / "calib" / "train2017")], CANVAS)
    spans = {}
    for tag in ("performance", "performance-vnni"):
        xml = q.nncf_quantize(tmp_path / "demo.onnx", tmp_path / tag / "model.xml", images, nncf_config(tag))
        model = ov.Core().read_model(xml)
        weights = [op.get_data() for op in model.get_ordered_ops() if op.get_type_name() == "Constant" and op.get_element_type() == ov.Type.i8]
        assert weights[0].shape[1] == 3  # the first int8 weights are the stem conv's (3 input channels)
        spans[tag] = [int(np.abs(w).max()) for w in weights]
    assert spans["performance"][0] == 63 and spans["performance-vnni"][0] == 127
    assert all(s == 127 for s in spans["performance"][1:]) and all(s == 127 for s in spans["performance-vnni"][1:])
    assert Candidate("openvino", "nncf:performance-vnni").label() == "openvino int8 nncf performance-vnni, fp32 rest"
