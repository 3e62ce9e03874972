"""CLI verbs of the evaluate stage: ``postprocess`` and ``parse``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from fcos_offline.cli.common import SIDE, add_flag, number
from fcos_offline.data.letterbox import RULES
from fcos_offline.errors import EXIT_OK, EXIT_SKIPS
from fcos_offline.io import OutputLock, check_output_apart


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``postprocess`` and ``parse`` verbs."""
    p = sub.add_parser(
        "postprocess",
        help="engine dumps -> COCO bbox mAP (class-wise) + summary.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Evaluate engine dumps like the recipe's fcos_pth_postprocess.py, without mmdet/mmcv.\n\n"
            "Reads per image labels (int64 x100) and dets (float32 x100x5, canvas pixels) from\n"
            "--bin_data_path: recipe naming <stem>_1.bin/<stem>_2.bin, ais_bench <stem>_0.bin/\n"
            "<stem>_1.bin (told apart by size: 800 vs 2000 bytes) or <stem>_labels.npy/_dets.npy.\n"
            "Boxes go back to the original image with the sizes in --test_annotation (a jpg-mode\n"
            ".info), are clipped to the image (not with --pad-rule recipe: the recipe does not\n"
            "clip) and evaluated with faster-coco-eval against\n"
            "instances_val2017.json (or the only instances_*.json) in --annotations_path.\n"
            "Images with no dumps count as images without detections.\n\n"
            "writes to --det_results_path: bbox_results.json (COCO results), <stem>.txt\n"
            "('label_name score x1 y1 x2 y2' per detection), summary.json (mAP as fractions,\n"
            "class-wise AP, skipped files), pr_curves.json, and vis/<stem>.jpg with --ifShowDetObj.\n\n"
            "example:\n"
            "  fcos-offline postprocess --bin_data_path=./result/dumpOutput_device0/ \\\n"
            "      --test_annotation=fcos_jpeg.info --det_results_path=./ret_npuinfer/ \\\n"
            "      --net_out_num=3 --net_input_height=800 --net_input_width=1333 --ifShowDetObj \\\n"
            "      --annotations_path /opt/npu/coco/annotations\n\n"
            "exit codes: 0 ok, 1 failed, 2 usage error, 3 evaluated but some dumps were skipped\n"
            "or some annotated images had no dumps, or some detections had implausible boxes\n"
            "(inverted, or far off the canvas: not evaluated, counted in summary.json)"
        ),
    )
    add_flag(p, "--bin-data-path", default="./result/dumpOutput_device0/", metavar="DIR",
             help="folder of dumps (default ./result/dumpOutput_device0/)")  # fmt: skip
    add_flag(p, "--test-annotation", required=True, metavar="INFO",
             help="jpg-mode .info with each image's width and height (fcos-offline get-info jpg ...)")  # fmt: skip
    add_flag(p, "--det-results-path", default="./detection-results/", metavar="DIR",
             help="output folder (default ./detection-results/)")  # fmt: skip
    add_flag(p, "--annotations-path", default="/opt/npu/coco/annotations", metavar="PATH",
             help="annotation folder or instances_*.json file (default /opt/npu/coco/annotations)")  # fmt: skip
    add_flag(
        p,
        "--net-input-height",
        type=SIDE,
        default=None,
        metavar="H",
        help="canvas height (default: what infer recorded in the dumps' summary.json; required without it, the recipe's is 800)",
    )
    add_flag(
        p,
        "--net-input-width",
        type=SIDE,
        default=None,
        metavar="W",
        help="canvas width (default: what infer recorded in the dumps' summary.json; required without it, the recipe's is 1333)",
    )
    add_flag(p, "--net-out-num", type=number(int, 2, 64), default=None, metavar="N",
             help="read labels from _{N-2}.bin and dets from _{N-1}.bin like the recipe (3: _1/_2); "
                  "default: detect the naming by file size")  # fmt: skip
    add_flag(p, "--pad-rule", choices=RULES, default="exact",
             help="inverse letterbox: exact inverse of the preprocess, boxes clipped to the image "
                  "(default), or the recipe's float-pad / scalar-scale formula without clipping "
                  "(reproduces Huawei's numbers)")  # fmt: skip
    add_flag(p, "--show-det-obj", "--ifShowDetObj", action="store_true",
             help="draw detections (score >= --show-score-thr) on the images into DIR/vis/")  # fmt: skip
    add_flag(p, "--show-score-thr", type=number(float, 0.0, 1.0), default=0.3, metavar="S", help="score threshold for drawing (0.3)")
    add_flag(p, "--class-names", metavar="FILE",
             help="text file, one class name per line, for a non-COCO-80 model (default: the model's labels as infer "
                  "recorded them in the dumps' summary.json, else the 80 COCO classes)")  # fmt: skip
    p.set_defaults(func=_postprocess)

    q = sub.add_parser(
        "parse",
        help="fps from a benchmark perf file or one of our summary.json files",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Print performance like the recipe's test/parse.py.\n\n"
            "  perf_vision_batchsize_B_device_N.txt: prints '310 bs{B} fps:{X}', the recipe's table\n"
            "    number (Interface throughputRate x 4 chips of an Ascend 310 card), and the plain\n"
            "    one-device fps (model only and end to end).\n"
            "  summary.json: fps and latency from infer, or mAP from postprocess.\n\n"
            "example:\n  fcos-offline parse result/perf_vision_batchsize_1_device_0.txt\n\n"
            "exit codes: 0 ok, 1 unreadable or unknown file"
        ),
    )
    q.add_argument("path", help="perf .txt file or summary.json")
    add_flag(q, "--chips", type=number(int, 1, 1024), default=4, metavar="N",
             help="devices per card for the recipe's number (default 4, Ascend 310)")  # fmt: skip
    q.set_defaults(func=_parse)


