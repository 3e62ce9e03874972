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

Nothing hangs or buries its message: the cluster joined (or started) is named in the first line and
recorded; a pool the cluster could never hold is refused before anything starts
(:func:`check_resources`); actors not started within :data:`START_TIMEOUT_S` (other jobs hold the
resources) end the run in one line; an error raised in a worker reaches the user as the one line a
local run gives (:func:`worker_error`).
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from fcos_offline.data.dataset import InputItem
from fcos_offline.engine.base import EngineOptions
from fcos_offline.errors import BadFileError, FcosError, UsageError, first_line, require
from fcos_offline.io import OutputLock
from fcos_offline.progress import info, progress_bar, warn

_NO_REGION = np.array([-1, -1, -1, -1], np.int64)
#: what a decode task reserves (a 24-megapixel photo decodes to 72 MB)
DECODE_MEMORY = 128 << 20
#: the CPUs a decode task reserves
DECODE_CPUS = 0.5
#: seconds the engine actors may take to be placed and to open the model before the run is called stalled
START_TIMEOUT_S = 120.0
#: the environment variable that sets another start timeout (seconds)
START_TIMEOUT_ENV = "FCOS_RAY_START_TIMEOUT_S"
#: seconds a cluster's address may take to accept a connection before it is called unreachable
REACH_TIMEOUT_S = 10.0
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


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


def _slots(node: dict[str, float], cpus: float, gpus: float, reserve_cpus: float = 0.0) -> int:
    """How many actors of ``cpus``/``gpus`` fit on a node with ``node``'s resources, ``reserve_cpus`` kept free."""
    eps = 1e-9
    free = node.get("CPU", 0.0) - reserve_cpus
    if free < -eps:
        return -1  # the reserve itself does not fit
    n = math.floor(free / cpus + eps)
    if gpus > 0:
        n = min(n, math.floor(node.get("GPU", 0.0) / gpus + eps))
    return n


def check_resources(nodes: list[dict[str, float]], actors: int, cpus_per_actor: float, gpus_per_actor: float) -> None:
    """Refuse (:class:`UsageError`) an actor pool the cluster could never hold: ``nodes`` are the alive nodes'
    resources (``ray.nodes()``'s ``Resources``: ``CPU``, ``GPU``, ...). One actor must fit on a node, and
    ``actors`` of them must fit on the nodes together while one node keeps room for a decode task."""
    cpu = sum(n.get("CPU", 0.0) for n in nodes)
    gpu = sum(n.get("GPU", 0.0) for n in nodes)
    has = f"the cluster has {len(nodes)} node(s) with {cpu:g} CPU and {gpu:g} GPU in all"
    each = f"{cpus_per_actor:g} CPU" + (f" and {gpus_per_actor:g} GPU" if gpus_per_actor else "")
    if not any(_slots(n, cpus_per_actor, gpus_per_actor) >= 1 for n in nodes):
        biggest = max(nodes, key=lambda n: (n.get("GPU", 0.0), n.get("CPU", 0.0)), default={})
        raise UsageError(
            f"one Ray actor asks for {each} (--ray-cpus-per-actor, --ray-gpus-per-actor), but no node has that "
            f"({has}; the largest node: {biggest.get('CPU', 0.0):g} CPU, {biggest.get('GPU', 0.0):g} GPU)"
        )
    slots = [max(0, _slots(n, cpus_per_actor, gpus_per_actor)) for n in nodes]
    fit = 0
    for i, n in enumerate(nodes):  # node i also keeps room for a decode task
        here = _slots(n, cpus_per_actor, gpus_per_actor, DECODE_CPUS)
        if here >= 0:
            fit = max(fit, sum(slots) - slots[i] + here)
    if fit < actors:
        need = f"{actors * cpus_per_actor:g} CPU" + (f" and {actors * gpus_per_actor:g} GPU" if gpus_per_actor else "")
        raise UsageError(
            f"--ray-actors {actors} x {each} need {need}, plus {DECODE_CPUS:g} CPU for the decode tasks; {has}: "
            f"at most {fit} such actor(s) fit (lower --ray-actors or --ray-cpus-per-actor)"
        )


def start_timeout() -> float:
    """Seconds the actors may take to start: :data:`START_TIMEOUT_S`, or ``$FCOS_RAY_START_TIMEOUT_S``."""
    text = os.environ.get(START_TIMEOUT_ENV)
    if text is None:
        return START_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < math.inf:
        raise UsageError(f"{START_TIMEOUT_ENV}={text!r}: give the seconds the Ray actors may take to start (a number > 0)")
    return value


