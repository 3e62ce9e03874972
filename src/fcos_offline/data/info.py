"""``.info`` lists: one ``<index> <path> <width> <height>`` line per file, like the recipe's get_info.py.

- ``bin`` mode: every ``*.bin`` of a folder with the canvas size given on the command line (the
  benchmark tool's input list). A .bin whose size is not ``3*W*H*4`` bytes is skipped and listed.
- ``jpg`` mode: every image (.jpg/.jpeg/.png/.bmp, any case) with its true width and height as
  OpenCV decodes it (EXIF orientation applied), which the postprocess uses to undo the letterbox.
  Undecodable images are skipped and listed.

Files are sorted by name and the index runs 0, 1, 2, ... without gaps. (The recipe writes
``glob`` order, which is unsorted, and restarts the index for each extension in jpg mode.) The
path is the folder as given joined with the file name.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from fcos_offline.data.preprocess import IMAGE_EXTENSIONS, first_per_stem, list_images, parallel_map, read_image
from fcos_offline.errors import BadFileError, FcosError
from fcos_offline.io import atomic_write_bytes, check_output_apart, read_text_bounded

MODES = ("bin", "jpg")
_LINE_BREAK = re.compile(r"[\r\n]")
#: a line: the index from the left, width and height from the right, the path between them verbatim
_INFO_LINE = re.compile(r"(\S+)\s(.+?)\s(\S+)\s(\S+)")


class InfoEntry(NamedTuple):
    """One line of an .info file."""

    index: int  # type: ignore[assignment]  # shadows tuple.index, as the .info format names it
    path: str
    width: int
    height: int


@dataclass
class InfoSummary:
    """What :func:`make_info` wrote and skipped."""

    out_path: str
    entries: list[InfoEntry] = field(default_factory=list)
    bad: list[BadFileError] = field(default_factory=list)


def format_info(entries: list[InfoEntry]) -> str:
    """The .info text: space-separated fields, one newline-terminated line per entry."""
    return "".join(f"{e.index} {e.path} {e.width} {e.height}\n" for e in entries)


def _image_size(path: str) -> tuple[str, int, int, str | None]:
    try:
        img = read_image(path)
    except BadFileError as exc:
        return path, 0, 0, exc.problem
    return path, int(img.shape[1]), int(img.shape[0]), None


def make_info(
    mode: str,
    src_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    width: int | None = None,
    height: int | None = None,
    workers: int | None = None,
) -> InfoSummary:
    """Write the .info list of ``src_dir`` (``mode`` "bin" needs the canvas width and height).

    Bad files are skipped and listed in the summary; nothing is written when no file is usable,
    and a folder without any candidate file raises FcosError. ``workers``: jpg-mode processes
    (default and most: the cores this process may use, see :func:`~fcos_offline.data.preprocess.cap_workers`).
    """
    if mode not in MODES:
        raise FcosError(f"mode must be one of {MODES}, got {mode!r}")
    src = Path(src_dir)
    if not src.is_dir():
        raise FcosError(f"folder not found: {src}")
    listed = Path(out_path).suffix.lower() in ({".bin"} if mode == "bin" else IMAGE_EXTENSIONS)
    check_output_apart([out_path], [src], inside_ok=not listed)  # the list may sit in the folder it lists, unless listed itself
    summary = InfoSummary(out_path=str(out_path))
    found: list[tuple[str, int, int]] = []
    if mode == "bin":
        if width is None or height is None or width <= 0 or height <= 0:
            raise FcosError("bin mode needs the positive canvas width and height")
        expected = 3 * width * height * 4
        bins = sorted(src.glob("*.bin"), key=lambda p: p.name)
        if not bins:
            raise FcosError(f"no .bin files in {src}")
        for p in bins:
            if _LINE_BREAK.search(p.name):
                summary.bad.append(BadFileError(p, "file name holds a line break; an .info line cannot list it"))
                continue
            try:
                size = p.stat().st_size
            except OSError as exc:
                summary.bad.append(BadFileError(p, f"cannot read ({exc.strerror or exc})"))
                continue
            if size != expected:
                summary.bad.append(BadFileError(p, f"{size} bytes, expected {expected} (float32 3x{height}x{width})"))
            else:
                found.append((os.path.join(str(src_dir), p.name), width, height))
    else:
        kept, summary.bad = first_per_stem(list_images(src))  # dumps are named by stem, as in preprocess
        paths = [os.path.join(str(src_dir), p.name) for p in kept]
        if not paths:
            raise FcosError(f"no images (.jpg/.jpeg/.png/.bmp) in {src}")
        summary.bad += [BadFileError(p, "file name holds a line break; an .info line cannot list it") for p in paths if _LINE_BREAK.search(p)]
        paths = [p for p in paths if not _LINE_BREAK.search(p)]
        for path, w, h, problem in parallel_map(_image_size, paths, len(paths), workers, "image sizes"):
            if problem is None:
                found.append((path, w, h))
            else:
                summary.bad.append(BadFileError(path, problem))
    summary.entries = [InfoEntry(i, path, w, h) for i, (path, w, h) in enumerate(found)]
    if summary.entries:
        out = Path(out_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out, format_info(summary.entries).encode())
    return summary


def _shown(line: str) -> str:
    """A line for an error message: whole when short, else its start and length."""
    return repr(line) if len(line) <= 120 else f"{line[:100]!r}... ({len(line):,} characters)"


def read_info(path: str | os.PathLike) -> list[InfoEntry]:
    """Parse an .info file; a malformed line raises FcosError naming the file and line number.

    The index is the first field and the sizes the last two; the path is everything between them,
    kept verbatim (any number of spaces, as :func:`format_info` wrote it) unless only its stripped form
    names a file (columns aligned with runs of spaces or tabs). Blank lines are ignored.
    """
    text = read_text_bounded(path, 256 << 20, "info file")
    entries: list[InfoEntry] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        if lineno == 1 and line.lstrip().startswith(("{", "[")):
            raise FcosError(f"{path}: a JSON file, not an .info list ('<index> <path> <width> <height>' lines; make one with fcos-offline get-info)")
        fields = _INFO_LINE.fullmatch(line.strip())
        if fields is None:
            raise FcosError(f"{where}: expected '<index> <path> <width> <height>', got {_shown(line)}")
        try:
            index, width, height = int(fields[1]), int(fields[3]), int(fields[4])
        except ValueError:
            raise FcosError(f"{where}: index, width and height must be integers, got {_shown(line)}") from None
        if width <= 0 or height <= 0:
            raise FcosError(f"{where}: width and height must be positive, got {_shown(line)}")
        listed = fields[2]
        if listed != listed.strip() and not os.path.exists(listed):  # columns aligned with runs of spaces or tabs
            listed = listed.strip()
        entries.append(InfoEntry(index, listed, width, height))
    return entries
