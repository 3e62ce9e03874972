"""Post-training int8 quantization of an exported detector with the engines' own tools.

* ONNX Runtime: ``onnxruntime.quantization.quantize_static`` (QDQ, per-channel weights, MinMax /
  Percentile / Entropy calibration), after ``quant_pre_process``.
* OpenVINO: ``nncf.quantize`` on the OpenVINO model (post-training quantization, fast bias
  correction).

Only the network is quantized: convolutions and the ops between them (ReLU, residual Add,
max-pool, FPN nearest up-sampling, the head's GroupNorm) under ``/network/``. The regression
``Scale``/``exp`` of the head and the whole post-processing graph (``/postprocess/``: sigmoid,
decode, top-k, NMS) stay in float by design. NNCF builds can keep the head's GroupNorm float
(``NncfConfig.norm_float``): by default NNCF rounds both its input (the conv output it normalises)
and its normalised output to int8.
Convolutions can additionally be returned to float by name (the tuner's accuracy fallback),
together with the Add / pooling / up-sampling / GroupNorm nodes they feed (else those nodes'
input quantizers keep the float conv's output in int8); shared head convolutions (one weight,
five FPN levels) form one *group*.

ONNX Runtime on x86 only fuses QDQ convolutions into its int8 kernels (QLinearConv) with uint8
activations (U8S8): with symmetric int8 activations (S8S8) the ReLU after a conv cannot be folded
into the activation quantizer, ``DequantizeLinear -> Conv -> Relu -> QuantizeLinear`` stays
unfused, and those convs run in float on weights dequantized at every call (slower than fp32).

Calibration uses real images through the same preprocessing as inference
(:func:`fcos_offline.data.preprocess.preprocess_image`), read lazily so hundreds of 800x1333
tensors never sit in memory at once.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fcos_offline.data.preprocess import preprocess_image, read_image
from fcos_offline.errors import FcosError, require
from fcos_offline.export.metadata import copy_metadata
from fcos_offline.model.heads.spec import SPECS

HEAD_FINAL = tuple(sorted({conv for spec in SPECS.values() for conv in spec.convs.values()}))
"""Every head family's prediction convolutions (logits, boxes, centerness): first to go back to float.
Their names differ by family (``conv_cls``, ``retina_cls``, ``atss_cls``…), so one list serves any model."""

ORT_OP_TYPES = ("Conv", "Relu", "Add", "MaxPool", "Resize")
"""Op types ONNX Runtime quantizes (QDQ around every conv boundary so its int8 kernels fuse)."""

CALIB_METHODS = ("minmax", "percentile", "entropy")

# What the head families keep in float by design (FCOS's per-level Scale, its Cast and exp; ATSS's Scale).
_HEAD_FLOAT_PATTERN = r"^/network/bbox_head/(" + "|".join(sorted({p for spec in SPECS.values() for p in spec.float_nodes})) + ")"
_HEAD_FLOAT_RE = re.compile(_HEAD_FLOAT_PATTERN)


# --------------------------------------------------------------------------- graph structure


@dataclass
class ConvGroup:
    """Convolutions of one module (the shared head convs run once per FPN level)."""

    name: str  # display name: the module path, e.g. "bbox_head.conv_cls" or "backbone.layer1.0.conv1"
    weight: str
    nodes: list[str] = field(default_factory=list)  # ONNX node names
    inputs: list[str] = field(default_factory=list)  # data input tensor per node
    outputs: list[str] = field(default_factory=list)  # output tensor per node

    @property
    def head_final(self) -> bool:
        """One of the head's prediction convolutions (``HeadSpec.convs`` of any family)?"""
        return any(self.name.endswith("." + h) or self.name == h for h in HEAD_FINAL)


