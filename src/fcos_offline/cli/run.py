"""``fcos-offline run``: the whole recipe in one command."""

from __future__ import annotations

import argparse
from pathlib import Path

from fcos_offline.cli.common import (
    BATCH,
    COUNT,
    POSITIVE_INT,
    SIDE,
    THREADS,
    DefaultsFormatter,
    add_flag,
    add_model_flags,
    add_ray_flags,
    number,
    overrides_from_args,
)
from fcos_offline.engine.backends import OFFLINE_ENGINES
from fcos_offline.engine.base import PRECISIONS
from fcos_offline.errors import EXIT_OK, EXIT_SKIPS
from fcos_offline.io import check_output_apart


def _cmd_run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from fcos_offline.report.report import results_table
    from fcos_offline.report.run import RunOptions, run

    opts = RunOptions(
        checkpoint=args.checkpoint,
        model=args.model,
        coco=args.coco,
        images=args.images,
        annotations=args.annotations,
        shape=tuple(args.shape) if args.shape else None,
        batch_sizes=tuple(args.batch_sizes) if args.batch_sizes else None,
        engines=tuple(args.engines) if args.engines else None,
        device=args.device,
        precision=args.precision,
        workdir=args.workdir,
        num_images=args.num_images,
        online=not args.no_online,
        write_bins=args.write_bins,
        compare=args.compare,
        ray=args.ray,
        ray_actors=args.ray_actors,
        ray_cpus_per_actor=args.ray_cpus_per_actor,
        ray_gpus_per_actor=args.ray_gpus_per_actor,
        threads=args.threads,
        vis_images=args.vis_images,
        html_images=args.html_images,
        score_thr=args.report_score_thr,
        overrides=overrides_from_args(args),
    )
    check_output_apart([args.workdir], [args.checkpoint, args.model])  # never inside a model folder: an artifact verifies every file in it
    check_output_apart([args.workdir], [args.coco, args.images, args.annotations], inside_ok=True)
    report = run(opts)
    title = f"fcos-offline results — {report['num_images']} images, {report['shape'][0]}x{report['shape'][1]}"
    busy = report["machine_load"]["note"]
    Console(width=max(Console().width, 150)).print(results_table(report["table"], title, busy))
    root = Path(report["workdir"])
    print(f"report: {root / 'report.md'} and {root / 'report.json'}")
    skipped = sum(len(e["skipped"]) for e in report["entries"]) + len(report.get("missing_images") or [])
    return EXIT_SKIPS if skipped else EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``run``."""
    p = sub.add_parser(
        "run",
        help="the whole recipe in one command (no arguments: the embedded demo, about a minute)",
        description="Export -> offline inference per engine and batch size -> post-processing -> COCO mAP, plus the "
        "online PyTorch baseline, in a work folder (finished steps are reused when rerun with the same --workdir). "
        "Prints the recipe's results table and writes report.md, report.json (mAP as fractions), PR-curve, "
        "per-class AP and speed plots, and images with drawn detections. Each configuration gets three speed figures: "
        "engine img/s (time inside the engine call), end-to-end img/s (files in -> dumps out) and the engine's latency "
        "per batch (p50/p99); docs/measurement.md says how each is timed.\n\n"
        "With --model, the artifact's own canvas, batch, precision and threads apply unless a flag says otherwise.\n\n"
        "With no arguments it runs the embedded demo: a small FCOS trained by this project on synthetic shapes, "
        "evaluated on a synthetic validation set generated on the fly.\n\n"
        "On an NVIDIA GPU, --device cuda runs PyTorch eager online and the checkpoint compiled by inductor "
        "offline (--precision fp16/bf16/tf32 for the compiled engine).\n\n"
        "Exit codes: 0 ok, 1 failed, 2 usage error, 3 completed but images were skipped (unreadable) or annotated "
        "images are missing (listed in report.json). A second run on a busy --workdir is refused (exit 1).",
        epilog="examples:\n"
        "  fcos-offline run                                         # the embedded demo, about a minute\n"
        "  fcos-offline run --checkpoint fcos_r50_caffe_fpn_1x_4gpu_20190516-a7cac5ff.pth --coco /opt/npu/coco \\\n"
        "      --shape 800 1333 --batch-sizes 1 4 --engines onnxruntime openvino\n"
        "  fcos-offline run --checkpoint fcos.pth --coco coco --model tuned/best   # offline: the tuned artifact\n"
        "  fcos-offline run --checkpoint fcos.pth --coco coco --device cuda --precision fp16",
        formatter_class=DefaultsFormatter,
    )
    add_flag(p, "--checkpoint", help="FCOS, RetinaNet or ATSS checkpoint (mmdet or torchvision); default: the embedded demo model")
    add_flag(
        p,
        "--model",
        help="run the offline engines on this artifact ('convert' or 'tune' output folder, .onnx or .xml) "
        "instead of the checkpoint's export; the online baseline still runs the checkpoint",
    )
    add_flag(p, "--coco", help="COCO folder with val2017/ and annotations/instances_val2017.json")
    add_flag(p, "--images", help="image folder (instead of --coco; needs --annotations)")
    add_flag(p, "--annotations", help="COCO instances JSON, or a folder holding one")
    add_flag(
        p,
        "--shape",
        nargs=2,
        type=SIDE,
        metavar=("H", "W"),
        help="input canvas (default: a --model's own, else 800 1333; the demo's own for the demo)",
    )
    add_flag(p, "--batch-sizes", nargs="+", type=BATCH, help="batch sizes to run (default: a --model artifact's own batch, else 1 4)")
    add_flag(
        p,
        "--engines",
        nargs="+",
        choices=OFFLINE_ENGINES,
        help="offline engines (default: onnxruntime openvino on CPU; inductor, the checkpoint compiled by PyTorch, on CUDA)",
    )
    add_flag(
        p,
        "--device",
        help="cpu (default), or cuda (cuda:N): the online baseline and the offline engines run on the GPU; report.json names it (GPU, driver, CUDA)",
    )
    add_flag(p, "--precision", choices=PRECISIONS, help="offline execution precision (default: a --model artifact's own, else fp32)")
    add_flag(p, "--threads", type=THREADS, help="engine threads (default: a --model artifact's own, else all cores)")
    add_flag(p, "--workdir", help="work folder (default runs/<timestamp>); rerun with the same one to reuse finished steps")
    add_flag(p, "--num-images", type=POSITIVE_INT, help="use only the first N images (sorted by file name)")
    add_flag(p, "--no-online", action="store_true", help="skip the online PyTorch baseline")
    add_flag(
        p,
        "--compare",
        action="store_true",
        help="compare the offline dumps with the online baseline's, image by image "
        "(compare.json and a section in report.md; see 'fcos-offline compare')",
    )
    add_flag(p, "--write-bins", action="store_true", help="write the recipe's .bin tensors and .info files instead of streaming")
    add_flag(p, "--vis-images", type=COUNT, default=4, help="images with drawn detections in the report (default 4)")
    add_flag(
        p,
        "--html-images",
        type=COUNT,
        default=60,
        help="pictures in report.html's image browser, the worst by per-image AP first (default 60; the page embeds them)",
    )
    add_flag(
        p,
        "--report-score-thr",
        type=number(float, 0.0, 1.0),
        default=0.3,
        help="report.html's operating point: boxes drawn, per-class precision/recall and the confusion matrix count "
        "detections scoring at least this (default 0.3; mAP always uses every detection)",
    )
    add_ray_flags(p)
    add_model_flags(p)
    p.set_defaults(func=_cmd_run)
