"""The ``fcos_offline.*`` metadata carried inside exported ONNX files (torch-free)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

META_PREFIX = "fcos_offline."


def post_graph_path(model: Path) -> Path:
    """``<name>.post.onnx`` beside a ``--no-nms`` export ``<name>.onnx``: its post-processing graph."""
    return model.with_name(model.name.removesuffix(model.suffix) + ".post.onnx")


def encode_metadata(values: dict[str, Any]) -> dict[str, str]:
    """JSON-encode values under ``fcos_offline.`` keys."""
    return {META_PREFIX + k: json.dumps(v) for k, v in values.items()}


def read_metadata(model_path: str | Path) -> dict[str, Any]:
    """The ``fcos_offline.*`` metadata of an ONNX file (empty for files we did not export)."""
    return read_header(model_path)[0]


def read_header(model_path: str | Path) -> tuple[dict[str, Any], int | None]:
    """An ONNX file's ``fcos_offline.*`` metadata and its first input's fixed batch (None: dynamic), in one read."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    metadata = {p.key[len(META_PREFIX) :]: json.loads(p.value) for p in model.metadata_props if p.key.startswith(META_PREFIX)}
    dims = model.graph.input[0].type.tensor_type.shape.dim if model.graph.input else []
    batch = dims[0].dim_value if len(dims) and dims[0].HasField("dim_value") and dims[0].dim_value > 0 else None
    return metadata, batch


def copy_metadata(src: str | Path, dst: str | Path) -> None:
    """Give ``dst`` the metadata of ``src`` (after a tool rewrote the graph and dropped it)."""
    import onnx

    meta = onnx.load(str(src), load_external_data=False).metadata_props
    model = onnx.load(str(dst))
    del model.metadata_props[:]
    for p in meta:
        model.metadata_props.add(key=p.key, value=p.value)
    onnx.save(model, str(dst))
