#!/usr/bin/env python
"""Engine speed on FCOS-R50 (random weights, the mmdet R50-caffe layout): PyTorch eager vs ONNX Runtime vs OpenVINO.

For each canvas size a random-weight FCOS-R50 (ResNet-50 caffe, stage blocks 3-4-6-3, FPN 256, four
stacked head convs, no GN, 80 classes) with randomised, calibrated batch-norm statistics and head is
saved as an mmdet checkpoint and exported to ONNX with a dynamic batch and NMS in the graph. Each
configuration (size x batch x engine) is opened through ``fcos_offline.engine.backends.open_engine``,
exactly as ``fcos-offline infer`` opens it, warmed up, then timed ``--repeats`` times on the same
preprocessed-looking batch. Engines:

* ``torch``   -- PyTorch eager from the checkpoint (``DetectorWithPost``), the "online" baseline;
* ``ort``     -- ONNX Runtime, CPU execution provider, all graph optimisations (the default);
* ``ov``      -- OpenVINO CPU with no precision hint (``--precision auto``): the plugin's default,
  bf16 on CPUs that have it (AVX512-BF16 / AMX), else f32;
* ``ov-f32``  -- OpenVINO CPU with ``INFERENCE_PRECISION_HINT=f32``.

Prints a table of ms per image (median of the timed runs, per-batch time / batch) and each
engine's time relative to ORT default, plus how many of PyTorch's detections each engine
reproduces; writes everything to ``bench/results/engines.json``.

    python bench/engines.py                                   # 800x1333 and 400x667, bs 1 and 4
    python bench/engines.py --sizes 400x667 --batches 1 --repeats 5 --engines ort,ov,ov-f32
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from r50 import build_r50  # bench/r50.py: the shared random-weight FCOS-R50

from fcos_offline.cpu import cpu_count
from fcos_offline.errors import first_line

ENGINES = {
    "torch": ("torch", "fp32"),
    "ort": ("onnxruntime", "fp32"),
    "ov": ("openvino", "auto"),
    "ov-f32": ("openvino", "fp32"),
}
RESULTS = Path(__file__).resolve().parent / "results" / "engines.json"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="800x1333,400x667", help="canvases HxW, comma separated (default 800x1333,400x667)")
    p.add_argument("--batches", default="1,4", help="batch sizes, comma separated (default 1,4)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per configuration after one warm-up (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per configuration (default 1)")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"subset of {','.join(ENGINES)} (default all)")
    p.add_argument("--threads", type=int, default=None, help="intra-op threads for every engine (default: each engine's own)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=str(RESULTS), help=f"results JSON (default {RESULTS})")
    p.add_argument("--workdir", default=None, help="where the checkpoint and ONNX files go (default: a temporary folder)")
    args = p.parse_args(argv)
    try:
        args.sizes = [tuple(int(v) for v in s.lower().split("x")) for s in args.sizes.split(",") if s]
        args.batches = [int(b) for b in args.batches.split(",") if b]
    except ValueError:
        p.error("--sizes is HxW[,HxW...] and --batches is N[,N...]")
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = [e for e in args.engines if e not in ENGINES]
    if unknown or any(len(s) != 2 for s in args.sizes) or min(args.batches, default=0) < 1 or args.repeats < 1:
        p.error(f"bad --engines {unknown}, --sizes, --batches or --repeats (engines: {', '.join(ENGINES)})")
    return args


# --------------------------------------------------------------------------- the model


def prepare_models(args, workdir: Path) -> dict[tuple[int, int], dict[str, str]]:
    """Per size: the checkpoint (torch engine) and a dynamic-batch ONNX export (other engines)."""
    import torch

    from fcos_offline.export.onnx_export import export_onnx, sample_input
    from fcos_offline.model.checkpoint import mmdet_state_dict

    # cls logits N(-5, 2): a few percent of candidates above the 0.05 threshold for NMS to work on
    calib = sample_input(1, *min(args.sizes), seed=args.seed)
    network = build_r50(args.seed, calib, cls_mean=-5.0, cls_std=2.0, cls_jitter=0.0, he_init=False)
    ckpt = workdir / "fcos_r50_random.pth"
    torch.save({"state_dict": mmdet_state_dict(network), "meta": {}}, ckpt)
    files = {}
    for h, w in args.sizes:
        onnx_path = workdir / f"fcos_r50_random_{h}x{w}.onnx"
        if not onnx_path.is_file() and any(ENGINES[e][0] != "torch" for e in args.engines):
            t0 = time.perf_counter()
            export_onnx(network, onnx_path, (h, w), dynamic_batch=True, verify=False)
            print(f"exported {onnx_path.name} in {time.perf_counter() - t0:.1f} s", flush=True)
        files[(h, w)] = {"checkpoint": str(ckpt), "onnx": str(onnx_path)}
    return files


# --------------------------------------------------------------------------- timing


def time_engine(name: str, files: dict[str, str], hw: tuple[int, int], batch: np.ndarray, args) -> dict:
    from fcos_offline.engine.backends import EngineOptions, open_engine

    engine_name, precision = ENGINES[name]
    options = EngineOptions(engine_name, "cpu", args.threads, precision, batch_size=len(batch))
    from functools import partial

    from fcos_offline.engine.timing import run_timed, time_engine

    t0 = time.perf_counter()
    model = files["checkpoint"] if engine_name == "torch" else files["onnx"]
    with open_engine(model, options, shape=hw) as engine:
        load_s = time.perf_counter() - t0
        times = time_engine(engine, batch, warmup=args.warmup, runs=args.repeats).seconds
        dets, labels, _ = run_timed(partial(engine.run, batch))
        described = engine.describe()
    b = len(batch)
    return {
        "engine": name,
        "library": described["engine"],
        "version": described["version"],
        "precision_asked": precision,
        "execution_precision": described.get("execution_precision", "fp32"),
        "height": hw[0],
        "width": hw[1],
        "batch_size": b,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "load_s": load_s,
        "batch_ms": [t * 1000 for t in times],
        "ms_per_img": statistics.median(times) * 1000 / b,
        "ms_per_img_min": min(times) * 1000 / b,
        "detections": int((labels >= 0).sum()),
        "_out": (dets, labels),
    }


def machine() -> dict:
    import onnxruntime

    from fcos_offline.cpu import cpu_description

    info = {"python": sys.version.split()[0], "platform": platform.platform(), "cpu_count": cpu_count(), "onnxruntime": onnxruntime.__version__}
    info.update(cpu_description())
    for mod in ("torch", "openvino"):
        try:
            m = __import__(mod)
            info[mod] = getattr(m, "__version__", None) or m.get_version()
        except ImportError:
            info[mod] = None
    with contextlib.suppress(OSError):
        info["load_average"] = list(os.getloadavg())
    return info


def main(argv=None) -> int:
    args = parse_args(argv)
    from fcos_offline.export.onnx_export import sample_input
    from fcos_offline.model.match import match_batches

    work_ctx = tempfile.TemporaryDirectory(prefix="fcos_bench_") if args.workdir is None else None
    workdir = Path(args.workdir or work_ctx.name)
    workdir.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    print(f"building FCOS-R50 (random weights) and exporting {', '.join(f'{h}x{w}' for h, w in args.sizes)} ...", flush=True)
    files = prepare_models(args, workdir)
    rows = []
    for hw in args.sizes:
        for b in args.batches:
            batch = sample_input(b, *hw, seed=args.seed + 1)
            ref = None
            for name in args.engines:
                print(f"  {hw[0]}x{hw[1]} bs{b} {name} ...", end=" ", flush=True)
                try:
                    row = time_engine(name, files[hw], hw, batch, args)
                except Exception as exc:
                    print(f"failed: {type(exc).__name__}: {first_line(exc)}", flush=True)
                    rows.append({"engine": name, "height": hw[0], "width": hw[1], "batch_size": b, "error": str(exc)[:500]})
                    continue
                dets, labels = row.pop("_out")
                if name == "torch":
                    ref = (dets, labels)
                if ref is not None:
                    m = match_batches(ref[0], ref[1], dets, labels, iou_thr=0.999, score_tol=1e-4)
                    loose = match_batches(ref[0], ref[1], dets, labels, iou_thr=0.9, score_tol=1e-2)
                    row["match_vs_torch"] = m.match_rate
                    row["match_vs_torch_loose"] = loose.match_rate
                print(f"{row['ms_per_img']:.0f} ms/img ({row['execution_precision']})", flush=True)
                rows.append(row)
    # ratios to ORT default in the same size and batch
    ort = {(r["height"], r["width"], r["batch_size"]): r["ms_per_img"] for r in rows if r.get("engine") == "ort" and "error" not in r}
    for r in rows:
        key = (r["height"], r["width"], r["batch_size"])
        if "error" not in r and key in ort:
            r["time_vs_ort"] = r["ms_per_img"] / ort[key]
            r["speedup_vs_ort"] = ort[key] / r["ms_per_img"]

    print()
    header = (
        f"{'canvas':>9} {'bs':>3} {'engine':<7} {'exec':<5} {'ms/img':>8} {'min':>8} {'x ORT time':>10} {'speed-up':>8} {'match':>7} {'loose':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        canvas = f"{r['height']}x{r['width']}"
        if "error" in r:
            print(f"{canvas:>9} {r['batch_size']:>3} {r['engine']:<7} failed: {r['error'][:60]}")
            continue
        ratio = f"{r['time_vs_ort']:.2f}" if "time_vs_ort" in r else "-"
        speed = f"{r['speedup_vs_ort']:.2f}x" if "speedup_vs_ort" in r else "-"
        match = f"{r['match_vs_torch']:.1%}" if "match_vs_torch" in r else "-"
        loose = f"{r['match_vs_torch_loose']:.1%}" if "match_vs_torch_loose" in r else "-"
        print(
            f"{canvas:>9} {r['batch_size']:>3} {r['engine']:<7} {r['execution_precision']:<5} {r['ms_per_img']:>8.1f} "
            f"{r['ms_per_img_min']:>8.1f} {ratio:>10} {speed:>8} {match:>7} {loose:>7}"
        )
    print(
        "ms/img: median of the timed runs / batch; x ORT time: ms/img over ORT default's (lower is faster); "
        "match: share of PyTorch's detections reproduced (IoU > 0.999, |d score| <= 1e-4; loose: IoU > 0.9, 1e-2)"
    )

    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "model": "FCOS-R50 (mmdet R50-caffe layout, random weights, calibrated BN/head), NMS in graph",
        "machine": machine(),
        "settings": {
            "sizes": [list(s) for s in args.sizes],
            "batches": args.batches,
            "repeats": args.repeats,
            "warmup": args.warmup,
            "threads": args.threads,
            "engines": args.engines,
        },
        "results": rows,
        "total_s": time.perf_counter() - t_start,
    }
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out} ({report['total_s']:.0f} s in all)")
    if work_ctx is not None:
        work_ctx.cleanup()
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
