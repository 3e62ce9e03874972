"""``fcos-offline inspect``."""

from __future__ import annotations

import argparse
import json

from fcos_offline.cli.common import DefaultsFormatter, add_model_flags, overrides_from_args
from fcos_offline.errors import EXIT_OK
from fcos_offline.model.checkpoint import inspect_checkpoint


def _cmd_inspect(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    info = inspect_checkpoint(args.checkpoint, overrides_from_args(args))
    if args.json:
        print(json.dumps(info, indent=2))
        return EXIT_OK
    cfg = info["config"]
    b, n, h, p = cfg["backbone"], cfg["neck"], cfg["head"], cfg["post"]
    table = Table(title=f"{info['path']}", show_header=False)
    if info["priors"] == "anchors":
        scales = ", ".join(f"{h['octave_base_scale'] * 2 ** (i / h['scales_per_octave']):.3g}" for i in range(h["scales_per_octave"]))
        priors = f"anchors: scales {scales} x stride, ratios {list(h['anchor_ratios'])}"
    else:
        priors = "one point per location"
    coder = f"deltas (dx,dy,dw,dh), stds {list(h['target_stds'])}" if info["coder"] == "delta_xywh" else "l,t,r,b distances"
    flags = "".join(f", {k.replace('_', '-')} {v}" for k, v in info["head_flags"].items())
    head_boxes = f"{priors}; {coder}; score factor {info['score_factor'] or 'none'}{flags}"
    rows = [
        ("detector", info["title"]),
        ("format", f"{info['format']}" + (f" (mmdet {info['mmdet_version']})" if info["mmdet_version"] else "")),
        (
            "backbone",
            f"{info['depth']} {b['block']}, {b['style']} style, stem {b['stem_channels']}, blocks {b['stage_blocks']}, widths {b['stage_out_channels']}",
        ),
        ("neck", f"FPN in {n['in_channels']} -> {n['out_channels']} x {n['num_outs']} levels, extras on {n['extra_on']}"),
        (
            "head",
            f"{h['stacked_convs']} convs x {h['feat_channels']} ch, norm {h['norm']}, scale {h['use_scale']}, {head_boxes}",
        ),
        ("raw outputs", "; ".join(f"{k} {v}" for k, v in info["raw_outputs"].items())),
        ("classes", str(info["num_classes"])),
        ("strides", str(h["strides"])),
        ("post-processing", f"{p['rule']}: nms_pre {p['nms_pre']}, score_thr {p['score_thr']}, iou {p['iou_thr']}, max {p['max_per_img']}"),
        ("parameters", f"{info['num_params']:,}"),
        ("settings from", ", ".join(f"{k}: {v}" for k, v in info["sources"].items() if k != "mmdet_version")),
    ]
    if info["ignored_pickled_objects"]:
        rows.append(("ignored pickled objects", ", ".join(info["ignored_pickled_objects"])))
    for k, v in rows:
        table.add_row(k, v)
    Console().print(table)
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``inspect``."""
    p = sub.add_parser(
        "inspect",
        help="show what a checkpoint holds (detector family, format, depth, widths, classes, head options)",
        description="Load an mmdet (v1/v2/v3) FCOS, RetinaNet or ATSS checkpoint, or a torchvision FCOS or RetinaNet "
        "(v1/v2) state dict, safely (weights_only) and print the detector family (from its head's key names), the "
        "architecture inferred from its tensor shapes, the settings taken from its meta config or the family's "
        "defaults, and its parameter count. Fails with one line if a key is missing or unexpected.",
        epilog="examples:\n"
        "  fcos-offline inspect fcos_r50_caffe_fpn_1x_4gpu_20190516-a7cac5ff.pth\n"
        "  fcos-offline inspect fcos.pth --json > fcos.json\n"
        "  fcos-offline inspect old.pth --rule mmdet218     # how it would be read with mmdet >= 2.18 post-processing",
        formatter_class=DefaultsFormatter,
    )
    p.add_argument("checkpoint", help="a .pth file")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_model_flags(p)
    p.set_defaults(func=_cmd_inspect)
