"""Intermediate tensors of two ONNX models that fcos-offline exported: where they start to differ.

The tap points are the outputs of every convolution of model A that model B computes under the
same tensor name (exports of one network keep their names through ONNX Runtime quantization and
convert): backbone convolutions, FPN lateral/output convolutions (one per level) and the head's
convolutions per FPN level (cls/reg/centerness maps included). Both models run with graph
optimisations off on the same preprocessed images; per tensor we report cosine similarity,
max/mean absolute error and relative error ``||a - b|| / ||a||``, in A's graph order, and name
the first tensor beyond tolerance (``|a - b| > atol + rtol * |a|`` anywhere).

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


def tap_points(model_a: Path, model_b: Path) -> tuple[list[tuple[str, str, str]], list[str]]:
    """(tensor, label, group) for every conv output of A that B also computes, in A's graph order;
    and the labels of A's conv outputs B does not compute under their names (fused or folded away)."""
    import onnx

    from fcos_offline.tune.quantize import conv_groups

    a = onnx.load(str(model_a), load_external_data=False)
    if not any(n.name.startswith("/network/") for n in a.graph.node):
        raise FcosError(f"{model_a}: --layers compares models exported by fcos-offline (this graph has none of its tensor names)")
    b_outputs = {o for n in onnx.load(str(model_b), load_external_data=False).graph.node for o in n.output}
    group_of = {out: g.name for g in conv_groups(model_a) for out in g.outputs}
    taps, untapped = [], []
    for node in a.graph.node:
        if node.op_type != "Conv" or node.output[0] not in group_of:
            continue
        level = _level(node.name)
        group = group_of[node.output[0]]
        label = group + (f" @P{3 + level}" if level is not None else "")
        if node.output[0] in b_outputs:
            taps.append((node.output[0], label, group))
        else:
            untapped.append(label)
    if not taps:
        raise FcosError(f"{model_b}: none of {model_a}'s convolution outputs are computed under the same names; not the same network")
    return taps, untapped


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