def _print_summary(summary: dict[str, Any]) -> None:
    """Class-wise AP table (percent) and the headline numbers on stdout; skipped files on stderr."""
    from rich.console import Console
    from rich.table import Table

    from fcos_offline.evaluate.coco import STAT_NAMES, SUMMARY_KEYS
    from fcos_offline.units import percent

    table = Table(title="class-wise bbox AP")
    table.add_column("category")
    table.add_column("id", justify="right")
    table.add_column("AP %", justify="right")
    for row in summary["classwise"]:
        table.add_row(row["name"], str(row["category_id"]), "-" if row["AP"] is None else percent(row["AP"]))
    Console(highlight=False).print(table)
    print("bbox " + "  ".join(f"{n} {percent(summary[k])}" for n, k in zip(STAT_NAMES, SUMMARY_KEYS)) + "  (percent; summary.json holds fractions)")
    print(
        f"{summary['num_images']} images, {summary['num_detections']} detections, "
        f"{summary['missing_dumps']} without dumps, {len(summary['skipped'])} skipped"
    )
    for item in summary["skipped"]:
        print(f"skipped: {item['path']}: {item['problem']}", file=sys.stderr)


def _postprocess(args: argparse.Namespace) -> int:
    from fcos_offline.data.annotations import read_class_names
    from fcos_offline.evaluate.postprocess import postprocess

    inputs = [args.bin_data_path, args.test_annotation, args.annotations_path, args.class_names]
    check_output_apart([args.det_results_path], inputs, inside_ok=True)  # dumps are read from their folder, not below
    with OutputLock(args.det_results_path, "postprocess"):
        summary = postprocess(
            bin_data_path=args.bin_data_path,
            test_annotation=args.test_annotation,
            det_results_path=args.det_results_path,
            annotations_path=args.annotations_path,
            net_input_height=args.net_input_height,
            net_input_width=args.net_input_width,
            net_out_num=args.net_out_num,
            pad_rule=args.pad_rule,
            show=args.show_det_obj,
            class_names=read_class_names(args.class_names) if args.class_names else None,
            show_score_thr=args.show_score_thr,
        )
    _print_summary(summary)
    print(f"results in {args.det_results_path} (summary.json, bbox_results.json)")
    return EXIT_SKIPS if summary["skipped"] or summary["missing_dumps"] or summary["implausible_boxes"] else EXIT_OK


def _parse(args: argparse.Namespace) -> int:
    from fcos_offline.data.perf import describe, parse_file

    for line in describe(parse_file(args.path, chips=args.chips)):
        print(line)
    return EXIT_OK
