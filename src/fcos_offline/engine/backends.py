"""One small engine interface and its implementations: ONNX Runtime, OpenVINO, PyTorch eager.

An engine loads a model, runs a batch ``[b,3,H,W]`` float32 of preprocessed images and returns
``(dets [b,100,5] float32, labels [b,100] int64)``; it describes itself for reports. A
static-batch model is fed padded batches and the padding is dropped. Models exported with
``--no-nms`` run their ``<name>.post.onnx`` post-processing graph in ONNX Runtime afterwards.

Model sources: an ``.onnx`` file, an OpenVINO ``.xml`` IR, a ``convert`` artifact folder (with
``artifact.json``), or, for the ``torch`` engine (the "online" baseline), a checkpoint.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from fcos_offline.errors import FcosError, MissingExtraError, UsageError, require

ENGINES = ("onnxruntime", "openvino", "torch")
PRECISIONS = ("fp32", "bf16", "fp16", "auto")


@dataclass
class EngineOptions:
    """How to run a model: engine, device, threads, precision (plain options)."""

    engine: str = "onnxruntime"
    device: str = "cpu"
    threads: int | None = None
    precision: str = "fp32"
    batch_size: int = 1
    ort_opt_level: str = "all"
    inter_op_threads: int | None = None


@dataclass
class ModelSource:
    """Where the model comes from, resolved from a path."""

    path: Path
    kind: str  # "onnx", "openvino-ir", "checkpoint"
    post_path: Path | None
    artifact: dict[str, Any]
    metadata: dict[str, Any]


def resolve_model(path: str | os.PathLike) -> ModelSource:
    """Resolve ``--model`` (ONNX file, OpenVINO .xml, artifact folder or checkpoint)."""
    p = Path(path)
    artifact: dict[str, Any] = {}
    if p.is_dir():
        info = p / "artifact.json"
        if not info.is_file():
            raise FcosError(f"{p}: a model folder needs an artifact.json (made by 'fcos-offline convert')")
        artifact = json.loads(info.read_text())
        p = p / artifact["model_file"]
    if not p.is_file():
        raise FcosError(f"{p}: no such model file")
    suffix = p.suffix.lower()
    if suffix in (".pth", ".pt", ".ckpt"):
        return ModelSource(p, "checkpoint", None, artifact, {})
    if suffix == ".xml":
        kind = "openvino-ir"
        onnx_meta_file = p.with_suffix(".meta.json")
        metadata = json.loads(onnx_meta_file.read_text()) if onnx_meta_file.is_file() else {}
    elif suffix == ".onnx":
        from fcos_offline.export.metadata import read_metadata

        kind = "onnx"
        try:
            metadata = read_metadata(p)
        except Exception as exc:  # noqa: BLE001 - onnx raises several types for bad files
            raise FcosError(f"{p}: not a readable ONNX file ({str(exc).splitlines()[0][:160]})") from None
    else:
        raise FcosError(f"{p}: unknown model type '{suffix}' (expected .onnx, .xml, a convert folder or a .pth)")
    post = None
    if metadata.get("nms_in_graph") is False:
        post = Path(artifact.get("post_file", "")) if artifact.get("post_file") else None
        post = (p.parent / post.name) if post else p.with_name(p.name.replace(".onnx", "").replace(".xml", "") + ".post.onnx")
        if not post.is_file():
            raise FcosError(f"{p} was exported with --no-nms but its post-processing graph {post} is missing")
    return ModelSource(p, kind, post, artifact, metadata)


class Engine:
    """Base class: subclasses set ``input_hw``/``static_batch`` and implement ``_run``."""

    name = "engine"
    input_hw: tuple[int, int]
    static_batch: int | None = None

    def __init__(self, source: ModelSource, options: EngineOptions) -> None:
        self.source = source
        self.options = options
        self._post = None
        if source.post_path is not None:
            import onnxruntime as ort

            self._post = ort.InferenceSession(str(source.post_path), providers=["CPUExecutionProvider"])

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``batch [b,3,H,W]`` -> (dets ``[b,K,5]``, labels ``[b,K]``); pads static batches."""
        b = batch.shape[0]
        if batch.shape[2:] != self.input_hw:
            raise FcosError(f"input is {batch.shape[2]}x{batch.shape[3]} but the model takes {self.input_hw[0]}x{self.input_hw[1]}")
        if self.static_batch is None or b == self.static_batch:
            return self._finish(self._run(np.ascontiguousarray(batch, dtype=np.float32)))
        dets, labels = [], []
        for start in range(0, b, self.static_batch):
            chunk = batch[start : start + self.static_batch]
            n = chunk.shape[0]
            if n < self.static_batch:
                chunk = np.concatenate([chunk, np.zeros((self.static_batch - n, *chunk.shape[1:]), np.float32)])
            d, lab = self._finish(self._run(np.ascontiguousarray(chunk, dtype=np.float32)))
            dets.append(d[:n])
            labels.append(lab[:n])
        return np.concatenate(dets), np.concatenate(labels)

    def _finish(self, outputs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        if self._post is not None:
            feeds = {i.name: o for i, o in zip(self._post.get_inputs(), outputs)}
            outputs = self._post.run(None, feeds)
        dets, labels = outputs[0], outputs[1]
        return np.asarray(dets, np.float32), np.asarray(labels, np.int64)

    def _run(self, batch: np.ndarray) -> list[np.ndarray]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Engine name, version, device, precision, threads, batch and model path."""
        return {
            "engine": self.name, "version": self.version(), "device": self.options.device,
            "precision": self.options.precision, "threads": self.options.threads,
            "batch_size": self.options.batch_size, "static_batch": self.static_batch,
            "input_hw": list(self.input_hw), "model": str(self.source.path),
        }

    def version(self) -> str:
        """The engine library's version."""
        return "?"


def _check_input(path: Path, inputs: list[tuple[str, bool, list[Any] | None]]) -> None:
    """One float input of rank 4 (``[B,3,H,W]``), whatever its name; a clear error otherwise."""
    desc = ", ".join(f"{n} {'float' if f else 'non-float'} {s}" for n, f, s in inputs)
    if len(inputs) != 1:
        raise FcosError(f"{path}: the model takes {len(inputs)} inputs ({desc}); an FCOS detector takes one image batch [B,3,H,W]")
    _, is_float, shape = inputs[0]
    if not is_float or shape is None or len(shape) != 4 or (isinstance(shape[1], int) and shape[1] != 3):
        raise FcosError(f"{path}: the model input is {desc}; an FCOS detector takes float [B,3,H,W]")


def detector_outputs(path: Path, outputs: list[tuple[str, bool, list[Any] | None]]) -> list[int]:
    """Positions of (dets, labels) among a model's outputs ``[(name, is_float, shape)]``.

    By name when the outputs are called ``dets`` and ``labels`` (our exports); otherwise by type,
    whatever the names and order: exactly two outputs, one float of rank 3 whose last dimension is
    5 (or unknown) and one integer of rank 2. Anything else is not a detector we can read.
    """
    names = [o[0] for o in outputs]
    if "dets" in names and "labels" in names:
        return [names.index("dets"), names.index("labels")]

    def fits(shape, rank: int, last: int | None) -> bool:
        return shape is None or (len(shape) == rank and (last is None or not isinstance(shape[-1], int) or shape[-1] == last))

    dets = [i for i, (_, f, s) in enumerate(outputs) if f and fits(s, 3, 5)]
    labels = [i for i, (_, f, s) in enumerate(outputs) if not f and fits(s, 2, None)]
    if len(outputs) == 2 and len(dets) == 1 and len(labels) == 1:
        return [dets[0], labels[0]]
    desc = ", ".join(f"{n} {'float' if f else 'int'} {s}" for n, f, s in outputs)
    raise FcosError(
        f"{path}: the model's outputs ({desc}) are not an FCOS detector's: expected 'dets' float [B,K,5] and "
        "'labels' int [B,K] (by these names, or any two outputs of those types)"
    )


def _static_dims(shape: list[Any]) -> tuple[int | None, tuple[int, int]]:
    batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
    if not (isinstance(shape[2], int) and isinstance(shape[3], int)):
        raise FcosError(f"model input must have a fixed height and width, got shape {shape}")
    return batch, (shape[2], shape[3])


class OnnxRuntimeEngine(Engine):
    """ONNX Runtime: CPU EP by default; CUDA / TensorRT EPs when onnxruntime-gpu provides them."""

    name = "onnxruntime"

    def __init__(self, source: ModelSource, options: EngineOptions) -> None:
        super().__init__(source, options)
        import onnxruntime as ort

        so = ort.SessionOptions()
        levels = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL, "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }
        so.graph_optimization_level = levels[options.ort_opt_level]
        if options.threads:
            so.intra_op_num_threads = options.threads
        if options.inter_op_threads:
            so.inter_op_num_threads = options.inter_op_threads
            so.execution_mode = ort.ExecutionMode.ORT_PARALLEL
        wanted = {
            "cpu": ["CPUExecutionProvider"],
            "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
            "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
        }.get(options.device.lower())
        if wanted is None:
            raise UsageError(f"onnxruntime device must be cpu, cuda or tensorrt, got {options.device!r}")
        if wanted[0] not in ort.get_available_providers():
            raise MissingExtraError(f"onnxruntime {wanted[0]}", "gpu")
        if options.precision not in ("fp32", "auto"):
            raise UsageError("onnxruntime runs the model in its own precision; quantize with 'fcos-offline tune' instead of --precision")
        try:
            self.session = ort.InferenceSession(str(source.path), so, providers=wanted)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types (Fail, InvalidGraph…)
            raise FcosError(f"{source.path}: ONNX Runtime cannot load the model ({str(exc).strip().splitlines()[0][:200]})") from None
        inputs = self.session.get_inputs()
        _check_input(source.path, [(i.name, i.type == "tensor(float)", i.shape) for i in inputs])
        inp = inputs[0]
        self.input_name = inp.name
        self.static_batch, self.input_hw = _static_dims(inp.shape)
        self.output_order = None  # raw outputs of a --no-nms export go to the post graph as they are
        if source.post_path is None:
            self.output_order = detector_outputs(source.path, [(o.name, o.type in ("tensor(float)", "tensor(float16)", "tensor(double)"), o.shape)
                                                               for o in self.session.get_outputs()])
        self._ort_version = ort.__version__

    def _run(self, batch: np.ndarray) -> list[np.ndarray]:
        outputs = self.session.run(None, {self.input_name: batch})
        return outputs if self.output_order is None else [outputs[i] for i in self.output_order]

    def version(self) -> str:
        return self._ort_version


class OpenVINOEngine(Engine):
    """OpenVINO: CPU by default (GPU device when present); precision f32, bf16, f16 or the plugin's auto."""

    name = "openvino"

    def __init__(self, source: ModelSource, options: EngineOptions) -> None:
        super().__init__(source, options)
        ov = require("openvino", "openvino")
        core = ov.Core()
        try:
            model = core.read_model(str(source.path))
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses
            raise FcosError(f"{source.path}: OpenVINO cannot read the model ({str(exc).strip().splitlines()[0][:200]})") from None
        _check_input(source.path, [(i.get_any_name(), i.get_element_type().is_real(), _ov_shape(i)) for i in model.inputs])
        inp = model.inputs[0]
        pshape = inp.get_partial_shape()
        if pshape[2].is_dynamic or pshape[3].is_dynamic:
            raise FcosError(f"{source.path}: model input must have a fixed height and width")
        self.input_hw = (pshape[2].get_length(), pshape[3].get_length())
        if pshape[0].is_dynamic:
            model.reshape({inp.get_any_name(): [options.batch_size, 3, *self.input_hw]})
            self.static_batch = options.batch_size
        else:
            self.static_batch = pshape[0].get_length()
        device = options.device.upper()
        if device not in core.available_devices and not device.startswith(("AUTO", "HETERO", "MULTI")):
            raise FcosError(f"OpenVINO device {device} not found (available: {', '.join(core.available_devices)})")
        config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
        hint = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}.get(options.precision)
        if options.precision not in PRECISIONS:
            raise UsageError(f"precision must be one of {', '.join(PRECISIONS)}")
        if hint:
            config["INFERENCE_PRECISION_HINT"] = hint
        if options.threads:
            config["INFERENCE_NUM_THREADS"] = options.threads
        self.compiled = core.compile_model(model, device, config)
        self.request = self.compiled.create_infer_request()
        self.output_order = self._output_order(source)
        ov_type = self.compiled.get_property("INFERENCE_PRECISION_HINT")
        self.actual_precision = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}.get(ov_type.to_string(), ov_type.to_string())
        self._ov_version = ov.__version__ if hasattr(ov, "__version__") else ov.get_version()

    def _output_order(self, source: ModelSource) -> list[int]:
        names = [set(o.get_names()) for o in self.compiled.outputs]
        if source.post_path is not None:
            from fcos_offline.export.metadata import raw_output_names

            wanted = raw_output_names(len(names) // 3)
        else:
            outputs = [("dets" if "dets" in n else "labels" if "labels" in n else o.get_any_name(), o.get_element_type().is_real(), _ov_shape(o))
                       for o, n in zip(self.compiled.outputs, names)]
            return detector_outputs(source.path, outputs)
        order = []
        for w in wanted:
            hits = [i for i, n in enumerate(names) if w in n]
            order.append(hits[0] if hits else len(order))
        return order

    def _run(self, batch: np.ndarray) -> list[np.ndarray]:
        result = self.request.infer({0: batch})
        values = list(result.values())
        return [np.asarray(values[i]) for i in self.output_order]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "execution_precision": self.actual_precision}

    def version(self) -> str:
        return str(self._ov_version)


