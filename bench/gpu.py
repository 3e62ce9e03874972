#!/usr/bin/env python
"""FCOS-R50 on one GPU: the online baseline (eager fp32) vs the compiled engine, network-only and end to end.

Model: ``bench/r50.py``'s random-weight FCOS-R50 (mmdet R50-caffe layout, 80 classes) whose
classification bias is shifted so that a realistic number of (point, class) pairs pass the 0.05
score threshold on the photos (``--candidates``, default 2000 per image; the count reached is
printed: NMS time depends on it). Saved as an mmdet checkpoint and run the way users run it:

* ``eager-fp32``: ``infer --engine torch --device cuda`` (the online baseline, IEEE fp32);
* ``compiled-<p>``: ``convert --engine inductor --device cuda --precision <p>`` then ``infer --model``.

For each configuration (``--plan``: engine/precision at batch sizes) it measures:

* network-only img/s and p50 ms per batch (device tensors in, synchronised);
* post-processing (decode + exact class-wise NMS on the device) ms per batch;
* end to end, JPEG -> dumps through ``run_inference`` (shared-memory feed with ``--workers``
  processes, device-side float conversion, a writer thread): img/s over ``--images`` photos
  (the COCO sample, repeated);
* detections matched against eager fp32 on the same photos (IoU > 0.5, same label).

and the feed alone (decode + letterbox img/s, same workers), so each end-to-end figure names its
bound: the slowest of network, post-processing and feed. Results go to ``--output`` (JSON,
rewritten after every configuration, so a run cut short keeps what it measured).

    python bench/gpu.py --output gpu.json                       # the full plan (~5 min on an H200)
    python bench/gpu.py --plan eager-fp32:1 compiled-fp16:8 --images 128
    python bench/gpu.py --device cpu --shape 320 512 --plan eager-fp32:2 compiled-fp32:2 --images 16   # smoke test
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from r50 import build_r50, set_candidates  # bench/r50.py: the shared random-weight FCOS-R50

from fcos_offline.cpu import cpu_count
from fcos_offline.errors import first_line

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PHOTOS = REPO.parent / "shared" / "data" / "coco-val2017-sample" / "val2017"
DEFAULT_PLAN = ["eager-fp32:1,8,32", "compiled-fp16:1,8,32", "compiled-fp32:8", "compiled-bf16:8"]
TARGETS = {"e2e_compiled_fp16_img_s": 500.0, "eager_fp32_img_s": 70.0, "compiled_fp16_bs1_p50_ms": 5.0}


def parse_plan(entries: list[str]) -> list[tuple[str, str, int]]:
    """``eager-fp32:1,8`` / ``compiled-fp16:8`` -> [(kind, precision, batch)]."""
    plan = []
    for entry in entries:
        name, _, batches = entry.partition(":")
        kind, _, precision = name.partition("-")
        if kind not in ("eager", "compiled") or precision not in ("fp32", "tf32", "fp16", "bf16") or not batches:
            raise SystemExit(f"bad --plan entry {entry!r} (e.g. eager-fp32:1,8 or compiled-fp16:8)")
        if kind == "eager" and precision != "fp32":
            raise SystemExit("the eager baseline runs fp32")
        plan += [(kind, precision, int(b)) for b in batches.split(",")]
    return plan


def photo_items(folder: Path, count: int, work: Path) -> list:
    """``count`` inputs cycling over the photos of ``folder`` (symlinks with distinct stems)."""
    from fcos_offline.data.preprocess import list_images
    from fcos_offline.engine.infer import items_from_images

    photos = list_images(folder)
    if not photos:
        raise SystemExit(f"no photos in {folder}")
    out = work / "photos"
    out.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        src = photos[i % len(photos)]
        link = out / f"{i:06d}{src.suffix}"
        if not link.exists():
            link.symlink_to(src.resolve())
    return items_from_images(out)


def build_model(photos: list, shape: tuple[int, int], candidates: float, work: Path) -> tuple[Path, float]:
    """The R50 checkpoint with ``candidates`` (point, class) pairs above 0.05 per photo; (path, reached)."""
    import torch

    from fcos_offline.data.preprocess import preprocess_image, read_image
    from fcos_offline.model.checkpoint import mmdet_state_dict

    calib = np.stack([preprocess_image(read_image(p.path), *shape)[0] for p in photos[:2]])
    model = build_r50(0, calib)
    reached = set_candidates(model, calib, candidates)
    path = work / "fcos_r50_random.pth"
    torch.save({"state_dict": mmdet_state_dict(model), "meta": {}}, path)
    return path, reached


def timed(fn, sync, repeats: int) -> list[float]:
    """Seconds per call of ``fn`` (synchronised), after two warm-up calls."""
    for _ in range(2):
        fn()
    sync()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return out


def network_and_post(engine, x, repeats: int) -> dict[str, float]:
    """Network-only and post-processing time of ``engine`` on the device batch ``x``."""
    import torch

    from fcos_offline.engine.torch_runtime import set_fp32_mode

    set_fp32_mode(str(x.device), engine.execution_precision() == "tf32")  # as the engines run: IEEE fp32 unless tf32
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    canvas = tuple(x.shape[2:])
    with torch.inference_mode():
        if hasattr(engine, "detector"):  # eager
            network, post = engine.detector.network, engine.detector.postprocess

            def net():
                return network(x)
        else:  # compiled
            fmt = torch.channels_last if engine.channels_last else torch.contiguous_format
            xin = x.to(engine.dtype).contiguous(memory_format=fmt)
            network, post = engine.network, engine.post

            def net():
                return network(xin)

        net_s = timed(net, sync, repeats)
        cls, reg, ctr = net()
        floats = [[t.float().clone() for t in level] for level in (cls, reg, ctr)]
        post_s = timed(lambda: post(*floats, canvas), sync, max(3, repeats // 2))
    b = x.shape[0]
    p50 = statistics.median(net_s)
    return {"network_img_s": b / p50, "network_p50_ms": p50 * 1000, "post_ms_per_batch": statistics.median(post_s) * 1000}


def feed_rate(items: list, shape: tuple[int, int], workers: int) -> float:
    """Images/s of the feed alone (decode + letterbox in ``workers`` processes, through shared memory)."""
    from fcos_offline.engine.infer import Feed

    t0 = time.perf_counter()
    n = sum(1 for loaded in Feed(items, shape, workers, window=max(8, 2 * workers)) if loaded.problem is None)
    return n / (time.perf_counter() - t0)


def matched(ref: Path, other: Path) -> float:
    """Share of the reference's detections (score > 0.05) the other run reproduces (IoU > 0.5, same label)."""
    from fcos_offline.data.dumps import read_dumps
    from fcos_offline.model.match import match_detections

    a, b = read_dumps(ref), read_dumps(other)
    total = hit = 0
    for stem, (labels, dets) in a.items():
        s = match_detections(dets, labels, b[stem][1], b[stem][0], iou_thr=0.5, score_tol=1.0)
        total += s.num_ref
        hit += s.matched
    return hit / total if total else 0.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--shape", nargs=2, type=int, default=[800, 1333], metavar=("H", "W"))
    p.add_argument("--plan", nargs="+", default=DEFAULT_PLAN, help=f"configurations (default: {' '.join(DEFAULT_PLAN)})")
    p.add_argument("--photos", default=str(DEFAULT_PHOTOS), help="folder of photos (default: the COCO val2017 sample)")
    p.add_argument("--images", type=int, default=512, help="inputs per end-to-end run (the photos repeated)")
    p.add_argument("--candidates", type=float, default=2000.0, help="(point, class) pairs above 0.05 per image to calibrate to")
    p.add_argument("--workers", type=int, default=max(1, min(15, cpu_count() - 1)), help="feed processes")
    p.add_argument("--repeats", type=int, default=20, help="timed network runs per configuration")
    p.add_argument("--workdir", help="where models and dumps go (default: a temporary folder)")
    p.add_argument("--output", default=str(REPO / "bench" / "results" / "gpu.json"))
    args = p.parse_args(argv)

    import torch

    from fcos_offline.engine.backends import EngineOptions, open_engine
    from fcos_offline.engine.base import ConvertRequest
    from fcos_offline.engine.convert import convert
    from fcos_offline.engine.infer import run_inference
    from fcos_offline.engine.torch_runtime import device_info, torch_device

    plan = parse_plan(args.plan)
    try:
        torch_device(args.device)
    except Exception as exc:
        raise SystemExit(f"bench/gpu.py: {exc}") from None
    shape = (args.shape[0], args.shape[1])
    work = Path(args.workdir or tempfile.mkdtemp(prefix="fcos-gpu-bench-"))
    items = photo_items(Path(args.photos), args.images, work)
    out_path = Path(args.output)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "machine": {"python": platform.python_version(), "cores": cpu_count(), **device_info(args.device)},
        "shape": list(shape),
        "images": len(items),
        "workers": args.workers,
        "configs": [],
    }

    def save() -> None:
        out_path.write_text(json.dumps(results, indent=2))

    t0 = time.perf_counter()
    ckpt, reached = build_model(items, shape, args.candidates, work)
    results["candidates_per_image"] = reached
    print(f"FCOS-R50 built in {time.perf_counter() - t0:.0f} s: {reached:.0f} (point, class) pairs above 0.05 per photo", flush=True)
    results["feed_img_s"] = feed_rate(items, shape, args.workers)
    print(f"feed alone (decode + letterbox, {args.workers} workers): {results['feed_img_s']:.0f} img/s", flush=True)
    save()
    from fcos_offline.data.preprocess import preprocess_image, read_image

    photo = torch.from_numpy(preprocess_image(read_image(items[0].path), *shape)[0]).to(args.device)
    reference_dumps: Path | None = None
    for kind, precision, bs in plan:
        name = f"{kind}-{precision}-bs{bs}"
        row: dict[str, Any] = {"config": name, "kind": kind, "precision": precision, "batch_size": bs}
        try:
            started = time.perf_counter()
            if kind == "eager":
                engine = open_engine(ckpt, EngineOptions(engine="torch", device=args.device, batch_size=bs), shape)
            else:
                art = work / f"compiled_{precision}_bs{bs}"
                if not (art / "artifact.json").is_file():
                    convert(ckpt, "inductor", art, ConvertRequest(precision=precision, batch_size=bs, device=args.device, shape=shape))
                engine = open_engine(art, EngineOptions(device=args.device, batch_size=bs))
                row["compile_cache_hit"] = engine.describe()["compile_cache_hit"]
            row["prepare_s"] = time.perf_counter() - started
            with engine:
                row.update(network_and_post(engine, photo.expand(bs, -1, -1, -1).contiguous(), args.repeats))
                dumps = work / "dumps" / name
                s = run_inference(engine, items, dumps, bs, workers=args.workers, show_progress=False)
                row["e2e_img_s"] = s.throughput_fps
                row["engine_img_s"] = s.infer_fps
                row["infer_p50_ms_per_batch"] = s.latency_ms["infer"]["median"]
            if kind == "eager" and reference_dumps is None:
                reference_dumps = dumps
            row["matched_vs_eager_fp32"] = matched(reference_dumps, dumps) if reference_dumps else None
            rates = {
                "network": row["network_img_s"],
                "post-processing": bs / (row["post_ms_per_batch"] / 1000),
                "feed": results["feed_img_s"],
            }
            row["bound"] = min(rates, key=lambda k: rates[k])
        except Exception as exc:  # one failed configuration must not lose the others
            row["error"] = f"{type(exc).__name__}: {first_line(exc, 300)}"
        results["configs"].append(row)
        save()
        if "error" in row:
            print(f"{name:24s} FAILED {row['error']}", flush=True)
        else:
            print(
                f"{name:24s} network {row['network_img_s']:7.1f} img/s (p50 {row['network_p50_ms']:6.2f} ms/batch), "
                f"post {row['post_ms_per_batch']:6.2f} ms/batch, end to end {row['e2e_img_s']:7.1f} img/s "
                f"(bound: {row['bound']}), matched {row['matched_vs_eager_fp32'] or 0:.4f}",
                flush=True,
            )
    ok = [r for r in results["configs"] if "error" not in r]
    eager32 = next((r for r in ok if r["kind"] == "eager"), None)
    for r in ok:
        r["network_x_eager_fp32"] = r["network_img_s"] / eager32["network_img_s"] if eager32 else None
        r["e2e_x_eager_fp32"] = r["e2e_img_s"] / eager32["e2e_img_s"] if eager32 else None
    fp16 = [r for r in ok if r["config"].startswith("compiled-fp16")]
    fp16_bs1 = next((r for r in fp16 if r["batch_size"] == 1), None)
    results["targets"] = {
        "e2e_compiled_fp16_img_s": {"target": TARGETS["e2e_compiled_fp16_img_s"], "measured": max((r["e2e_img_s"] for r in fp16), default=None)},
        "eager_fp32_img_s": {
            "target": TARGETS["eager_fp32_img_s"],
            "measured": max((r["e2e_img_s"] for r in ok if r["kind"] == "eager"), default=None),
        },
        "compiled_fp16_bs1_p50_ms": {"target": TARGETS["compiled_fp16_bs1_p50_ms"], "measured": fp16_bs1["network_p50_ms"] if fp16_bs1 else None},
    }
    save()
    print(f"results: {out_path}")
    return 0 if ok and len(ok) == len(results["configs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
