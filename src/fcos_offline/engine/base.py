"""The engine protocol: what every backend provides, and the records that cross it.

A **backend** is one module under :mod:`fcos_offline.engine.backends` (``onnxruntime``,
``openvino``, ``torch``, ``inductor``) that provides the :class:`Backend` protocol: its name, the
pip extra that installs it, the precisions and devices it accepts, its version, what it can
``convert`` (an ONNX file, or for ``inductor`` a checkpoint) into, and ``load`` — which opens a
model and returns an :class:`Engine`.

An **engine** runs a batch ``[b,3,H,W]`` float32 of preprocessed images and returns
``(dets [b,K,5] float32, labels [b,K] int64)``; it reports its version and the precision it
really executes, and closes (it is a context manager). A static-batch model is fed padded
batches and the padding is dropped. Models exported with ``--no-nms`` run their
``<name>.post.onnx`` post-processing graph in ONNX Runtime afterwards.

Options resolve with one precedence rule: a value given by the caller (a flag) > the
artifact's recorded engine options > the built-in default. ``None`` in
:class:`EngineOptions` means "not given".
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from fcos_offline.data.letterbox import check_canvas as check_canvas
from fcos_offline.errors import FcosError, UsageError

if TYPE_CHECKING:
    from fcos_offline.engine.artifact import Artifact
    from fcos_offline.model.checkpoint import ModelOverrides

PRECISIONS = ("fp32", "tf32", "bf16", "fp16", "auto")


@dataclass(frozen=True)
class EngineOptions:
    """How to run a model, as asked for; ``None`` = not given (artifact, then default, decides)."""

    engine: str | None = None
    device: str | None = None
    threads: int | None = None
    precision: str | None = None
    batch_size: int | None = None
    ort_opt_level: str | None = None
    inter_op_threads: int | None = None


@dataclass(frozen=True)
class EngineConfig:
    """Resolved engine options (what an engine is opened with); ``threads=None`` = the engine's choice."""

    engine: str = "onnxruntime"
    device: str = "cpu"
    threads: int | None = None
    precision: str = "fp32"
    batch_size: int = 1
    ort_opt_level: str = "all"
    inter_op_threads: int | None = None

    def options(self) -> EngineOptions:
        """The same values as explicit options (for recording in an artifact)."""
        return EngineOptions(**{f.name: getattr(self, f.name) for f in fields(self)})


def cap_threads(config: EngineConfig) -> EngineConfig:
    """Threads beyond this machine's cores only add contention: cap them (and say so)."""
    from fcos_offline.cpu import cpu_count
    from fcos_offline.progress import warn

    cores = cpu_count()
    changes: dict[str, Any] = {}
    for name in ("threads", "inter_op_threads"):
        value = getattr(config, name)
        if value is not None and value > cores:
            warn(f"--{name.replace('_', '-')} {value} is more than the {cores} core(s) this process may use; using {cores}")
            changes[name] = cores
    return replace(config, **changes) if changes else config


def resolve_options(given: EngineOptions, recorded: EngineOptions | None = None) -> EngineConfig:
    """Flag given > artifact's recorded value > built-in default, field by field."""
    default = EngineConfig()
    values: dict[str, Any] = {}
    for f in fields(EngineConfig):
        value = getattr(given, f.name)
        if value is None and recorded is not None:
            value = getattr(recorded, f.name)
        values[f.name] = getattr(default, f.name) if value is None else value
    return EngineConfig(**values)


def settings_flags(overrides: ModelOverrides | None) -> list[str]:
    """The model-setting flags ``overrides`` sets (``--score-thr`` ...): they only apply to a checkpoint."""
    if overrides is None:
        return []
    return [f"--{f.name.replace('_', '-')}" for f in fields(overrides) if getattr(overrides, f.name) is not None]


def refuse_settings(model: object, overrides: ModelOverrides | None) -> None:
    """An exported model has its settings built in: setting them again is a usage error, not a silent no-op."""
    given = settings_flags(overrides)
    if given:
        raise UsageError(
            f"{' '.join(given)}: {model} is an exported model with its settings built in; "
            "they apply to a checkpoint (export it again with them, or run it with --engine torch)"
        )


@dataclass(frozen=True)
class ConvertRequest:
    """What ``convert`` was asked to build (each backend reads the fields that concern it)."""

    precision: str = "fp32"
    batch_size: int = 1
    opt_level: str = "all"  # onnxruntime's graph optimisation level
    device: str = "cpu"  # inductor: the device the program is exported and compiled for
    shape: tuple[int, int] | None = None  # inductor: the canvas (H, W) of a checkpoint
    overrides: ModelOverrides | None = None  # inductor: model settings the checkpoint cannot tell
    channels_last: bool | None = None  # inductor: NHWC activations (None: on for CUDA)
    cuda_graphs: bool | None = None  # inductor: replay the static batch as a CUDA graph (None: on for CUDA)