def _module_name(node_name: str, weight: str) -> str:
    """A readable group name: ``bbox_head.conv_cls``, ``backbone.layer1.0.conv1`` (level suffixes dropped)."""
    if weight.startswith("network.") and weight.endswith(".weight"):
        return weight[len("network.") : -len(".weight")]
    parts = [re.sub(r"_\d+$", "", p) for p in node_name.split("/") if p][:-1]
    if parts and parts[0] == "network":
        parts = parts[1:]
    out = [p for i, p in enumerate(parts) if not (i + 1 < len(parts) and parts[i + 1].startswith(p + "."))]
    return ".".join(out) or node_name


def is_network_node(name: str) -> bool:
    """Part of the quantizable network (not post-processing, not the head's exp/scale)?"""
    return name.startswith("/network/") and not _HEAD_FLOAT_RE.match(name)


def conv_groups(model_path: str | os.PathLike) -> list[ConvGroup]:
    """The network's convolutions grouped by module, in graph order (models we did not export: one per Conv)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    ours = any(n.name.startswith("/network/") for n in model.graph.node)
    groups: dict[str, ConvGroup] = {}
    for node in model.graph.node:
        if node.op_type != "Conv" or (ours and not is_network_node(node.name)):
            continue
        weight = node.input[1]
        name = _module_name(node.name, weight) if ours else node.name
        g = groups.get(name)  # by module: shared head convs (also after ORT folds each level's Scale into them)
        if g is None:
            g = groups[name] = ConvGroup(name, weight)
        g.nodes.append(node.name)
        g.inputs.append(node.input[0])
        g.outputs.append(node.output[0])
    return list(groups.values())


def float_by_design(model_path: str | os.PathLike) -> dict[str, Any]:
    """What stays float whatever the fallback does (for the report)."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    post = [n for n in model.graph.node if n.name.startswith("/postprocess/")]
    head = [n.name for n in model.graph.node if _HEAD_FLOAT_RE.match(n.name)]
    ops = sorted({n.op_type for n in post})
    return {
        "postprocess_nodes": len(post),
        "postprocess_ops": ops,
        "head_nodes": head,
        "summary": f"/postprocess/* ({len(post)} nodes: sigmoid, decode, top-k, NMS) and the head's Scale/exp "
        f"({len(head)} nodes) always run in float",
    }


# --------------------------------------------------------------------------- calibration data


class ImageTensors:
    """Preprocessed images, read lazily: ``len()``, indexing and iteration give ``[1,3,H,W]`` float32."""

    def __init__(self, paths: Sequence[str | os.PathLike], canvas_hw: tuple[int, int]) -> None:
        if not paths:
            raise FcosError("no calibration images")
        self.paths = [str(p) for p in paths]
        self.canvas_hw = (int(canvas_hw[0]), int(canvas_hw[1]))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        tensor, _ = preprocess_image(read_image(self.paths[i]), *self.canvas_hw)
        return tensor[None]

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]


class _OrtReader:
    """``CalibrationDataReader`` over :class:`ImageTensors` with ``set_range`` (strided calibration)."""

    def __init__(self, images: ImageTensors, input_name: str) -> None:
        self.images = images
        self.input_name = input_name
        self.start, self.end, self.pos = 0, len(images), 0

    def __len__(self) -> int:
        return len(self.images)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.start, self.end, self.pos = start_index, min(end_index, len(self.images)), start_index

    def get_next(self):
        if self.pos >= self.end:
            return None
        item = {self.input_name: self.images[self.pos]}
        self.pos += 1
        return item

    def rewind(self) -> None:
        self.pos = self.start


