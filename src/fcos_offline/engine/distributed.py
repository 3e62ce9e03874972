"""Offline inference on a Ray cluster (Ray Data): the same inputs, engines, dumps and summary as a local run.

The pipeline, streamed with Ray Data's backpressure:

1. the inputs are listed (a folder of images or an ``.info``; local paths or fsspec URLs);
2. **CPU tasks** decode and letterbox each image: the exact preprocessing of a local run, split
   after the resize (:func:`~fcos_offline.data.preprocess.letterbox_uint8`) so that only uint8
   travels through the object store;
3. **an actor pool** (``actors``, each with ``cpus_per_actor`` / ``gpus_per_actor``) holds one
   engine per actor, finishes the preprocessing (:func:`~fcos_offline.data.preprocess.to_input_tensor`,
   bit-identical), runs a batch and writes each image's dumps atomically (temporary name, rename);
4. the driver counts finished images (progress bar with images/s across the cluster) and writes
   the perf file and ``summary.json`` with overall and per-actor throughput and latency.

The model reaches the workers **by path**: on one machine (and on clusters whose nodes share a
filesystem — NFS, a mounted bucket) every actor opens the same file; the object store is not used
for the model. Dumps go to the output path, which every node must be able to write.

Faults: a killed worker process is restarted by Ray and its batch retried (Ray Data's defaults, relied on:
decode tasks ``max_retries=-1``, actors ``max_restarts=-1``, ``max_task_retries=-1``; lost blocks are rebuilt from lineage); the dumps of
a retried batch are rewritten whole, so every dump ends identical. A rerun after the driver died
skips images whose dumps are complete (the ``--resume`` rule, checked against the dumps' key).
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from fcos_offline.data.dataset import InputItem
from fcos_offline.engine.base import EngineOptions
from fcos_offline.errors import BadFileError, FcosError, UsageError, first_line, require
from fcos_offline.io import OutputLock
from fcos_offline.progress import progress_bar, warn

_NO_REGION = np.array([-1, -1, -1, -1], np.int64)
#: what a decode task reserves (a 24-megapixel photo decodes to 72 MB)
DECODE_MEMORY = 128 << 20


def local_path(path_or_url: str) -> str | None:
    """A plain path or a ``file://`` URL as a local path; None for other fsspec URLs."""
    if "://" not in path_or_url:
        return path_or_url
    scheme, _, rest = path_or_url.partition("://")
    return rest if scheme == "file" else None


def absolute(path_or_url: str) -> str:
    """A local path made absolute (Ray's workers may run in another directory); URLs as given."""
    return path_or_url if "://" in path_or_url else os.path.abspath(path_or_url)


def _read_remote(url: str) -> bytes:
    """An fsspec URL's bytes, refused past the size an image may have (as a local file is)."""
    from fcos_offline.data.preprocess import MAX_IMAGE_BYTES

    fsspec = require("fsspec", "ray")
    with fsspec.open(url, "rb") as f:
        data = bytes(f.read(MAX_IMAGE_BYTES + 1))
    if len(data) > MAX_IMAGE_BYTES:
        raise BadFileError(url, f"more than the {MAX_IMAGE_BYTES:,} bytes an image may have")
    return data


def list_remote_images(url: str) -> list[InputItem]:
    """Images (by extension, file-name order) under an fsspec URL."""
    from fcos_offline.data.preprocess import IMAGE_EXTENSIONS

    fsspec = require("fsspec", "ray")
    fs, root = fsspec.core.url_to_fs(url)
    names = sorted((p for p in fs.ls(root, detail=False) if Path(p).suffix.lower() in IMAGE_EXTENSIONS), key=lambda p: Path(p).name)
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    return [InputItem(Path(p).stem, f"{protocol}://{p}" if protocol not in ("file", "local") else p, "image") for p in names]


def _load_row(row: dict[str, Any], canvas: tuple[int, int]) -> dict[str, Any]:
    """CPU task: decode + letterbox one image to uint8 on the canvas (a ``.bin`` input is left to the actor)."""
    import cv2

    from fcos_offline.data.preprocess import decode_image, letterbox_uint8, read_image

    t0 = time.perf_counter()
    placed = np.zeros((canvas[0], canvas[1], 3), np.uint8)
    region, problem = _NO_REGION, ""
    if row["kind"] == "image":
        try:
            local = local_path(row["path"])
            img = read_image(local) if local is not None else decode_image(_read_remote(row["path"]), row["path"])
            resized, lb = letterbox_uint8(img, *canvas)
            placed[lb.pad_top : lb.pad_top + lb.new_h, lb.pad_left : lb.pad_left + lb.new_w] = resized
            region = np.array([lb.pad_top, lb.pad_left, lb.new_h, lb.new_w], np.int64)
        except BadFileError as exc:
            problem = exc.problem
        except FcosError as exc:
            problem = str(exc)
        except (OSError, cv2.error) as exc:
            problem = first_line(exc, last=True)
    return {**row, "image": placed, "region": region, "problem": problem, "load_s": time.perf_counter() - t0}


