"""Reading a checkpoint file without running pickled code: ``torch.load(weights_only=True)``.

Objects of other types that old ``meta`` dicts hold (mmengine's message hub, numpy scalars…) are
replaced by inert placeholders; plain data types torch refuses by default are loaded as what they
are; a pickle that names an executing callable (``os.system``, ``eval``…) is refused outright.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

from fcos_offline.errors import BadFileError, FcosError

_DANGEROUS_MODULES = ("os", "posix", "nt", "subprocess", "sys", "shutil", "socket", "importlib", "runpy", "pty")
_DANGEROUS_BUILTINS = ("eval", "exec", "compile", "open", "__import__", "getattr", "setattr", "globals", "input")


def _plain_dict(*_: Any) -> dict[Any, Any]:
    """A ``defaultdict`` in a meta dict loads as a plain dict (its factory is never called)."""
    return {}


def _plain_list(*_: Any) -> list[Any]:
    """A ``deque`` in a meta dict loads as a list (its items are appended by the unpickler)."""
    return []


#: plain data types torch's weights-only loader refuses by default but that run no code when built:
#: pickled name -> what torch.serialization.safe_globals gets for it
_INERT_TYPES: dict[str, Any] = {
    **{
        f"{prefix}{t.__name__}": (t, f"builtins.{t.__name__}")
        for t in (frozenset, range, slice, list, dict, set, tuple, int, float, str, bool, bytes)
        for prefix in ("", "builtins.")
    },
    "collections.defaultdict": (_plain_dict, "collections.defaultdict"),
    "collections.deque": (_plain_list, "collections.deque"),
}


def _torch_reason(exc: BaseException) -> str:
    """torch's error in one line, without its advice to load unsafely (never what we do)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    match = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if match:
        return f"its pickle holds {match.group(1)}, which this tool does not load"
    line = next((ln.strip() for ln in text.splitlines() if ln.strip() and "weights_only" not in ln), "")
    line = line.split(". ")[0].rstrip(".")  # its first sentence: the rest is advice, cut mid-word otherwise
    return line[:200] or type(exc).__name__


def _placeholder(name: str) -> type:
    module, _, qual = name.rpartition(".")

    def _init(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs

    def _setstate(self, state: Any) -> None:
        self.state = state

    return type(qual, (), {"__module__": module, "__qualname__": qual, "__init__": _init, "__setstate__": _setstate})


def read_checkpoint_file(path: str | Path) -> tuple[Any, list[str]]:
    """``torch.load(weights_only=True)`` with inert placeholders for foreign meta objects."""
    import torch

    path = Path(path)
    if path.is_dir():
        raise FcosError(f"{path}: a folder, not a checkpoint file (.pth)")
    if not path.is_file():
        raise FcosError(f"{path}: no such checkpoint file")
    if path.stat().st_size == 0:
        raise BadFileError(path, "empty file (0 bytes), not a checkpoint")
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic != b"PK" and magic[:1] != b"\x80":  # torch files are zip archives or (legacy) pickles
        raise BadFileError(path, "not a PyTorch checkpoint (neither a zip archive nor a pickle)")
    placeholders: dict[str, type] = {}
    inert: list[Any] = []  # plain data types a meta dict may hold: loaded as what they are
    for _ in range(64):
        try:
            with torch.serialization.safe_globals([*inert, *placeholders.values()]):
                return torch.load(path, map_location="cpu", weights_only=True), sorted(placeholders)
        except pickle.UnpicklingError as exc:
            match = re.search(r"GLOBAL ([\w.]+)", str(exc))
            if not match or match.group(1) in placeholders or _INERT_TYPES.get(match.group(1)) in inert:
                raise BadFileError(path, f"not a loadable checkpoint ({_torch_reason(exc)})") from None
            name = match.group(1)
            if name in _INERT_TYPES:
                inert.append(_INERT_TYPES[name])
                continue
            module, _, attr = name.rpartition(".")
            module = module or "builtins"  # torch reports builtins bare ("GLOBAL eval")
            if module.split(".")[0] in _DANGEROUS_MODULES or (module == "builtins" and attr in _DANGEROUS_BUILTINS):
                raise BadFileError(path, f"refused: the pickle would call {name} when loaded (never executed)") from None
            placeholders[name] = _placeholder(name)
        except Exception as exc:
            raise BadFileError(path, f"not a readable PyTorch checkpoint (truncated or wrong file type: {_torch_reason(exc)})") from None
    raise BadFileError(path, "too many unknown pickled types")