@dataclass
class Converted:
    """What a backend's ``convert`` wrote: the model file and what ``artifact.json`` records about it."""

    model_file: str
    input_shape: list[int] | None = None  # [B,3,H,W] when the backend decides it (checkpoint sources)
    settings: dict[str, Any] = field(default_factory=dict)
    engine_options: EngineOptions | None = None


@dataclass
class ModelSource:
    """Where the model comes from, resolved from a path (see :func:`engine.backends.resolve_model`)."""

    path: Path
    kind: str  # "onnx", "openvino-ir", "checkpoint", "torch-weights" (an inductor artifact)
    post_path: Path | None = None
    artifact: Artifact | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    fixed_batch: int | None = None  # an ONNX input's fixed batch dimension (None: dynamic or not known before opening)


class Engine:
    """Base class of every backend's engine: subclasses set ``input_hw``/``static_batch``, implement ``_run``."""

    name = "engine"
    input_hw: tuple[int, int]
    static_batch: int | None = None

    @property
    def device_input(self) -> bool:
        """Does this engine build its input on a device (so the feed should hand it uint8 images)?"""
        return False

    def __init__(self, source: ModelSource, config: EngineConfig) -> None:
        self.source = source
        self.config = config
        self._post: Any = None
        if source.post_path is not None:
            import onnxruntime as ort

            self._post = ort.InferenceSession(str(source.post_path), providers=["CPUExecutionProvider"])

    # the protocol -----------------------------------------------------------------------

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``batch [b,3,H,W]`` -> (dets ``[b,K,5]``, labels ``[b,K]``); pads static batches."""
        b = batch.shape[0]
        if tuple(batch.shape[2:]) != tuple(self.input_hw):
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

    def feed_note(self, batch_size: int) -> str | None:
        """What a feed of ``batch_size`` images does to a fixed-batch model (split, zero-padded), or None when it fits."""
        fixed = self.static_batch
        if fixed is None or batch_size == fixed:
            return None
        calls = -(-batch_size // fixed)
        padded = f", {calls * fixed - batch_size} of its {calls * fixed} rows zeros" if batch_size % fixed else ""
        return (
            f"{self.source.path} has a fixed batch of {fixed}: each batch of {batch_size} runs as {calls} call(s) of {fixed}{padded}; "
            f"the fps are this feed's, not the model's at batch {batch_size} (export or convert it at batch {batch_size} for that)"
        )

    def run_letterboxed(self, images: list[np.ndarray], pads: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
        """Letterboxed uint8 images (BGR HxWx3) placed at ``pads`` (top, left) -> detections.

        The feed's form of a batch: here the float tensor is built on the host
        (:func:`data.preprocess.to_input_tensor`); engines on a device build it there.
        """
        from fcos_offline.data.preprocess import to_input_tensor

        h, w = self.input_hw
        return self.run(np.stack([to_input_tensor(img, top, left, h, w) for img, (top, left) in zip(images, pads)]))

    def version(self) -> str:
        """The engine library's version."""
        return "?"

    def execution_precision(self) -> str:
        """The precision the engine really computes in (may differ from the one asked for)."""
        return self.config.precision

    def describe(self) -> dict[str, Any]:
        """Engine name, version, device, precisions, threads, batch and model path (for reports)."""
        return {
            "engine": self.name,
            "version": self.version(),
            "device": self.config.device,
            "precision": self.config.precision,
            "execution_precision": self.execution_precision(),
            "threads": self.config.threads,
            "batch_size": self.config.batch_size,
            "static_batch": self.static_batch,
            "input_hw": list(self.input_hw),
            "model": str(self.source.path),
            **self.label_info(),
        }

    def label_info(self) -> dict[str, Any]:
        """``num_classes`` and ``class_names`` as far as the model says (None: unknown); ``postprocess``
        maps the dumps' labels to categories with them."""
        config = self.model_settings() or self.source.metadata.get("config") or {}
        return {"num_classes": (config.get("head") or {}).get("num_classes"), "class_names": self.source.metadata.get("class_names")}

    def output_key(self) -> str:
        """A digest of everything that determines this engine's detections for a given input.

        Model bytes (and its post graph), engine and version, device, real precision, canvas and
        the model settings; not threads or batch size, which do not change results.
        """
        from fcos_offline.io import file_digest, json_digest

        files = [self.source.path] + ([self.source.post_path] if self.source.post_path else [])
        return json_digest(
            {
                "files": [file_digest(f) for f in files],
                "engine": self.name,
                "version": self.version(),
                "device": self.config.device,
                "precision": self.execution_precision(),
                "input_hw": list(self.input_hw),
                "settings": self.model_settings(),
            }
        )

    def model_settings(self) -> dict[str, Any]:
        """Settings applied on top of the model file (none for exported models; the torch engine's config)."""
        return {}

    def close(self) -> None:
        """Release the engine's sessions (idempotent)."""
        self._post = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    # for subclasses ---------------------------------------------------------------------

    def _finish(self, outputs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        if self._post is not None:
            feeds = {i.name: o for i, o in zip(self._post.get_inputs(), outputs)}
            outputs = self._post.run(None, feeds)
        dets, labels = outputs[0], outputs[1]
        return np.asarray(dets, np.float32), np.asarray(labels, np.int64)

    def _run(self, batch: np.ndarray) -> list[np.ndarray]:
        raise NotImplementedError


class Backend(Protocol):
    """What a backend module provides (see the module docstring)."""

    NAME: str
    EXTRA: str  # the pip extra that installs it
    PRECISIONS: tuple[str, ...]  # execution precisions it accepts
    CONVERT_PRECISIONS: tuple[str, ...]  # stored precisions ``convert`` writes (empty: no convert)
    CONVERT_FROM: str  # what ``convert`` reads: "onnx" (a batch-fixed ONNX file) or "checkpoint"
    MODEL_KINDS: tuple[str, ...]  # ModelSource kinds it opens
    MODEL_SUFFIXES: tuple[str, ...]  # the files one model of its own format is stored in, model file first ("model<suffix>" each from convert)

    def available(self) -> bool: ...

    def version(self) -> str: ...

    def convert(self, source: Path, out: Path, request: ConvertRequest) -> Converted: ...

    def load(self, source: ModelSource, config: EngineConfig, shape: tuple[int, int] | None, overrides: ModelOverrides | None) -> Engine: ...


# shared helpers for backends -------------------------------------------------------------------


def check_input(path: Path, inputs: list[tuple[str, bool, list[Any] | None]]) -> None:
    """One float input of rank 4 (``[B,3,H,W]``), whatever its name; a clear error otherwise."""
    desc = ", ".join(f"{n} {'float' if f else 'non-float'} {s}" for n, f, s in inputs)
    if len(inputs) != 1:
        raise FcosError(f"{path}: the model takes {len(inputs)} inputs ({desc}); a dense detector takes one image batch [B,3,H,W]")
    _, is_float, shape = inputs[0]
    if not is_float or shape is None or len(shape) != 4 or (isinstance(shape[1], int) and shape[1] != 3):
        raise FcosError(f"{path}: the model input is {desc}; a dense detector takes float [B,3,H,W]")


def detector_outputs(path: Path, outputs: list[tuple[str, bool, list[Any] | None]]) -> list[int]:
    """Positions of (dets, labels) among a model's outputs ``[(name, is_float, shape)]``.

    By name when the outputs are called ``dets`` and ``labels`` (our exports); otherwise by type,
    whatever the names and order: exactly two outputs, one float of rank 3 whose last dimension is
    5 (or unknown) and one integer of rank 2. Anything else is not a detector we can read.
    """
    names = [o[0] for o in outputs]
    if "dets" in names and "labels" in names:
        return [names.index("dets"), names.index("labels")]

    def fits(shape: list[Any] | None, rank: int, last: int | None) -> bool:
        return shape is None or (len(shape) == rank and (last is None or not isinstance(shape[-1], int) or shape[-1] == last))

    dets = [i for i, (_, f, s) in enumerate(outputs) if f and fits(s, 3, 5)]
    labels = [i for i, (_, f, s) in enumerate(outputs) if not f and fits(s, 2, None)]
    if len(outputs) == 2 and len(dets) == 1 and len(labels) == 1:
        return [dets[0], labels[0]]
    desc = ", ".join(f"{n} {'float' if f else 'int'} {s}" for n, f, s in outputs)
    raise FcosError(
        f"{path}: the model's outputs ({desc}) are not a dense detector's: expected 'dets' float [B,K,5] and "
        "'labels' int [B,K] (by these names, or any two outputs of those types)"
    )


def static_dims(path: Path, shape: list[Any]) -> tuple[int | None, tuple[int, int]]:
    """(fixed batch or None, (H, W)) of a ``[B,3,H,W]`` input shape; H and W must be fixed."""
    batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
    if not (isinstance(shape[2], int) and isinstance(shape[3], int)):
        raise FcosError(f"{path}: model input must have a fixed height and width, got shape {shape}")
    return batch, check_canvas(path, shape[2], shape[3])
