"""Which conv groups int8 hurts most, measured where it matters: at the head's outputs.

For each conv group alone, its convolutions get the quantization an int8 model gives them — the
input activation through that model's QuantizeLinear -> DequantizeLinear (its scale and zero point),
the weights dequantized from its int8 values — while the rest of the network stays fp32. The score
is the error that causes at the head's prediction convolutions (``HeadSpec.convs``: class and
centerness scores after their sigmoid, box regressions as they are), as a normalised mean squared
error against fp32: ``sum((q - f)^2) / sum(f^2)`` over all FPN levels and probe images, summed over
the head's outputs.

Why at the outputs: a conv's own relative error says nothing of what the layers after it make of
it. The measure is still a proxy for mAP: on the demo model single groups moved the mAP by little,
and this order ranked the one that moved it most (the stem conv, +0.16 points) ninth (README:
Tuning). One ONNX Runtime session holds every group, each behind a boolean switch (``Where``), so
the probe costs one fp32 run per group and image.

The accuracy fallback returns groups to float in this order (:func:`fallback_order`), 1, 2, 4, …
more at a time (:func:`fallback_steps`).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

from fcos_offline.errors import FcosError
from fcos_offline.model.heads.spec import SPECS
from fcos_offline.progress import progress_bar

if TYPE_CHECKING:
    import onnx

    from fcos_offline.tune.quantize import ConvGroup, ImageTensors

#: names the measurement in tune.json (a stored order from another method is measured again)
METHOD = "normalised squared error at the head's outputs when each conv group alone is int8"

#: every head family's prediction convs, and whether their output is a logit (compared after its sigmoid)
HEAD_OUTPUTS = {conv: kind in spec.scores for spec in SPECS.values() for kind, conv in spec.convs.items()}

#: probe images at the demo canvas (320x512); larger canvases get fewer (at least one), see :func:`probe_images`
PROBE_PIXELS = 4 * 320 * 512


def probe_images(requested: int, canvas_hw: tuple[int, int], available: int) -> int:
    """How many images the probe runs: ``requested``, fewer on large canvases (one 800x1333 image holds
    more locations than four demo images), at least one."""
    by_pixels = max(1, PROBE_PIXELS // max(1, canvas_hw[0] * canvas_hw[1]))
    return max(1, min(requested, by_pixels, available))


def _targets(model: onnx.ModelProto, groups: list[ConvGroup]) -> dict[str, tuple[list[str], bool]]:
    """Output kind -> (tensors, is a logit): the head's last convs, else the graph's float outputs."""
    from onnx import TensorProto

    heads = {h: (list(g.outputs), logit) for g in groups for h, logit in HEAD_OUTPUTS.items() if g.name.split(".")[-1] == h}
    if heads:
        return heads
    floats = [o.name for o in model.graph.output if o.type.tensor_type.elem_type == TensorProto.FLOAT]
    if not floats:
        raise FcosError("no float output to measure quantization error at (and no head prediction convs found)")
    return {o: ([o], False) for o in floats}


def _switched_model(fp32_onnx: str | os.PathLike, qdq_onnx: str | os.PathLike, groups: list[ConvGroup]) -> tuple[onnx.ModelProto, dict[str, str]]:
    """The fp32 graph where a boolean input per group feeds that group's convs their int8 view; group -> input."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    qmodel = onnx.load(str(qdq_onnx))
    model = onnx.load(str(fp32_onnx))
    producers = {o: n for n in qmodel.graph.node for o in n.output}
    q_inits = {i.name: i for i in qmodel.graph.initializer}
    q_convs = {n.name: n for n in qmodel.graph.node if n.op_type == "Conv"}
    group_of = {node: i for i, g in enumerate(groups) for node in g.nodes}
    switches: dict[str, str] = {}
    nodes: list[onnx.NodeProto] = []
    for node in model.graph.node:
        q = q_convs.get(node.name)
        i = group_of.get(node.name)
        if node.op_type != "Conv" or q is None or i is None:
            nodes.append(node)
            continue
        switch = switches.setdefault(groups[i].name, f"int8_switch_{i}")
        act = producers.get(q.input[0])
        if act is not None and act.op_type == "DequantizeLinear" and all(p in q_inits for p in act.input[1:]):
            params = []
            for k, p in enumerate(act.input[1:]):
                params.append(f"{node.name}/int8_probe/act_param{k}")
                model.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(q_inits[p]), params[-1]))
            base = f"{node.name}/int8_probe/act"
            nodes += [
                helper.make_node("QuantizeLinear", [node.input[0], *params], [base + "_q"], name=base + "_q"),
                helper.make_node("DequantizeLinear", [base + "_q", *params], [base + "_dq"], name=base + "_dq"),
                helper.make_node("Where", [switch, base + "_dq", node.input[0]], [base], name=base),
            ]
            node.input[0] = base
        wdq = producers.get(q.input[1])
        if wdq is not None and wdq.op_type == "DequantizeLinear" and all(p in q_inits for p in wdq.input):
            w = numpy_helper.to_array(q_inits[wdq.input[0]]).astype(np.float32)
            scale = numpy_helper.to_array(q_inits[wdq.input[1]]).astype(np.float32)
            zero = numpy_helper.to_array(q_inits[wdq.input[2]]).astype(np.float32) if len(wdq.input) > 2 else np.zeros_like(scale)
            shape = [1] * w.ndim
            if scale.ndim:  # per channel, along the DequantizeLinear's axis (default 1)
                shape[next((a.i for a in wdq.attribute if a.name == "axis"), 1)] = -1
            name = f"{node.name}/int8_probe/weight"
            model.graph.initializer.append(numpy_helper.from_array((w - zero.reshape(shape)) * scale.reshape(shape), name + "_dq"))
            nodes.append(helper.make_node("Where", [switch, name + "_dq", node.input[1]], [name], name=name))
            node.input[1] = name
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {n.input[0] for n in nodes if n.op_type == "Where"}
    switches = {g: s for g, s in switches.items() if s in used}
    if not switches:
        raise FcosError(f"{qdq_onnx}: no quantized convolution matches a convolution of {fp32_onnx} by name")
    model.graph.input.extend(helper.make_tensor_value_info(s, TensorProto.BOOL, []) for s in switches.values())
    return model, switches


