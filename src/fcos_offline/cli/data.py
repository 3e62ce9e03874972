"""CLI verbs of the data stage: ``preprocess`` and ``get-info``."""

from __future__ import annotations

import argparse
import sys

from fcos_offline.cli.common import SIDE, THREADS, add_flag
from fcos_offline.data.letterbox import DEFAULT_CANVAS
from fcos_offline.errors import EXIT_OK, EXIT_SKIPS, FcosError, UsageError
from fcos_offline.io import writes_through

_EXITS = "exit codes: 0 ok, 1 failed (nothing usable written), 2 usage error, 3 done but some files skipped"


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``preprocess`` and ``get-info`` verbs."""
    p = sub.add_parser(
        "preprocess",
        help="images -> letterboxed float32 .bin tensors (the recipe's preprocess step)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Turn every image of a folder into the model's input tensor, like the recipe's\n"
            "fcos_pth_preprocess.py: keep-ratio resize to fit the canvas (s = min(W/w, H/h),\n"
            "sizes floored, cv2 bilinear), subtract the BGR mean (102.9801, 115.9465, 122.7717),\n"
            "centre on a zero canvas, channels first.\n\n"
            "Reads .jpg/.jpeg/.png/.bmp (any case) in file-name order. Writes <stem>.bin per image\n"
            "(float32, C order, 3*H*W*4 bytes; 12,796,800 for 800x1333), each atomically, using\n"
            "all cores. Unreadable, empty or truncated images are skipped and named; preprocess.json\n"
            "beside the tensors records the counts, the rate and the skipped files.\n\n"
            "example:\n"
            "  fcos-offline preprocess --image_src_path=/opt/npu/coco/val2017 \\\n"
            "      --bin_file_path=val2017_bin --model_input_height=800 --model_input_width=1333\n\n" + _EXITS
        ),
    )
    add_flag(p, "--image-src-path", required=True, metavar="DIR", help="folder of images")
    add_flag(p, "--bin-file-path", required=True, metavar="DIR", help="output folder (created if missing)")
    add_flag(p, "--model-input-height", type=SIDE, default=DEFAULT_CANVAS[0], metavar="H", help=f"canvas height (default {DEFAULT_CANVAS[0]})")
    add_flag(p, "--model-input-width", type=SIDE, default=DEFAULT_CANVAS[1], metavar="W", help=f"canvas width (default {DEFAULT_CANVAS[1]})")
    add_flag(
        p,
        "--workers",
        type=THREADS,
        default=None,
        metavar="N",
        help="processes (default and most: the cores this process may use; more are capped, with a warning)",
    )
    p.set_defaults(func=_preprocess)

    g = sub.add_parser(
        "get-info",
        help=".info list of .bin tensors (bin) or of images with their sizes (jpg)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Write an .info list, one line per file: '<index> <path> <width> <height>'\n"
            "(space separated, newline terminated, index from 0 without gaps), like the recipe's\n"
            "get_info.py.\n\n"
            "  bin MODE: every *.bin in SRC with the canvas WIDTH HEIGHT you give (the\n"
            "            benchmark tool's input list); a .bin not 3*W*H*4 bytes is skipped.\n"
            "  jpg MODE: every image (.jpg/.jpeg/.png/.bmp) with its decoded width and height\n"
            "            (what postprocess needs to undo the letterbox); bad images are skipped.\n\n"
            "Files are sorted by name. The recipe writes glob order (unsorted) and, in jpg mode,\n"
            "restarts the index for each extension; the contents per file are the same.\n\n"
            "examples:\n"
            "  fcos-offline get-info bin val2017_bin fcos.info 1333 800\n"
            "  fcos-offline get-info jpg /opt/npu/coco/val2017 fcos_jpeg.info\n\n" + _EXITS
        ),
    )
    g.add_argument("mode", choices=("bin", "jpg"), help="bin or jpg")
    g.add_argument("src", help="folder to list")
    g.add_argument("out", help="the .info file to write")
    g.add_argument("width", type=SIDE, nargs="?", help="canvas width (bin mode only)")
    g.add_argument("height", type=SIDE, nargs="?", help="canvas height (bin mode only)")
    add_flag(
        g,
        "--workers",
        type=THREADS,
        default=None,
        metavar="N",
        help="jpg mode processes (default and most: the cores this process may use; more are capped, with a warning)",
    )
    g.set_defaults(func=_get_info)


def _report_bad(bad: list) -> None:
    for error in bad:
        print(f"skipped: {error.path}: {error.problem}", file=sys.stderr)


def _preprocess(args: argparse.Namespace) -> int:
    from fcos_offline.data.preprocess import preprocess_folder

    summary = preprocess_folder(
        args.image_src_path,
        args.bin_file_path,
        args.model_input_height,
        args.model_input_width,
        workers=args.workers,
    )
    _report_bad(summary.bad)
    if summary.written == 0:
        raise FcosError(f"no image could be preprocessed ({len(summary.bad)} bad files)")
    print(
        f"wrote {summary.written} .bin files ({summary.canvas_h}x{summary.canvas_w} float32) to "
        f"{summary.dst_dir} in {summary.seconds:.1f} s, {summary.images_per_s:.1f} images/s; "
        f"{len(summary.bad)} skipped"
    )
    return EXIT_SKIPS if summary.bad else EXIT_OK


def _get_info(args: argparse.Namespace) -> int:
    from fcos_offline.data.info import make_info

    if args.mode == "bin" and (args.width is None or args.height is None):
        raise UsageError("bin mode needs the canvas size: get-info bin SRC OUT WIDTH HEIGHT")
    if args.mode == "jpg" and args.width is not None:
        raise UsageError("jpg mode reads each image's size; drop WIDTH HEIGHT")
    summary = make_info(args.mode, args.src, args.out, args.width, args.height, workers=args.workers)
    _report_bad(summary.bad)
    if not summary.entries:
        raise FcosError(f"no usable {'.bin files' if args.mode == 'bin' else 'images'} in {args.src}")
    status = f"wrote {len(summary.entries)} lines to {summary.out_path}; {len(summary.bad)} skipped"
    print(status, file=sys.stderr if writes_through(summary.out_path) else sys.stdout)  # the list itself may be on stdout
    return EXIT_SKIPS if summary.bad else EXIT_OK
