"""``fcos-offline export``: checkpoint -> verified ONNX."""

from __future__ import annotations

import argparse

from fcos_offline.cli.common import (
    SIDE,
    DefaultsFormatter,
    add_flag,
    add_model_flags,
    number,
    overrides_from_args,
)
from fcos_offline.data.letterbox import DEFAULT_CANVAS
from fcos_offline.errors import EXIT_OK
from fcos_offline.io import atomic_write_json, check_output_apart


def _cmd_export(args: argparse.Namespace) -> int:
    from fcos_offline.export.onnx_export import (
        export_checkpoint,  # torch: imported only for this verb
    )

    check_output_apart([args.output, args.summary], [args.checkpoint])
    summary = export_checkpoint(
        args.checkpoint,
        args.output,
        args.shape,
        args.batch_size,
        args.dynamic_export,
        args.opset,
        not args.no_nms,
        not args.no_verify,
        overrides_from_args(args),
    )
    v = summary["verify"]
    print(
        f"wrote {summary['path']}"
        + (f" and {summary['post_path']}" if summary["post_path"] else "")
        + f" (input [{summary['batch']},3,{summary['shape'][0]},{summary['shape'][1]}], opset {summary['opset']})"
    )
    if v:
        print(
            f"verified against PyTorch with ONNX Runtime: {v['matched']}/{v['num_ref']} detections matched "
            f"({v['match_rate']:.2%}), max box error {v['max_box_err']:.2e} px, max score error {v['max_score_err']:.2e}"
        )
    raw = summary.get("verify_raw")
    if raw:
        print(
            f"raw head outputs ({raw['outputs']} tensors) match PyTorch to a relative error of {raw['max_rel_err']:.2e} "
            f"(worst: {raw['worst_output']})"
        )
    if args.summary:
        atomic_write_json(args.summary, summary)
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``export``."""
    p = sub.add_parser(
        "export",
        help="checkpoint -> ONNX with NMS in the graph (verified with ONNX Runtime)",
        description="Export an FCOS, RetinaNet or ATSS checkpoint to ONNX with standard ops only (TopK, NonMaxSuppression, Gather…) "
        "so ONNX Runtime and OpenVINO run it as is. Input 'input' float32 [B,3,H,W] (BGR, caffe mean, centred "
        "zero pad); outputs 'dets' float32 [B,100,5] (x1,y1,x2,y2,score in canvas pixels) and 'labels' int64 "
        "[B,100] (-1 padding). The export runs the ONNX model on a sample input against PyTorch and fails "
        "if detections do not match.",
        epilog="examples:\n"
        "  fcos-offline export --checkpoint fcos.pth --output fcos.onnx --dynamic-export      # 800x1333, any batch\n"
        "  fcos-offline export --checkpoint fcos.pth --output_file fcos_bs4.onnx --batch_size 4\n"
        "  fcos-offline export --checkpoint fcos.pth --output fcos_raw.onnx --no-nms   # + fcos_raw.post.onnx",
        formatter_class=DefaultsFormatter,
    )
    add_flag(p, "--checkpoint", required=True, help="mmdet (FCOS, RetinaNet, ATSS) or torchvision (FCOS, RetinaNet) .pth")
    add_flag(p, "--output", "--output-file", dest="output", required=True, help="ONNX file to write")
    add_flag(p, "--shape", nargs=2, type=SIDE, default=list(DEFAULT_CANVAS), metavar=("H", "W"), help="input canvas height width")
    add_flag(p, "--batch-size", type=number(int, 1, 1024), default=1, help="fixed batch size (ignored with --dynamic-export)")
    add_flag(p, "--dynamic-export", action="store_true", help="dynamic batch dimension")
    add_flag(p, "--opset", type=number(int, 11, 21), default=17, help="ONNX opset (11 to 21)")
    add_flag(p, "--no-nms", action="store_true", help="export the raw head (cls/reg/ctr per level) plus <name>.post.onnx")
    add_flag(p, "--no-verify", action="store_true", help="skip the ONNX Runtime vs PyTorch check")
    add_flag(p, "--summary", help="also write the export summary JSON here")
    add_model_flags(p)
    p.set_defaults(func=_cmd_export)
