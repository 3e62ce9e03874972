"""Images -> letterboxed, normalised float32 tensors (spec §8.2), one ``<stem>.bin`` per image.

Decoding is OpenCV's ``IMREAD_COLOR`` (BGR uint8; grey, alpha, CMYK and 16-bit inputs are
converted by OpenCV, EXIF orientation applied), the same pixels as ``cv2.imread``.

Bad inputs are detected before decoding where OpenCV might otherwise return a partial picture:

- a 0-byte file;
- a JPEG whose last start-of-scan marker (FFDA) is not followed by an end-of-image marker (FFD9):
  the file was cut (bytes after a complete image, e.g. camera trailers, are accepted);
- a PNG without its IEND chunk, a BMP shorter than the size its header declares;
- anything OpenCV cannot decode (``imdecode`` returns None), e.g. a text file named ``.jpg``;
- a JPEG whose decoding libjpeg reports as corrupt ("Corrupt JPEG data: ...", "Premature end
  of JPEG file"): bit rot, or a cut file with an end-of-image marker appended. OpenCV returns a
  picture for these and libjpeg only prints to stderr, so that output is captured around the call.

Each is reported as :class:`~fcos_offline.errors.BadFileError`; :func:`preprocess_folder`
skips and lists them.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import cv2
import numpy as np

from fcos_offline.data.letterbox import Letterbox, letterbox_for
from fcos_offline.errors import BadFileError, FcosError, UsageError
from fcos_offline.io import OutputLock, atomic_write_bytes, atomic_write_json, check_output_apart, opens_without_waiting
from fcos_offline.progress import progress_bar, warn

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
MEAN_BGR = (102.9801, 115.9465, 122.7717)
STD_BGR = (1.0, 1.0, 1.0)
#: decoding limits (see :func:`read_image`)
DEFAULT_MAX_PIXELS = 200_000_000
MAX_IMAGE_BYTES = 1 << 30
_MEAN32 = np.array(MEAN_BGR, dtype=np.float32).reshape(3, 1, 1)

T = TypeVar("T")
R = TypeVar("R")


def _truncation_problem(data: bytes) -> str | None:
    """Why ``data`` looks cut short, or None."""
    if data[:2] == b"\xff\xd8":
        sos = data.rfind(b"\xff\xda")
        if sos < 0:
            return "JPEG without image data (no start-of-scan marker)"
        if data.rfind(b"\xff\xd9") < sos:
            return "truncated JPEG (no end-of-image marker FFD9 after the image data)"
    elif data[:8] == b"\x89PNG\r\n\x1a\n":
        if data.rfind(b"IEND") < 0:
            return "truncated PNG (no IEND chunk)"
    elif data[:2] == b"BM" and len(data) >= 6:
        declared = int.from_bytes(data[2:6], "little")
        if declared and len(data) < declared:
            return f"truncated BMP ({len(data)} of {declared} bytes)"
    return None


_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def declared_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) a JPEG, PNG or BMP header declares, read before any pixel is decoded (None: unknown)."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 24:
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    if data[:2] == b"BM" and len(data) >= 26:
        return abs(int.from_bytes(data[18:22], "little", signed=True)), abs(int.from_bytes(data[22:26], "little", signed=True))
    if data[:2] == b"\xff\xd8":
        i = 2
        while i + 9 < len(data):
            if data[i] != 0xFF:
                i += 1
                continue
            marker = data[i + 1]
            if marker in _JPEG_SOF:
                return int.from_bytes(data[i + 7 : i + 9], "big"), int.from_bytes(data[i + 5 : i + 7], "big")
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0xFF:
                i += 2 if marker != 0xFF else 1
                continue
            i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


def max_image_pixels() -> int:
    """The largest image (width x height) we decode: ``FCOS_OFFLINE_MAX_PIXELS``, default 200 megapixels."""
    try:
        return int(os.environ.get("FCOS_OFFLINE_MAX_PIXELS", DEFAULT_MAX_PIXELS))
    except ValueError:
        return DEFAULT_MAX_PIXELS


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Decode an image as BGR uint8 HxWx3, exactly like ``cv2.imread(path, cv2.IMREAD_COLOR)``.

    Refused before decoding: anything but a regular file, files over 1 GiB, and images whose
    header declares more than :func:`max_image_pixels` pixels (a 32000x32000 PNG of a few bytes
    would otherwise take 3 GB and seconds to decode).
    """
    try:
        with open(path, "rb", opener=opens_without_waiting) as f:  # a named pipe is refused, not waited on
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise BadFileError(path, "not a regular file (a device, pipe or socket)")
            if st.st_size > MAX_IMAGE_BYTES:
                raise BadFileError(path, f"{st.st_size:,} bytes, more than the {MAX_IMAGE_BYTES:,} an image may have")
            data = f.read()
    except OSError as exc:
        raise BadFileError(path, f"cannot read ({exc.strerror or exc})") from exc
    return decode_image(data, path)