class _EngineActor:
    """One engine per actor: finish preprocessing, run a batch, write its dumps."""

    def __init__(
        self, model: str, options: EngineOptions, shape: tuple[int, int] | None, overrides: Any, output: str, fmt: str, canvas: tuple[int, int]
    ) -> None:
        from fcos_offline.engine.backends import open_engine

        self.engine = open_engine(model, options, shape, overrides)
        self.output, self.fmt, self.canvas = output, fmt, canvas
        self.actor = f"{os.uname().nodename}:{os.getpid()}"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from fcos_offline.data.dumps import write_dumps
        from fcos_offline.data.preprocess import to_input_tensor
        from fcos_offline.engine.infer import read_input

        n = len(batch["stem"])
        problems = [str(p) for p in batch["problem"]]
        tensors, rows = [], []
        for i in range(n):
            if problems[i]:
                continue
            top, left, h, w = (int(v) for v in batch["region"][i])
            if top < 0:  # a .bin input: the recipe's preprocessed tensor, read here
                item = InputItem(str(batch["stem"][i]), str(batch["path"][i]), "bin")
                loaded = read_input(item, self.canvas)
                if loaded.problem is not None:
                    problems[i] = loaded.problem
                    continue
                tensor = loaded.tensor(self.canvas)
            else:
                tensor = to_input_tensor(batch["image"][i][top : top + h, left : left + w], top, left, *self.canvas)
            tensors.append(tensor)
            rows.append(i)
        infer_s = np.zeros(n)
        if tensors:
            t0 = time.perf_counter()
            dets, labels = self.engine.run(np.stack(tensors))
            elapsed = time.perf_counter() - t0
            out = Path(local_path(self.output) or self.output)
            for k, i in enumerate(rows):
                write_dumps(out, str(batch["stem"][i]), labels[k], dets[k], self.fmt)
                infer_s[i] = elapsed / len(rows)
        return {
            "stem": batch["stem"],
            "path": batch["path"],
            "problem": np.array(problems, dtype=object),
            "load_s": batch["load_s"],
            "infer_s": infer_s,
            "actor": np.array([self.actor] * n, dtype=object),
            "done_at": np.full(n, time.time()),
        }


def _init_ray(address: str) -> Any:
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")  # the core worker's own warnings (our progress bar reports)
    ray = require("ray", "ray")
    if not ray.is_initialized():
        kwargs: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False, "include_dashboard": False, "ignore_reinit_error": True}
        if address == "auto":
            ray.init(**kwargs)  # RAY_ADDRESS's cluster, else the one `ray start` began here, else a new local one
        else:
            ray.init(address=address, **kwargs)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.verbose_stats_logs = False
    for name in ("ray", "ray.data"):  # Ray Data configures its loggers on import: quiet them after
        logging.getLogger(name).setLevel(logging.ERROR)
    return ray


