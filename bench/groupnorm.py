#!/usr/bin/env python
"""What does keeping the head's GroupNorm float (build tag ``-gn``) cost on an FCOS-R50 that has one?

    python bench/groupnorm.py                          # 800x1333, 2 interleaved rounds
    python bench/groupnorm.py --shape 400 667 --rounds 3

The recipe's checkpoint (``fcos_r50_caffe_fpn_1x_4gpu``, GN=N) has no GroupNorm, so ``-gn``
leaves its graph unchanged; its GN=Y sibling (``fcos_r50_caffe_fpn_gn_1x_4gpu``, 36.7 AP), the
torchvision FCOS and the demo model normalise every head tower conv with GroupNorm(32). This
builds that R50 (``bench/r50.py``, ``head_norm="gn"``, random weights), quantizes it with and
without ``-gn`` — NNCF ``performance-bc-mm`` (``-vnni`` on VNNI CPUs) and ONNX Runtime QDQ U8S8
MinMax, as ``tune``'s candidate list builds them — and times each pair in interleaved rounds on
the same input (real COCO photos, batch 1): OpenVINO with fp32 and, where the CPU has native
bf16, bf16 float ops; ONNX Runtime with its own kernels. Prints the CPU's features, ms/img and the
``-gn`` / plain ratio per pair; writes ``--output`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import numpy as np
from r50 import build_r50  # bench/r50.py: the shared random-weight FCOS-R50

from fcos_offline.cpu import cpu_count

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PHOTOS = REPO.parent / "shared" / "data" / "coco-val2017-sample" / "val2017"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", nargs=2, type=int, default=[800, 1333], metavar=("H", "W"))
    p.add_argument("--photos", default=str(DEFAULT_PHOTOS), help="calibration and timing photos (default: the COCO val2017 sample)")
    p.add_argument("--calib-images", type=int, default=10)
    p.add_argument("--runs", type=int, default=8, help="timed runs per configuration and round (median)")
    p.add_argument("--seconds", type=float, default=20.0, help="stop timing a configuration after this (at least 3 runs)")
    p.add_argument("--rounds", type=int, default=2, help="interleaved rounds over every configuration (noise)")
    p.add_argument("--threads", type=int, default=cpu_count())
    p.add_argument("--workdir", default=str(REPO / "bench" / "results" / "groupnorm"), help="models (reused by later runs)")
    p.add_argument("--output", default=str(REPO / "bench" / "results" / "groupnorm.json"))
    args = p.parse_args(argv)

    import torch

    from fcos_offline.cpu import cpu_description, describe_cpu
    from fcos_offline.data.preprocess import list_images
    from fcos_offline.engine.backends import EngineOptions, open_engine
    from fcos_offline.engine.timing import time_engine
    from fcos_offline.export.onnx_export import export_onnx
    from fcos_offline.tune import quantize as q
    from fcos_offline.tune.space import nncf_config, ort_config

    torch.set_num_threads(args.threads)
    machine = cpu_description()
    print(describe_cpu(machine), flush=True)
    h, w = args.shape
    work = Path(args.workdir) / f"{h}x{w}"
    work.mkdir(parents=True, exist_ok=True)
    paths = [str(p) for p in list_images(args.photos)][: args.calib_images]
    if not paths:
        print(f"no photos in {args.photos}", file=sys.stderr)
        return 1
    images = q.ImageTensors(paths, (h, w))
    onnx_path = work / "fcos_r50_gn.onnx"
    if not onnx_path.is_file():
        print(f"building FCOS-R50 with a GroupNorm head (random weights), exporting {onnx_path}", flush=True)
        model = build_r50(0, np.concatenate([images[i] for i in range(min(2, len(images)))]), head_norm="gn")
        export_onnx(model, onnx_path, shape=(h, w), dynamic_batch=False, verify=False)
        del model
    pre = q.preprocess_for_ort(onnx_path, work / "ort-preprocessed.onnx")

    nncf_tag = "performance-bc-mm" + ("-vnni" if q.vnni_cpu(machine["features"]) else "")
    models: dict[str, Path] = {}
    for tag in (nncf_tag, nncf_tag + "-gn"):
        dst = work / f"nncf-{tag}" / "model.xml"
        if not dst.is_file():
            print(f"nncf.quantize {tag} ({len(images)} calibration images)", flush=True)
            q.nncf_quantize(onnx_path, dst, images, nncf_config(tag))
        models[f"nncf:{tag}"] = dst
    for tag in ("u8s8-minmax-pc", "u8s8-minmax-pc-gn"):
        dst = work / f"ort-qdq-{tag}" / "model.onnx"
        if not dst.is_file():
            print(f"onnxruntime quantize_static {tag}", flush=True)
            q.ort_quantize(pre, dst, images, ort_config(tag), cache_dir=work / "calibration")
        models[f"ort-qdq:{tag}"] = dst

    rests = ["fp32"] + (["bf16"] if {"avx512_bf16", "amx_bf16"} & set(machine["features"]) else [])
    configs = [
        (f"openvino {b} {r}", models[b], EngineOptions("openvino", precision=r, threads=args.threads))
        for r in rests
        for b in models
        if b.startswith("nncf")
    ]
    configs += [(f"onnxruntime {b}", models[b], EngineOptions(threads=args.threads)) for b in models if b.startswith("ort-qdq")]
    x = images[0]
    timings: dict[str, list[float]] = {name: [] for name, _, _ in configs}
    for rnd in range(args.rounds):
        for name, path, options in configs:
            with open_engine(path, options) as engine:
                ms = time_engine(engine, x, warmup=2, runs=args.runs, max_seconds=args.seconds).ms_per_img
            timings[name].append(ms)
            print(f"round {rnd + 1}: {name:58s} {ms:8.1f} ms/img", flush=True)

    pairs = []
    for name, _, _ in configs:
        if "-gn" in name:
            continue
        gn = name.replace("-pc", "-pc-gn") if "ort-qdq" in name else name.replace(nncf_tag, nncf_tag + "-gn")
        plain_ms, gn_ms = statistics.median(timings[name]), statistics.median(timings[gn])
        pairs.append({"plain": name, "gn": gn, "plain_ms": plain_ms, "gn_ms": gn_ms, "gn_over_plain": gn_ms / plain_ms})
    print(f"\nFCOS-R50 with a GroupNorm head, {h}x{w}, batch 1, {args.threads} threads, median of {args.rounds} rounds (ms/img):")
    print("| build | GroupNorm int8 | GroupNorm float (-gn) | -gn / plain |\n|---|---|---|---|")
    for r in pairs:
        print(f"| {r['plain']} | {r['plain_ms']:.1f} | {r['gn_ms']:.1f} | {r['gn_over_plain']:.3f} |")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": machine, "shape": [h, w], "threads": args.threads, "timings_ms": timings, "pairs": pairs}, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
