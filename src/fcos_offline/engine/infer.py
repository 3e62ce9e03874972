"""Offline inference: inputs -> engine -> dumps, with per-stage timings (the vendor ``benchmark``).

Inputs are a bin-mode ``.info`` (the recipe's preprocessed ``.bin`` tensors), a jpg-mode
``.info`` or a folder of images. The feed (:class:`Feed`) decodes and letterboxes images in
worker processes into shared memory (no pickled pixel arrays) through a bounded window, so memory
stays flat for any number of images and no intermediate ``.bin`` is written (streaming). The
float conversion and mean subtraction happen on the host for CPU engines and on the device for
engines that run on one (:attr:`Engine.device_input`), with bit-identical results. Loading of
batch k+1 (workers) and dump writing of batch k-1 (a writer thread) overlap inference of batch k.

Each image's dumps are written atomically (temporary name, then rename): an interrupted run
leaves only whole files, and ``resume=True`` skips images whose dumps are complete.
"""

from __future__ import annotations

import collections
import json
import os
import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from fcos_offline.data.dataset import InputItem
from fcos_offline.data.dumps import dumps_complete, is_dump_file, write_dumps
from fcos_offline.data.perf import PerfStats, perf_file_name, write_perf_file
from fcos_offline.data.preprocess import (
    IMAGE_EXTENSIONS,
    cap_workers,
    letterbox_uint8,
    list_images,
    read_image,
    to_input_tensor,
)
from fcos_offline.engine.base import Engine
from fcos_offline.engine.timing import run_timed, segment_spread_pct
from fcos_offline.errors import BadFileError, FcosError, UsageError, first_line
from fcos_offline.io import atomic_write_json, locks_output, process_alive, read_stamp
from fcos_offline.progress import progress_bar, warn

STAGES = ("read", "preprocess", "infer", "postprocess", "e2e")


def items_from_info(info_path: str | os.PathLike) -> list[InputItem]:
    """Items of a recipe ``.info`` file (bin or jpg mode, told by each path's extension)."""
    from fcos_offline.data.info import read_info

    items = []
    for entry in read_info(info_path):
        p = Path(entry.path)
        if p.suffix.lower() == ".bin":
            items.append(InputItem(p.stem, str(p), "bin", (entry.width, entry.height)))
        else:
            items.append(InputItem(p.stem, str(p), "image"))
    return items


def items_from_images(folder: str | os.PathLike) -> list[InputItem]:
    """Items for every image in ``folder`` (sorted by file name)."""
    return [InputItem(p.stem, str(p), "image") for p in list_images(folder)]


@dataclass
class Loaded:
    """One input read by the feed: letterboxed uint8 pixels and their placement, or a ``.bin`` tensor."""

    item: InputItem
    pixels: np.ndarray | None  # uint8 HxWx3 BGR resized image (pads set), or float32 [3,H,W] (.bin); None if a problem
    pads: tuple[int, int] | None  # (top, left) of the image on the canvas; None for a .bin tensor
    problem: str | None
    read_s: float
    preprocess_s: float
    submitted: float = 0.0

    def tensor(self, canvas_hw: tuple[int, int]) -> np.ndarray:
        """The float32 ``[3,H,W]`` input (:func:`data.preprocess.to_input_tensor` for an image)."""
        assert self.pixels is not None
        if self.pads is None:
            return self.pixels
        return to_input_tensor(self.pixels, *self.pads, *canvas_hw)


def listed_size_problem(item: InputItem, canvas_hw: tuple[int, int]) -> str | None:
    """Why a ``.bin`` cannot be this model's input by the size its bin-mode ``.info`` lists (None: it can)."""
    if item.listed_wh is None or item.listed_wh == (canvas_hw[1], canvas_hw[0]):
        return None
    w, h = item.listed_wh
    return f"listed as {w}x{h} (width x height) in the .info; the model takes {canvas_hw[1]}x{canvas_hw[0]}"


