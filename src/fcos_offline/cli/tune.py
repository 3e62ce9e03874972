"""``fcos-offline tune``: the fastest engine configuration within an accuracy budget."""

from __future__ import annotations

import argparse
from typing import Any

from fcos_offline.cli.common import (
    BATCH,
    COUNT,
    POSITIVE_INT,
    SIDE,
    THREADS,
    DefaultsFormatter,
    add_flag,
    number,
)
from fcos_offline.errors import EXIT_OK, EXIT_SKIPS
from fcos_offline.tune.inputs import DEMO_MAX_IMAGES
from fcos_offline.tune.policy import HOLDOUT_MAX_IMAGES
from fcos_offline.tune.quantize import CALIB_METHODS
from fcos_offline.tune.space import TUNE_ENGINES
from fcos_offline.units import map_text, percent


def _cmd_tune(args: argparse.Namespace) -> int:
    from rich.console import Console

    from fcos_offline.tune.search import TuneOptions, tune

    opts = TuneOptions(
        model=args.model,
        coco=args.coco,
        images=args.images,
        annotations=args.annotations,
        output=args.output,
        calib_images=args.calib_images,
        eval_images=args.eval_images,
        holdout_images=args.holdout_images,
        max_map_drop=args.max_map_drop,
        batch_sizes=tuple(args.batch_sizes),
        threads=tuple(args.threads) if args.threads else None,
        engines=tuple(args.engines),
        calib_methods=tuple(args.calib_methods),
        time_budget=args.time_budget,
        bench_runs=args.bench_runs,
        bench_seconds=args.bench_seconds,
        shape=tuple(args.shape) if args.shape else None,
        fresh=args.fresh,
        fallback=not args.no_fallback,
        sweep=not args.no_sweep,
        max_fallback_steps=args.max_fallback_steps,
    )
    result = tune(opts)
    import sys

    Console(highlight=False, width=None if sys.stdout.isatty() else 180).print(format_table(result))
    chosen = result["chosen"]
    ref = result["reference"]
    measured = chosen.get("map_drop_spread")
    spread = (
        f" +- {measured['se_points']:.2f} (standard error, {measured['images']} images)" if measured and measured["se_points"] is not None else ""
    )
    print(
        f"chosen: {chosen['label']}, threads {chosen['threads'] or 'auto'}, batch {chosen['batch_size']}: "
        f"mAP {map_text(chosen['bbox_mAP'], 2)} (drop {chosen['map_drop']:+.2f}{spread} points, budget {opts.max_map_drop:g}), "
        f"{chosen['ms_per_img']:.1f} ms/img = {chosen['speedup_vs_reference']:.2f}x ONNX Runtime default fp32 "
        f"({chosen.get('reference_ms') or ref['ms_per_img']:.1f} ms/img, timed in the same phase)"
    )
    check = result.get("accuracy_check") or {}
    agreement = chosen.get("agreement")
    if check.get("criterion") == "agreement" and agreement:
        print(
            f"accuracy check: output agreement with the reference, not mAP drop ({check['why']}): {agreement['matched']} of "
            f"{agreement['detections_a']} detections matched, score error max {agreement['score_err_max']:.1e}, box error max "
            f"{agreement['box_err_px_max']:.2f} px ({'within' if agreement['within_tolerance'] else 'beyond'} {check['agreement_tolerance']})"
        )
    held = chosen.get("holdout")
    if held:
        print(
            f"held-out check: drop {held['map_drop']:+.2f} +- {held['map_drop_se'] or 0:.2f} points on {held['images']} images the search "
            f"never saw (mAP {map_text(held['bbox_mAP'], 2)} vs {map_text(held['reference_bbox_mAP'], 2)})"
        )
    for c in (result.get("holdout") or {}).get("checks", []):
        if not c["within_budget"]:
            print(f"rejected by the held-out check: {c['label']} (drop {c['eval_map_drop']:+.2f} on the eval images, {c['map_drop']:+.2f} held out)")
    print(f"why: {chosen['reason']}")
    if result.get("float_by_design"):
        print(f"float by design: {result['float_by_design']['summary']}")
    for fb in result.get("fallback", []):
        added = [g for s in fb["steps"] for g in s["added"]]
        print(f"fallback for {fb['label']}: {fb.get('stopped')}; returned to float in order: {', '.join(added) or '-'}")
    print(
        f"artifact: {chosen['artifact']} (run it: fcos-offline infer --model {chosen['artifact']} "
        f"--batch-size {chosen['batch_size']} --images DIR); all trials: {opts.output}/tune.json"
    )
    if result.get("skipped"):
        reasons = sorted({s["reason"] for s in result["skipped"]})
        print(f"{len(result['skipped'])} configuration(s) not tried: {'; '.join(reasons)}")
        return EXIT_SKIPS
    return EXIT_OK