def _error_line(text: str) -> str:
    """The line of an error's text that says what went wrong, ANSI codes stripped: a (remote) traceback's last
    ``Type: message`` line, else the first line."""
    lines = [ln.strip() for ln in _ANSI.sub("", text).splitlines() if ln.strip()]
    said = [ln for ln in lines if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)\b.*:", ln)]
    return (said[-1] if said else lines[0] if lines else "no message")[:300]


def _without_retry_note(e: BaseException) -> BaseException:
    """``e`` without the retry note Ray Data appends to a map task's error (to its message, or as one more argument)."""
    if isinstance(e, OSError) and isinstance(e.filename, str) and e.filename.startswith("Failed to "):
        return type(e)(e.errno, e.strerror)  # the note, one more argument, came back as the file name
    args = list(e.args)
    if not (args and isinstance(args[0], str) and "\nFailed to " in args[0]):
        return e
    e.args = (args[0].split("\nFailed to ", 1)[0], *args[1:])  # its message, mended in place (subclasses take other arguments)
    return e


def worker_error(exc: BaseException, stalled: str) -> BaseException:
    """The error a local run would raise for ``exc``, a Ray task or actor error: the :class:`FcosError` or
    :class:`OSError` raised in the worker (Ray's wrappers unwrapped), else one :class:`FcosError` line;
    ``stalled`` is the line for actors that did not start in time."""
    ray_exceptions = require("ray.exceptions", "ray")
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop(0)
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ray_exceptions.GetTimeoutError):
            return FcosError(stalled)
        if isinstance(e, (FcosError, OSError)) and not isinstance(e, ray_exceptions.RayError):
            return _without_retry_note(e)
        todo += [c for c in (getattr(e, "cause", None), e.__cause__, e.__context__) if isinstance(c, BaseException)]
    return FcosError(f"a Ray worker failed: {_error_line(str(exc))}")


def _is_ray_error(exc: BaseException) -> bool:
    return any(type(e).__module__.startswith("ray.") for e in (exc, exc.__cause__, exc.__context__) if e is not None)


@contextmanager
def _stderr_to_devnull() -> Iterator[None]:
    """File descriptor 2 points at /dev/null meanwhile (output written there by C++ code, which ``sys.stderr`` does not see)."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


#: per address given, whether this process joined a running cluster (True) or started one (False) when it initialised Ray
_JOINED: dict[str, bool | None] = {}


def _init_ray(address: str) -> tuple[Any, bool | None]:
    """Ray, initialised quietly (our own lines on stderr only), and whether it joined a running cluster; a
    cluster that cannot be joined or started is one line."""
    os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")  # the core worker's own warnings (our progress bar reports)
    ray = require("ray", "ray")
    if not ray.is_initialized():
        _JOINED[address], target = _cluster_to_join(address)
        if target is not None:
            _check_reachable(target, "found by --ray alone" if address == "auto" else f"--ray {address}")
        kwargs: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False, "include_dashboard": False, "ignore_reinit_error": True}
        where = "$RAY_ADDRESS's or this machine's Ray cluster (or a new local one)" if address == "auto" else f"the Ray cluster at {address}"
        try:
            with _stderr_to_devnull():  # Ray's C++ logger announces the log level it read, on fd 2
                if address == "auto":
                    ray.init(**kwargs)  # RAY_ADDRESS's cluster, else the one `ray start` began here, else a new local one
                else:
                    ray.init(address=address, **kwargs)
        except Exception as exc:
            if ray.is_initialized():
                ray.shutdown()
            raise FcosError(f"cannot use {where}: {_error_line(str(exc) or type(exc).__name__)}") from exc
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.verbose_stats_logs = False
    ctx.raise_original_map_exception = True  # a worker's FcosError/OSError itself, not Ray Data's UserCodeException around it
    for name in ("ray", "ray.data"):  # Ray Data configures its loggers on import: quiet them after
        logging.getLogger(name).setLevel(logging.ERROR)
    for handler in logging.getLogger("ray.data").handlers:  # its console: a failed run is our one line (its log file keeps the trace)
        if isinstance(handler, logging.StreamHandler):
            handler.setLevel(logging.CRITICAL + 1)
    return ray, _JOINED.get(address)


def _cluster_to_join(address: str) -> tuple[bool | None, str | None]:
    """Asked before ``ray.init`` runs: whether it joins a running cluster rather than starting one (None: cannot
    tell), and that cluster's ``host:port`` when known (not for Ray Client's ``ray://``)."""
    if address.startswith("ray://"):
        return True, None
    try:
        from ray._private import services  # Ray's own rule, as ray.init applies it

        found = services.canonicalize_bootstrap_address(None if address == "auto" else address)  # type: ignore[arg-type]  # None: as ray.init
    except Exception:
        return None, None
    return found is not None, found


