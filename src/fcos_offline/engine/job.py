"""``infer`` as one library call: which inputs, which model and batch, local or on Ray.

:func:`infer` is what ``fcos-offline infer`` runs: it gathers the inputs (``--images`` folder or
URL, or an ``.info`` list), resolves the batch (flag, else a convert/tune folder's, else 1), opens
the engine and runs :func:`~fcos_offline.engine.infer.run_inference` (or its Ray twin).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fcos_offline.data.dataset import InputItem
from fcos_offline.engine.base import EngineOptions
from fcos_offline.engine.infer import InferSummary, cap_batch, gather_items, run_inference
from fcos_offline.errors import FcosError, UsageError

if TYPE_CHECKING:
    from fcos_offline.model.checkpoint import ModelOverrides


@dataclass
class RayPlan:
    """Where and how wide ``--ray`` runs (see :func:`fcos_offline.engine.distributed.run_inference_ray`)."""

    address: str = "auto"
    actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0


@dataclass
class InferRequest:
    """One ``infer`` run: the model (or a checkpoint for the torch engine), its inputs and where the dumps go."""

    model: str | None = None
    checkpoint: str | None = None
    images: str | None = None  # a folder, one image, or (with ray) a URL
    input_info: str | None = None  # a bin-mode or jpg-mode .info
    items: list[InputItem] | None = None  # inputs a library caller gathered itself (run), instead of images/input_info
    output: str | os.PathLike = "result/dumpOutput_device0"
    options: EngineOptions = field(default_factory=EngineOptions)  # batch_size: None = the artifact's, else 1
    shape: tuple[int, int] | None = None
    overrides: ModelOverrides | None = None
    fmt: str = "bin"
    warmup: int = 1
    loop: int = 1
    resume: bool = False
    workers: int | None = None
    device_id: int = 0
    perf_dir: str | os.PathLike | None = None
    ray: RayPlan | None = None


def gather_inputs(images: str | None, input_info: str | None, ray: bool) -> list[InputItem]:
    """``images`` (a folder, a file:// URL, or with ``ray`` any fsspec URL) or ``input_info``."""
    if images and "://" in images:
        from fcos_offline.engine.distributed import list_remote_images, local_path

        local = local_path(images)
        if local is not None:
            return gather_items(local, None)
        if not ray:
            raise UsageError(f"{images}: reading images from a URL needs --ray (or mount it and give the path)")
        return list_remote_images(images)
    return gather_items(images, input_info)


def _model_of(req: InferRequest, offline_engines: tuple[str, ...]) -> str:
    engine = req.options.engine
    if req.checkpoint and engine in offline_engines:
        raise UsageError(
            "--checkpoint runs with --engine torch; for the other engines export it ('fcos-offline export') "
            "or compile it ('fcos-offline convert --engine inductor --checkpoint X.pth --shape H W')"
        )
    if engine is not None and engine not in offline_engines and not req.checkpoint:
        raise UsageError("--engine torch runs a checkpoint: give --checkpoint X.pth (and --shape H W)")
    if req.checkpoint and req.model:
        raise UsageError("give --model or --checkpoint, not both")
    model = req.checkpoint or req.model
    if not model:
        raise UsageError("give --model (ONNX file, OpenVINO .xml or convert folder), or --checkpoint with --engine torch")
    return model


def infer(req: InferRequest) -> InferSummary:
    """Run ``req`` (see the module docstring); the summary is also written as ``<output>/summary.json``."""
    from dataclasses import replace

    from fcos_offline.engine.backends import OFFLINE_ENGINES, open_engine, resolve_model

    model = _model_of(req, OFFLINE_ENGINES)
    items: list[InputItem] | None = None
    items_error: FcosError | None = None
    try:  # counted first (the batch is capped to them), reported after the model's own problems
        items = req.items if req.items is not None else gather_inputs(req.images, req.input_info, req.ray is not None)
        if not items:
            items_error = FcosError(f"{req.input_info or req.images}: no inputs listed; nothing to infer")
    except FcosError as exc:
        items_error = exc
    asked = req.options.batch_size
    source = resolve_model(model)
    artifact = source.artifact  # its batch unless the request says otherwise
    fixed = artifact.batch_size if artifact and not artifact.dynamic_batch else source.fixed_batch
    batch_size = asked or (artifact.batch_size if artifact else fixed or 1)
    if items and fixed is None:  # a fixed batch is padded, not capped
        batch_size = cap_batch(batch_size, len(items))
    options = replace(req.options, batch_size=batch_size)
    if req.ray is not None:
        from fcos_offline.engine.distributed import run_inference_ray

        if items_error is not None or not items:
            raise items_error or FcosError("no inputs")
        summary: Any = run_inference_ray(
            model,
            options,
            items,
            str(req.output),
            batch_size,
            req.fmt,
            req.resume,
            req.ray.address,
            req.ray.actors,
            req.ray.cpus_per_actor,
            req.ray.gpus_per_actor,
            req.shape,
            req.overrides,
            req.device_id,
            req.perf_dir,
        )
        return summary
    with open_engine(model, options, req.shape, req.overrides) as engine:
        if items_error is not None or not items:
            raise items_error or FcosError("no inputs")
        if asked is None and engine.static_batch is not None:  # a fixed-batch OpenVINO IR: its batch is known once open
            batch_size = engine.static_batch
        return run_inference(
            engine, items, req.output, batch_size, req.fmt, req.warmup, req.loop, req.resume, req.workers, req.device_id, req.perf_dir
        )
