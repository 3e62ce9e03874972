"""File writes that never leave a torn file, and reads that never run away.

Every file fcos-offline writes goes through :func:`atomic_write_bytes` (temporary name, then
``os.replace``) or :func:`atomic_folder` (a ``.part`` folder renamed into place), so an
interrupted run leaves either the old file or the new one. A full disk becomes
:class:`~fcos_offline.errors.DiskFullError` naming the file; other write failures a one-line
:class:`~fcos_offline.errors.FcosError`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fcos_offline.errors import DiskFullError, FcosError, UsageError

#: the most bytes a text or JSON input may have before we refuse to read it (COCO train annotations: 450 MB)
MAX_TEXT_BYTES = 1 << 30


def _a(what: str) -> str:
    return ("an " if what[:1].lower() in "aeiou." else "a ") + what


def translate_os_error(path: object, exc: OSError) -> FcosError:
    """The one-line error for a failed write of ``path``."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(path, exc.strerror or "")
    return FcosError(f"cannot write {path}: {exc.strerror or exc}")


def writes_through(path: str | os.PathLike) -> bool:
    """True for an output a rename must not replace: a symlink (``/dev/stdout`` -> the shell's
    redirect, a link the user made), a device or a named pipe; it is written through instead."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return False
    return stat.S_ISLNK(mode) or not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def atomic_write_bytes(path: str | os.PathLike, payload: bytes | memoryview) -> None:
    """Write ``payload`` to ``path`` via a temporary name and ``os.replace`` (no torn files).

    The temporary file is removed on failure and an existing ``path`` is left as it was. A target
    a rename must not replace (see :func:`writes_through`) is written directly.
    """
    path = Path(path)
    if writes_through(path):
        try:
            with open(path, "wb") as f:
                f.write(payload)
        except OSError as exc:
            raise translate_os_error(path, exc) from None
        return
    tmp = path.with_name(f"{path.name}.part{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
        os.replace(tmp, path)
    except OSError as exc:
        raise translate_os_error(path, exc) from None
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_json(path: str | os.PathLike, payload: Any, indent: int | None = 2) -> None:
    """:func:`atomic_write_bytes` for a JSON document."""
    atomic_write_bytes(path, json.dumps(payload, indent=indent).encode())


def read_stamp(path: str | os.PathLike) -> dict[str, Any]:
    """A small JSON record we wrote (a key stamp): its object, or {} when it is missing or unreadable."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def check_replaceable(path: str | os.PathLike, marker: str) -> Path:
    """``path`` as an absolute path, if :func:`atomic_folder` may replace it (missing, empty, or holding ``marker``)."""
    final = Path(os.path.abspath(path))
    if final.exists() and not final.is_dir():
        raise UsageError(f"{path} exists and is not a folder; choose another output folder")
    if final.is_dir() and any(final.iterdir()) and not (final / marker).is_file():
        raise UsageError(f"{path} is a folder with other files in it (no {marker}); choose a new or empty output folder")
    return final


@contextmanager
def atomic_folder(path: str | os.PathLike, marker: str) -> Iterator[Path]:
    """Yield a fresh ``<path>.part`` folder; on success it replaces ``path`` whole.

    An existing ``path`` is only replaced when it is an empty folder or one holding ``marker``
    (an earlier output of the same kind); anything else (a file, someone's folder) is refused
    before any work starts. On failure the partial folder is removed and ``path`` is left untouched.
    """
    final = check_replaceable(path, marker)
    tmp = final.with_name(final.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    try:
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
    except OSError as exc:
        raise translate_os_error(final, exc) from None
    shutil.rmtree(old, ignore_errors=True)


def read_text_bounded(path: str | os.PathLike, limit: int = MAX_TEXT_BYTES, what: str = "file") -> str:
    """The text of ``path``, refusing files (or devices) larger than ``limit`` bytes."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise FcosError(f"{p}: not a regular file (a device, pipe or socket), expected {_a(what)}")
            if st.st_size > limit:
                raise FcosError(f"{p}: {st.st_size:,} bytes, more than the {limit:,} {_a(what)} may have")
            data = f.read(limit + 1)
    except IsADirectoryError:
        raise FcosError(f"{p}: is a folder, expected {_a(what)}") from None
    except OSError as exc:
        raise FcosError(f"cannot read {what} {p}: {exc.strerror or exc}") from None
    if len(data) > limit:  # grew while we read it
        raise FcosError(f"{p}: larger than {limit:,} bytes; not {_a(what)} this tool reads")
    try:
        return data.decode()
    except UnicodeDecodeError as exc:
        raise FcosError(f"{p}: not text (byte {exc.start} is not UTF-8), expected {_a(what)}") from None


def read_json_bounded(path: str | os.PathLike, limit: int = MAX_TEXT_BYTES, what: str = "JSON file") -> Any:
    """A JSON document from ``path`` (size-bounded); a malformed file is one line naming it."""
    text = read_text_bounded(path, limit, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise FcosError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except RecursionError:
        raise FcosError(f"{path}: nested too deeply to be {_a(what)}") from None


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def json_digest(payload: Any) -> str:
    """A short stable digest of a JSON-able value (keys sorted)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def process_alive(pid: int) -> bool:
    """Is a process with this pid running (ours or another user's)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