def _check_reachable(target: str, given: str) -> None:
    """One line when nothing answers at ``host:port`` (``ray.init`` would retry for minutes, silently); ``given``: how it was named."""
    import socket

    host, _, port = target.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=REACH_TIMEOUT_S).close()
    except (OSError, ValueError) as exc:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
        raise FcosError(
            f"cannot reach the Ray cluster at {target} ({given}): {detail}; is it running? (--ray ADDRESS names the cluster to use)"
        ) from None


def cluster_record(ray: Any, nodes: list[dict[str, Any]], address: str, joined: bool | None) -> dict[str, Any]:
    """Which cluster the run uses: its address, how it was reached, its alive ``nodes`` (``ray.nodes()``) and their resources."""
    try:
        gcs = str(ray.get_runtime_context().gcs_address)
    except Exception:  # Ray Client: the address given is the one known
        gcs = address
    total: dict[str, float] = {}
    for n in nodes:
        for k in ("CPU", "GPU", "memory", "object_store_memory"):
            total[k] = total.get(k, 0.0) + float(n.get("Resources", {}).get(k, 0.0))
    return {
        "cluster_address": gcs,
        "cluster": {True: "joined", False: "started", None: "unknown"}[joined],  # a running cluster, or a local one started here
        "cluster_nodes": [
            {"address": n.get("NodeManagerAddress", "?"), **{k: float(n.get("Resources", {}).get(k, 0.0)) for k in ("CPU", "GPU")}} for n in nodes
        ],
        "cluster_resources": total,
    }


def describe_cluster(record: dict[str, Any]) -> str:
    """One line for :func:`cluster_record`."""
    r = record["cluster_resources"]
    how = {"joined": "joined the running cluster", "started": "started a local cluster"}.get(record["cluster"], "using the cluster")
    return (
        f"Ray: {how} at {record['cluster_address']}: {len(record['cluster_nodes'])} node(s), {r.get('CPU', 0):g} CPU, {r.get('GPU', 0):g} GPU, "
        f"{r.get('memory', 0) / 2**30:.1f} GiB memory, {r.get('object_store_memory', 0) / 2**30:.1f} GiB object store"
    )


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
    timeout = start_timeout()
    out_local = local_path(str(output_dir))
    if out_local is None:
        raise UsageError(f"{output_dir}: dumps are written to a local or shared path (or file:// URL); mount the store first")
    out = Path(absolute(out_local))
    with OutputLock(out, "infer"):  # one writer per dump folder (the nodes write under the driver's lock)
        out.mkdir(parents=True, exist_ok=True)
        model = absolute(str(model))
        check_unique_stems(items)
        options = replace(options, batch_size=batch_size)
        ray, joined = _init_ray(address)  # the cluster first: named in the first line, and checked before the dumps are touched
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        cluster = cluster_record(ray, nodes, address, joined)
        info(describe_cluster(cluster))
        check_resources([n.get("Resources", {}) for n in nodes], actors, cpus_per_actor, gpus_per_actor)
        with open_engine(model, options, shape, overrides) as engine:  # the driver checks the model once and keys the dumps
            canvas = engine.input_hw
            described = engine.describe()
            check_dump_folder(out, engine, resume)
            note = engine.feed_note(batch_size)
        if note:
            warn(note)
        todo = [i for i in items if not (resume and dumps_complete(out, i.stem, fmt))]
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
        timed: list[tuple[float, float]] = []  # (when it finished, engine seconds per image), for the spread over time
        if todo:
            ray.data.DataContext.get_current().wait_for_min_actors_s = timeout  # a pool that cannot start fails, never hangs
            ds = ray.data.from_items(
                [{"stem": i.stem, "path": absolute(i.path), "kind": i.kind} for i in todo], override_num_blocks=max(1, min(len(todo), 8 * actors))
            )
            # decode tasks reserve memory for one decoded photo; this also keeps Ray from fusing them into the actors,
            # so decoding overlaps inference instead of running inside the actor between batches
            ds = ds.map(_load_row, fn_kwargs={"canvas": canvas}, num_cpus=DECODE_CPUS, memory=DECODE_MEMORY)
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
            stalled = (
                f"the {actors} Ray engine actor(s) ({cpus_per_actor:g} CPU, {gpus_per_actor:g} GPU each) did not start within {timeout:g} s: "
                f"the cluster's resources are held by other work, or the model opens slowly (${START_TIMEOUT_ENV} sets the wait)"
            )
            try:
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
                                timed.append((float(t), float(i_s)))
                            advance(1)
            except Exception as exc:
                if not _is_ray_error(exc):  # a Ray error may also be an FcosError: RayTaskError(FcosError), the remote traceback its text
                    raise
                raise worker_error(exc, stalled) from None
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
            engine_spread_pct=segment_spread_pct([s for _, s in sorted(timed)]),  # in the order the images finished
            distributed={
                "framework": f"ray {ray.__version__}",
                "address": address,
                **cluster,
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
