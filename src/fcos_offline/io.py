"""File writes that never leave a torn file, and reads that never run away.

Every file fcos-offline writes goes through :func:`atomic_write_bytes` (temporary name, then
``os.replace``) or :func:`atomic_folder` (a ``.part`` folder renamed into place), so an
interrupted run leaves either the old file or the new one. A full disk becomes
:class:`~fcos_offline.errors.DiskFullError` naming the file; other write failures a one-line
:class:`~fcos_offline.errors.FcosError`.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import stat
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from functools import wraps
from inspect import signature
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

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
        with open(path, "rb", opener=opens_without_waiting) as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):  # a pipe or device named like our stamp: not ours
                return {}
            value = json.loads(f.read())
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
def atomic_folder(path: str | os.PathLike, marker: str, verb: str = "fcos-offline process") -> Iterator[Path]:
    """Yield a fresh ``<path>.part`` folder; on success it replaces ``path`` whole.

    An existing ``path`` is only replaced when it is an empty folder or one holding ``marker``
    (an earlier output of the same kind); anything else (a file, someone's folder) is refused
    before any work starts. On failure the partial folder is removed and ``path`` is left untouched.
    One writer at a time: an :class:`OutputLock` beside ``path`` is held throughout.
    """
    final = check_replaceable(path, marker)
    with OutputLock(final, verb, beside=True):
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
        with open(p, "rb", opener=opens_without_waiting) as f:  # a named pipe is refused, not waited on
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


def _overlap(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_output_apart(outputs: Iterable[str | os.PathLike | None], inputs: Iterable[str | os.PathLike | None], inside_ok: bool = False) -> None:
    """Refuse (one line, :class:`UsageError`) when an output path and an input path overlap.

    Paths are compared resolved (symlinks followed). An output overlaps an input when it is the
    same path, holds it (the verb writes into, clears or replaces a folder the input is in) or lies
    inside it (the verb writes into a folder of its inputs, where its files could be read as
    inputs; ``inside_ok``: a verb whose output there is never read as an input). ``None`` entries
    and inputs that do not exist (URLs, files not made yet) are skipped.
    """
    given = [(str(i), Path(i).resolve()) for i in inputs if i is not None and Path(i).exists()]
    for out in outputs:
        if out is None:
            continue
        target = Path(out).resolve()
        for text, source in given:
            if _overlap(target, source) and not (inside_ok and source in target.parents):
                how = "is" if target == source else ("holds" if target in source.parents else "is inside")
                raise UsageError(
                    f"the output {out} {how} the input {text}"
                    + ("" if how == "is" else f" ({target} vs {source})")
                    + "; an output never overlaps an input: choose an output outside it"
                )


class OutputLock:
    """One writer per output: an exclusive ``flock`` on a lock file, refused in one line when held.

    The lock file is ``<folder>/.fcos-lock`` (``beside``: ``<parent>/.<name>.lock``, for an output
    replaced whole). The kernel releases the lock when its holder exits, however it ends (a killed
    run never leaves the folder locked); the holder removes the file when it is done, and a lock
    taken on a file another holder has just removed is retaken on the current one. A folder the lock
    created is removed again when the work fails before writing anything into it.
    """

    def __init__(self, folder: str | os.PathLike, verb: str, beside: bool = False) -> None:
        self.folder = Path(folder).resolve()  # links followed: two spellings of one folder share one lock
        self.verb = verb
        self.path = self.folder.with_name(f".{self.folder.name}.lock") if beside else self.folder / ".fcos-lock"
        self.fd: int | None = None
        self.created = False

    def __enter__(self) -> OutputLock:
        self.created = not self.path.parent.exists()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise FcosError(f"cannot make the output folder {self.path.parent}: {exc.strerror or exc}") from None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise translate_os_error(self.path, exc) from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid, _, verb = os.pread(fd, 64, 0).decode(errors="replace").strip().partition(" ")
                os.close(fd)
                raise FcosError(
                    f"{self.folder} is in use by another {verb or self.verb} (pid {pid or '?'}); wait for it to finish or choose another output"
                ) from None
            except OSError as exc:  # a file system without locks
                os.close(fd)
                raise FcosError(f"cannot lock {self.path}: {exc.strerror or exc}") from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # its holder removed this file as we opened it: lock the current one
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()} {self.verb}".encode(), 0)  # who holds it, for the refusal line
        except OSError as exc:
            os.close(fd)
            raise translate_os_error(self.path, exc) from None
        self.fd = fd
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None
        if exc_type is not None and self.created:
            with suppress(OSError):  # not empty: the failed work's files stay for the user to see
                self.path.parent.rmdir()


P = ParamSpec("P")
R = TypeVar("R")


def locks_output(verb: str, argument: str = "output_dir") -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate a function so that it runs holding the :class:`OutputLock` of its ``argument`` folder."""

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        params = signature(fn)

        @wraps(fn)
        def locked(*args: P.args, **kwargs: P.kwargs) -> R:
            with OutputLock(params.bind(*args, **kwargs).arguments[argument], verb):
                return fn(*args, **kwargs)

        return locked

    return decorate


def opens_without_waiting(path: str | os.PathLike, flags: int) -> int:
    """An ``opener`` for :func:`open`: ``O_NONBLOCK``, so that a named pipe opens at once (its
    ``fstat`` then refuses it) instead of waiting forever for a writer; regular files read as usual."""
    return os.open(path, flags | os.O_NONBLOCK)
