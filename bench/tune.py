#!/usr/bin/env python
"""Speed of the tuned recipe on the recipe's FCOS-R50 vs ONNX Runtime's and OpenVINO's defaults.

    python bench/tune.py                                   # demo tune first (~5 min), then 800x1333 and 400x667
    python bench/tune.py --demo-tune tuned/ --sizes 800x1333 --runs 5
    python bench/tune.py --demo-tune tuned/ --sizes 800x1333 --search     # + tune's own search on the R50

The model is ``Detector(DetectorConfig())`` — mmdet's FCOS-R50-caffe, no-GN head, 80 classes — with
random weights whose frozen-BN statistics are set from a real forward pass and then perturbed
(non-trivial BN), and a head rescaled so that a realistic number of boxes reaches NMS (cls logits
~ N(-5.5, 0.8): about a thousand (point, class) pairs above 0.05 at 800x1333; distances of a few
strides). It is exported with NMS in the graph and a dynamic batch, like ``fcos-offline export``.

Configurations (one run, same machine, same input: real COCO photos preprocessed like ``infer``):

* ONNX Runtime default: fp32, ``EngineOptions()`` (all graph optimisations, default threads);
* OpenVINO default: no precision hint (the CPU plugin picks bf16 where the CPU has it), and f32;
* ONNX Runtime int8: QDQ S8S8 (symmetric int8 activations), QDQ U8S8 and QOperator U8S8;
* OpenVINO running ONNX Runtime's U8S8 QDQ graph;
* **tuned**: the recipe ``fcos-offline tune`` chose for the demo model (run first, or read from
  ``--demo-tune DIR``) applied to the R50 — same engine, quantizer and options, conv groups kept
  float (by module name) and float-op precision — with threads and batch size swept for this
  network as ``tune``'s sweep does. The recipe's mAP drop is the demo model's, measured by
  ``tune`` (eval subset through ``infer`` + ``postprocess``, verified on the saved artifact).

With ``--search``, ``fcos-offline tune`` itself also runs on the R50 (candidates, threads/batch
sweep, interleaved re-timing), over the builds that held the 0.3-point budget on the demo model
(random weights have no mAP to keep: the budget is lifted, the demo's drop for the same build is
reported), and its choice is compared with this run's baselines.

Calibration uses the real images in ``--calib-dir`` (default: the shared COCO sample). Results go
to ``--workdir`` (``tune_bench.json``, models reused by later runs).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
from r50 import build_r50  # bench/r50.py: the shared random-weight FCOS-R50

from fcos_offline.cpu import cpu_count

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CALIB = REPO.parent / "shared" / "data" / "coco-val2017-sample" / "val2017"
DEFAULT_ANN = REPO.parent / "shared" / "data" / "coco-val2017-sample" / "annotations" / "instances_val2017_sample.json"


def candidates_per_image(model, x: np.ndarray) -> float:
    """Mean number of (point, class) pairs above the 0.05 score threshold (what reaches NMS)."""
    import torch

    with torch.no_grad():
        cls, _, _ = model(torch.from_numpy(x))
    return float(sum((c.sigmoid() > 0.05).sum().item() for c in cls)) / x.shape[0]


def bench(engine, x: np.ndarray, runs: int, seconds: float, warmup: int = 2) -> float:
    """Median ms per image, through the library's one timing loop (as tune times its trials)."""
    from fcos_offline.engine.timing import time_engine

    return time_engine(engine, x, warmup=warmup, runs=runs, max_seconds=seconds).ms_per_img


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["800x1333", "400x667"])
    p.add_argument("--calib-dir", default=str(DEFAULT_CALIB))
    p.add_argument("--calib-images", type=int, default=10)
    p.add_argument("--runs", type=int, default=8)
    p.add_argument("--seconds", type=float, default=25.0, help="stop timing a configuration after this (at least 3 runs)")
    p.add_argument("--threads", type=int, default=cpu_count())
    p.add_argument("--workdir", default=str(REPO / "bench" / "results" / "tune"), help="models, timings (tune_bench.json)")
    p.add_argument("--demo-tune", help="a finished 'fcos-offline tune' folder of the demo model (default: run it into WORKDIR/demo)")
    p.add_argument("--demo-eval-images", type=int, default=None, help="eval images for the demo tune (default: tune's)")
    p.add_argument("--demo-checkpoint", help="demo model to tune (default: the shipped one, fcos_offline/assets/fcos_demo.pth)")
    p.add_argument("--quick", action="store_true", help="only the three headline configurations")
    p.add_argument(
        "--search",
        action="store_true",
        help="also run tune's own search on the R50 (speed decides; accuracy proxied by the demo model's trial of the same build)",
    )
    p.add_argument("--annotations", default=str(DEFAULT_ANN), help="--search: COCO annotations of --calib-dir (mAP is meaningless on random weights)")
    p.add_argument("--search-eval-images", type=int, default=2, help="--search: images tune evaluates (only to run its path)")
    args = p.parse_args(argv)

    import torch

    from fcos_offline.cpu import cpu_description, describe_cpu
    from fcos_offline.data.preprocess import list_images
    from fcos_offline.engine.backends import EngineOptions, open_engine
    from fcos_offline.engine.backends.openvino import onnx_to_ir
    from fcos_offline.export.onnx_export import export_onnx
    from fcos_offline.tune import quantize as q

    torch.set_num_threads(args.threads)
    machine = cpu_description()
    print(describe_cpu(machine), flush=True)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    paths = [str(p) for p in list_images(args.calib_dir)][: args.calib_images]
    if not paths:
        print(f"no calibration images in {args.calib_dir}", file=sys.stderr)
        return 1
    nproc = cpu_count()
    report: dict = {"machine": machine, "cpu_threads": args.threads, "cores": nproc, "calibration_images": len(paths), "sizes": {}}
    report["demo"] = demo_recipe(Path(args.demo_tune) if args.demo_tune else work / "demo", args, run=not args.demo_tune)
    recipe = report["demo"]["candidate"]
    print(
        f"recipe (the demo model's choice): {report['demo']['label']}, threads {recipe['threads'] or 'auto'}, "
        f"batch {recipe['batch_size']}, float groups {recipe['float_groups'] or '-'}; demo mAP drop "
        f"{report['demo']['map_drop']:+.2f} points{held_out(report['demo'])}",
        flush=True,
    )
    for size in args.sizes:
        h, w = (int(v) for v in size.split("x"))
        tag = f"{h}x{w}"
        d = work / tag
        d.mkdir(exist_ok=True)
        images = q.ImageTensors(paths, (h, w))
        x1 = images[0]
        x4 = np.concatenate([images[i % len(images)] for i in range(4)])
        onnx_path = d / "fcos_r50.onnx"
        if not onnx_path.is_file():
            print(f"[{tag}] building FCOS-R50 (random weights) and exporting {onnx_path}", flush=True)
            model = build_r50(0, np.concatenate([images[i] for i in range(min(2, len(images)))]))
            export_onnx(model, onnx_path, shape=(h, w), dynamic_batch=True, verify=False)
            (d / "candidates.json").write_text(json.dumps({"per_image": candidates_per_image(model, x1)}))
            del model
        cands = json.loads((d / "candidates.json").read_text())["per_image"] if (d / "candidates.json").is_file() else None
        print(f"[{tag}] {cands} (point, class) pairs above the 0.05 score threshold per image (NMS input)", flush=True)
        ir = onnx_to_ir(onnx_path, d / "openvino-fp32" / "model.xml")
        quant_s: dict[str, float] = {}
        pre = q.preprocess_for_ort(onnx_path, d / "ort-preprocessed.onnx")
        ort_models = {}
        if not args.quick:
            for cfg in (
                q.OrtQuantConfig(activation_type="s8"),
                q.OrtQuantConfig(activation_type="u8"),
                q.OrtQuantConfig(activation_type="u8", quant_format="qoperator"),
            ):
                dst = d / f"ort-qdq-{cfg.tag()}" / "model.onnx"
                t0 = time.perf_counter()
                if not dst.is_file():
                    print(f"[{tag}] onnxruntime quantize_static {cfg.tag()}", flush=True)
                    q.ort_quantize(pre, dst, images, cfg, cache_dir=d / "calibration")
                quant_s[cfg.tag()] = time.perf_counter() - t0
                ort_models[cfg.tag()] = dst

        rows = []

        def measure(name: str, model, options, x=x1, group: str = "", rows=rows, tag=tag) -> float:
            with open_engine(model, options) as engine:
                ms = bench(engine, x, args.runs, args.seconds)
                prec = engine.execution_precision()
            rows.append(
                {"config": name, "group": group, "ms_per_img": ms, "batch_size": x.shape[0], "threads": options.threads, "execution_precision": prec}
            )
            print(f"[{tag}] {name:52s} {ms:8.1f} ms/img", flush=True)
            return ms

        ort_default = measure("ONNX Runtime default (fp32)", onnx_path, EngineOptions(), group="ort_default")
        ov_default = measure("OpenVINO default (no precision hint)", ir, EngineOptions("openvino", precision="auto"), group="ov_default")
        if not args.quick:
            measure("OpenVINO f32", ir, EngineOptions("openvino", precision="fp32"))
            for t, mpath in ort_models.items():
                measure(f"ONNX Runtime int8 {'QOperator' if t.endswith('-qop') else 'QDQ'} {t}", mpath, EngineOptions())
            measure("OpenVINO on ORT's QDQ u8s8 graph", ort_models["u8s8-minmax-pc"], EngineOptions("openvino", precision="auto"))
        # the recipe's model and precision; threads and batch size swept for this network, as tune's sweep does
        recipe_model = build_recipe(recipe, onnx_path, pre, d, images)
        base = recipe_options(recipe)
        threads = sorted({args.threads, max(1, args.threads // 2)}, reverse=True)
        for th in threads:
            for x in (x1, x4) if not args.quick else (x1,):
                opts = dataclasses.replace(base, threads=th, batch_size=x.shape[0])
                measure(f"tuned recipe, {th} thr, bs{x.shape[0]}", recipe_model, opts, x=x, group="tuned")
        if recipe["engine"] == "openvino" and not args.quick:
            other = "bf16" if base.precision == "fp32" else "fp32"
            measure(
                f"  (recipe with {other} for the float ops, {args.threads} thr, bs1)",
                recipe_model,
                dataclasses.replace(base, threads=args.threads, precision=other, batch_size=1),
                group="info",
            )
        tuned = min((r for r in rows if r["group"] == "tuned"), key=lambda r: r["ms_per_img"])
        if args.search:
            search = r50_search(onnx_path, d, args, report["demo"])
            search.update(vs_ort_default=ort_default / search["ms_per_img"], vs_ov_default=ov_default / search["ms_per_img"])
            report.setdefault("search", {})[tag] = search
            print(
                f"[{tag}] tune's search on the R50 chose {search['label']}, threads {search['threads'] or 'auto'}, batch "
                f"{search['batch_size']}: {search['ms_per_img']:.1f} ms/img = {search['vs_ort_default']:.2f}x ORT default, "
                f"{search['vs_ov_default']:.2f}x OpenVINO default (this run's baselines); demo model under the same build: "
                f"drop {search['demo_map_drop']:+.2f} points",
                flush=True,
            )
        ov_f32 = next((r["ms_per_img"] for r in rows if r["config"] == "OpenVINO f32"), None)
        summary = {
            "ort_default_ms": ort_default,
            "ov_default_ms": ov_default,
            "ov_f32_ms": ov_f32,
            "tuned_ms": tuned["ms_per_img"],
            "tuned": tuned["config"],
            "recipe": report["demo"]["label"],
            "tuned_vs_ov_f32": ov_f32 / tuned["ms_per_img"] if ov_f32 else None,
            "tuned_vs_ort_default": ort_default / tuned["ms_per_img"],
            "tuned_vs_ov_default": ov_default / tuned["ms_per_img"],
            "goal_met": ort_default / tuned["ms_per_img"] >= 3.5 and ov_default / tuned["ms_per_img"] >= 1.6,
            "rows": rows,
            "quantization_s": quant_s,
            "nms_candidates_per_image": cands,
        }
        report["sizes"][tag] = summary
        print(
            f"[{tag}] ORT default {ort_default:.1f} ms/img, OpenVINO default {ov_default:.1f} ms/img, tuned {tuned['ms_per_img']:.1f} "
            f"ms/img ({tuned['config']}): {summary['tuned_vs_ort_default']:.2f}x ORT default (goal 3.5x), "
            f"{summary['tuned_vs_ov_default']:.2f}x OpenVINO default (goal 1.6x)"
            + (f", {summary['tuned_vs_ov_f32']:.2f}x OpenVINO f32" if ov_f32 else ""),
            flush=True,
        )

    (work / "tune_bench.json").write_text(json.dumps(report, indent=1))
    print(f"wrote {work / 'tune_bench.json'}")
    print(
        "\n| size | ORT default ms/img | OpenVINO default ms/img | OpenVINO f32 ms/img | tuned ms/img | vs ORT default | vs OpenVINO default | vs OpenVINO f32 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for tag, s in report["sizes"].items():
        f32 = f"{s['ov_f32_ms']:.1f}" if s.get("ov_f32_ms") else "-"
        vs_f32 = f"{s['tuned_vs_ov_f32']:.2f}x" if s.get("tuned_vs_ov_f32") else "-"
        print(
            f"| {tag} | {s['ort_default_ms']:.1f} | {s['ov_default_ms']:.1f} | {f32} | {s['tuned_ms']:.1f} | "
            f"{s['tuned_vs_ort_default']:.2f}x | {s['tuned_vs_ov_default']:.2f}x | {vs_f32} |"
        )
    for tag, s in report["sizes"].items():
        print(f"tuned at {tag}: {s['tuned']}")
    dm = report["demo"]
    print(
        f"recipe: {dm['label']} (threads {dm['candidate']['threads'] or 'auto'}, batch {dm['candidate']['batch_size']}); "
        f"demo model under it: mAP {dm['bbox_mAP']:.4f} vs fp32 {dm['reference_mAP']:.4f}, drop {dm['map_drop']:+.2f} points "
        f"({dm['eval_images']} eval images){held_out(dm)}{'' if dm['map_drop'] <= 0.3 else '  OVER the 0.3 budget'}"
    )
    return 0


DEFAULT_RECIPE = {
    "engine": "openvino",
    "build": "nncf:performance-bc-mm-gn",
    "exec_precision": "fp32",
    "float_groups": [],
    "threads": None,
    "inter_op_threads": None,
    "batch_size": 1,
    "opt_level": "all",
}


def demo_recipe(folder: Path, args, run: bool) -> dict:
    """The demo model's tuned choice (``tune`` run into ``folder`` unless it is already there)."""
    from fcos_offline.report.run import DEMO_CHECKPOINT
    from fcos_offline.tune.search import TUNE_FILE, TuneOptions, tune

    path = folder / TUNE_FILE
    checkpoint = Path(args.demo_checkpoint or DEMO_CHECKPOINT)
    if run and not checkpoint.is_file():
        print(f"demo model {checkpoint} not found: timing the default recipe, its accuracy is not measured")
        return {
            "label": "openvino int8 nncf performance-bc-mm-gn, fp32 rest (default recipe)",
            "candidate": DEFAULT_RECIPE,
            "bbox_mAP": float("nan"),
            "reference_mAP": float("nan"),
            "map_drop": float("nan"),
            "eval_images": 0,
        }
    if run:
        print(f"tuning the demo model into {folder} (its choice is the recipe applied to the R50)", flush=True)
        result = tune(TuneOptions(output=str(folder), eval_images=args.demo_eval_images, batch_sizes=(1, 4), demo_checkpoint=str(checkpoint)))
    else:
        result = json.loads(path.read_text())
    chosen = result["chosen"]
    return {
        "label": chosen["label"],
        "candidate": chosen["candidate"],
        "bbox_mAP": chosen["bbox_mAP"],
        "reference_mAP": result["reference"]["bbox_mAP"],
        "map_drop": chosen["map_drop"],
        "demo_speedup_vs_ort_default": chosen["speedup_vs_reference"],
        "eval_images": result["context"]["eval_images"],
        "reason": chosen["reason"],
        "holdout": chosen.get("holdout"),
        "tune_json": str(path),
    }


def held_out(demo: dict) -> str:
    """The demo tune's held-out check of its choice, in words ('' when it made none)."""
    h = demo.get("holdout")
    return f"; held out: {h['map_drop']:+.2f} +- {h['map_drop_se'] or 0:.2f} points on {h['images']} unseen images" if h else ""


def demo_accuracy(demo: dict) -> dict[str, float]:
    """``engine/model_id/exec_precision`` -> mAP drop on the demo model, for builds without float groups.

    Where the demo tune re-judged builds on held-out images (its eval images judged the drop
    loosely), those drops stand, and builds it did not re-judge count only if they compute in fp32
    (the eval images' drop of the others is not trusted).
    """
    from fcos_offline.tune.space import Candidate

    result = json.loads(Path(demo["tune_json"]).read_text())
    held = {c["accuracy_id"]: c["map_drop"] for c in (result.get("holdout") or {}).get("checks", [])}
    drops: dict[str, float] = {}
    for t in result["trials"]:
        cand = Candidate.from_dict(t["candidate"])
        if cand.float_groups:
            continue
        key = f"{cand.engine}/{cand.model_id}/{cand.exec_precision}"
        if t["accuracy_id"] in held:
            drops[key] = held[t["accuracy_id"]]
        elif not held or t["precision"] == "fp32":
            drops[key] = t["map_drop"]
    return drops


def r50_search(onnx_path: Path, d: Path, args, demo: dict) -> dict:
    """tune's search (candidates, sweep, interleaved confirmation) on the R50 over the builds that held the demo's budget."""
    from fcos_offline.tune.search import TuneOptions, tune

    if "tune_json" not in demo:
        raise SystemExit("--search needs the demo tune (its trials are the accuracy proxy)")
    drops = demo_accuracy(demo)
    budget = 0.3
    allowed = tuple(k for k, drop in drops.items() if drop <= budget + 1e-9)
    print(f"[search] builds within the demo's {budget}-point budget (held-out drops where tune checked): {', '.join(allowed)}", flush=True)
    opts = TuneOptions(
        model=str(onnx_path),
        images=args.calib_dir,
        annotations=args.annotations,
        output=str(d / "search"),
        eval_images=args.search_eval_images,
        calib_images=args.calib_images,
        max_map_drop=1e9,  # accuracy is the demo model's (random weights have no mAP to keep)
        candidates=allowed,
        fallback=False,
        batch_sizes=(1, 4),
        bench_runs=args.runs,
        bench_seconds=args.seconds,
    )
    result = tune(opts)
    chosen = result["chosen"]
    key = f"{chosen['engine']}/{chosen['candidate']['build'].replace(':', '-')}/{chosen['candidate']['exec_precision']}"
    return {
        "label": chosen["label"],
        "threads": chosen["threads"],
        "batch_size": chosen["batch_size"],
        "ms_per_img": chosen["ms_per_img"],
        "tune_reference_ms": result["reference"]["ms_per_img"],
        "speedup_vs_tune_reference": chosen["speedup_vs_reference"],
        "demo_map_drop": drops.get(key, 0.0 if chosen["candidate"]["build"] == "fp32" else float("nan")),
        "trials": len(result["trials"]),
        "machine": result["machine"],
        "tune_json": str(d / "search" / "tune.json"),
    }


def build_recipe(recipe: dict, onnx_path: Path, pre: Path, d: Path, images) -> Path:
    """The recipe's model for this network: same quantizer, options and float conv groups (by module name)."""
    from fcos_offline.engine.backends.openvino import onnx_to_ir
    from fcos_offline.tune import quantize as q
    from fcos_offline.tune.space import Candidate, nncf_config, ort_config, parse_build

    cand = Candidate.from_dict(recipe)
    kind, tag = parse_build(cand.build)
    if kind == "fp32":
        return onnx_path if cand.engine == "onnxruntime" else onnx_to_ir(onnx_path, d / "openvino-fp32" / "model.xml")
    src = pre if kind == "ort-qdq" else onnx_path
    groups = {g.name: g for g in q.conv_groups(src)}
    missing = [g for g in cand.float_groups if g not in groups]
    if missing:
        print(f"warning: float groups not in this network: {missing}")
    nodes = [n for g in cand.float_groups if g in groups for n in groups[g].nodes]
    folder = d / f"recipe-{cand.model_id}"
    t0 = time.perf_counter()
    if kind == "nncf":
        dst = folder / "model.xml"
        if not dst.is_file():
            print(f"[recipe] nncf.quantize {tag} ({len(images)} calibration images, {len(nodes)} conv nodes float)", flush=True)
            q.nncf_quantize(onnx_path, dst, images, nncf_config(tag), nodes)
    else:
        dst = folder / "model.onnx"
        if not dst.is_file():
            print(f"[recipe] onnxruntime quantize_static {tag} ({len(nodes)} conv nodes float)", flush=True)
            q.ort_quantize(pre, dst, images, ort_config(tag), nodes, cache_dir=d / "calibration")
    print(f"[recipe] model {dst} ready in {time.perf_counter() - t0:.0f} s", flush=True)
    return dst


def recipe_options(recipe: dict):
    from fcos_offline.tune.space import Candidate

    cand = Candidate.from_dict(recipe)
    return cand.engine_options("cpu")


if __name__ == "__main__":
    sys.exit(main())