def read_input(item: InputItem, canvas_hw: tuple[int, int]) -> Loaded:
    """Read one input and letterbox it (an image) or check it (a ``.bin``); problems are reported, not raised."""
    t0 = time.perf_counter()
    try:
        if item.kind == "bin":
            problem = listed_size_problem(item, canvas_hw)
            if problem:
                raise BadFileError(item.path, problem)
            expected = 3 * canvas_hw[0] * canvas_hw[1]
            size = os.path.getsize(item.path)
            if size != expected * 4:
                raise BadFileError(item.path, f"{size} bytes, expected {expected * 4} (float32 3x{canvas_hw[0]}x{canvas_hw[1]})")
            tensor = np.fromfile(item.path, dtype="<f4").reshape(3, *canvas_hw)
            if not np.isfinite(tensor).all():
                raise BadFileError(item.path, f"{int((~np.isfinite(tensor)).sum())} NaN/inf values in the tensor")
            return Loaded(item, tensor, None, None, time.perf_counter() - t0, 0.0)
        img = read_image(item.path)
        t1 = time.perf_counter()
        resized, lb = letterbox_uint8(img, *canvas_hw)
        return Loaded(item, resized, (lb.pad_top, lb.pad_left), None, t1 - t0, time.perf_counter() - t1)
    except BadFileError as exc:
        problem = exc.problem
    except FcosError as exc:  # e.g. an image too thin to letterbox: skipped, as preprocess_folder skips it
        problem = str(exc)
    except cv2.error as exc:
        problem = f"OpenCV: {first_line(exc, last=True)}"
    except OSError as exc:
        problem = exc.strerror or str(exc)
    return Loaded(item, None, None, problem, time.perf_counter() - t0, 0.0)


_ATTACHED: dict[str, SharedMemory] = {}
#: shared-memory blocks of the feed are named ``fcos-feed-<pid>-<random>``
SHM_PREFIX = "fcos-feed-"


def remove_stale_blocks(shm_dir: Path = Path("/dev/shm")) -> list[str]:
    """Remove feed blocks whose run is gone; returns their names.

    A run killed with its whole process group (resource tracker included, e.g. ``kill -9 -PGID``
    or an out-of-memory kill of the group) leaves its block in ``/dev/shm``; the next run removes it.
    """
    removed = []
    for path in shm_dir.glob(SHM_PREFIX + "*") if shm_dir.is_dir() else []:
        pid_text = path.name[len(SHM_PREFIX) :].split("-")[0]
        if pid_text.isdigit() and not process_alive(int(pid_text)):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def _read_into_slot(item: InputItem, canvas_hw: tuple[int, int], shm_name: str, offset: int) -> tuple[Loaded, tuple[int, ...], str]:
    """In a worker: :func:`read_input` with the pixels written into shared memory at ``offset``; only their shape travels back."""
    loaded = read_input(item, canvas_hw)
    pixels, loaded.pixels = loaded.pixels, None
    if pixels is None:
        return loaded, (), ""
    if shm_name not in _ATTACHED:
        _ATTACHED[shm_name] = SharedMemory(shm_name)
    np.ndarray(pixels.shape, pixels.dtype, buffer=_ATTACHED[shm_name].buf, offset=offset)[...] = pixels
    return loaded, pixels.shape, pixels.dtype.str


#: feed workers yield to the engine's threads when cores are short (they run ahead of it by a window)
FEED_NICENESS = 10


def _worker_init() -> None:
    """One OpenCV thread per worker; Ctrl-C is the parent's to handle; the worker ends with its parent.

    Without the last, a killed run's workers would wait forever, and with them the shared memory
    they hold open (Python's resource tracker removes it only once every holder has gone).
    """
    import ctypes
    import signal
    import sys

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cv2.setNumThreads(1)
    os.nice(FEED_NICENESS)
    if sys.platform == "linux":
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


