"""OpenVINO backend: CPU by default (GPU where present); f32, bf16, f16 or the plugin's own choice."""

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
from fcos_offline.errors import FcosError, UsageError, first_line, require
from fcos_offline.io import atomic_write_json

if TYPE_CHECKING:
    from fcos_offline.model.checkpoint import ModelOverrides

NAME: str = "openvino"
EXTRA: str = "openvino"
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16", "auto")
CONVERT_PRECISIONS: tuple[str, ...] = ("fp32", "fp16")
CONVERT_FROM: str = "onnx"
MODEL_KINDS: tuple[str, ...] = ("onnx", "openvino-ir")
MODEL_SUFFIXES: tuple[str, ...] = (".xml", ".bin", ".meta.json")  # the IR, its weights, the ONNX metadata (save_ir)
_HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}


def available() -> bool:
    """Is openvino importable?"""
    return importlib.util.find_spec("openvino") is not None


def version() -> str:
    """OpenVINO's version."""
    ov = require("openvino", EXTRA)
    return str(ov.get_version())


def save_ir(model: Any, dst_xml: Path, metadata: dict[str, Any], compress_to_fp16: bool = False) -> Path:
    """Save an ``ov.Model`` as IR with the ONNX metadata beside it (``<name>.meta.json``)."""
    ov = require("openvino", EXTRA)
    dst_xml.parent.mkdir(parents=True, exist_ok=True)
    ov.save_model(model, str(dst_xml), compress_to_fp16=compress_to_fp16)
    atomic_write_json(dst_xml.with_suffix(".meta.json"), metadata)
    return dst_xml


def onnx_to_ir(src_onnx: Path, dst_xml: Path, compress_to_fp16: bool = False) -> Path:
    """The one ONNX -> OpenVINO IR conversion (reused when the IR exists)."""
    from fcos_offline.export.metadata import read_metadata

    if dst_xml.is_file() and dst_xml.with_suffix(".bin").is_file():
        return dst_xml
    ov = require("openvino", EXTRA)
    return save_ir(ov.convert_model(str(src_onnx)), dst_xml, read_metadata(src_onnx), compress_to_fp16)


def convert(source: Path, out: Path, request: ConvertRequest) -> Converted:
    """OpenVINO IR (``model.xml``/``.bin``) of the batch-fixed ONNX ``source``; ``fp16`` compresses the weights."""
    if request.precision not in CONVERT_PRECISIONS:
        raise UsageError("openvino IR is stored fp32 or fp16; bf16 is an execution precision (infer --precision bf16)")
    onnx_to_ir(source, out / "model.xml", compress_to_fp16=request.precision == "fp16")
    return Converted("model.xml")


def _shape(port: Any) -> list[Any] | None:
    """An OpenVINO port's shape as a list (ints, '?' for dynamic dimensions), None for a dynamic rank."""
    ps = port.get_partial_shape()
    return None if ps.rank.is_dynamic else [d.get_length() if d.is_static else "?" for d in ps]


class OpenVINOEngine(Engine):
    """A compiled OpenVINO model with one infer request."""

    name = NAME

    def __init__(self, source: ModelSource, config: EngineConfig) -> None:
        super().__init__(source, config)
        ov = require("openvino", EXTRA)
        if config.precision not in PRECISIONS:
            raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}")
        core = ov.Core()
        try:
            model = core.read_model(str(source.path))
        except Exception as exc:
            raise FcosError(f"{source.path}: OpenVINO cannot read the model ({first_line(exc)})") from None
        check_input(source.path, [(i.get_any_name(), i.get_element_type().is_real(), _shape(i)) for i in model.inputs])
        inp = model.inputs[0]
        fixed_batch, self.input_hw = static_dims(source.path, _shape(inp) or [])
        if fixed_batch is None:
            model.reshape({inp.get_any_name(): [config.batch_size, 3, *self.input_hw]})
        self.static_batch = fixed_batch or config.batch_size
        device = config.device.upper()
        if device not in core.available_devices and not device.startswith(("AUTO", "HETERO", "MULTI")):
            raise FcosError(f"OpenVINO device {device} not found (available: {', '.join(core.available_devices)})")
        props: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
        if config.precision in _HINTS:
            props["INFERENCE_PRECISION_HINT"] = _HINTS[config.precision]
        if config.threads:
            props["INFERENCE_NUM_THREADS"] = config.threads
        self.compiled: Any = core.compile_model(model, device, props)
        self.request: Any = self.compiled.create_infer_request()
        self.output_order = self._output_order(source)
        ov_type = self.compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
        self._actual = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}.get(ov_type, ov_type)

    def _output_order(self, source: ModelSource) -> list[int]:
        names = [set(o.get_names()) for o in self.compiled.outputs]
        if source.post_path is None:
            outputs = [
                ("dets" if "dets" in n else "labels" if "labels" in n else o.get_any_name(), o.get_element_type().is_real(), _shape(o))
                for o, n in zip(self.compiled.outputs, names)
            ]
            return detector_outputs(source.path, outputs)
        import onnx

        order: list[int] = []
        wanted = [i.name for i in onnx.load(str(source.post_path), load_external_data=False).graph.input]  # cls_0, reg_0[, ctr_0], …
        for w in wanted:
            hits = [i for i, n in enumerate(names) if w in n]
            order.append(hits[0] if hits else len(order))
        return order

    def _run(self, batch: np.ndarray) -> list[np.ndarray]:
        values = list(self.request.infer({0: batch}).values())
        return [np.asarray(values[i]) for i in self.output_order]

    def execution_precision(self) -> str:
        return self._actual

    def version(self) -> str:
        return version()

    def close(self) -> None:
        super().close()
        self.request = self.compiled = None


def load(source: ModelSource, config: EngineConfig, shape: tuple[int, int] | None = None, overrides: ModelOverrides | None = None) -> Engine:
    """An engine for an ONNX model or an OpenVINO IR."""
    return OpenVINOEngine(source, config)