def _ov_shape(port) -> list[Any] | None:
    """An OpenVINO port's shape as a list (ints, '?' for dynamic dimensions), None for a dynamic rank."""
    ps = port.get_partial_shape()
    return None if ps.rank.is_dynamic else [d.get_length() if d.is_static else "?" for d in ps]


class TorchEngine(Engine):
    """PyTorch eager from the checkpoint: the recipe's "online" baseline."""

    name = "torch"

    def __init__(self, source: ModelSource, options: EngineOptions, shape: tuple[int, int], overrides=None) -> None:
        super().__init__(source, options)
        torch = require("torch", "torch")
        from fcos_offline.model.checkpoint import load_model
        from fcos_offline.model.postprocess import FCOSDetector

        if options.threads:
            torch.set_num_threads(options.threads)
        if options.precision not in ("fp32", "auto"):
            raise UsageError("the torch engine runs fp32 (the online reference)")
        network, self.checkpoint = load_model(source.path, overrides)
        self.device = "cuda" if options.device.lower() == "cuda" else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise FcosError("--device cuda asked for but torch sees no CUDA device")
        self.detector = FCOSDetector(network).eval().to(self.device)
        self.input_hw = tuple(shape)  # type: ignore[assignment]
        self._torch = torch

    def _run(self, batch: np.ndarray) -> list[np.ndarray]:
        with self._torch.inference_mode():
            dets, labels = self.detector(self._torch.from_numpy(batch).to(self.device))
        return [dets.cpu().numpy(), labels.cpu().numpy()]

    def version(self) -> str:
        return self._torch.__version__