class Feed:
    """Bounded look-ahead over items: in-process (workers=0) or worker processes feeding shared memory.

    Workers decode and letterbox into slots of one shared-memory block (a slot holds a
    canvas-sized float32 ``.bin`` tensor or a letterboxed uint8 image); only file names and
    shapes are pickled, and the parent copies the pixels out, freeing the slot at once.
    """

    def __init__(self, items: list[InputItem], canvas_hw: tuple[int, int], workers: int, window: int) -> None:
        self.items = items
        self.canvas_hw = canvas_hw
        self.window = max(1, window)
        self.pool = None
        self.shm: SharedMemory | None = None
        self.slot_bytes = 3 * canvas_hw[0] * canvas_hw[1] * 4
        if workers > 0 and items:
            import multiprocessing
            import secrets

            remove_stale_blocks()
            name = f"{SHM_PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
            self.shm = SharedMemory(name=name, create=True, size=self.window * self.slot_bytes)
            self.pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init)

    def __iter__(self) -> Iterator[Loaded]:
        if self.pool is None or self.shm is None:
            for item in self.items:
                submitted = time.perf_counter()
                loaded = read_input(item, self.canvas_hw)
                loaded.submitted = submitted
                yield loaded
            return
        pool, shm = self.pool, self.shm
        free = list(range(self.window))
        pending: collections.deque[tuple[Future, InputItem, int, float]] = collections.deque()

        def submit(item: InputItem) -> None:
            slot = free.pop()
            future = pool.submit(_read_into_slot, item, self.canvas_hw, shm.name, slot * self.slot_bytes)
            pending.append((future, item, slot, time.perf_counter()))

        it = iter(self.items)
        try:
            for item in it:
                submit(item)
                if not free:
                    break
            while pending:
                fut, _, slot, submitted = pending[0]
                loaded, shape, dtype = fut.result()
                pending.popleft()
                loaded.submitted = submitted
                if shape:
                    loaded.pixels = np.ndarray(shape, np.dtype(dtype), buffer=shm.buf, offset=slot * self.slot_bytes).copy()
                free.append(slot)
                nxt = next(it, None)
                if nxt is not None:
                    submit(nxt)
                yield loaded
        except BrokenProcessPool:
            paths = [entry[1].path for entry in pending] or ["the next input"]
            others = f" (or one of the {len(paths) - 1} read after it)" if len(paths) > 1 else ""
            raise FcosError(
                f"a decode worker died (killed, or out of memory) reading {paths[0]}{others}; "
                "rerun with --workers 0 to read in this process, or --resume to go on"
            ) from None
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            shm.close()
            shm.unlink()


STAMP = ".fcos-dumps.json"


def check_unique_stems(items: list[InputItem]) -> None:
    """Dumps are named by file stem: two inputs with one stem would overwrite each other's."""
    counts = collections.Counter(i.stem for i in items)
    dup = sorted(s for s, n in counts.items() if n > 1)[:3]
    if dup:
        raise FcosError(f"input names collide (dumps are named by file stem): {', '.join(dup)}")