def output_sensitivity(
    fp32_onnx: str | os.PathLike,
    qdq_onnx: str | os.PathLike,
    images: ImageTensors,
    groups: list[ConvGroup],
    num_images: int = 4,
) -> dict[str, dict[str, float]]:
    """Per conv group: the error at the head's outputs when that group alone is int8 as in ``qdq_onnx``.

    ``qdq_onnx``: a QDQ model quantized from ``fp32_onnx`` (same conv node names). Returns group ->
    ``{"score": total, <output kind>: its share}`` (module docstring); groups ``qdq_onnx`` does not
    quantize are left out.
    """
    import onnx
    import onnxruntime as ort

    from fcos_offline.engine.backends.onnxruntime import optimization_level

    model, switches = _switched_model(fp32_onnx, qdq_onnx, groups)
    targets = _targets(model, groups)
    wanted = [t for tensors, _ in targets.values() for t in tensors]
    have = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in wanted if t not in have)
    so = ort.SessionOptions()
    so.graph_optimization_level = optimization_level("disable")  # exact QDQ arithmetic, no fusion across the switches
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    del model
    input_name = next(i.name for i in sess.get_inputs() if i.name not in switches.values())
    num = {g: dict.fromkeys(targets, 0.0) for g in switches}
    den = dict.fromkeys(targets, 0.0)
    n = min(num_images, len(images))

    def outputs(feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        got = dict(zip(wanted, sess.run(wanted, feed)))
        return {
            t: 1.0 / (1.0 + np.exp(-got[t].astype(np.float64))) if logit else got[t].astype(np.float64)
            for tensors, logit in targets.values()
            for t in tensors
        }

    with progress_bar(n * (len(switches) + 1), "int8 sensitivity (each conv group alone int8)", unit="run") as advance:
        for i in range(n):
            off = {s: np.array(False) for s in switches.values()}
            x = images[i]
            ref = outputs({input_name: x, **off})
            advance(1)
            for kind, (tensors, _) in targets.items():
                den[kind] += sum(float((ref[t] ** 2).sum()) for t in tensors)
            for group, switch in switches.items():
                got = outputs({input_name: x, **off, switch: np.array(True)})
                for kind, (tensors, _) in targets.items():
                    num[group][kind] += sum(float(((got[t] - ref[t]) ** 2).sum()) for t in tensors)
                advance(1)
    scores: dict[str, dict[str, float]] = {}
    for group, parts in num.items():
        share = {kind: parts[kind] / den[kind] if den[kind] > 0 else 0.0 for kind in targets}
        scores[group] = {"score": sum(share.values()), **share}
    return scores


def fallback_order(groups: list[ConvGroup], scores: dict[str, float]) -> list[ConvGroup]:
    """Groups in the order they go back to float: the largest error at the outputs first (``scores``:
    group name -> score; unscored groups last, in graph order)."""
    return sorted(groups, key=lambda g: -scores.get(g.name, 0.0))


def fallback_steps(order: list[ConvGroup]) -> list[list[ConvGroup]]:
    """Cumulative float sets: the first 1, 2, 4, 8, ... groups of ``order``, then all of them."""
    steps, k = [], 1
    while True:
        steps.append(order[: min(k, len(order))])
        if k >= len(order):
            return steps
        k *= 2