def _stride(n: int, canvas_hw: tuple[int, int]) -> int:
    """Images per calibration pass: bounded memory (all intermediate tensors are held per pass)."""
    cap = max(1, min(16, int(2.5e6 // max(1, canvas_hw[0] * canvas_hw[1]))))
    return max(d for d in range(1, min(cap, n) + 1) if n % d == 0)


# --------------------------------------------------------------------------- ONNX Runtime


@dataclass
class OrtQuantConfig:
    """How ``quantize_static`` is called."""

    method: str = "minmax"  # minmax | percentile | entropy
    activation_type: str = "s8"  # s8 | u8
    weight_type: str = "s8"
    per_channel: bool = True
    op_types: tuple[str, ...] = ORT_OP_TYPES
    quant_format: str = "qdq"  # qdq | qoperator
    activation_symmetric: bool | None = None  # None: symmetric for s8, asymmetric for u8
    norm_float: bool = False  # GroupNorm's affine unquantized (its normalised output float; see onnx_groupnorm_affine)

    def tag(self) -> str:
        """Short stable id, e.g. ``s8s8-minmax-pc``."""
        t = f"{self.activation_type}{self.weight_type}-{self.method}" + ("-pc" if self.per_channel else "-pt")
        if self.quant_format != "qdq":
            t += "-qop"
        if self.norm_float:
            t += "-gn"
        if tuple(self.op_types) != ORT_OP_TYPES:
            t += "-" + "+".join(o.lower() for o in self.op_types)
        return t


def onnx_groupnorm_affine(model: Any) -> list[str]:
    """The Mul / Add of each GroupNorm's affine in an ONNX graph (InstanceNormalization, Reshape, then
    Mul by gamma and Add of beta; or a GroupNormalization op's consumers through a Reshape).

    Left out of ONNX Runtime's quantization they keep the GroupNorm's normalised output float; its
    input stays int8, because ONNX Runtime's int8 conv kernel writes an int8 output (README: Tuning).
    """
    consumers: dict[str, list[Any]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    names: list[str] = []
    for norm in (n for n in model.graph.node if n.op_type in ("InstanceNormalization", "GroupNormalization")):
        todo = list(consumers.get(norm.output[0], []))
        while todo:
            node = todo.pop()
            if node.op_type in ("Mul", "Add"):
                names.append(node.name)
            if node.op_type in ("Reshape", "Mul"):
                todo += consumers.get(node.output[0], [])
    return list(dict.fromkeys(names))


def preprocess_for_ort(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """``quant_pre_process`` (shape inference + ORT's basic graph optimisation); a plain copy if it fails."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    dst = Path(dst)
    if dst.is_file():
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".part")
    try:
        quant_pre_process(str(src), str(tmp), skip_symbolic_shape=True)
        os.replace(tmp, dst)
    except Exception as exc:
        logging.getLogger(__name__).info("quant_pre_process failed (%s); quantizing the model as exported", exc)
        tmp.unlink(missing_ok=True)
        shutil.copy(src, dst)
    return dst


def ort_quantize(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    images: ImageTensors,
    config: OrtQuantConfig,
    float_nodes: Iterable[str] = (),
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Quantize ``src`` with ``quantize_static`` into ``dst``; nodes named in ``float_nodes`` stay float.

    Calibration ranges are cached in ``cache_dir`` (per method and op types), so returning nodes to
    float or switching the integer types does not re-run calibration.
    """
    import onnx
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    src, dst = Path(src), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(src))
    excluded = set(float_nodes)
    # the Add / pooling / up-sampling nodes a float conv feeds go float too (else its output stays int8)
    float_outputs = {n.output[0] for n in model.graph.node if n.name in excluded}
    excluded |= {n.name for n in model.graph.node if n.op_type in ("Add", "MaxPool", "Resize", "Relu") and any(i in float_outputs for i in n.input)}
    if config.norm_float:
        excluded |= set(onnx_groupnorm_affine(model))
    ours = any(n.name.startswith("/network/") for n in model.graph.node)
    nodes = [n.name for n in model.graph.node if n.op_type in config.op_types and n.name not in excluded and (not ours or is_network_node(n.name))]
    qtypes = {"s8": QuantType.QInt8, "u8": QuantType.QUInt8}
    methods = {"minmax": CalibrationMethod.MinMax, "percentile": CalibrationMethod.Percentile, "entropy": CalibrationMethod.Entropy}
    if config.method not in methods:
        raise FcosError(f"unknown calibration method {config.method!r} (choose from {', '.join(CALIB_METHODS)})")
    symmetric = config.activation_type == "s8" if config.activation_symmetric is None else config.activation_symmetric
    extra: dict[str, Any] = {
        "ActivationSymmetric": symmetric,
        "CalibStridedMinMax": _stride(len(images), images.canvas_hw),
    }
    cache = None
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        ops = "+".join(sorted(config.op_types))
        cache = Path(cache_dir) / f"ort_ranges_{config.method}_{ops}_{len(images)}.json"
    reader = _OrtReader(images, model.graph.input[0].name)
    del model
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_static logs its advice through the root logger
    try:
        quantize_static(
            str(src),
            str(dst),
            reader,
            quant_format=QuantFormat.QDQ if config.quant_format == "qdq" else QuantFormat.QOperator,
            op_types_to_quantize=list(config.op_types),
            per_channel=config.per_channel,
            activation_type=qtypes[config.activation_type],
            weight_type=qtypes[config.weight_type],
            nodes_to_quantize=nodes,
            calibrate_method=methods[config.method],
            extra_options=extra,
            calibration_cache_path=cache,
        )
    finally:
        root.setLevel(level)
    copy_metadata(src, dst)
    return dst


# --------------------------------------------------------------------------- OpenVINO / NNCF


@dataclass
class NncfConfig:
    """How ``nncf.quantize`` is called."""

    preset: str = "performance"  # performance (symmetric) | mixed (asymmetric activations)
    fast_bias_correction: bool = True
    subset_size: int | None = None  # None: every calibration image
    activation_ranges: str = "mean_minmax"  # NNCF's default (per-image min/max averaged) | minmax (global, like ORT's MinMax)
    overflow_fix: bool = True  # NNCF's default: the first conv's weights in 7 bits; off for CPUs with VNNI (see vnni_cpu)
    norm_float: bool = False  # GroupNorm runs in float: its input and its normalised output unquantized (NNCF's default: int8)

    def tag(self) -> str:
        """Short stable id, e.g. ``nncf-performance``."""
        return (
            f"nncf-{self.preset}"
            + ("" if self.fast_bias_correction else "-bc")
            + ("-mm" if self.activation_ranges == "minmax" else "")
            + ("" if self.overflow_fix else "-vnni")
            + ("-gn" if self.norm_float else "")
        )


#: the CPU flags of an int8 dot product without the int16 intermediate that can saturate (VNNI, AMX)
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def vnni_cpu(features: Iterable[str]) -> bool:
    """Does a CPU with these flags run int8 convolutions without the saturation NNCF's overflow fix works around?

    Without VNNI, x86 int8 kernels add pairs of u8 x s8 products in 16 bits, which can saturate;
    NNCF therefore quantizes the first conv's weights to 7 bits by default (its ``overflow_fix``).
    OpenVINO's documentation: the problem does not occur on CPUs with VNNI and later (README: Tuning
    has what 8 bits changed on the demo model).
    """
    return any(f in VNNI_FLAGS for f in features)


_OV_FOLLOWERS = ("Add", "Interpolate", "MaxPool", "Concat")
#: OpenVINO's GroupNorm: the exported Reshape -> InstanceNormalization -> Reshape becomes an MVN
_OV_NORM_TYPES = ("MVN", "GroupNormalization")


def _ov_consumers(node) -> list:
    """The OpenVINO nodes reading ``node``'s first output."""
    return [t.get_node() for t in node.output(0).get_target_inputs()]


def _ov_reach(op, through) -> list:
    """The nodes downstream of ``op``: its consumers, and on through every node ``through(node)`` accepts."""
    outs, seen = _ov_consumers(op), 0
    while seen < len(outs):
        if through(outs[seen]):
            outs += _ov_consumers(outs[seen])
        seen += 1
    return outs


def _reshape_to_norm(node) -> bool:
    """A Reshape in front of a GroupNorm (the exported GroupNorm groups channels before its MVN)?"""
    return node.get_type_name() == "Reshape" and any(c.get_type_name() in _OV_NORM_TYPES for c in _ov_consumers(node))


def _ov_groupnorm_names(model) -> list[str]:
    """Every GroupNorm of an OpenVINO model: the MVN (or GroupNormalization) and, through the Reshape
    after it, the Multiply / Add of its affine, whose input quantizer rounds the normalised output.
    (Any MVN counts: an instance or layer norm would stay float too; FCOS has none.)"""
    names: list[str] = []
    for op in model.get_ordered_ops():
        if op.get_type_name() not in _OV_NORM_TYPES:
            continue
        names.append(op.get_friendly_name())
        affine = _ov_reach(op, lambda n: n.get_type_name() in ("Reshape", "Multiply"))
        names += [n.get_friendly_name() for n in affine if n.get_type_name() in ("Multiply", "Add")]
    return list(dict.fromkeys(names))


def _ov_ignored_names(model, onnx_nodes: Iterable[str]) -> list[str]:
    """OpenVINO op names of ONNX conv nodes (a biased Conv is ``<name>/WithoutBiases`` + an Add
    called ``<name>``) plus the element-wise / pooling / up-sampling / GroupNorm ops they feed (a
    GroupNorm through its Reshape), whose input quantizers would otherwise keep the float conv's
    output in int8."""
    wanted = set(onnx_nodes)
    names: list[str] = []
    for op in model.get_ordered_ops():
        name = op.get_friendly_name()
        base = name.removesuffix("/WithoutBiases")
        if base not in wanted or op.get_type_name() not in ("Convolution", "GroupConvolution"):
            continue
        names.append(name)
        # through the conv's bias Add and GroupNorm's Reshape to the real consumers
        outs = _ov_reach(op, lambda n, base=base: (n.get_type_name() == "Add" and n.get_friendly_name() == base) or _reshape_to_norm(n))
        names += [n.get_friendly_name() for n in outs if n.get_type_name() in (*_OV_FOLLOWERS, *_OV_NORM_TYPES) and n.get_friendly_name() != base]
    return list(dict.fromkeys(names))


def nncf_quantize(
    src_onnx: str | os.PathLike,
    dst_xml: str | os.PathLike,
    images: ImageTensors,
    config: NncfConfig,
    float_nodes: Iterable[str] = (),
) -> Path:
    """``nncf.quantize`` of the OpenVINO model; ``float_nodes`` (ONNX conv names) stay float."""
    ov = require("openvino", "openvino")
    nncf = require("nncf", "tune")
    from fcos_offline.engine.backends.openvino import save_ir
    from fcos_offline.export.metadata import read_metadata

    nncf.set_log_level(logging.ERROR)
    dst = Path(dst_xml)
    dst.parent.mkdir(parents=True, exist_ok=True)
    model = ov.convert_model(str(src_onnx))
    float_nodes = list(float_nodes)
    ignored = nncf.IgnoredScope(
        patterns=[r"^/postprocess/.*", _HEAD_FLOAT_PATTERN + ".*"],
        names=_ov_ignored_names(model, float_nodes) + (_ov_groupnorm_names(model) if config.norm_float else []),
        validate=False,
    )
    preset = {"performance": nncf.QuantizationPreset.PERFORMANCE, "mixed": nncf.QuantizationPreset.MIXED}[config.preset]
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    advanced = AdvancedQuantizationParameters()
    if config.activation_ranges == "minmax":
        # the global min/max over all calibration images: NNCF's default averages per-image extremes,
        # which clips the large activations box regression relies on
        advanced.activations_range_estimator_params = RangeEstimatorParametersSet.MINMAX
    if not config.overflow_fix:
        advanced.overflow_fix = nncf.OverflowFix.DISABLE  # every weight in 8 bits (VNNI / AMX CPUs: vnni_cpu)
    quantized = nncf.quantize(
        model,
        nncf.Dataset(images),
        preset=preset,
        target_device=nncf.TargetDevice.CPU,
        subset_size=min(len(images), config.subset_size or len(images)),
        fast_bias_correction=config.fast_bias_correction,
        ignored_scope=ignored,
        advanced_parameters=advanced,
    )
    return save_ir(quantized, dst, read_metadata(Path(src_onnx)))  # FakeQuantize weights are stored as int8
