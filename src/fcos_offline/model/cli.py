"""``fcos-offline inspect``, and the model-setting flags that every checkpoint-taking verb shares."""

from __future__ import annotations

import argparse
import json

from fcos_offline.errors import EXIT_OK


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """Overrides for what tensor shapes cannot tell (default: the checkpoint's meta, else per format)."""
    from fcos_offline.cli import add_flag

    g = parser.add_argument_group("model settings shapes cannot tell (default: checkpoint meta, else format default)")
    add_flag(g, "--style", choices=["caffe", "pytorch"], help="ResNet style: stride on the 1x1 (caffe, mmdet default here) or the 3x3 (pytorch)")
    add_flag(g, "--norm-on-bbox", action=argparse.BooleanOptionalAction, default=None, help="box distances as ReLU(x)*stride instead of exp(x)")
    add_flag(g, "--centerness-on-reg", action=argparse.BooleanOptionalAction, default=None, help="centerness from the regression branch instead of the classification branch")
    add_flag(g, "--extra-on", choices=["output", "input"], help="FPN P6 from the P5 output (FCOS) or from C5")
    add_flag(g, "--rule", choices=["mmdet2", "mmdet218", "mmdet3", "torchvision"],
             help="test-time post-processing: mmdet2 = spec §7.2 (mmdet 1.x/2.x<2.18 files and files without a version), "
             "mmdet218 = §7.3 as mmdet 2.18+ (files whose meta says so), mmdet3 = §7.3 with v3's size filter, torchvision = §10")
    add_flag(g, "--score-thr", type=float, help="score threshold (default 0.05 mmdet, 0.2 torchvision)")
    add_flag(g, "--nms-pre", type=int, help="candidates kept per level before NMS (default 1000)")
    add_flag(g, "--iou-thr", type=float, help="NMS IoU threshold (default 0.5 mmdet, 0.6 torchvision)")
    add_flag(g, "--max-per-img", type=int, help="detections kept per image (default 100)")


def overrides_from_args(args: argparse.Namespace):
    """:class:`ModelOverrides` from the flags of :func:`add_model_flags`."""
    from fcos_offline.model.checkpoint import ModelOverrides

    return ModelOverrides(**{k: getattr(args, k, None) for k in ModelOverrides.__dataclass_fields__})


def inspect_checkpoint(path: str, overrides=None) -> dict:
    """Everything inferred about a checkpoint, as a JSON-able dict (loads and checks every tensor)."""
    from fcos_offline.model.checkpoint import build_model, describe_depth, load_checkpoint

    ckpt = load_checkpoint(path, overrides)
    build_model(ckpt)  # proves every tensor is used and every shape fits
    cfg = ckpt.config
    return {
        "path": ckpt.path,
        "format": ckpt.format,
        "mmdet_version": ckpt.sources.get("mmdet_version"),
        "depth": describe_depth(cfg),
        "num_classes": cfg.head.num_classes,
        "num_params": ckpt.num_params,
        "config": cfg.to_dict(),
        "sources": ckpt.sources,
        "class_names": ckpt.class_names,
        "ignored_pickled_objects": ckpt.ignored_objects,
    }


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
    rows = [
        ("format", f"{info['format']}" + (f" (mmdet {info['mmdet_version']})" if info["mmdet_version"] else "")),
        ("backbone", f"{info['depth']} {b['block']}, {b['style']} style, stem {b['stem_channels']}, blocks {b['stage_blocks']}, widths {b['stage_out_channels']}"),
        ("neck", f"FPN in {n['in_channels']} -> {n['out_channels']} x {n['num_outs']} levels, extras on {n['extra_on']}"),
        ("head", f"{h['stacked_convs']} convs x {h['feat_channels']} ch, norm {h['norm']}, scale {h['use_scale']}, "
                 f"{'ReLU*stride' if h['norm_on_bbox'] else 'exp'} boxes, centerness on {'reg' if h['centerness_on_reg'] else 'cls'}"),
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
        help="show what a checkpoint holds (format, depth, widths, classes, head options)",
        description="Load an mmdet (v1/v2/v3) or torchvision FCOS checkpoint safely (weights_only) and print the "
        "architecture inferred from its tensor shapes, the settings taken from its meta config or defaults, and "
        "its parameter count. Fails with one line if a key is missing or unexpected.",
    )
    p.add_argument("checkpoint", help="a .pth file")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_model_flags(p)
    p.set_defaults(func=_cmd_inspect)
