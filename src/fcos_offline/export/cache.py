"""One export cache for ``run`` and ``tune``: a checkpoint's ONNX, reused only for the same inputs.

The key is the checkpoint's content digest, the canvas, the model overrides, the package version
and :data:`GRAPH_REVISION`; anything else (a checkpoint rewritten in place, another ``--score-thr``,
a fix to the network or its post-processing) exports again.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from fcos_offline import __version__
from fcos_offline.io import atomic_write_json, file_digest, read_stamp
from fcos_offline.model.checkpoint import ModelOverrides
from fcos_offline.progress import info

STAMP = "export.json"

#: bumped whenever the same checkpoint would export to a different graph (2: torchvision layout pads to 32)
GRAPH_REVISION = 2


def cached_export(checkpoint: Path, folder: Path, shape: tuple[int, int], overrides: ModelOverrides | None = None) -> tuple[Path, dict[str, Any]]:
    """``<folder>/model.onnx`` (dynamic batch, NMS in the graph, verified) and its export summary."""

    from fcos_offline.export.metadata import read_metadata

    folder.mkdir(parents=True, exist_ok=True)
    onnx_path = folder / "model.onnx"
    stamp = folder / STAMP
    key = {
        "checkpoint_sha256": file_digest(checkpoint),
        "shape": list(shape),
        "version": __version__,
        "graph_revision": GRAPH_REVISION,
        "overrides": asdict(overrides) if overrides else None,
    }
    previous = read_stamp(stamp)
    if onnx_path.is_file() and previous.get("key") == key and "result" in previous:
        info(f"reusing {onnx_path} (same checkpoint bytes, canvas and settings)")
        return onnx_path, previous["result"]
    if previous:
        info(f"exporting again: {checkpoint}, canvas or settings changed since {onnx_path} was made")
    stamp.unlink(missing_ok=True)  # the model file is rewritten below: never reuse a half-written one
    from fcos_offline.export.onnx_export import export_checkpoint

    info(f"exporting {checkpoint} -> {onnx_path} ({shape[0]}x{shape[1]}, dynamic batch, NMS in the graph)")
    result = export_checkpoint(checkpoint, onnx_path, shape, dynamic_batch=True, overrides=overrides)
    result["metadata_class_names"] = read_metadata(onnx_path).get("class_names")
    atomic_write_json(stamp, {"key": key, "result": result})
    return onnx_path, result
