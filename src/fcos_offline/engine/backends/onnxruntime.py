"""ONNX Runtime backend: CPU execution provider by default; CUDA / TensorRT / CANN providers where installed."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fcos_offline.engine.base import (
    Converted,
    ConvertRequest,
    Engine,
    EngineConfig,
    ModelSource,
    check_input,
    detector_outputs,
    static_dims,
)
from fcos_offline.errors import FcosError, MissingExtraError, UsageError, first_line
from fcos_offline.progress import info

if TYPE_CHECKING:
    from fcos_offline.model.checkpoint import ModelOverrides

NAME: str = "onnxruntime"
EXTRA: str = "gpu"  # the CPU build is a core dependency; [gpu] adds onnxruntime-gpu's providers
PRECISIONS: tuple[str, ...] = ("fp32", "auto")
CONVERT_PRECISIONS: tuple[str, ...] = ("fp32",)
CONVERT_FROM: str = "onnx"
MODEL_KINDS: tuple[str, ...] = ("onnx",)
MODEL_SUFFIXES: tuple[str, ...] = (".onnx",)
ORT_OPT_LEVELS = ("disable", "basic", "extended", "all")
#: device -> execution providers, most wanted first (and the extra that provides the first)
DEVICES: dict[str, tuple[list[str], str]] = {
    "cpu": (["CPUExecutionProvider"], "onnxruntime"),
    "cuda": (["CUDAExecutionProvider", "CPUExecutionProvider"], "gpu"),
    "tensorrt": (["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], "gpu"),
    "cann": (["CANNExecutionProvider", "CPUExecutionProvider"], "cann"),
}


def available() -> bool:
    """Is onnxruntime importable?"""
    return importlib.util.find_spec("onnxruntime") is not None


def version() -> str:
    """onnxruntime's version."""
    import onnxruntime as ort

    return str(ort.__version__)


def optimization_level(name: str) -> Any:
    """``disable|basic|extended|all`` -> ``ort.GraphOptimizationLevel``."""
    import onnxruntime as ort

    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if name not in levels:
        raise UsageError(f"onnxruntime optimisation level must be one of {', '.join(levels)}, got {name!r}")
    return levels[name]


def convert(source: Path, out: Path, request: ConvertRequest) -> Converted:
    """Apply the graph optimisations offline to the batch-fixed ONNX ``source`` and save ``model.onnx`` (metadata kept)."""
    import onnxruntime as ort

    from fcos_offline.export.metadata import copy_metadata

    if request.precision != "fp32":
        raise UsageError("onnxruntime artifacts are fp32; use 'fcos-offline tune' for int8")
    so = ort.SessionOptions()
    so.graph_optimization_level = optimization_level(request.opt_level)
    so.optimized_model_filepath = str(out / "model.onnx")
    so.log_severity_level = 3  # its own multi-line colour warning about hardware-specific layouts: said below in one line
    ort.InferenceSession(str(source), so, providers=["CPUExecutionProvider"])
    if request.opt_level == "all":
        info("ONNX Runtime's 'all' optimisations lay the graph out for this CPU's instruction set: run this artifact on this machine class")
    copy_metadata(source, out / "model.onnx")
    return Converted("model.onnx")


class OnnxRuntimeEngine(Engine):
    """An ``ort.InferenceSession`` over an ONNX detector (or a raw head + its post graph)."""

    name = NAME

    def __init__(self, source: ModelSource, config: EngineConfig) -> None:
        super().__init__(source, config)
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = optimization_level(config.ort_opt_level)
        if config.threads:
            so.intra_op_num_threads = config.threads
        if config.inter_op_threads:
            so.inter_op_num_threads = config.inter_op_threads
            so.execution_mode = ort.ExecutionMode.ORT_PARALLEL
        if config.device.lower() not in DEVICES:
            raise UsageError(f"onnxruntime device must be one of {', '.join(DEVICES)}, got {config.device!r}")
        wanted, extra = DEVICES[config.device.lower()]
        if wanted[0] not in ort.get_available_providers():
            raise MissingExtraError(f"onnxruntime {wanted[0]}", extra)
        if config.precision not in PRECISIONS:
            raise UsageError("onnxruntime runs the model in its own precision; quantize with 'fcos-offline tune' instead of --precision")
        try:
            self.session: Any = ort.InferenceSession(str(source.path), so, providers=wanted)
        except Exception as exc:
            raise FcosError(f"{source.path}: ONNX Runtime cannot load the model ({first_line(exc)})") from None
        inputs = self.session.get_inputs()
        check_input(source.path, [(i.name, i.type == "tensor(float)", i.shape) for i in inputs])
        self.input_name = inputs[0].name
        self.static_batch, self.input_hw = static_dims(source.path, inputs[0].shape)
        self.output_order: list[int] | None = None  # raw outputs of a --no-nms export go to the post graph as they are
        if source.post_path is None:
            floats = ("tensor(float)", "tensor(float16)", "tensor(double)")
            self.output_order = detector_outputs(source.path, [(o.name, o.type in floats, o.shape) for o in self.session.get_outputs()])

    def _run(self, batch: np.ndarray) -> list[np.ndarray]:
        outputs = self.session.run(None, {self.input_name: batch})
        return outputs if self.output_order is None else [outputs[i] for i in self.output_order]

    def version(self) -> str:
        return version()

    def close(self) -> None:
        super().close()
        self.session = None


def load(source: ModelSource, config: EngineConfig, shape: tuple[int, int] | None = None, overrides: ModelOverrides | None = None) -> Engine:
    """An engine for an ONNX model."""
    return OnnxRuntimeEngine(source, config)
