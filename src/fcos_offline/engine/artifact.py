"""``artifact.json``: one schema, one writer, one reader for ``convert`` and ``tune`` outputs.

An artifact is a folder holding an engine's model file (and the ``--no-nms`` post-processing
graph, if any) plus ``artifact.json``. ``infer --model FOLDER`` / ``run --model FOLDER`` open it
with its engine; a ``tune`` artifact also records the engine options it was tuned with, which
apply wherever the caller does not give them (see :func:`engine.base.resolve_options`).

Schema 2 (this writer). Schema 1 files (written before the schema was versioned, by ``convert``
and ``tune`` with slightly different keys) are read too.

Integrity: the writer records the sha256 of every other file in the folder (``files``); the reader
verifies them and refuses a changed, missing or added file (or a link) in one line naming it. A
file without digests (written by an older version) reads with empty ``files``: fine for engines
whose model files are data (ONNX, OpenVINO IR: parsing them runs no code); the compiled engines
refuse it (:func:`engine.backends.resolve_model`), as older versions wrote theirs with pickles and
compiled code.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from fcos_offline.engine.base import EngineOptions
from fcos_offline.errors import FcosError
from fcos_offline.io import atomic_write_json, file_digest, read_json_bounded

ARTIFACT_FILE = "artifact.json"
SCHEMA = 2


@dataclass
class Artifact:
    """What ``artifact.json`` says about the model beside it."""

    engine: str
    model_file: str
    batch_size: int
    input_shape: list[int]  # [B,3,H,W] as converted (B = batch_size)
    precision: str  # stored precision: fp32, fp16 or int8
    engine_version: str
    source: str  # the ONNX (or checkpoint export) it was made from
    post_file: str | None = None  # the --no-nms post-processing graph, if any
    dynamic_batch: bool = False
    engine_options: EngineOptions | None = None  # recorded options (tune), applied where not given
    tuned: bool = False
    tuning: dict[str, Any] = field(default_factory=dict)  # tune's record: trial, quantization, mAP, speed
    settings: dict[str, Any] = field(default_factory=dict)  # what the model file cannot tell (inductor: model config, layout)
    files: dict[str, str] = field(default_factory=dict)  # sha256 of every other file in the folder (filled by write_artifact)
    schema: int = SCHEMA

    @property
    def canvas(self) -> tuple[int, int]:
        """The input canvas (H, W)."""
        return int(self.input_shape[2]), int(self.input_shape[3])

    def to_json(self) -> dict[str, Any]:
        """The JSON document (engine options as a plain dict)."""
        out = asdict(self)
        out["engine_options"] = asdict(self.engine_options) if self.engine_options else None
        return out


def _folder_files(folder: Path) -> list[str]:
    """Every entry below ``folder`` but its ``artifact.json`` and (unlinked) folders, as POSIX paths relative to it."""
    names = []
    for root, dirs, files in os.walk(folder):  # links to folders are listed in dirs, not followed
        here = Path(root)
        names += [(here / n).relative_to(folder).as_posix() for n in files + [d for d in dirs if (here / d).is_symlink()]]
    return sorted(n for n in names if n != ARTIFACT_FILE)


def write_artifact(folder: str | Path, artifact: Artifact) -> Path:
    """Record the digest of every file in ``folder`` in ``artifact.files``, then write
    ``<folder>/artifact.json`` atomically; returns its path."""
    folder = Path(folder)
    artifact.files = {name: file_digest(folder / name) for name in _folder_files(folder)}
    path = folder / ARTIFACT_FILE
    atomic_write_json(path, artifact.to_json())
    return path


def verify_files(folder: Path, files: Any) -> dict[str, str]:
    """Check the folder against the digests ``artifact.json`` records (None: an older file without them); returns them.

    A changed, missing or added file (or a link) is one line naming it; nothing in the folder is
    opened by an engine before this passed.
    """
    path = folder / ARTIFACT_FILE
    if files is None:
        return {}
    if not (isinstance(files, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in files.items())):
        raise FcosError(f"{path}: files must be an object of file name -> sha256")
    for name in _folder_files(folder):
        entry = folder / name
        if entry.is_symlink() or not entry.is_file():
            raise FcosError(f"{entry}: a link or special file in an artifact folder (artifacts hold plain files only); convert again")
        if name not in files:
            raise FcosError(f"{entry}: not part of the artifact ({ARTIFACT_FILE} lists no such file); remove it or convert again")
        if file_digest(entry) != files[name]:
            raise FcosError(f"{entry}: changed since it was written (its sha256 differs from {ARTIFACT_FILE}'s); convert again")
    for name in files:
        if not (folder / name).is_file():
            raise FcosError(f"{folder / name}: missing ({ARTIFACT_FILE} lists it); convert again")
    return dict(files)


_SCHEMA1_TUNING = ("trial", "quantization", "float_groups", "float_nodes", "float_precision", "bbox_mAP", "map_drop", "ms_per_img", "infer")


def read_artifact(folder: str | Path) -> Artifact:
    """The artifact of ``folder``, its files verified; a missing, malformed, incomplete or changed file is one line naming it."""
    path = Path(folder) / ARTIFACT_FILE
    if not path.is_file():
        raise FcosError(f"{folder}: a model folder needs an {ARTIFACT_FILE} (made by 'fcos-offline convert' or 'tune')")
    data = read_json_bounded(path, 1 << 20, "artifact description")
    if not isinstance(data, dict):
        raise FcosError(f"{path}: expected a JSON object")
    schema = data.get("schema", 1)
    if schema not in (1, SCHEMA):
        raise FcosError(f"{path}: artifact schema {schema!r} is not one this version reads (1 or {SCHEMA}); upgrade fcos-offline")
    missing = [k for k in ("engine", "model_file", "batch_size", "input_shape") if k not in data]
    if missing:
        raise FcosError(f"{path}: missing {', '.join(missing)}")
    shape = data["input_shape"]
    if not (isinstance(shape, list) and len(shape) == 4 and all(isinstance(v, int) for v in shape)):
        raise FcosError(f"{path}: input_shape must be [B,3,H,W] integers, got {shape!r}")
    if not isinstance(data["batch_size"], int) or data["batch_size"] < 1:
        raise FcosError(f"{path}: batch_size must be a positive integer, got {data['batch_size']!r}")
    if not isinstance(data["model_file"], str) or Path(data["model_file"]).name != data["model_file"]:
        raise FcosError(f"{path}: model_file must be a file name inside the folder, got {data['model_file']!r}")
    if data.get("post_file") is not None and Path(str(data["post_file"])).name != data["post_file"]:
        raise FcosError(f"{path}: post_file must be a file name inside the folder, got {data['post_file']!r}")
    opts = data.get("engine_options")
    known = {f.name for f in fields(EngineOptions)}
    if opts is not None and not isinstance(opts, dict):
        raise FcosError(f"{path}: engine_options must be an object")
    engine_options = EngineOptions(**{k: v for k, v in opts.items() if k in known}) if opts else None
    tuning = dict(data.get("tuning") or {})
    settings = data.get("settings") or {}
    if not isinstance(settings, dict):
        raise FcosError(f"{path}: settings must be an object")
    if schema == 1:
        tuning.update({k: data[k] for k in _SCHEMA1_TUNING if k in data})
    files = verify_files(Path(folder), data.get("files"))
    try:
        return Artifact(
            engine=str(data["engine"]),
            model_file=data["model_file"],
            batch_size=data["batch_size"],
            input_shape=shape,
            precision=str(data.get("precision", "fp32")),
            engine_version=str(data.get("engine_version", "?")),
            source=str(data.get("source", "")),
            post_file=data.get("post_file"),
            dynamic_batch=bool(data.get("dynamic_batch", False)),
            engine_options=engine_options,
            tuned=bool(data.get("tuned", False)),
            tuning=tuning,
            settings=settings,
            files=files,
            schema=SCHEMA,
        )
    except TypeError as exc:  # pragma: no cover - guarded above
        raise FcosError(f"{path}: {exc}") from None