def check_dump_folder(out: Path, engine: Engine, resume: bool) -> None:
    """A dump folder only ever holds one model's dumps: the same model and settings, or none.

    ``out/.fcos-dumps.json`` records :meth:`Engine.output_key`. Resuming on another key is
    refused; a fresh run removes the dump files (:func:`~fcos_offline.data.dumps.is_dump_file`) and
    summary an earlier run of ours left (another key) and says so; other files stay;
    dumps without our stamp (another tool's, or an unknown run's) are never mixed in nor removed.
    """
    key = engine.output_key()
    stamp = out / STAMP
    previous = read_stamp(stamp).get("key")
    dumps = [p for p in out.iterdir() if is_dump_file(p) and p.is_file()]
    if previous != key and dumps:
        if resume or previous is None:
            raise FcosError(
                f"{out} holds dumps made by "
                + (
                    "another model, engine, precision or canvas; --resume would mix them with this run's: use a fresh --output, or drop --resume to replace them"
                    if previous
                    else "another tool or an unknown run; use a fresh --output (or remove them)"
                )
            )
        perf = read_stamp(out / "summary.json").get("perf_file")  # the earlier run's perf file, which parse would read
        perf_path = Path(perf) if isinstance(perf, str) and PERF_NAME.fullmatch(Path(perf).name) else None
        # never outside the output: only where infer itself writes it by default (beside a dumpOutput* folder, else inside)
        inside = perf_path is not None and perf_path.resolve().parent == default_perf_dir(out).resolve()
        for p in [*dumps, out / "summary.json", *([perf_path] if inside and perf_path else [])]:
            p.unlink(missing_ok=True)  # its summary too: an interrupted run must not inherit it
        left = f"; its perf file {perf_path} is outside {out} and was left as it is" if perf_path and not inside else ""
        warn(f"{out}: removed the {len(dumps)} dump files (and summary, perf file) of an earlier run with another model or settings{left}")
    atomic_write_json(stamp, {"key": key, "engine": engine.name, "model": str(engine.source.path)})


def default_workers(engine: Engine, todo: list[InputItem]) -> int:
    """Feed processes when none are asked for.

    * An engine on a device leaves the cores idle: up to 8 workers (one core stays with the driver).
    * A CPU engine gets one worker per core its threads leave free, and none when it uses every
      core: a decoder beside it then preempts one of its threads, and the others wait for that one
      at every parallel step. Measured on two cores (FCOS-R50 800x1333, ONNX Runtime on both
      cores, 20 COCO photos): 97% of the engine-alone rate decoding in-process, 83-95% with a
      worker at niceness 10, 82% with one at SCHED_IDLE.
    * None for a few inputs, for ``.bin`` inputs (nothing to decode) or on one core.
    """
    from fcos_offline.cpu import cpu_count

    cores = cpu_count()
    if cores < 2 or len(todo) <= 2 or not any(i.kind == "image" for i in todo):
        return 0
    if engine.device_input:
        return max(1, min(8, cores - 1))
    busy = (engine.config.threads or cores) + max(0, (engine.config.inter_op_threads or 1) - 1)
    return max(0, min(4, cores - busy))


def cap_batch(batch_size: int, num_images: int) -> int:
    """A batch larger than the images present only allocates padding: cap it (and say so)."""
    if 0 < num_images < batch_size:
        warn(f"batch size {batch_size} is more than the {num_images} image(s) to run; using {num_images}")
        return num_images
    return batch_size


def latency_stats(values_s: list[float]) -> dict[str, float]:
    """min/mean/median/p90/p99 in milliseconds (zeros when nothing was measured)."""
    if not values_s:
        return {"min": 0.0, "mean": 0.0, "median": 0.0, "p90": 0.0, "p99": 0.0, "count": 0}
    ms = np.asarray(values_s) * 1000.0
    return {
        "min": float(ms.min()),
        "mean": float(ms.mean()),
        "median": float(np.median(ms)),
        "p90": float(np.percentile(ms, 90)),
        "p99": float(np.percentile(ms, 99)),
        "count": int(ms.size),
    }


@dataclass
class InferSummary:
    """What one :func:`run_inference` did and how fast (written as ``summary.json``)."""

    engine: dict[str, Any]
    num_images: int
    num_inferred: int
    num_resumed: int
    batch_size: int
    wall_s: float
    throughput_fps: float
    infer_fps: float
    latency_ms: dict[str, dict[str, float]]
    skipped: list[dict[str, str]] = field(default_factory=list)
    output_dir: str = ""
    perf_file: str = ""
    warmup: int = 0
    loop: int = 1
    distributed: dict[str, Any] | None = None  # a Ray run: cluster, actors, per-actor throughput and latency
    engine_spread_pct: float | None = None  # how much the engine's speed varies over the run (engine.timing.segment_spread_pct)

    def to_dict(self) -> dict[str, Any]:
        """JSON view."""
        return dict(self.__dict__)


