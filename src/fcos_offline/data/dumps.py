"""Engine output dumps: per image ``labels`` int64 [N] and ``dets`` float32 [N, 5] (N = max_per_img, 100 by default).

``dets`` rows are x1, y1, x2, y2, score in input-canvas pixels; after the last detection
``labels`` is -1 and ``dets`` rows are zero.

File names, per image stem:

=======================  ======================  ======================  =====================
naming                   labels                  dets                    written by
=======================  ======================  ======================  =====================
recipe (``fmt="bin"``)   ``<stem>_1.bin``        ``<stem>_2.bin``        benchmark tool, us
ais_bench (0-based)      ``<stem>_0.bin``        ``<stem>_1.bin``        ais_bench
numpy (``fmt="npy"``)    ``<stem>_labels.npy``   ``<stem>_dets.npy``     us
=======================  ======================  ======================  =====================

``.bin`` files are raw little-endian arrays (``tofile``). ``_1`` means labels in one naming and
dets in the other, so by default :func:`read_dumps` decides by byte size: labels are
``8 * N`` bytes (800 for N = 100), dets ``20 * N`` bytes (2000): any N is read, the pair's sizes
tell it (a model exported with ``max_per_img=50`` dumps 400 + 1000 bytes). With ``net_out_num`` (the recipe's flag)
it reads labels from ``_{net_out_num-2}`` and dets from ``_{net_out_num-1}`` and checks sizes.

Writes are atomic (temporary name, then ``os.replace``), so an interrupted run never leaves a
torn dump: a pair is either complete or missing (:func:`dumps_complete`, used by ``--resume``).
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import numpy as np

from fcos_offline.errors import BadFileError, FcosError, first_line
from fcos_offline.io import atomic_write_bytes

FORMATS = ("bin", "npy")
NUM_DETS = 100


def dump_paths(out_dir: str | os.PathLike, stem: str, fmt: str = "bin") -> tuple[Path, Path]:
    """The (labels, dets) paths we write for ``stem`` in format ``fmt``."""
    out = Path(out_dir)
    if fmt == "bin":
        return out / f"{stem}_1.bin", out / f"{stem}_2.bin"
    if fmt == "npy":
        return out / f"{stem}_labels.npy", out / f"{stem}_dets.npy"
    raise FcosError(f"dump format must be one of {FORMATS}, got {fmt!r}")


_DUMP_NAME = re.compile(r".+_(\d+\.bin|labels\.npy|dets\.npy)")


def is_dump_file(path: str | os.PathLike) -> bool:
    """Named like a dump: ``<stem>_<N>.bin`` (the recipe's, ais_bench's) or ``<stem>_labels/_dets.npy``."""
    return bool(_DUMP_NAME.fullmatch(Path(path).name))


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def write_dumps(out_dir: str | os.PathLike, stem: str, labels: np.ndarray, dets: np.ndarray, fmt: str = "bin") -> tuple[Path, Path]:
    """Write one image's labels [N] (int64) and dets [N, 5] (float32) atomically; return the paths."""
    labels_arr = np.ascontiguousarray(labels, dtype=np.int64).reshape(-1)
    dets_arr = np.ascontiguousarray(dets, dtype=np.float32)
    if dets_arr.ndim != 2 or dets_arr.shape[1] != 5 or dets_arr.shape[0] != labels_arr.shape[0]:
        raise FcosError(f"dets must be [N, 5] with N = len(labels) = {labels_arr.shape[0]}, got {dets_arr.shape}")
    labels_path, dets_path = dump_paths(out_dir, stem, fmt)
    labels_path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "bin":
        atomic_write_bytes(labels_path, labels_arr.astype("<i8").tobytes())
        atomic_write_bytes(dets_path, dets_arr.astype("<f4").tobytes())
    else:
        atomic_write_bytes(labels_path, _npy_bytes(labels_arr))
        atomic_write_bytes(dets_path, _npy_bytes(dets_arr))
    return labels_path, dets_path