def _age(seconds: float) -> str:
    """How long before the re-timing a row was timed (``after`` for a row timed later)."""
    span = abs(seconds)
    text = f"{span / 60:.0f} min" if span >= 90 else f"{span:.0f} s"
    return text if seconds >= 0 else f"{text} after"


def format_table(result: dict[str, Any]) -> Any:
    """A rich Table of every trial (the chosen one marked), with a legend of its markers as the caption."""
    from rich.table import Table

    chosen_key = (result.get("chosen") or {}).get("key")
    check = result.get("accuracy_check") or {}
    by_agreement = check.get("criterion") == "agreement"
    retimed_at = (result.get("confirmation") or {}).get("at")
    title = f"tune: {len(result['trials'])} configurations on {check.get('eval_images', '?')} eval images (budget {result['settings']['max_map_drop']:g} mAP points"
    title += ", judged by output agreement)" if by_agreement else ")"
    legend = [
        "→ chosen; ✗ fails the accuracy check ("
        + (
            f"outputs beyond compare's tolerance of the reference's: {check.get('agreement_tolerance')}"
            if by_agreement
            else "mAP drop over the budget"
        )
        + "); agrees: outputs within that tolerance (✓) or not (✗) on the eval images.",
        "threads: N* = the engine's default (N cores), +Nio = inter-op threads. ms/img: median of the timed runs, ± their spread "
        "(coefficient of variation); speedup: against ONNX Runtime's default fp32 (the reference) timed alongside.",
    ]
    if retimed_at:
        legend.append(
            "· = not re-timed in the final interleaved rounds with the reference and the finalists: timed the age shown "
            "before them (or after), and its speedup is against the reference's timing of that phase (reference_ms in tune.json)."
        )
    busy = (result.get("machine_load") or {}).get("note")
    if busy:
        legend.insert(0, busy)
    table = Table(title=title, caption="\n".join(legend), caption_justify="left")
    for col, just in (
        ("", "left"),
        ("engine", "left"),
        ("precision", "left"),
        ("quantization", "left"),
        ("float", "right"),
        ("threads", "right"),
        ("batch", "right"),
        ("mAP %", "right"),
        ("drop (points)", "right"),
        ("agrees", "left"),
        ("ms/img", "right"),
        ("img/s", "right"),
        ("speedup", "right"),
        ("timed", "right"),
        ("size MB", "right"),
    ):
        table.add_column(col, justify=just)  # type: ignore[arg-type]
    for t in sorted(result["trials"], key=lambda t: t["ms_per_img"]):
        c = t["candidate"]
        quant = "-" if c["build"] == "fp32" else c["build"].replace("ort-qdq:", "ORT QDQ ").replace("nncf:", "NNCF ")
        prec = t["precision"] + (f" (+{t['float_precision']})" if t.get("float_precision") else "")
        threads = f"{t['threads_effective']}" + ("" if t["threads"] else "*") + (f"+{t['inter_op_threads']}io" if t.get("inter_op_threads") else "")
        opt = f" opt-{t['ort_opt_level']}" if t["engine"] == "onnxruntime" and t["ort_opt_level"] != "all" else ""
        mark = "→" if t["key"] == chosen_key else ("" if t["within_budget"] else "✗")
        agreement = t.get("agreement")
        agrees = "" if agreement is None else ("✓" if agreement["within_tolerance"] else "✗")
        spread = "" if t.get("spread_pct") is None else f" ±{t['spread_pct']:.0f}%"
        stale = bool(retimed_at) and not t.get("confirmed_runs")
        timed = "re-timed" if retimed_at and not stale else (f"· {_age(retimed_at - t['timed_at'])}" if stale and t.get("timed_at") else "")
        table.add_row(
            mark,
            t["engine"] + opt,
            prec,
            quant,
            str(len(t["float_groups"])) if t["float_groups"] else "",
            threads,
            str(t["batch_size"]),
            percent(t["bbox_mAP"], 2),
            f"{t['map_drop']:+.2f}",
            agrees,
            f"{t['ms_per_img']:.1f}{spread}",
            f"{t['img_per_s']:.2f}",
            f"{t['speedup_vs_reference']:.2f}x" + ("·" if stale else ""),
            timed,
            f"{t['size_mb']:.1f}",
        )
    return table


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``tune``."""
    p = sub.add_parser(
        "tune",
        help="fastest configuration within an accuracy budget (int8/bf16, threads, batch)",
        description="Try engine configurations — ONNX Runtime fp32 (optimisation levels, threads), ONNX Runtime int8 "
        "static QDQ (quantize_static, per-channel, MinMax/Percentile/Entropy calibration on real images), OpenVINO "
        "f32 / bf16 / int8 (NNCF post-training quantization) and batch sizes — measure COCO mAP on an eval subset "
        "and speed, return the most sensitive convolutions to float while an int8 model exceeds the mAP budget, and "
        "save the fastest configuration within the budget as an artifact folder that 'infer --model' runs with its "
        "engine options. Post-processing (decode, NMS) always stays float, and int8 builds keep the head's GroupNorm "
        "float (ONNX Runtime's: its normalised output). Finished trials are cached in "
        "<output>/tune.json and skipped when rerun. With no --model/--coco it tunes the embedded demo model on the "
        "demo data. Exit 3 when some configurations were not tried (time budget, failures).",
        epilog="examples:\n"
        "  fcos-offline tune                                   # the embedded demo model on the demo data, about 5 min\n"
        "  fcos-offline tune --model fcos.onnx --coco /opt/npu/coco --calib-images 200 --eval-images 500 \\\n"
        "      --max-map-drop 0.3 --batch-sizes 1 4 --output tuned/\n"
        "  fcos-offline infer --model tuned/best --images val2017   # then run the choice with its engine options",
        formatter_class=DefaultsFormatter,
    )
    add_flag(p, "--model", help="exported .onnx (dynamic batch preferred) or a checkpoint (exported at --shape); default: the demo model")
    add_flag(p, "--coco", help="COCO folder with val2017/ and annotations/instances_val2017.json")
    add_flag(p, "--images", help="image folder (instead of --coco; needs --annotations)")
    add_flag(p, "--annotations", help="COCO instances JSON, or a folder holding one")
    add_flag(p, "--output", default="tuned", help="work folder: tune.json, models/, best/ (default: tuned)")
    add_flag(
        p,
        "--calib-images",
        type=POSITIVE_INT,
        help="calibration images (default 200), taken outside the eval subset (the demo: from its train split)",
    )
    add_flag(
        p,
        "--eval-images",
        type=POSITIVE_INT,
        help="images for mAP, the first N by file name (default 500, the demo's too: enough to judge a 0.3-point drop to about +-0.1; "
        f"the demo generates at most {DEMO_MAX_IMAGES:,} for each of --eval-images, --calib-images and --holdout-images)",
    )
    add_flag(
        p,
        "--holdout-images",
        type=COUNT,
        help="re-judge the chosen configuration's mAP drop on N images the search never saw (neither evaluated nor calibrated "
        "on); over budget there, the next configuration is chosen and checked. Default: only when the eval images judge the "
        "drop to worse than a third of the budget (standard error), on as many images as bring it there (at most "
        f"{HOLDOUT_MAX_IMAGES}); 0: never",
    )
    add_flag(
        p,
        "--max-map-drop",
        type=number(float, 0.0, 100.0),
        default=0.3,
        help="allowed mAP drop in points (default 0.3 = 0.3 mAP points, percent units)",
    )
    add_flag(p, "--batch-sizes", nargs="+", type=BATCH, default=[1], help="batch sizes to try (default: 1)")
    add_flag(p, "--threads", nargs="+", type=THREADS, help="intra-op thread counts to try (default: all cores and half of them)")
    add_flag(p, "--engines", nargs="+", choices=TUNE_ENGINES, default=list(TUNE_ENGINES), help=f"engines to try (default: {' '.join(TUNE_ENGINES)})")
    add_flag(
        p,
        "--calib-methods",
        nargs="+",
        choices=CALIB_METHODS,
        default=list(CALIB_METHODS),
        help=f"ONNX Runtime calibration methods (default: {' '.join(CALIB_METHODS)})",
    )
    add_flag(
        p,
        "--time-budget",
        type=number(float, 0.0, low_open=True),
        help="seconds: no new trial, accuracy fallback, sweep, re-timing or held-out check starts after this; preparing the "
        "data, the reference trial, a trial already under way and saving and verifying the choice always run, so a run "
        "takes longer than the budget by about their time",
    )
    add_flag(p, "--bench-runs", type=number(int, 1, 10_000), default=10, help="timed runs per configuration, median taken (default 10)")
    add_flag(
        p,
        "--bench-seconds",
        type=number(float, 0.0, low_open=True),
        default=20.0,
        help="stop timing a configuration after this many seconds, at least 3 runs (default 20)",
    )
    add_flag(p, "--shape", nargs=2, type=SIDE, metavar=("H", "W"), help="canvas when --model is a checkpoint (default 800 1333; the demo's own)")
    add_flag(p, "--fresh", action="store_true", help="ignore the finished trials in <output>/tune.json")
    add_flag(p, "--no-fallback", action="store_true", help="do not return convolutions to float for int8 models over budget")
    add_flag(p, "--max-fallback-steps", type=COUNT, help="at most this many fallback steps per int8 model (default: no limit)")
    add_flag(p, "--no-sweep", action="store_true", help="do not sweep threads/batch sizes for the best configurations")
    p.set_defaults(func=_cmd_tune)