def fps(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0


@locks_output("infer")  # one writer per dump folder
def run_inference(
    engine: Engine,
    items: list[InputItem],
    output_dir: str | os.PathLike,
    batch_size: int = 1,
    fmt: str = "bin",
    warmup: int = 1,
    loop: int = 1,
    resume: bool = False,
    workers: int | None = None,
    device_id: int = 0,
    perf_dir: str | os.PathLike | None = None,
    show_progress: bool = True,
) -> InferSummary:
    """Run ``engine`` over ``items`` in batches of ``batch_size`` and write one dump pair per image.

    ``workers``: feed processes (0: read in this process; None: :func:`default_workers`); more than
    the cores this process may use are capped to them (:func:`~fcos_offline.data.preprocess.cap_workers`).
    """
    if batch_size < 1:
        raise UsageError("--batch-size must be >= 1")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    check_unique_stems(items)
    check_dump_folder(out, engine, resume)
    note = engine.feed_note(batch_size)
    if note:
        warn(note)
    todo = [i for i in items if not (resume and dumps_complete(out, i.stem, fmt))]
    resumed = len(items) - len(todo)
    previous = out / "summary.json"
    if resume and not todo and previous.is_file():  # all done before: keep that run's numbers
        try:
            kept = InferSummary(**json.loads(previous.read_text()))
        except (TypeError, ValueError):
            kept = None
        if kept is not None and kept.batch_size == batch_size:
            kept.num_resumed = resumed
            return kept
    canvas = engine.input_hw
    workers = default_workers(engine, todo) if workers is None else cap_workers(workers)
    per_image: list[float] = []  # engine seconds per image of each batch, in run order (its spread)
    times: dict[str, list[float]] = {s: [] for s in STAGES}
    infer_total = 0.0
    skipped: list[dict[str, str]] = []
    done = 0

    writer = ThreadPoolExecutor(1, thread_name_prefix="fcos-dumps")  # writes batch k-1 while batch k runs
    writing: Future | None = None

    def write(batch: list[Loaded], dets: np.ndarray, labels: np.ndarray) -> None:
        t1 = time.perf_counter()
        for loaded, d, lab in zip(batch, dets, labels):
            write_dumps(out, loaded.item.stem, lab, d, fmt)
        t2 = time.perf_counter()
        times["postprocess"].append((t2 - t1) / len(batch))
        times["e2e"].extend(t2 - b.submitted for b in batch)

    def flush(batch: list[Loaded], advance: Callable[[int], None]) -> None:
        nonlocal infer_total, done, writing
        if engine.device_input and all(b.pads is not None for b in batch):
            pixels, pads = [b.pixels for b in batch], [b.pads for b in batch]

            def call() -> tuple[np.ndarray, np.ndarray]:
                return engine.run_letterboxed(pixels, pads)  # type: ignore[arg-type]  # checked above: images, all placed
        else:
            tensor = np.stack([b.tensor(canvas) for b in batch])

            def call() -> tuple[np.ndarray, np.ndarray]:
                return engine.run(tensor)

        if warmup and done == 0 and not times["infer"]:
            for _ in range(warmup):
                call()
        dets, labels, t_infer = run_timed(call, loop)
        infer_total += t_infer
        times["infer"].append(t_infer)
        per_image.append(t_infer / len(batch))  # a short last batch is not a fast moment
        if writing is not None:
            writing.result()  # the previous batch's dumps are on disk (or its error is raised here)
        writing = writer.submit(write, batch, dets, labels)
        done += len(batch)
        advance(len(batch))

    start = time.perf_counter()
    batch: list[Loaded] = []
    window = max(2 * batch_size, 4)
    try:
        with progress_bar(len(todo), f"infer {engine.name} bs{batch_size}", unit="img") if show_progress else _null_bar() as advance:
            for loaded in Feed(todo, canvas, workers, window):
                if loaded.problem is not None:
                    warn(f"skipped {loaded.item.path}: {loaded.problem}", kind="skipped")
                    skipped.append({"path": loaded.item.path, "problem": loaded.problem})
                    advance(1)
                    continue
                times["read"].append(loaded.read_s)
                if loaded.item.kind == "image":
                    times["preprocess"].append(loaded.preprocess_s)
                batch.append(loaded)
                if len(batch) == batch_size:
                    flush(batch, advance)
                    batch = []
            if batch:
                flush(batch, advance)
            if writing is not None:
                writing.result()
    finally:
        writer.shutdown(wait=True)
    wall = time.perf_counter() - start
    latency = {s: latency_stats(v) for s, v in times.items()}
    summary = InferSummary(
        engine=engine.describe(),
        num_images=len(items),
        num_inferred=done,
        num_resumed=resumed,
        batch_size=batch_size,
        wall_s=wall,
        throughput_fps=fps(done, wall),
        infer_fps=fps(done, infer_total),
        latency_ms=latency,
        skipped=skipped,
        output_dir=str(out),
        warmup=warmup,
        loop=loop,
        engine_spread_pct=segment_spread_pct(per_image),
    )
    return write_summary(summary, out, device_id, perf_dir)


#: the benchmark tool's perf file names (:func:`data.perf.perf_file_name`)
PERF_NAME = re.compile(r"perf_vision_batchsize_\d+_device_\d+\.txt")


def default_perf_dir(out: Path) -> Path:
    """Where the perf file of dumps in ``out`` goes without ``--perf-dir``: beside a ``dumpOutput*`` folder (the
    benchmark tool's layout), else in ``out``."""
    return out.parent if out.name.startswith("dumpOutput") else out


def write_summary(summary: InferSummary, out: Path, device_id: int = 0, perf_dir: str | os.PathLike | None = None) -> InferSummary:
    """The vendor perf file (:func:`default_perf_dir` unless ``perf_dir``) and ``summary.json``."""
    perf_target = Path(perf_dir) if perf_dir else default_perf_dir(out)
    summary.perf_file = str(write_perf_file(perf_target / perf_file_name(summary.batch_size, device_id), perf_stats(summary)))
    atomic_write_json(out / "summary.json", summary.to_dict())
    return summary


def perf_stats(s: InferSummary) -> PerfStats:
    lat = s.latency_ms
    mean = {k: v["mean"] for k, v in lat.items()}
    per_img_infer = mean["infer"] / s.batch_size if s.batch_size else 0.0
    return PerfStats(
        batch_size=s.batch_size,
        e2e_fps=s.throughput_fps,
        e2e_latency_ms=s.wall_s * 1000.0,
        interface_fps=s.infer_fps,
        infer_fps=s.infer_fps,
        infer_latency_ms=per_img_infer,
        read_fps=fps(1, mean["read"] / 1000.0),
        read_latency_ms=mean["read"],
        preprocess_fps=fps(1, mean["preprocess"] / 1000.0),
        preprocess_latency_ms=mean["preprocess"],
        post_fps=fps(1, mean["postprocess"] / 1000.0),
        post_latency_ms=mean["postprocess"],
    )


def _no_advance(n: int = 1) -> None:
    return None


class _null_bar:
    def __enter__(self) -> Callable[[int], None]:
        return _no_advance

    def __exit__(self, *exc: object) -> None:
        return None


def gather_items(images: str | None = None, input_info: str | None = None) -> list[InputItem]:
    """Items from ``--images DIR`` or ``--input-info FILE`` (exactly one)."""
    if bool(images) == bool(input_info):
        raise UsageError("give exactly one input: --images DIR or --input-info FILE")
    if images:
        p = Path(images)
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
            return [InputItem(p.stem, str(p), "image")]
        if not p.is_dir():
            raise FcosError(f"{p}: no such folder of images")
        found = items_from_images(p)
        if not found:
            raise FcosError(f"{p}: no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
        return found
    return items_from_info(input_info)  # type: ignore[arg-type]