#: what libjpeg prints (and OpenCV passes over) when the data it decodes is damaged
_LIBJPEG_CORRUPT = ("Corrupt JPEG data", "Premature end of JPEG file")
#: libjpeg's report of bytes left over when the picture ended before the end marker: bit rot in the scan reads so,
#: and so does padding a writer left after a whole picture (which cv2.imread uses); the two cannot be told apart
_LIBJPEG_LEFTOVER = "extraneous bytes before marker 0xd9"
_STDERR_LOCK = threading.Lock()
_SINK: list[Any] = []  # this process's one file that libjpeg's warnings are caught in (made on first use)


def _imdecode_with_stderr(data: bytes) -> tuple[np.ndarray | None, list[str]]:
    """``cv2.imdecode`` and libjpeg's lines on file descriptor 2 meanwhile (it warns there, never raising).

    One thread at a time redirects the descriptor into one scratch file per process; whatever else
    reached it meanwhile (another thread's progress line) is passed on. Without a descriptor 2 or a
    scratch file (a full or read-only temporary folder) it decodes without looking.
    """
    with _STDERR_LOCK:
        sys.stderr.flush()
        try:
            if not _SINK:
                _SINK.append(tempfile.TemporaryFile())  # noqa: SIM115 - kept open for the process's life, reused per decode
            sink = _SINK[0]
            sink.seek(0)
            sink.truncate()
            saved = os.dup(2)
        except OSError:
            return cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR), []
        try:
            os.dup2(sink.fileno(), 2)
            img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        sink.seek(0)
        printed = sink.read().decode(errors="replace")
    ours = [line for line in printed.splitlines() if line.startswith(_LIBJPEG_CORRUPT)]
    others = "".join(line for line in printed.splitlines(keepends=True) if not line.startswith(_LIBJPEG_CORRUPT))
    if others:
        os.write(2, others.encode())
    return img, ours


def decode_image(data: bytes, name: object) -> np.ndarray:
    """An image file's bytes (``name``: where they came from) decoded as :func:`read_image` does;
    refused first: no bytes, more declared pixels than :func:`max_image_pixels`, a truncated file;
    refused after: a JPEG libjpeg reports as corrupt while decoding it (the picture would be partly garbage). Bytes
    left over before the end marker are refused too, with both readings named: bit rot in the scan reads that way,
    and so does padding after a whole picture, which the recipe's ``cv2.imread`` would use (re-save such a file)."""
    if not data:
        raise BadFileError(name, "empty file (0 bytes)")
    size = declared_size(data)
    limit = max_image_pixels()
    if size is not None and size[0] * size[1] > limit:
        raise BadFileError(name, f"declares {size[0]}x{size[1]} pixels, more than the limit of {limit:,} (set FCOS_OFFLINE_MAX_PIXELS to raise it)")
    problem = _truncation_problem(data)
    if problem:
        raise BadFileError(name, problem)
    if data[:2] == b"\xff\xd8":
        img, lines = _imdecode_with_stderr(data)
        if lines and img is not None:
            if all(_LIBJPEG_LEFTOVER in line for line in lines):
                raise BadFileError(
                    name,
                    f"corrupt JPEG (libjpeg: {'; '.join(lines)}): bit rot in the scan, or padding after a whole picture; "
                    "if the picture looks right, re-save the file",
                )
            raise BadFileError(name, f"corrupt JPEG (libjpeg: {'; '.join(lines)}); its picture would be partly wrong")
    else:
        img = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if img is None:
        raise BadFileError(name, "not a decodable image (OpenCV cannot read it)")
    return img