def run_inference_ray(
    model: str | os.PathLike,
    options: EngineOptions,
    items: list[InputItem],
    output_dir: str,
    batch_size: int = 1,
    fmt: str = "bin",
    resume: bool = False,
    address: str = "auto",
    actors: int = 1,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
    shape: tuple[int, int] | None = None,
    overrides: Any = None,
    device_id: int = 0,
    perf_dir: str | os.PathLike | None = None,
) -> Any:
    """Distributed :func:`~fcos_offline.engine.infer.run_inference`; returns its :class:`InferSummary` (with ``distributed``)."""
    from dataclasses import replace

    from fcos_offline.data.dumps import dump_paths, dumps_complete
    from fcos_offline.engine.backends import open_engine
    from fcos_offline.engine.infer import InferSummary, check_dump_folder, check_unique_stems, fps, latency_stats, listed_size_problem, write_summary
    from fcos_offline.engine.timing import segment_spread_pct

    if batch_size < 1 or actors < 1 or cpus_per_actor <= 0 or gpus_per_actor < 0:
        raise UsageError("--batch-size and --ray-actors must be >= 1, --ray-cpus-per-actor > 0, --ray-gpus-per-actor >= 0")
    out_local = local_path(str(output_dir))
    if out_local is None:
        raise UsageError(f"{output_dir}: dumps are written to a local or shared path (or file:// URL); mount the store first")
    out = Path(absolute(out_local))
    with OutputLock(out, "infer"):  # one writer per dump folder (the nodes write under the driver's lock)
        out.mkdir(parents=True, exist_ok=True)
        model = absolute(str(model))
        check_unique_stems(items)
        options = replace(options, batch_size=batch_size)
        with open_engine(model, options, shape, overrides) as engine:  # the driver checks the model once and keys the dumps
            canvas = engine.input_hw
            described = engine.describe()
            check_dump_folder(out, engine, resume)
            note = engine.feed_note(batch_size)
        if note:
            warn(note)
        todo = [i for i in items if not (resume and dumps_complete(out, i.stem, fmt))]
        ray = _init_ray(address)
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        start = time.perf_counter()
        skipped: list[dict[str, str]] = []
        wrong_size = {i.path: p for i in todo if (p := listed_size_problem(i, canvas))}  # the workers see only paths: judged here
        for path, problem in wrong_size.items():
            skipped.append({"path": path, "problem": problem})
            warn(f"skipped {path}: {problem}", kind="skipped")
        todo = [i for i in todo if i.path not in wrong_size]
        given = {i.stem: i.path for i in todo}
        per_actor: dict[str, list[float]] = {}
        load_s: list[float] = []
        done_at: list[float] = []
        if todo:
            ds = ray.data.from_items(
                [{"stem": i.stem, "path": absolute(i.path), "kind": i.kind} for i in todo], override_num_blocks=max(1, min(len(todo), 8 * actors))
            )
            # decode tasks reserve memory for one decoded photo; this also keeps Ray from fusing them into the actors,
            # so decoding overlaps inference instead of running inside the actor between batches
            ds = ds.map(_load_row, fn_kwargs={"canvas": canvas}, num_cpus=0.5, memory=DECODE_MEMORY)
            ds = ds.map_batches(
                _EngineActor,
                batch_size=batch_size,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=actors),
                num_cpus=cpus_per_actor,
                num_gpus=gpus_per_actor or None,
                fn_constructor_kwargs={
                    "model": model,
                    "options": options,
                    "shape": shape,
                    "overrides": overrides,
                    "output": str(out),
                    "fmt": fmt,
                    "canvas": canvas,
                },
            )
            bar = progress_bar(len(todo), f"infer {described['engine']} bs{batch_size} on Ray ({actors} actor(s), {len(nodes)} node(s))")
            with bar as advance:
                for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                    for stem, problem, l_s, i_s, actor, t in zip(
                        batch["stem"], batch["problem"], batch["load_s"], batch["infer_s"], batch["actor"], batch["done_at"]
                    ):
                        if problem:
                            path = given[str(stem)]  # as the user gave it (the workers saw it made absolute)
                            warn(f"skipped {path}: {problem}", kind="skipped")
                            skipped.append({"path": str(path), "problem": str(problem)})
                        else:
                            per_actor.setdefault(str(actor), []).append(float(i_s))
                            load_s.append(float(l_s))
                            done_at.append(float(t))
                        advance(1)
        wall = time.perf_counter() - start
        done = sum(len(v) for v in per_actor.values())
        skipped_paths = {s["path"] for s in skipped}
        lost = [i.stem for i in todo if i.path not in skipped_paths and not all(p.is_file() for p in dump_paths(out, i.stem, fmt))]
        if lost:
            raise FcosError(
                f"{out}: the Ray workers inferred {len(lost)} image(s) whose dumps are not there (first: {lost[0]}); "
                "--output must be a folder every node sees at the same path"
            )
        infer_all = [s for v in per_actor.values() for s in v]
        latency = {
            "read": latency_stats(load_s),
            "preprocess": latency_stats([]),
            "infer": latency_stats([s * batch_size for s in infer_all]),
            "postprocess": latency_stats([]),
            "e2e": latency_stats([]),
        }
        summary = InferSummary(
            engine=described,
            num_images=len(items),
            num_inferred=done,
            num_resumed=len(items) - len(todo),
            batch_size=batch_size,
            wall_s=wall,
            throughput_fps=fps(done, wall),
            infer_fps=fps(done, sum(infer_all) / max(1, len(per_actor))),
            latency_ms=latency,
            skipped=skipped,
            output_dir=str(out),
            warmup=0,
            loop=1,
            engine_spread_pct=segment_spread_pct(infer_all),
            distributed={
                "framework": f"ray {ray.__version__}",
                "address": address,
                "nodes": len(nodes),
                "actors": actors,
                "cpus_per_actor": cpus_per_actor,
                "gpus_per_actor": gpus_per_actor,
                "model_transport": "shared path",
                "per_actor": {
                    a: {"images": len(v), "engine_img_per_s": fps(len(v), sum(v)), "latency_ms": latency_stats(v)} for a, v in per_actor.items()
                },
            },
        )
        if not todo and not skipped and resume and (out / "summary.json").is_file():
            warn(f"every dump in {out} was complete: nothing to run")
        return write_summary(summary, out, device_id, perf_dir)
