#!/usr/bin/env python
"""Local streaming inference vs Ray Data with 1 and 2 actors, on this machine, in one run.

The model is the shipped demo FCOS (exported to ONNX at its canvas) unless ``--model`` names
another; the images are synthetic demo images (``--images N``). For each configuration the
script prints images/s end to end, the ratio to the local streaming run measured in the same
process, and for Ray its fixed start-up cost (cluster start, actor start and model load before
the first dump) and its steady-state rate (images after the first dump / time since it). Every
run's dumps are checked byte-identical to the local run's. Results: ``bench/results/distributed.json``.

    python bench/distributed.py                      # 120 images, batch 4, actors 1 and 2
    python bench/distributed.py --images 400 --actors 1 2 4
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from fcos_offline.cpu import cpu_count

RESULTS = Path(__file__).resolve().parent / "results" / "distributed.json"


def _dumps(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.bin"))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=120, help="demo images (default 120)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--actors", type=int, nargs="+", default=[1, 2], help="actor counts to run (default 1 2)")
    p.add_argument("--cpus-per-actor", type=float, default=0.5, help="CPUs reserved per actor (default 0.5: decode tasks need the rest)")
    p.add_argument("--model", help="an ONNX model (default: the demo model exported at its canvas)")
    p.add_argument("--output", default=str(RESULTS))
    args = p.parse_args(argv)

    import ray

    from fcos_offline.cpu import cpu_description
    from fcos_offline.demo import DEMO_CHECKPOINT
    from fcos_offline.demo.synthetic import DEMO_CANVAS, make_demo_data
    from fcos_offline.engine.backends import EngineOptions, open_engine
    from fcos_offline.engine.distributed import run_inference_ray
    from fcos_offline.engine.infer import items_from_images, run_inference
    from fcos_offline.export.onnx_export import export_checkpoint

    work = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    model = Path(args.model) if args.model else work / "demo.onnx"
    if not args.model:
        export_checkpoint(DEMO_CHECKPOINT, model, DEMO_CANVAS, dynamic_batch=True)
    make_demo_data(work / "d", "val", args.images, seed=1000)
    items = items_from_images(work / "d" / "val2017")
    result: dict = {
        **cpu_description(),
        "images": len(items),
        "batch_size": args.batch_size,
        "runs": [],
    }

    with open_engine(model, EngineOptions(batch_size=args.batch_size)) as engine:
        local = run_inference(engine, items, work / "local", args.batch_size, show_progress=False)
    reference = _dumps(work / "local")
    result["runs"].append({"config": "local streaming", "img_per_s": local.throughput_fps, "wall_s": local.wall_s})
    print(f"local streaming: {local.throughput_fps:.2f} img/s ({local.wall_s:.1f} s)", flush=True)

    t0 = time.perf_counter()
    ray.init(num_cpus=cpu_count(), include_dashboard=False, log_to_driver=False)
    cluster_start = time.perf_counter() - t0
    result["ray_cluster_start_s"] = cluster_start
    print(f"Ray local cluster started in {cluster_start:.1f} s", flush=True)
    for n in args.actors:
        out = work / f"ray{n}"
        t0 = time.perf_counter()
        s = run_inference_ray(model, EngineOptions(), items, str(out), args.batch_size, actors=n, cpus_per_actor=args.cpus_per_actor)
        wall = time.perf_counter() - t0
        done = sorted(json.loads((out / "summary.json").read_text())["distributed"]["per_actor"].items())
        firsts = [p.stat().st_mtime for p in out.glob("*_2.bin")]
        first, last = min(firsts), max(firsts)
        steady = (len(firsts) - 1) / (last - first) if last > first else 0.0
        startup = wall - (last - first)
        identical = _dumps(out) == reference
        row = {
            "config": f"ray {n} actor(s)",
            "img_per_s": s.num_inferred / wall,
            "wall_s": wall,
            "steady_img_per_s": steady,
            "startup_s": startup,
            "identical_dumps": identical,
            "per_actor_images": {a: v["images"] for a, v in done},
        }
        result["runs"].append(row)
        print(
            f"ray {n} actor(s): {row['img_per_s']:.2f} img/s end to end ({row['img_per_s'] / local.throughput_fps:.2f}x local), "
            f"steady {steady:.2f} img/s ({steady / local.throughput_fps:.2f}x local), start-up {startup:.1f} s, "
            f"dumps identical: {identical}",
            flush=True,
        )
    ray.shutdown()
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(f"results: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