def letterbox_uint8(img_bgr: np.ndarray, canvas_h: int, canvas_w: int) -> tuple[np.ndarray, Letterbox]:
    """The first half of :func:`preprocess_image`: the image resized to fit the canvas (uint8) and its placement.

    Resize with ``cv2.INTER_LINEAR`` on uint8, which is what ``mmcv.imresize`` does.
    """
    if img_bgr.ndim != 3 or img_bgr.shape[2] != 3 or img_bgr.dtype != np.uint8:
        raise ValueError(f"expected a BGR uint8 HxWx3 image, got {img_bgr.dtype} {img_bgr.shape}")
    h, w = img_bgr.shape[:2]
    lb = letterbox_for(w, h, canvas_h, canvas_w)
    return cv2.resize(img_bgr, (lb.new_w, lb.new_h), interpolation=cv2.INTER_LINEAR), lb


def to_input_tensor(resized: np.ndarray, pad_top: int, pad_left: int, canvas_h: int, canvas_w: int) -> np.ndarray:
    """The second half: subtract the BGR mean in float32 (std is 1), zero padding around, channels first."""
    out = np.zeros((3, canvas_h, canvas_w), dtype=np.float32)
    region = out[:, pad_top : pad_top + resized.shape[0], pad_left : pad_left + resized.shape[1]]
    np.subtract(resized.transpose(2, 0, 1), _MEAN32, out=region)
    return out


def preprocess_image(img_bgr: np.ndarray, canvas_h: int, canvas_w: int) -> tuple[np.ndarray, Letterbox]:
    """Letterbox and normalise one BGR uint8 image into a float32 [3, H, W] tensor (spec §8.2).

    :func:`letterbox_uint8` then :func:`to_input_tensor`; a distributed run does the first half in
    a CPU task and the second in the engine's actor (uint8 travels, bit-identical result).
    """
    resized, lb = letterbox_uint8(img_bgr, canvas_h, canvas_w)
    return to_input_tensor(resized, lb.pad_top, lb.pad_left, canvas_h, canvas_w), lb


def first_per_stem(images: Iterable[Path]) -> tuple[list[Path], list[BadFileError]]:
    """Dumps and tensors are named by stem: the first image of each stem (in the given order), and the rest as skips."""
    seen: dict[str, Path] = {}
    dropped = []
    for image in images:
        if image.stem in seen:
            dropped.append(BadFileError(image, f"same stem as {seen[image.stem].name}; skipped"))
        else:
            seen[image.stem] = image
    return list(seen.values()), dropped


def list_images(src_dir: str | os.PathLike) -> list[Path]:
    """Image files (.jpg/.jpeg/.png/.bmp, any case) directly in ``src_dir``, sorted by file name.

    Entries that only look like images (a dangling or looping symlink, a device) are listed too,
    so that reading them fails with a line that names them instead of their vanishing silently.
    """
    src = Path(src_dir)
    if not src.is_dir():
        raise FcosError(f"image folder not found: {src}")
    return sorted(
        (p for p in src.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not p.is_dir()),
        key=lambda p: p.name,
    )


def cap_workers(workers: int) -> int:
    """Worker processes asked for, at most the cores this process may use (said in one line when capped).

    Decoding is CPU-bound: more processes than cores only take turns on them, each with its own
    memory (``--workers 64`` on 2 cores: 66 processes, 4.3 GB, 2.5x slower than 2).
    """
    from fcos_offline.cpu import cpu_count

    cores = cpu_count()
    if workers > cores:
        warn(f"{workers} worker processes asked for, more than the {cores} cores this process may use; using {cores}")
        return cores
    return workers


