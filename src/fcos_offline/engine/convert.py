"""``convert`` (the recipe's ATC step): ONNX -> an engine artifact for a fixed batch and shape.

An artifact is a folder holding the engine's model file and ``artifact.json`` (engine, batch
size, input shape, precision, source); ``infer --model FOLDER`` accepts it like an ONNX file.

* ``onnxruntime``: batch fixed, graph optimisations applied offline and saved (``model.onnx``).
* ``openvino``: OpenVINO IR (``model.xml``/``.bin``) reshaped to the fixed batch; ``fp16``
  compresses the weights.

TensorRT runs through ONNX Runtime's TensorRT execution provider (``infer --engine onnxruntime
--device tensorrt`` with ``onnxruntime-gpu``), which builds and caches its engine itself.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from fcos_offline.errors import FcosError, UsageError, require
from fcos_offline.export.metadata import copy_metadata, read_metadata


def _fix_batch(model, batch_size: int):
    """Give every graph input/output a fixed leading (batch) dimension."""
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = batch_size
    return model


def convert(model: str | Path, engine: str, output: str | Path, batch_size: int = 1, precision: str = "fp32",
            opt_level: str = "all") -> dict[str, Any]:
    """Convert an ONNX file into an artifact folder; returns the artifact description."""
    import onnx

    src = Path(model)
    if batch_size < 1:
        raise UsageError("--batch-size must be >= 1")
    if not src.is_file() or src.suffix.lower() != ".onnx":
        raise FcosError(f"{src}: convert takes an exported .onnx file")
    try:
        metadata = read_metadata(src)
        proto = onnx.load(str(src))
    except Exception as exc:  # noqa: BLE001 - onnx raises several types for bad files
        raise FcosError(f"{src}: not a readable ONNX file ({str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__})") from None
    if len(proto.graph.input) != 1 or len(proto.graph.input[0].type.tensor_type.shape.dim) != 4:
        raise FcosError(f"{src}: not an FCOS model: it has {len(proto.graph.input)} inputs, expected one image batch [B,3,H,W]")
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    if batch_dim.HasField("dim_value") and batch_dim.dim_value != batch_size:
        raise UsageError(f"{src} has a fixed batch of {batch_dim.dim_value}; export with --dynamic-export to convert to batch {batch_size}")
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    fixed = out / "fixed.onnx"
    onnx.save(_fix_batch(proto, batch_size), str(fixed))
    post_file = None
    if metadata.get("nms_in_graph") is False:
        post_src = src.with_name(src.name[: -len(".onnx")] + ".post.onnx")
        if not post_src.is_file():
            raise FcosError(f"{src} was exported with --no-nms but {post_src} is missing")
        post_file = "model.post.onnx"
        shutil.copy(post_src, out / post_file)
    if engine == "onnxruntime":
        import onnxruntime as ort

        if precision != "fp32":
            raise UsageError("onnxruntime artifacts are fp32; use 'fcos-offline tune' for int8")
        so = ort.SessionOptions()
        so.graph_optimization_level = {
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }[opt_level]
        so.optimized_model_filepath = str(out / "model.onnx")
        ort.InferenceSession(str(fixed), so, providers=["CPUExecutionProvider"])
        model_file, version = "model.onnx", ort.__version__
        copy_metadata(src, out / model_file)
    elif engine == "openvino":
        ov = require("openvino", "openvino")
        if precision not in ("fp32", "fp16"):
            raise UsageError("openvino IR is stored fp32 or fp16; bf16 is an execution precision (infer --precision bf16)")
        ov_model = ov.convert_model(str(fixed))
        ov.save_model(ov_model, str(out / "model.xml"), compress_to_fp16=precision == "fp16")
        (out / "model.meta.json").write_text(json.dumps(metadata))
        model_file, version = "model.xml", ov.get_version()
    else:
        raise UsageError(f"unknown engine {engine!r} (choose onnxruntime or openvino)")
    fixed.unlink()
    shape = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    artifact = {
        "engine": engine, "engine_version": version, "batch_size": batch_size, "input_shape": shape,
        "precision": precision, "source": str(src), "model_file": model_file, "post_file": post_file,
    }
    (out / "artifact.json").write_text(json.dumps(artifact, indent=2))
    return artifact