def pair_size(labels_bytes: int, dets_bytes: int) -> int | None:
    """K when ``labels_bytes``/``dets_bytes`` are a labels (int64 x K) and dets (float32 x K x 5) pair, else None."""
    if labels_bytes > 0 and labels_bytes % 8 == 0 and dets_bytes * 2 == labels_bytes * 5:
        return labels_bytes // 8
    return None


def dumps_complete(out_dir: str | os.PathLike, stem: str, fmt: str = "bin", num_dets: int | None = None) -> bool:
    """Whether both dump files of ``stem`` exist as a consistent pair (of ``num_dets`` detections, if given)."""
    labels_path, dets_path = dump_paths(out_dir, stem, fmt)
    if not (labels_path.is_file() and dets_path.is_file()):
        return False
    if fmt == "bin":
        k = pair_size(labels_path.stat().st_size, dets_path.stat().st_size)
        return k is not None and (num_dets is None or k == num_dets)
    try:
        k = np.load(labels_path, mmap_mode="r").size
        return bool(np.load(dets_path, mmap_mode="r").size == 5 * k and k > 0 and (num_dets is None or k == num_dets))
    except Exception:
        return False


def _size_text(num_dets: int | None) -> str:
    if num_dets is None:
        return "labels are int64 x K = 8K bytes, dets float32 x K x 5 = 20K bytes, for the same K"
    return f"labels are int64 x {num_dets} = {8 * num_dets} bytes, dets float32 x {num_dets} x 5 = {20 * num_dets} bytes"


def _load_bin(path: Path, role: str, num_dets: int) -> np.ndarray:
    expected = 8 * num_dets if role == "labels" else 20 * num_dets
    size = path.stat().st_size
    if size != expected:
        raise BadFileError(path, f"{size} bytes, expected {role} ({_size_text(num_dets)})")
    if role == "labels":
        return np.fromfile(path, dtype="<i8").astype(np.int64)
    return _finite(path, np.fromfile(path, dtype="<f4").astype(np.float32).reshape(num_dets, 5))


def _finite(path: Path, dets: np.ndarray) -> np.ndarray:
    """``dets`` if every value is finite; a NaN/inf (an engine or precision fault) skips the image."""
    bad = ~np.isfinite(dets)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise BadFileError(path, f"dets hold {int(bad.sum())} NaN/inf value(s) (first in row {row}); not evaluated")
    return dets


