"""Intermediate tensors of two ONNX models that fcos-offline exported: where they start to differ.

The tap points are the outputs of every convolution of one model that the other computes under
the same tensor name (exports of one network keep their names through ONNX Runtime quantization
and convert; of the two graphs, the one keeping more, so A and B may be given in either order):
backbone convolutions, FPN lateral/output convolutions (one per level) and the head's
convolutions per FPN level (cls/reg/centerness maps included). Both models run with graph
optimisations off on the same preprocessed images; per tensor we report cosine similarity,
max/mean absolute error and relative error ``||a - b|| / ||a||`` (A is the reference), in network
order, and name the first tensor beyond tolerance (``|a - b| > atol + rtol * |a|`` anywhere).

Per conv group (a module; the head's shared convs over all levels) the largest relative error is
the same signal ``tune`` uses to choose which layers to return to float
(:func:`fcos_offline.tune.quantize.conv_groups` names the groups).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fcos_offline.errors import FcosError

#: how many tapped tensors one extra session run fetches (bounds memory on big canvases)
TAPS_PER_RUN = 24


@dataclass
class TensorStat:
    """One tapped tensor, compared over the images."""

    tensor: str  # ONNX tensor name (the same in both models)
    label: str  # module and FPN level, e.g. "bbox_head.conv_cls @P4"
    group: str  # the conv group (module) it belongs to
    cosine: float = 1.0  # smallest over the images
    max_abs: float = 0.0
    mean_abs: float = 0.0  # mean over the images
    rel: float = 0.0  # largest over the images
    within: bool = True

    def to_dict(self) -> dict[str, Any]:
        """JSON view."""
        return asdict(self)


def _level(node_name: str) -> int | None:
    """The FPN level a head/neck conv node serves (``conv_cls_2`` -> 2, ``fpn_convs.3`` -> 3), None elsewhere."""
    if "/bbox_head/" in node_name:
        m = re.search(r"_(\d+)/Conv$", node_name)
        return int(m.group(1)) if m else 0
    m = re.search(r"/(?:fpn_convs|lateral_convs)\.(\d+)/", node_name)
    return int(m.group(1)) if m else None


def _conv_outputs(model: Path, graph: Any) -> list[tuple[str, str, str]]:
    """(tensor, label, group) of every convolution of ``graph`` in a conv group, in graph order."""
    from fcos_offline.tune.quantize import conv_groups

    group_of = {out: g.name for g in conv_groups(model) for out in g.outputs}
    convs = []
    for node in graph.node:
        if node.op_type == "Conv" and node.output[0] in group_of:
            level = _level(node.name)
            group = group_of[node.output[0]]
            convs.append((node.output[0], group + (f" @P{3 + level}" if level is not None else ""), group))
    return convs


def tap_points(model_a: Path, model_b: Path) -> tuple[list[tuple[str, str, str]], list[str]]:
    """(tensor, label, group) for every convolution output one model computes under its exported name and the
    other computes too; and the labels of those the other does not compute (fused or folded away).

    Symmetric: the convolutions are those of whichever graph keeps more of them under names both
    compute (the source graph, when the other is an optimised one: its fused convolutions have
    layout-specific names), in that graph's order; A's when both keep as many.
    """
    import onnx

    paths = (model_a, model_b)
    graphs = [onnx.load(str(m), load_external_data=False).graph for m in paths]
    for model, graph in zip(paths, graphs):
        if not any(n.name.startswith("/network/") for n in graph.node):
            raise FcosError(f"{model}: --layers compares models exported by fcos-offline (this graph has none of its tensor names)")
    computed = [{o for n in g.node for o in n.output} for g in graphs]
    convs = [_conv_outputs(m, g) for m, g in zip(paths, graphs)]
    shared = [[c for c in convs[i] if c[0] in computed[1 - i]] for i in (0, 1)]
    ref = 0 if len(shared[0]) >= len(shared[1]) else 1
    if not shared[ref]:
        raise FcosError(
            f"{model_b}: none of {model_a}'s convolution outputs are computed under the same names (nor the other way); not the same network"
        )
    return shared[ref], [label for t, label, _ in convs[ref] if t not in computed[1 - ref]]


def _session(model: Path, outputs: list[str]) -> Any:
    import onnx
    import onnxruntime as ort

    from fcos_offline.engine.backends.onnxruntime import optimization_level

    proto = onnx.load(str(model))
    have = {o.name for o in proto.graph.output}
    for name in outputs:
        if name not in have:
            proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    so = ort.SessionOptions()
    so.graph_optimization_level = optimization_level("disable")  # keep every tapped tensor as the graph computes it
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def compare_layers(
    model_a: Path, model_b: Path, batches: list[np.ndarray], atol: float = 1e-3, rtol: float = 1e-3
) -> tuple[list[TensorStat], list[str]]:
    """Every tap point of A and B compared on ``batches`` (each ``[b,3,H,W]`` at the models' batch size),
    and the convolutions of A that could not be compared (see :func:`tap_points`)."""
    taps, untapped = tap_points(model_a, model_b)
    stats = [TensorStat(t, label, group) for t, label, group in taps]
    for start in range(0, len(taps), TAPS_PER_RUN):
        chunk = stats[start : start + TAPS_PER_RUN]
        names = [s.tensor for s in chunk]
        sess_a, sess_b = _session(model_a, names), _session(model_b, names)
        feed_a, feed_b = sess_a.get_inputs()[0].name, sess_b.get_inputs()[0].name
        for batch in batches:
            out_a = sess_a.run(names, {feed_a: batch})
            out_b = sess_b.run(names, {feed_b: batch})
            for s, x, y in zip(chunk, out_a, out_b):
                x, y = np.asarray(x, np.float64).ravel(), np.asarray(y, np.float64).ravel()
                diff = np.abs(x - y)
                na, nb = float(np.linalg.norm(x)), float(np.linalg.norm(y))
                cos = float(np.dot(x, y) / (na * nb)) if na > 0 and nb > 0 else (1.0 if na == nb else 0.0)
                s.cosine = min(s.cosine, cos)
                s.max_abs = max(s.max_abs, float(diff.max()) if diff.size else 0.0)
                s.mean_abs += (float(diff.mean()) if diff.size else 0.0) / len(batches)
                s.rel = max(s.rel, float(np.linalg.norm(x - y)) / na if na > 0 else float(nb > 0))
                s.within = s.within and bool(np.all(diff <= atol + rtol * np.abs(x)))
        del sess_a, sess_b
    return stats, untapped


def first_divergence(stats: list[TensorStat]) -> TensorStat | None:
    """The first tensor, in network order, beyond tolerance."""
    return next((s for s in stats if not s.within), None)


def group_errors(stats: list[TensorStat]) -> dict[str, float]:
    """Largest relative error per conv group (module), the unit ``tune`` returns to float."""
    out: dict[str, float] = {}
    for s in stats:
        out[s.group] = max(out.get(s.group, 0.0), s.rel)
    return out
