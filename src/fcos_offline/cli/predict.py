"""``fcos-offline predict``: see what the detector sees (drawn images + COCO-format detections)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fcos_offline.cli.common import BATCH, SIDE, DefaultsFormatter, add_engine_flags, add_flag, engine_options_from_args, number
from fcos_offline.errors import EXIT_OK, EXIT_SKIPS, FcosError


def _cmd_predict(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from fcos_offline.demo import DEMO_CHECKPOINT
    from fcos_offline.engine.predict import PredictRequest, predict

    model = args.model or str(DEMO_CHECKPOINT)
    shape = tuple(args.shape) if args.shape else None
    if shape is None and Path(model).resolve() == DEMO_CHECKPOINT:  # the demo model runs at the canvas it was trained on
        from fcos_offline.demo.synthetic import DEMO_CANVAS

        shape = DEMO_CANVAS
    s = predict(
        PredictRequest(
            model=model,
            images=args.images,
            output=args.output,
            score_thr=args.score_thr,
            class_names=args.class_names,
            save_txt=args.save_txt,
            shape=shape,
            options=engine_options_from_args(args, args.batch_size),
            workers=args.workers,
        )
    )
    engine = s["engine"]
    table = Table(title=f"predict — {engine['engine']} {engine['execution_precision']} bs{s['batch_size']}, canvas {s['canvas'][0]}x{s['canvas'][1]}")
    table.add_column("")
    table.add_column("value", justify="right")
    spread = f" (±{s['engine_spread_pct']:.0f}%)" if s["engine_spread_pct"] is not None else ""
    for what, value in (
        ("images drawn / given", f"{s['drawn_images']} / {s['images']}"),
        ("skipped", str(len(s["skipped"]))),
        ("detections (predictions.json)", str(s["detections"])),
        (f"detections drawn (score >= {s['score_thr']:g})", str(s["detections_drawn"])),
        ("engine img/s", f"{s['engine_img_per_s']:.2f}{spread}"),
        ("end-to-end img/s (files in -> dumps out)", f"{s['e2e_img_per_s']:.2f}"),
        ("engine ms per batch, p50 / p99", f"{s['engine_ms_per_batch']['median']:.1f} / {s['engine_ms_per_batch']['p99']:.1f}"),
    ):
        table.add_row(what, value)
    Console(highlight=False).print(table)
    print(f"drawn images in {s['output']}/; every detection in {s['predictions_file']}; summary {s['output']}/predict.json")
    for item in s["skipped"]:
        print(f"skipped: {item['path']}: {item['problem']}", file=sys.stderr)
    if s["skipped"] and not s["drawn_images"]:
        raise FcosError(f"no usable images: all {len(s['skipped'])} were skipped (each named above and in {s['output']}/predict.json)")
    return EXIT_SKIPS if s["skipped"] else EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``predict``."""
    p = sub.add_parser(
        "predict",
        help="see what the detector sees: images with their detections drawn, and every detection as COCO JSON",
        description="Run a model over images and draw what it detects. The model runs through infer's own feed and "
        "engines (a checkpoint is exported first, at --shape, into OUTPUT/work/model and reused); boxes are mapped back "
        "to each original image. Writes into --output: <stem>.jpg (detections scoring at least --score-thr drawn, "
        "'class score' labels, one colour per class), predictions.json (COCO results: image_id, file_name, category_id, "
        "bbox [x,y,w,h] in original pixels, score) holding EVERY detection the model returned, not only those drawn "
        "(so it evaluates to the mAP postprocess reports), with --save-txt labels/<stem>.txt ('class_id class_name score "
        "x1 y1 x2 y2' per drawn detection, class_id = the model's 0-based label), and predict.json (images, detections, "
        "skipped, speed as infer measures it). The output is never an image folder nor inside one. "
        "Exit 3 when some images could not be read (each named, and skipped), 1 when none could.",
        epilog="examples:\n"
        "  fcos-offline predict --images photos/ --output seen/   # the embedded demo model\n"
        "  fcos-offline predict --model fcos.onnx --images val2017/000000000139.jpg val2017/000000000285.jpg --output seen\n"
        "  fcos-offline predict --model fcos_r50.pth --shape 800 1333 --images val2017 --output seen --save-txt\n"
        "  fcos-offline predict --model tuned/best --images shapes/ --class-names shapes.txt --score-thr 0.5 --output seen",
        formatter_class=DefaultsFormatter,
    )
    add_flag(
        p,
        "--model",
        help="ONNX file, OpenVINO .xml, a convert/tune folder, or a checkpoint .pth (exported at --shape) "
        "(default: the embedded demo model, which detects the synthetic demo's shapes)",
    )
    add_flag(p, "--images", nargs="+", required=True, metavar="DIR|FILE", help="image files and/or folders (their images, not subfolders)")
    add_flag(p, "--output", default="predictions", metavar="DIR", help="where drawn images, predictions.json and predict.json go")
    add_flag(
        p,
        "--score-thr",
        type=number(float, 0.0, 1.0),
        default=0.3,
        metavar="S",
        help="draw (and with --save-txt, list) detections scoring at least S (default 0.3); predictions.json holds every detection",
    )
    add_flag(
        p,
        "--class-names",
        metavar="FILE",
        help="text file, one class name per line, label 0 first (default: the model's recorded names, else the 80 COCO classes)",
    )
    add_flag(p, "--save-txt", action="store_true", help="also write labels/<stem>.txt: 'class_id class_name score x1 y1 x2 y2' per drawn detection")
    add_flag(
        p,
        "--shape",
        nargs=2,
        type=SIDE,
        metavar=("H", "W"),
        help="canvas a checkpoint is exported at (default: 320 512 for the demo model, else 800 1333); "
        "an exported model has its own (a different one is refused)",
    )
    add_engine_flags(p)
    add_flag(p, "--batch-size", type=BATCH, default=None, help="images per engine call (default: a convert or tune folder's batch, else 1)")
    add_flag(p, "--workers", type=number(int, 0, 1024), help="decode worker processes (default: as infer decides)")
    p.set_defaults(func=_cmd_predict)