def _load_npy(path: Path, role: str, num_dets: int | None) -> np.ndarray:
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as exc:
        raise BadFileError(path, f"not a readable .npy file ({first_line(exc, 160)})") from None
    if not isinstance(arr, np.ndarray):  # np.load also opens .npz archives
        raise BadFileError(path, "not a .npy array (an .npz archive?)")
    k = num_dets if num_dets is not None else (arr.size if role == "labels" else arr.size // 5)
    want = k if role == "labels" else 5 * k
    kind_ok = arr.dtype.kind in "iu" if role == "labels" else arr.dtype.kind == "f"
    if arr.size != want or k < 1 or not kind_ok:
        raise BadFileError(path, f"{arr.dtype} {arr.shape}, expected {role} ({_size_text(num_dets)})")
    if role == "labels":
        return arr.reshape(k).astype(np.int64)
    return _finite(path, arr.reshape(k, 5).astype(np.float32))


def _pair_by_size(stem: str, group: dict[int, Path], num_dets: int | None) -> tuple[Path, Path, int]:
    """(labels, dets, K): the two files whose sizes make a labels/dets pair (of ``num_dets``, if given)."""
    found = ", ".join(p.name for p in group.values())
    if len(group) == 1:
        (only,) = group.values()
        size = only.stat().st_size
        missing = "dets" if size % 20 or size == 8 * (num_dets or NUM_DETS) else "labels"
        raise BadFileError(only, f"no {missing} dump for {stem} (found {found})")
    if len(group) > 2:
        raise BadFileError(group[min(group)], f"{len(group)} dump files for {stem} ({found}); give net_out_num to choose")
    a, b = sorted(group.values(), key=lambda p: p.stat().st_size)
    sa, sb = a.stat().st_size, b.stat().st_size
    k = pair_size(sa, sb)
    if k is not None and (num_dets is None or k == num_dets):
        return a, b, k
    if sa % 8 == 0 and sa > 0 and (num_dets is None or sa == 8 * num_dets):
        raise BadFileError(
            b,
            f"{sb} bytes fits neither dump: beside {a.name} ({sa} bytes, labels of {sa // 8}) dets are "
            f"{20 * (sa // 8)} bytes ({_size_text(num_dets or sa // 8)})",
        )
    raise BadFileError(a, f"{sa} bytes fits neither dump ({_size_text(num_dets)})")


def _pair_by_index(stem: str, group: dict[int, Path], net_out_num: int, num_dets: int | None) -> tuple[Path, Path, int]:
    wanted = {"labels": net_out_num - 2, "dets": net_out_num - 1}
    hint = "omit net_out_num to detect the naming (recipe _1/_2 or ais_bench _0/_1) by size"
    for role, idx in wanted.items():
        if idx not in group:
            found = ", ".join(p.name for p in group.values())
            raise BadFileError(
                group[min(group)],
                f"no {stem}_{idx}.bin ({role}, net_out_num={net_out_num}); found {found}; {hint}",
            )
    labels_path, dets_path = group[wanted["labels"]], group[wanted["dets"]]
    k = pair_size(labels_path.stat().st_size, dets_path.stat().st_size)
    if k is None or (num_dets is not None and k != num_dets):
        raise BadFileError(labels_path, f"sizes do not match net_out_num={net_out_num} ({_size_text(num_dets)}); {hint}")
    return labels_path, dets_path, k


def read_dumps(
    directory: str | os.PathLike,
    num_dets: int | None = None,
    net_out_num: int | None = None,
    skipped: list[BadFileError] | None = None,
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Load every dump pair of ``directory`` as ``{stem: (labels [N] int64, dets [N, 5] float32)}``.

    Naming is detected per stem (see the module docstring). A bad or unpaired file raises
    :class:`BadFileError`, or, when a ``skipped`` list is given, is appended there and its stem
    left out. Files other than ``*.bin`` / ``*.npy`` are ignored.
    """
    root = Path(directory)
    if not root.is_dir():
        raise FcosError(f"dump folder not found: {root}")
    if net_out_num is not None and net_out_num < 2:
        raise FcosError(f"net_out_num must be at least 2, got {net_out_num}")

    def fail(error: BadFileError) -> None:
        if skipped is None:
            raise error
        skipped.append(error)

    bins: dict[str, dict[int, Path]] = {}
    npys: dict[str, dict[str, Path]] = {}
    for path in sorted(root.iterdir()):
        if not path.is_file():
            continue
        if path.suffix == ".bin":
            stem, _, idx = path.stem.rpartition("_")
            if stem and idx.isdigit():
                bins.setdefault(stem, {})[int(idx)] = path
            else:
                fail(BadFileError(path, "not a dump name (expected <stem>_<n>.bin)"))
        elif path.suffix == ".npy":
            stem, _, role = path.stem.rpartition("_")
            if stem and role in ("labels", "dets"):
                npys.setdefault(stem, {})[role] = path
            else:
                fail(BadFileError(path, "not a dump name (expected <stem>_labels.npy or <stem>_dets.npy)"))

    result: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for stem, group in bins.items():
        try:
            if net_out_num is None:
                labels_path, dets_path, k = _pair_by_size(stem, group, num_dets)
            else:
                labels_path, dets_path, k = _pair_by_index(stem, group, net_out_num, num_dets)
            result[stem] = (_load_bin(labels_path, "labels", k), _load_bin(dets_path, "dets", k))
        except BadFileError as exc:
            fail(exc)
    for stem, roles in npys.items():
        try:
            if stem in bins:
                raise BadFileError(next(iter(roles.values())), f"{stem} is also dumped as .bin; .npy ignored")
            missing = {"labels", "dets"} - roles.keys()
            if missing:
                raise BadFileError(next(iter(roles.values())), f"no {missing.pop()} .npy for {stem}")
            labels = _load_npy(roles["labels"], "labels", num_dets)
            result[stem] = (labels, _load_npy(roles["dets"], "dets", labels.shape[0]))
        except BadFileError as exc:
            fail(exc)
    return dict(sorted(result.items()))
