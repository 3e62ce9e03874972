"""The one CLI, ``fcos-offline <verb>``: each verb is a thin shell over a library function.

One module per verb group registers its sub-parsers (``model``: inspect; ``export``; ``data``:
preprocess, get-info; ``engine``: infer, convert; ``evaluate``: postprocess, parse; ``run``;
``tune``; ``demo``). The library never imports this package. Heavy libraries (torch, openvino)
are imported inside the library calls, so ``--help`` and the offline verbs never need torch.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from fcos_offline import __version__
from fcos_offline.errors import EXIT_FAILED, EXIT_USAGE, FcosError


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (what was wrong, and where to read more), exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _build_parser() -> argparse.ArgumentParser:
    from fcos_offline.cli import compare, data, demo, engine, evaluate, export, model, predict, run, tune

    parser = _Parser(
        prog="fcos-offline",
        description=(
            "Dense detectors (FCOS, RetinaNet, ATSS) from a PyTorch checkpoint to fast, verified offline inference.\n\n"
            "The recipe, one verb per stage:\n"
            "  inspect CKPT          what a checkpoint holds (family, format, depth, classes, head options)\n"
            "  export                checkpoint -> ONNX with NMS in the graph (self-verified)\n"
            "  preprocess            images -> 800x1333 float32 .bin tensors (the recipe's step)\n"
            "  get-info              .info lists of .bin files or images\n"
            "  convert               ONNX -> engine artifact (ORT optimised, OpenVINO IR)\n"
            "  infer                 offline inference: dumps <stem>_1.bin/_2.bin + perf file\n"
            "  predict               see what the detector sees: drawn images + every detection as COCO JSON\n"
            "  postprocess           dumps -> COCO bbox mAP (class-wise) + summary.json\n"
            "  parse                 fps from a perf file or summary.json\n"
            "  run                   all of the above in one command (default: embedded demo)\n"
            "  tune                  fastest configuration within an accuracy budget\n"
            "  compare A B           where and why two models (or dump sets) stop matching, down to the layer\n\n"
            "Exit codes: 0 ok, 1 failed, 2 usage error, 3 completed with skips."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"fcos-offline {__version__}")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks on errors")
    sub = parser.add_subparsers(dest="verb", metavar="<verb>")
    for module in (model, export, data, engine, predict, evaluate, run, tune, compare, demo):
        module.register(sub)
    return parser


def _stdout_closed(rich_exit: bool) -> bool:
    """Whether stdout was a pipe whose reader has gone: poll reports an error on its write end, or
    rich, on seeing that, has already pointed stdout at /dev/null (and raised SystemExit(1))."""
    import select

    try:
        fd = sys.stdout.fileno()
        null = os.stat(os.devnull)
        now = os.fstat(fd)
        if rich_exit and (now.st_rdev, now.st_ino) == (null.st_rdev, null.st_ino):  # rich already pointed it at /dev/null
            return True
        poller = select.poll()
        poller.register(fd, select.POLLOUT)
        return any(ev & select.POLLERR for _, ev in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return False


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fcos-offline`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    if debug:
        argv.remove("--debug")
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse printed its usage line (exit 2) or the help (exit 0)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    args.debug = debug
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        try:
            code = int(args.func(args) or 0)
        finally:
            from fcos_offline.progress import end_warnings

            end_warnings()  # how many warnings of a kind were held back (before an error's line)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at interpreter exit
        return code
    except FcosError as exc:
        if debug:
            raise
        print(f"fcos-offline {args.verb}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"fcos-offline {args.verb}: interrupted", file=sys.stderr)
        return 130
    except (BrokenPipeError, SystemExit) as exc:  # rich exits 1 itself when its stdout pipe breaks
        if not _stdout_closed(rich_exit=isinstance(exc, SystemExit)):
            raise
        if debug and isinstance(exc, BrokenPipeError):
            raise
        # `fcos-offline ... | head`: the reader left; say nothing more, and let the exit flush go nowhere
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # the shells' code for a writer stopped by SIGPIPE
    except OSError as exc:  # a write outside our atomic writer: name the file and the problem
        if debug:
            raise
        target = exc.filename2 or exc.filename  # copies and renames name the destination second
        where = f" {target}" if target else ""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            print(f"fcos-offline {args.verb}: error: disk full while writing{where or ' (file unknown)'}", file=sys.stderr)
        else:
            print(f"fcos-offline {args.verb}: error:{where or ' OSError'}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:
        if debug:
            raise
        print(
            f"fcos-offline {args.verb}: error: {type(exc).__name__}: {exc} (rerun with --debug for a traceback)",
            file=sys.stderr,
        )
        return EXIT_FAILED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
