"""Each candidate's model file: built once under ``<output>/models`` (quantized with its float groups), then reused
while its key stamp (``<model>.key.json``: the source model's and calibration images' digests, the canvas, the build's
settings and the library versions) still matches; the chosen one is copied into an artifact folder."""

from __future__ import annotations

import contextlib
import io
import shutil
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from fcos_offline import __version__
from fcos_offline.engine.artifact import ARTIFACT_FILE, Artifact, write_artifact
from fcos_offline.engine.backends import backend, model_files
from fcos_offline.engine.base import ConvertRequest
from fcos_offline.io import atomic_folder, atomic_write_json, file_digest, json_digest, read_stamp
from fcos_offline.progress import info
from fcos_offline.tune import quantize as q
from fcos_offline.tune.space import Candidate, nncf_config, ort_config, parse_build, quant_description
from fcos_offline.tune.store import Trial


def model_size_mb(path: Path) -> float:
    """Size of a model (every file it is stored in: an OpenVINO IR with its weights)."""
    return sum(p.stat().st_size for p in model_files(path) if p.is_file()) / 2**20


def installed_version(dist: str) -> str:
    """A distribution's version, "" when it is not installed (its build then fails with the install hint)."""
    try:
        return version(dist)
    except PackageNotFoundError:
        return ""


class ModelBuilder:
    """Builds (or reuses) the model file of each candidate from the fp32 ONNX ``source``."""

    def __init__(self, source: Path, out: Path, calib_paths: list[str], canvas: tuple[int, int]) -> None:
        self.source, self.out = source, out
        self.calib_paths, self.canvas = calib_paths, canvas
        self._images: q.ImageTensors | None = None
        self._groups: dict[str, q.ConvGroup] | None = None
        self._source_key: dict[str, Any] | None = None

    def source_key(self) -> dict[str, Any]:
        """What every build depends on besides its own settings: the source's and calibration images' bytes, the canvas, our version."""
        if self._source_key is None:
            self._source_key = {
                "source_sha256": file_digest(self.source),
                "calibration": json_digest([[p, file_digest(p)] for p in self.calib_paths]),
                "canvas": list(self.canvas),
                "fcos_offline": __version__,
            }
        return self._source_key

    def _cached(self, dst: Path, settings: dict[str, Any], build: Callable[[], object]) -> Path:
        """``dst`` as built by ``build()``, reused only when its stamp holds this source's key and ``settings``; stale files are removed first."""
        stamp = dst.with_suffix(".key.json")
        key = json_digest({**self.source_key(), **settings})
        files = model_files(dst)
        if all(f.is_file() for f in files) and read_stamp(stamp).get("key") == key:
            return dst
        for f in (stamp, *files):
            f.unlink(missing_ok=True)
        build()
        atomic_write_json(stamp, {"key": key, **settings})
        return dst

    def preprocessed(self) -> Path:
        """The source after ORT's ``quant_pre_process`` (what ONNX Runtime quantizes), rebuilt for another source."""
        dst = self.out / "models" / "ort-preprocessed.onnx"
        return self._cached(
            dst, {"build": "ort-preprocessed", "onnxruntime": backend("onnxruntime").version()}, lambda: q.preprocess_for_ort(self.source, dst)
        )

    def images(self) -> q.ImageTensors:
        """The calibration images (preprocessed once, lazily)."""
        if self._images is None:
            self._images = q.ImageTensors(self.calib_paths, self.canvas)
        return self._images

    def float_nodes(self, groups: tuple[str, ...]) -> list[str]:
        """The ONNX conv nodes of the named conv groups (returned to float by the fallback)."""
        if not groups:
            return []
        if self._groups is None:
            self._groups = {g.name: g for g in q.conv_groups(self.source)}
        return [n for name in groups for n in self._groups[name].nodes]

    def model_file(self, cand: Candidate) -> Path:
        """Build (or reuse) the model file of ``cand``."""
        models = self.out / "models"
        models.mkdir(parents=True, exist_ok=True)
        kind, tag = parse_build(cand.build)
        engine = backend(cand.engine)
        engine_version = engine.version()
        if kind == "fp32":  # the source itself where the engine stores ONNX, else the engine's own conversion of it
            if engine.MODEL_SUFFIXES[0] == self.source.suffix.lower():
                return self.source
            folder = models / f"{cand.engine}-fp32"
            dst = folder / f"model{engine.MODEL_SUFFIXES[0]}"
            return self._cached(
                dst, {"build": cand.build, cand.engine: engine_version}, lambda: engine.convert(self.source, folder, ConvertRequest())
            )
        folder = models / cand.model_id
        nodes = self.float_nodes(cand.float_groups)
        float_note = f", {len(nodes)} conv nodes float" if nodes else ""
        settings = {"engine": cand.engine, "build": cand.build, "float_nodes": nodes, cand.engine: engine_version}
        quiet = contextlib.redirect_stdout(io.StringIO())  # ORT's histogram calibrators print; our progress is on stderr
        if kind == "ort-qdq":
            dst = folder / "model.onnx"

            def ort_build() -> None:
                pre = self.preprocessed()
                info(f"  quantizing with onnxruntime quantize_static ({tag}{float_note})")
                calibration = self.out / "work" / "calibration" / json_digest(self.source_key())  # ranges of this source and images only
                with quiet:
                    q.ort_quantize(pre, dst, self.images(), ort_config(tag), nodes, cache_dir=calibration)

            return self._cached(dst, settings, ort_build)
        dst = folder / "model.xml"

        def nncf_build() -> None:
            info(f"  quantizing with nncf.quantize ({tag}{float_note})")
            with quiet:
                q.nncf_quantize(self.source, dst, self.images(), nncf_config(tag), nodes)

        return self._cached(dst, {**settings, "nncf": installed_version("nncf")}, nncf_build)

    def save_artifact(self, trial: Trial, best: Path) -> Path:
        """The folder ``best``: ``trial``'s model and ``artifact.json`` with its engine options (written whole)."""
        from fcos_offline.export.metadata import post_graph_path, read_metadata

        cand = trial.candidate
        model = self.model_file(cand)  # rebuilt if its files were removed
        with atomic_folder(best, ARTIFACT_FILE) as tmp:
            for f in model_files(model):  # each as model<its suffix>
                shutil.copy(f, tmp / f"model{f.name.removeprefix(model.stem).lower()}")
            model_file = f"model{model.suffix.lower()}"
            post_file = None
            if read_metadata(self.source).get("nms_in_graph") is False:
                shutil.copy(post_graph_path(self.source), tmp / "model.post.onnx")
                post_file = "model.post.onnx"
            artifact = Artifact(
                engine=cand.engine,
                model_file=model_file,
                batch_size=cand.batch_size,
                input_shape=[cand.batch_size, 3, *self.canvas],
                precision=trial.precision,
                engine_version=backend(cand.engine).version(),
                source=str(self.source),
                post_file=post_file,
                dynamic_batch=True,
                engine_options=cand.engine_options(),
                tuned=True,
                tuning={
                    "trial": trial.key,
                    "float_precision": trial.float_precision,
                    "quantization": quant_description(cand),
                    "float_groups": list(cand.float_groups),
                    "float_nodes": trial.float_nodes,
                    "bbox_mAP": trial.bbox_mAP,
                    "map_drop": trial.map_drop,
                    "ms_per_img": trial.ms_per_img,
                    "infer": f"fcos-offline infer --model {best} --batch-size {cand.batch_size} --images DIR",
                },
            )
            write_artifact(tmp, artifact)
        return best
