"""The backends, one module each, and the one mapping that dispatches to them.

Adding a backend = one module providing :class:`fcos_offline.engine.base.Backend` plus one line
in :data:`BACKENDS`; the CLI's ``--engine`` choices, ``convert`` and ``tune`` follow from here.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from fcos_offline.engine.artifact import ARTIFACT_FILE, read_artifact
from fcos_offline.engine.backends import inductor, onnxruntime, openvino, torch
from fcos_offline.engine.base import (
    Backend,
    Engine,
    EngineConfig,
    EngineOptions,
    ModelSource,
    cap_threads,
    refuse_settings,
    resolve_options,
)
from fcos_offline.errors import FcosError, UsageError, first_line

if TYPE_CHECKING:
    from fcos_offline.model.checkpoint import ModelOverrides

BACKENDS: dict[str, Backend] = {
    "onnxruntime": onnxruntime,
    "openvino": openvino,
    "torch": torch,
    "inductor": inductor,
}
ENGINES = tuple(BACKENDS)
#: the engines that run exported models (everything but the online baseline)
OFFLINE_ENGINES = tuple(name for name, b in BACKENDS.items() if "checkpoint" not in b.MODEL_KINDS)
#: the engines that run exported ONNX models (what ``tune`` searches over)
ONNX_ENGINES = tuple(name for name, b in BACKENDS.items() if "onnx" in b.MODEL_KINDS)
#: the engines ``convert`` can build an artifact for
CONVERT_ENGINES = tuple(name for name, b in BACKENDS.items() if b.CONVERT_PRECISIONS)
#: every stored precision some backend converts to
CONVERT_PRECISIONS = tuple(dict.fromkeys(p for b in BACKENDS.values() for p in b.CONVERT_PRECISIONS))
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".ckpt")

__all__ = [
    "BACKENDS",
    "CONVERT_ENGINES",
    "ENGINES",
    "OFFLINE_ENGINES",
    "ONNX_ENGINES",
    "Engine",
    "EngineConfig",
    "EngineOptions",
    "backend",
    "model_files",
    "open_engine",
    "resolve_model",
]


def backend(name: str) -> Backend:
    """The backend called ``name`` (a usage error listing the choices otherwise)."""
    if name not in BACKENDS:
        raise UsageError(f"unknown engine {name!r} (choose from {', '.join(ENGINES)})")
    return BACKENDS[name]


def model_files(path: Path) -> list[Path]:
    """The files the model ``path`` is stored in: those its backend declares for its suffix (``MODEL_SUFFIXES``:
    an OpenVINO IR's ``.bin`` and ``.meta.json`` beside its ``.xml``), else the file alone."""
    for b in BACKENDS.values():
        if b.MODEL_SUFFIXES[:1] == (path.suffix,):
            return [path.with_suffix(s) for s in b.MODEL_SUFFIXES]
    return [path]


def resolve_model(path: str | os.PathLike) -> ModelSource:
    """Resolve ``--model`` (ONNX file, OpenVINO .xml, artifact folder or checkpoint)."""
    from fcos_offline.export.metadata import post_graph_path, read_header

    p = Path(path)
    artifact = None
    if p.is_dir():
        artifact = read_artifact(p)
        p = p / artifact.model_file
    if not p.is_file():
        raise FcosError(f"{p}: no such model file")
    maker = BACKENDS.get(artifact.engine) if artifact is not None else None
    if artifact is not None and maker is not None and maker.CONVERT_FROM == "checkpoint":  # a compiled engine's artifact
        if not artifact.files:
            raise FcosError(
                f"{p.parent / ARTIFACT_FILE}: records no file digests (written by an older fcos-offline); "
                f"a {artifact.engine} artifact is only opened with every file verified: convert it again"
            )
        return ModelSource(p, maker.MODEL_KINDS[0], None, artifact, {})
    suffix = p.suffix.lower()
    if suffix in CHECKPOINT_SUFFIXES:
        return ModelSource(p, "checkpoint", None, artifact, {})
    fixed_batch = None
    if suffix == ".xml":
        kind = "openvino-ir"
        meta_file = p.with_suffix(".meta.json")
        from fcos_offline.io import read_json_bounded

        metadata = read_json_bounded(meta_file, 1 << 24, "model metadata") if meta_file.is_file() else {}
    elif suffix == ".onnx":
        kind = "onnx"
        try:
            metadata, fixed_batch = read_header(p)
        except Exception as exc:
            raise FcosError(f"{p}: not a readable ONNX file ({first_line(exc, 160)})") from None
    elif (p.parent / ARTIFACT_FILE).is_file():
        raise UsageError(f"{p}: part of an artifact; give its folder (--model {p.parent})")
    else:
        raise FcosError(f"{p}: unknown model type '{suffix}' (expected .onnx, .xml, a convert folder or a .pth)")
    post = None
    if metadata.get("nms_in_graph") is False:
        if artifact is not None and artifact.post_file:
            post = p.parent / artifact.post_file
        else:
            post = post_graph_path(p)
        if not post.is_file():
            raise FcosError(f"{p} was exported with --no-nms but its post-processing graph {post} is missing")
    return ModelSource(p, kind, post, artifact, metadata, fixed_batch)


def open_engine(
    model: str | os.PathLike, options: EngineOptions | None = None, shape: tuple[int, int] | None = None, overrides: ModelOverrides | None = None
) -> Engine:
    """Open ``model`` with the engine its options resolve to (flag > artifact > default).

    A missing engine library is a one-line hint naming the extra to install.
    """
    options = options or EngineOptions()
    if options.engine is not None:
        backend(options.engine)
    source = resolve_model(model)
    artifact = source.artifact
    recorded = None
    if artifact is not None:
        if options.engine is not None and options.engine != artifact.engine:
            raise UsageError(f"{model} is a {artifact.engine} artifact; use --engine {artifact.engine}")
        # the artifact's engine and tuned options; the batch stays the caller's (the model takes any)
        recorded = replace(artifact.engine_options or EngineOptions(), engine=artifact.engine, batch_size=None)
    else:  # the engine that opens this kind of file, where only one does
        openers = [name for name, b in BACKENDS.items() if source.kind in b.MODEL_KINDS]
        recorded = EngineOptions(engine=openers[0]) if len(openers) == 1 else None
    config = cap_threads(resolve_options(options, recorded))
    chosen = backend(config.engine)
    if source.kind not in chosen.MODEL_KINDS:
        if source.kind == "checkpoint":
            raise UsageError(f"{config.engine} runs an exported model; export the checkpoint first ('fcos-offline export') or use --engine torch")
        if "checkpoint" in chosen.MODEL_KINDS:
            raise UsageError("the torch engine runs a checkpoint (--checkpoint X.pth), not an exported model")
        openers = [name for name, b in BACKENDS.items() if source.kind in b.MODEL_KINDS]
        raise UsageError(f"a {source.kind} model runs with --engine {' or '.join(openers)}, not {config.engine}")
    if source.kind != "checkpoint":
        refuse_settings(model, overrides)
    engine = chosen.load(source, config, shape, overrides)
    if shape is not None and source.kind != "checkpoint" and tuple(shape) != tuple(engine.input_hw):
        engine.close()
        raise UsageError(
            f"{model} takes {engine.input_hw[0]}x{engine.input_hw[1]} inputs (its canvas is set at export), "
            f"not the {shape[0]}x{shape[1]} asked (--shape, or --input_height/--input_width)"
        )
    return engine
