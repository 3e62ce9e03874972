"""``fcos-offline compare``: where and why two models (or two dump sets) stop matching."""

from __future__ import annotations

import argparse
import sys

from fcos_offline.cli.common import BATCH, SIDE, add_flag, number
from fcos_offline.errors import EXIT_FAILED, EXIT_OK
from fcos_offline.units import map_text, points


def _cmd_compare(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from fcos_offline.compare.layers import first_divergence
    from fcos_offline.compare.run import CompareOptions, compare

    result = compare(
        CompareOptions(
            a=args.a,
            b=args.b,
            images=args.images,
            annotations=args.annotations,
            info_file=args.info,
            num_images=args.num_images,
            output=args.output,
            shape=tuple(args.shape) if args.shape else None,
            batch_size=args.batch_size,
            iou_thr=args.iou_thr,
            score_tol=args.score_tol,
            box_tol=args.box_tol,
            layers=args.layers,
            atol=args.atol,
            rtol=args.rtol,
            layer_images=args.layer_images,
            worst=args.worst,
            draw=args.draw,
            max_map_drop=args.max_map_drop,
        )
    )
    console = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    o = result.outputs.overall()
    print(f"A: {result.a.path} ({result.a.kind})\nB: {result.b.path} ({result.b.kind})")
    print(
        f"{o['images']} images: {o['matched']} detections matched (same label, IoU >= {o['iou_thr']:g}) of {o['detections_a']} in A "
        f"and {o['detections_b']} in B ({o['match_rate']:.2%}); only in A {o['only_a']}, only in B {o['only_b']}; "
        f"score error max {o['score_err_max']:.2e} (p99 {o['score_err_p99']:.2e}); box error max {o['box_err_px_max']:.2f} px "
        f"(p99 {o['box_err_px_p99']:.2f})"
    )
    if o["images_unreadable"]:
        print(f"{len(o['images_unreadable'])} more image(s) differ: a side's dumps could not be read (listed in compare.json)")
        for u in result.outputs.unreadable[:10]:
            print(f"  {u['stem']}: {u['side'].upper()}: {u['path']}: {u['problem']}")
    if result.a.map is not None and result.b.map is not None:
        delta = points(result.b.map["bbox_mAP"] - result.a.map["bbox_mAP"])
        print(f"mAP: A {map_text(result.a.map['bbox_mAP'], 2)}, B {map_text(result.b.map['bbox_mAP'], 2)} (B - A {delta} points)")
    worst = result.outputs.worst(args.worst)
    if worst:
        table = Table(title="images that differ most")
        for col in ("image", "A", "B", "matched", "only A", "only B", "max Δscore", "max Δbox px"):
            table.add_column(col, justify="left" if col == "image" else "right")
        for im in worst:
            table.add_row(
                im.stem,
                str(im.num_a),
                str(im.num_b),
                str(im.matched),
                str(im.only_a),
                str(im.only_b),
                f"{im.max_score_err:.2e}",
                f"{im.max_box_err:.2f}",
            )
        console.print(table)
    if result.pictures:
        print(f"side by side (A left, B right): {', '.join(result.pictures)}")
    if result.layers:
        table = Table(title=f"intermediate tensors, network order (atol {args.atol:g}, rtol {args.rtol:g})")
        for col in ("", "tensor", "cosine", "max abs", "mean abs", "relative"):
            table.add_column(col, justify="left" if col in ("", "tensor") else "right")
        for s in result.layers:
            table.add_row("" if s.within else "✗", s.label, f"{s.cosine:.6f}", f"{s.max_abs:.3e}", f"{s.mean_abs:.3e}", f"{s.rel:.3e}")
        console.print(table)
        first = first_divergence(result.layers)
        print(
            f"first divergence: {first.label} ({first.tensor}), relative error {first.rel:.3e}"
            if first
            else "every tapped tensor is within tolerance"
        )
        if result.untapped:
            total = len(result.layers) + len(result.untapped)
            print(
                f"not compared: {len(result.untapped)} of the network's {total} convolutions, which one graph fused or folded away "
                f"(first: {result.untapped[0]}); a divergence there shows only downstream"
            )
    if result.sensitivity:
        order = sorted(result.sensitivity, key=lambda g: -result.sensitivity[g])[:8]
        print(
            "most quantization-sensitive conv groups (tune's signal; tune returns these to float first): "
            + ", ".join(f"{g} {result.sensitivity[g]:.2e}" for g in order)
        )
    print(f"{'within' if result.within_tolerance else 'NOT within'} tolerance; details in {args.output}/compare.json")
    if args.max_map_drop is not None:
        drop = result.map_drop_points
        print(
            f"mAP budget: B is {drop:+.2f} points below A, {'within' if result.accepted else 'over'} the {args.max_map_drop:g}-point budget"
            + ("" if result.within_tolerance else " (the exit code follows the budget: --max-map-drop)")
        )
    return EXIT_OK if result.accepted else EXIT_FAILED


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``compare``."""
    p = sub.add_parser(
        "compare",
        help="where and why two models (or two dump folders) stop matching: outputs, mAP, layers",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=(
            "Compare A and B on the same images. Each is a checkpoint (PyTorch), an .onnx, an OpenVINO .xml, a\n"
            "convert/tune artifact folder, or a folder of dumps (ours, the recipe's _1/_2 or ais_bench's _0/_1).\n"
            "Models run through the same preprocessing and infer path; then per image and overall: detections\n"
            "matched (same label, IoU >= --iou-thr), only in A / only in B, score error (max, p99), box error in\n"
            "canvas pixels; mAP of each side and the difference with --annotations; the images that differ most,\n"
            "drawn side by side. --layers compares the intermediate tensors of models fcos-offline exported\n"
            "(backbone, FPN and head convolutions per level; cosine, max/mean abs and relative error in network\n"
            "order) and names the first one beyond --atol/--rtol. It reads ONNX graphs (.onnx, ONNX Runtime\n"
            "artifacts, checkpoints exported on the fly): an OpenVINO artifact is compared by its outputs only.\n"
            "Convolutions one graph fused away (an ONNX Runtime optimised graph, as A or B) are counted, not compared.\n"
            "A checkpoint is exported by this tool, so checkpoint vs its own .onnx shows identical layers: its\n"
            "outputs comparison (PyTorch vs the engine) is what tests the export.\n\n"
            "examples:\n"
            "  fcos-offline compare fcos.pth fcos_bs4/ --images val2017 --num-images 50\n"
            "  fcos-offline compare fcos.onnx tuned/best --images val2017 --layers   # best: an ONNX Runtime build\n"
            "  fcos-offline compare fcos.onnx tuned/best --images val2017 --annotations ann.json --max-map-drop 0.3\n"
            "  fcos-offline compare result/dumpOutput_device0 result_ascend/dumpOutput_device0 \\\n"
            "      --annotations instances_val2017.json --info fcos_jpeg.info\n\n"
            "Writes <output>/compare.json (mAP as fractions) and <output>/worst/*.jpg.\n"
            "exit codes: 0 within tolerance (with --max-map-drop: within that mAP budget), 1 not (or failed), 2 usage error"
        ),
    )
    p.add_argument("a", help="reference: checkpoint, .onnx, .xml, artifact folder or dump folder")
    p.add_argument("b", help="the other side (same kinds)")
    add_flag(p, "--images", help="image folder both sides run on (needed unless both are dump folders)")
    add_flag(p, "--annotations", help="COCO instances JSON (or a folder holding one): mAP of each side and the difference")
    add_flag(p, "--info", help="jpg-mode .info with the images' sizes (for --annotations on dump folders without --images)")
    add_flag(p, "--num-images", type=number(int, 1, 10_000_000), help="only the first N images (by file name)")
    add_flag(p, "--output", default="compare", help="output folder (default: compare)")
    add_flag(p, "--shape", nargs=2, type=SIDE, metavar=("H", "W"), help="canvas for a checkpoint side (default: the other side's)")
    add_flag(p, "--batch-size", type=BATCH, default=1, help="batch size for the model sides (default 1)")
    add_flag(p, "--iou-thr", type=number(float, 0.0, 1.0, low_open=True), default=0.5, help="IoU for two detections to match (0.5)")
    add_flag(p, "--score-tol", type=number(float, 0.0), default=1e-3, help="largest score error within tolerance (1e-3)")
    add_flag(p, "--box-tol", type=number(float, 0.0), default=1.0, help="largest box error within tolerance, canvas pixels (1.0)")
    add_flag(
        p,
        "--max-map-drop",
        type=number(float, 0.0),
        metavar="P",
        help="accept B (exit 0) when its mAP is at most P points below A's, even if detections differ (as tune's budget; "
        "needs --annotations); without it, exit 0 only within the output tolerances",
    )
    add_flag(p, "--layers", action="store_true", help="compare intermediate tensors and name the first divergence")
    add_flag(p, "--atol", type=number(float, 0.0), default=1e-3, help="layer tolerance: |a-b| <= atol + rtol*|a| (atol 1e-3)")
    add_flag(p, "--rtol", type=number(float, 0.0), default=1e-3, help="layer tolerance, relative part (1e-3)")
    add_flag(p, "--layer-images", type=number(int, 1, 64), default=2, help="images for --layers (2)")
    add_flag(p, "--worst", type=number(int, 0, 10_000), default=10, help="worst images listed (10)")
    add_flag(p, "--draw", type=number(int, 0, 1000), default=3, help="worst images drawn side by side (3)")
    p.set_defaults(func=_cmd_compare)