def parallel_map(func: Callable[[T], R], items: Iterable[T], total: int, workers: int | None, description: str) -> Iterator[R]:
    """``map`` over a process pool (in-process for one worker) with a progress bar, in order.

    ``workers`` None means one per core; more than the cores are capped to them (:func:`cap_workers`).
    """
    from fcos_offline.cpu import cpu_count

    workers = max(1, min(cap_workers(workers) if workers else cpu_count(), total or 1))
    if workers == 1:
        with progress_bar(total, description, unit="img") as advance:
            for item in items:
                yield func(item)
                advance(1)
        return
    # spawn: no fork of a process that already runs threads (progress bar, OpenCV's pool)
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_single_threaded_worker) as pool, progress_bar(total, description, unit="img") as advance:
        for result in pool.imap(func, items, chunksize=2):
            yield result
            advance(1)


def _single_threaded_worker() -> None:
    """One OpenCV thread per worker process (the pool already uses every core); Ctrl-C is the parent's to handle."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    cv2.setNumThreads(1)


#: written beside the tensors: counts, timing and the skipped files
SUMMARY_FILE = "preprocess.json"


@dataclass
class PreprocessSummary:
    """What :func:`preprocess_folder` did."""

    dst_dir: str
    canvas_h: int
    canvas_w: int
    written: int = 0
    seconds: float = 0.0
    bad: list[BadFileError] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        """Throughput over the whole run (decode + resize + normalise + write)."""
        return self.written / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        """What ``preprocess.json`` (beside the tensors) records."""
        return {
            "canvas": [self.canvas_h, self.canvas_w],
            "written": self.written,
            "seconds": self.seconds,
            "images_per_s": self.images_per_s,
            "skipped": [{"path": e.path, "problem": e.problem} for e in self.bad],
        }


def _preprocess_one(task: tuple[str, str, int, int]) -> tuple[str, str | None]:
    src, dst, canvas_h, canvas_w = task
    try:
        tensor, _ = preprocess_image(read_image(src), canvas_h, canvas_w)
    except (FcosError, cv2.error) as exc:
        return src, getattr(exc, "problem", str(exc))
    atomic_write_bytes(Path(dst), memoryview(tensor).cast("B"))  # type: ignore[arg-type]  # numpy stubs: ndarray is a Buffer only on 3.12+
    return src, None


def preprocess_folder(
    src_dir: str | os.PathLike,
    dst_dir: str | os.PathLike,
    canvas_h: int,
    canvas_w: int,
    workers: int | None = None,
) -> PreprocessSummary:
    """Write ``<stem>.bin`` (float32 [3, H, W], C order) for every image of ``src_dir``.

    Runs on ``workers`` processes (default and most: the cores this process may use); bad files are skipped and listed in
    the summary; two images with the same stem keep the first by file name. ``dst_dir`` must lie
    apart from ``src_dir`` and has one writer at a time.
    """
    images = list_images(src_dir)
    if not images:
        raise FcosError(f"no images (.jpg/.jpeg/.png/.bmp) in {src_dir}")
    dst = Path(dst_dir)
    if dst.exists() and not dst.is_dir():
        raise UsageError(f"{dst}: exists and is not a folder; --bin_file_path names the folder the tensors go to")
    check_output_apart([dst], [src_dir], inside_ok=True)  # images are listed from their folder, not below
    with OutputLock(dst, "preprocess"):
        summary = PreprocessSummary(dst_dir=str(dst), canvas_h=canvas_h, canvas_w=canvas_w)
        kept, summary.bad = first_per_stem(images)
        tasks = [(str(image), str(dst / f"{image.stem}.bin"), canvas_h, canvas_w) for image in kept]
        start = time.perf_counter()
        try:
            for src, problem in parallel_map(_preprocess_one, tasks, len(tasks), workers, "preprocess"):
                if problem is None:
                    summary.written += 1
                else:
                    summary.bad.append(BadFileError(src, problem))
        except BaseException:
            # the pool is gone (terminated): remove what its workers were writing when they stopped
            for part in dst.glob("*.bin.part*"):
                part.unlink(missing_ok=True)
            raise
        summary.seconds = time.perf_counter() - start
        summary.bad.sort(key=lambda e: e.path)
        atomic_write_json(dst / SUMMARY_FILE, summary.to_json())
    return summary
