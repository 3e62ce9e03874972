"""tune's int8 sensitivity: each conv group alone int8, measured at the head's outputs; the fallback's order and steps."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fcos_offline.errors import FcosError
from fcos_offline.tune import quantize as q
from fcos_offline.tune import sensitivity as sens

CANVAS = (160, 256)


@pytest.fixture(scope="module")
def demo_int8(tmp_path_factory) -> SimpleNamespace:
    """The shipped demo model (fp32, ORT-preprocessed) and its ONNX Runtime U8S8 QDQ model, 4 calibration images."""
    from fcos_offline.data.preprocess import list_images
    from fcos_offline.demo import DEMO_CHECKPOINT
    from fcos_offline.demo.synthetic import make_demo_data
    from fcos_offline.export.onnx_export import export_checkpoint
    from fcos_offline.tune.space import ORT_QDQ_DEFAULT, ort_config

    root = tmp_path_factory.mktemp("sens")
    export_checkpoint(DEMO_CHECKPOINT, root / "demo.onnx", CANVAS, dynamic_batch=True)
    make_demo_data(root / "calib", "train", 4, seed=0)
    images = q.ImageTensors([str(p) for p in list_images(root / "calib" / "train2017")], CANVAS)
    pre = q.preprocess_for_ort(root / "demo.onnx", root / "pre.onnx")
    int8 = q.ort_quantize(pre, root / "int8.onnx", images, ort_config(ORT_QDQ_DEFAULT))
    return SimpleNamespace(root=root, fp32=pre, int8=int8, images=images, groups=q.conv_groups(pre))


def _head_outputs(model, groups, feeds: dict) -> dict[str, np.ndarray]:
    import onnx
    import onnxruntime as ort

    wanted = [t for g in groups if g.head_final for t in g.outputs]
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in wanted)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return dict(zip(wanted, sess.run(wanted, feeds)))


def test_switches_off_is_the_fp32_model_and_one_switch_quantizes_one_group(demo_int8) -> None:
    import onnx

    model, switches = sens._switched_model(demo_int8.fp32, demo_int8.int8, demo_int8.groups)
    assert set(switches) == {g.name for g in demo_int8.groups}  # every conv of the demo is int8 in the QDQ model
    x = demo_int8.images[0]
    input_name = onnx.load(str(demo_int8.fp32)).graph.input[0].name
    off = {s: np.array(False) for s in switches.values()}
    fp32 = _head_outputs(onnx.load(str(demo_int8.fp32)), demo_int8.groups, {input_name: x})
    same = _head_outputs(model, demo_int8.groups, {input_name: x, **off})
    assert all(np.array_equal(same[t], fp32[t]) for t in fp32)  # all switches off: exactly fp32
    model, _ = sens._switched_model(demo_int8.fp32, demo_int8.int8, demo_int8.groups)
    stem = _head_outputs(model, demo_int8.groups, {input_name: x, **off, switches["backbone.conv1"]: np.array(True)})
    assert any(not np.array_equal(stem[t], fp32[t]) for t in fp32)


def test_each_groups_error_lands_where_the_network_carries_it(demo_int8) -> None:
    """conv_cls alone int8 moves the class scores only; a backbone conv moves all three outputs."""
    scores = sens.output_sensitivity(demo_int8.fp32, demo_int8.int8, demo_int8.images, demo_int8.groups, 2)
    assert set(scores) == {g.name for g in demo_int8.groups}
    cls = scores["bbox_head.conv_cls"]
    assert cls["conv_cls"] > 0.0 and cls["conv_centerness"] == 0.0 and cls["conv_reg"] == 0.0
    assert cls["score"] == pytest.approx(cls["conv_cls"])
    stem = scores["backbone.conv1"]
    assert min(stem["conv_cls"], stem["conv_centerness"], stem["conv_reg"]) > 0.0
    assert all(v["score"] == pytest.approx(v["conv_cls"] + v["conv_centerness"] + v["conv_reg"]) for v in scores.values())


def test_a_coarser_quantizer_puts_its_group_first(demo_int8, tmp_path) -> None:
    """The probe measures the int8 model it is given: 16x the scale of one conv's input quantizer (its
    QuantizeLinear and DequantizeLinear) and that group ranks first."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(demo_int8.int8))
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = {i.name: i for i in model.graph.initializer}
    target = next(g for g in demo_int8.groups if g.name == "backbone.layer3.0.conv2")
    conv = next(n for n in model.graph.node if n.name == target.nodes[0])
    dq = producers[conv.input[0]]
    scale = inits[dq.input[1]]
    scale.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(scale) * 16, scale.name))
    coarse = tmp_path / "coarse.onnx"
    onnx.save(model, coarse)
    before = sens.output_sensitivity(demo_int8.fp32, demo_int8.int8, demo_int8.images, demo_int8.groups, 2)
    after = sens.output_sensitivity(demo_int8.fp32, coarse, demo_int8.images, demo_int8.groups, 2)
    assert max(before, key=lambda g: before[g]["score"]) != target.name
    assert max(after, key=lambda g: after[g]["score"]) == target.name
    assert after[target.name]["score"] > 10 * before[target.name]["score"]
    order = sens.fallback_order(demo_int8.groups, {g: v["score"] for g, v in after.items()})
    assert order[0].name == target.name


def test_a_quantized_model_of_another_network_is_refused(demo_int8, tmp_path) -> None:
    import onnx

    model = onnx.load(str(demo_int8.int8))
    for n in model.graph.node:
        n.name = "other/" + n.name
    other = tmp_path / "other.onnx"
    onnx.save(model, other)
    with pytest.raises(FcosError, match="no quantized convolution matches"):
        sens.output_sensitivity(demo_int8.fp32, other, demo_int8.images, demo_int8.groups, 1)


def test_probe_images_shrink_with_the_canvas() -> None:
    assert sens.probe_images(4, (320, 512), 200) == 4
    assert sens.probe_images(4, (800, 1333), 200) == 1  # one R50 canvas holds more locations than 4 demo images
    assert sens.probe_images(4, (320, 512), 2) == 2  # no more than there are
    assert sens.probe_images(0, (320, 512), 200) == 1


@pytest.mark.parametrize(("n", "sizes"), [(1, [1]), (4, [1, 2, 4]), (5, [1, 2, 4, 5]), (35, [1, 2, 4, 8, 16, 32, 35])])
def test_fallback_steps_double(n: int, sizes: list[int]) -> None:
    groups = [q.ConvGroup(f"g{i}", f"w{i}") for i in range(n)]
    steps = sens.fallback_steps(groups)
    assert [len(s) for s in steps] == sizes
    assert all(s == groups[: len(s)] for s in steps)  # cumulative


def test_fallback_order_largest_error_first_unscored_last() -> None:
    groups = [q.ConvGroup(n, n) for n in ("a", "b", "c", "d")]
    order = sens.fallback_order(groups, {"c": 3.0, "a": 1.0, "b": 2.0})
    assert [g.name for g in order] == ["c", "b", "a", "d"]


def test_the_model_files_are_left_as_they_were(demo_int8) -> None:
    """The fp32 and int8 files are left as they were (the probe edits copies in memory)."""
    before = Path(demo_int8.fp32).read_bytes(), Path(demo_int8.int8).read_bytes()
    sens.output_sensitivity(demo_int8.fp32, demo_int8.int8, demo_int8.images, demo_int8.groups[:3], 1)
    assert (Path(demo_int8.fp32).read_bytes(), Path(demo_int8.int8).read_bytes()) == before