def tuned_options(options: EngineOptions, artifact: dict[str, Any]) -> EngineOptions:
    """A ``tune`` artifact's engine options fill in whatever ``options`` leaves at the defaults.

    Its engine replaces the default engine (onnxruntime); threads, precision, ORT optimisation
    level and inter-op threads apply where the caller kept the default value. The batch size
    stays the caller's (the tuned one is recorded in ``artifact.json``; the model takes any).
    """
    tuned = artifact.get("engine_options")
    if not tuned:
        return options
    defaults = EngineOptions()
    changes: dict[str, Any] = {}
    if artifact.get("engine") and options.engine == defaults.engine:
        changes["engine"] = artifact["engine"]
    for name in ("threads", "precision", "ort_opt_level", "inter_op_threads"):
        if tuned.get(name) is not None and getattr(options, name) == getattr(defaults, name):
            changes[name] = tuned[name]
    return replace(options, **changes) if changes else options


def open_engine(model: str | os.PathLike, options: EngineOptions, shape: tuple[int, int] | None = None, overrides=None) -> Engine:
    """Open ``model`` with the engine named in ``options`` (one-line hint if it is not installed)."""
    if options.engine not in ENGINES:
        raise UsageError(f"unknown engine {options.engine!r} (choose from {', '.join(ENGINES)})")
    source = resolve_model(model)
    options = tuned_options(options, source.artifact)
    if source.artifact.get("engine") and source.artifact["engine"] != options.engine:
        raise UsageError(f"{model} is a {source.artifact['engine']} artifact; use --engine {source.artifact['engine']}")
    if options.engine == "torch":
        if source.kind != "checkpoint":
            raise UsageError("the torch engine runs a checkpoint (--checkpoint X.pth), not an exported model")
        if shape is None:
            raise UsageError("the torch engine needs the input --shape H W")
        return TorchEngine(source, options, shape, overrides)
    if source.kind == "checkpoint":
        raise UsageError(f"{options.engine} runs an exported model; export the checkpoint first ('fcos-offline export') or use --engine torch")
    if options.engine == "openvino":
        return OpenVINOEngine(source, options)
    if source.kind == "openvino-ir":
        raise UsageError("an OpenVINO .xml model runs with --engine openvino")
    return OnnxRuntimeEngine(source, options)
