"""Error types and the exit codes every verb shares."""

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_SKIPS = 3


class FcosError(Exception):
    """A failure we explain in one line (no traceback unless --debug)."""

    exit_code = EXIT_FAILED


class UsageError(FcosError):
    """Bad command-line usage or contradictory options."""

    exit_code = EXIT_USAGE


class BadFileError(FcosError):
    """One input file is unreadable or malformed; callers may skip it and go on."""

    def __init__(self, path: object, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


class DiskFullError(FcosError):
    """The disk (or quota) filled up while writing a file; what was written before is intact."""

    def __init__(self, path: object, detail: str = "") -> None:
        super().__init__(f"disk full while writing {path}" + (f" ({detail})" if detail else ""))
        self.path, self.detail = str(path), detail

    def __reduce__(self):  # picklable across worker processes despite the custom __init__
        return (DiskFullError, (self.path, self.detail))


class MissingExtraError(FcosError):
    """An optional dependency is not installed."""

    def __init__(self, module: str, extra: str) -> None:
        super().__init__(f"'{module}' is not installed; install it with: pip install 'fcos-offline[{extra}]'")


def first_line(exc: BaseException, limit: int = 200, *, last: bool = False) -> str:
    """An exception's message in one line (its first non-empty line, or its last with ``last``),
    at most ``limit`` characters; its type's name when the message is empty."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[-1] if last else lines[0])[:limit] if lines else type(exc).__name__


def require(module: str, extra: str):
    """Import an optional module or raise MissingExtraError naming the extra to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise MissingExtraError(module, extra) from exc
