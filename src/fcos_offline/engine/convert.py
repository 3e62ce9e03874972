"""``convert`` (the recipe's ATC step): ONNX -> an engine artifact for a fixed batch and shape.

An artifact is a folder holding the engine's model file and ``artifact.json``
(:mod:`fcos_offline.engine.artifact`); ``infer --model FOLDER`` accepts it like an ONNX file.
What each engine builds is its backend's ``convert``:

* ``onnxruntime``: batch fixed, graph optimisations applied offline and saved (``model.onnx``).
* ``openvino``: OpenVINO IR (``model.xml``/``.bin``) at the fixed batch; ``fp16`` compresses the weights.
* ``inductor``: from the checkpoint, a ``torch.export`` program compiled by PyTorch's inductor
  (CPU or CUDA; fp32/tf32/fp16/bf16) with its compile cache (:mod:`engine.backends.inductor`).

TensorRT runs through ONNX Runtime's TensorRT execution provider (``infer --engine onnxruntime
--device tensorrt`` with ``onnxruntime-gpu``), which builds and caches its engine itself.
The folder is written whole or not at all: a failed convert leaves an existing artifact as it was.
A failed write is one line naming the output and the cause (a full disk says so; the engine
libraries' own serialisation errors are translated, not passed through).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fcos_offline.engine.artifact import ARTIFACT_FILE, Artifact, write_artifact
from fcos_offline.engine.backends import CHECKPOINT_SUFFIXES, CONVERT_ENGINES, backend
from fcos_offline.engine.base import Backend, ConvertRequest, refuse_settings
from fcos_offline.errors import DiskFullError, FcosError, UsageError, first_line
from fcos_offline.export.metadata import post_graph_path, read_metadata
from fcos_offline.io import atomic_folder, atomic_write_bytes, translate_os_error

#: free bytes below which a failed write is reported as a full disk
_NEARLY_FULL = 1 << 20


def _free_bytes(folder: Path) -> int | None:
    """Free bytes for an unprivileged writer on ``folder``'s file system (None when unknown)."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


@contextmanager
def _writing(output: Path, engine: str, need: int) -> Iterator[None]:
    """Refuse to start when the disk has less than ``need`` bytes free (some engine libraries abort
    on a full disk); turn whatever the engine's writers raise into one line naming ``output``."""
    free = _free_bytes(output.parent)
    if free is not None and free < need:
        raise DiskFullError(output, f"{free:,} bytes free, the {engine} artifact needs about {need:,}")
    try:
        yield
    except FcosError:
        raise
    except OSError as exc:
        raise translate_os_error(output, exc) from None
    except Exception as exc:  # the libraries' serialisation errors ("iostream error", "Protobuf serialization failed")
        free = _free_bytes(output.parent)
        if free is not None and free < _NEARLY_FULL:
            raise DiskFullError(output, f"{engine}: {first_line(exc, 120)}") from None
        raise FcosError(f"{output}: {engine} could not build or write the artifact ({type(exc).__name__}: {first_line(exc)})") from None


def _fix_batch(model: Any, batch_size: int) -> Any:
    """Give every graph input/output a fixed leading (batch) dimension."""
    for value in list(model.graph.input) + list(model.graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = batch_size
    return model


def convert(model: str | Path, engine: str, output: str | Path, request: ConvertRequest | None = None) -> Artifact:
    """Convert an ONNX file (or, for ``inductor``, a checkpoint) into an artifact folder; returns its description."""
    request = request or ConvertRequest()
    src = Path(model)
    if request.batch_size < 1:
        raise UsageError("--batch-size must be >= 1")
    if engine not in CONVERT_ENGINES:
        raise UsageError(f"convert builds artifacts for {', '.join(CONVERT_ENGINES)}, not {engine!r}")
    chosen = backend(engine)
    if request.precision not in chosen.CONVERT_PRECISIONS:
        raise UsageError(f"{engine} artifacts are stored {' or '.join(chosen.CONVERT_PRECISIONS)}, not {request.precision}")
    if chosen.CONVERT_FROM == "checkpoint":
        return _convert_checkpoint(src, chosen, output, request)
    return _convert_onnx(src, chosen, output, request)


def _convert_checkpoint(src: Path, chosen: Backend, output: str | Path, request: ConvertRequest) -> Artifact:
    if not src.is_file() or src.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise UsageError(f"{src}: {chosen.NAME} builds from a checkpoint (--checkpoint X.pth --shape H W)")
    with atomic_folder(output, ARTIFACT_FILE) as out, _writing(Path(output), chosen.NAME, src.stat().st_size):
        done = chosen.convert(src, out, request)
        artifact = Artifact(
            engine=chosen.NAME,
            model_file=done.model_file,
            batch_size=request.batch_size,
            input_shape=done.input_shape or [],
            precision=request.precision,
            engine_version=chosen.version(),
            source=str(src),
            engine_options=done.engine_options,
            settings=done.settings,
        )
        write_artifact(out, artifact)
    return artifact


def _convert_onnx(src: Path, chosen: Backend, output: str | Path, request: ConvertRequest) -> Artifact:
    import onnx

    batch_size = request.batch_size
    if not src.is_file() or src.suffix.lower() != ".onnx":
        raise FcosError(f"{src}: convert takes an exported .onnx file")
    refuse_settings(src, request.overrides)
    try:
        metadata = read_metadata(src)
        proto = onnx.load(str(src))
    except Exception as exc:
        raise FcosError(f"{src}: not a readable ONNX file ({first_line(exc, 160)})") from None
    if len(proto.graph.input) != 1 or len(proto.graph.input[0].type.tensor_type.shape.dim) != 4:
        raise FcosError(f"{src}: not a detector model: it has {len(proto.graph.input)} inputs, expected one image batch [B,3,H,W]")
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    if request.shape is not None and tuple(request.shape) != (dims[2].dim_value, dims[3].dim_value):
        raise UsageError(
            f"--shape {request.shape[0]} {request.shape[1]}: {src} takes {dims[2].dim_value}x{dims[3].dim_value} inputs (its canvas is set at export)"
        )
    batch_dim = dims[0]
    if batch_dim.HasField("dim_value") and batch_dim.dim_value != batch_size:
        raise UsageError(f"{src} has a fixed batch of {batch_dim.dim_value}; export with --dynamic-export to convert to batch {batch_size}")
    post_src = post_graph_path(src)
    if metadata.get("nms_in_graph") is False and not post_src.is_file():
        raise FcosError(f"{src} was exported with --no-nms but {post_src} is missing")
    need = 2 * src.stat().st_size + (post_src.stat().st_size if post_src.is_file() else 0)  # the batch-fixed copy and the engine's model
    with atomic_folder(output, ARTIFACT_FILE) as out, _writing(Path(output), chosen.NAME, need):
        fixed = out / "fixed.onnx"
        atomic_write_bytes(fixed, _fix_batch(proto, batch_size).SerializeToString())
        post_file = None
        if metadata.get("nms_in_graph") is False:
            post_file = "model.post.onnx"
            shutil.copy(post_src, out / post_file)
        done = chosen.convert(fixed, out, request)
        fixed.unlink()
        artifact = Artifact(
            engine=chosen.NAME,
            model_file=done.model_file,
            batch_size=batch_size,
            input_shape=[d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim],
            precision=request.precision,
            engine_version=chosen.version(),
            source=str(src),
            post_file=post_file,
        )
        write_artifact(out, artifact)
    return artifact
