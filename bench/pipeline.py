#!/usr/bin/env python
"""Does the streaming pipeline keep up with the engine on few cores? End to end vs the engine alone.

For one model and engine configuration (default: FCOS-R50 random weights from ``bench/r50.py`` at
800x1333, exported to ONNX, ONNX Runtime fp32), in one process and on the same machine state:

1. **engine alone**: the engine run once over every distinct photo, preprocessed beforehand and
   held in memory (the end-to-end inputs cycle over the same photos) -> images/s;
2. **end to end**: ``infer --images`` over ``--images`` real photos (the COCO val2017 sample,
   repeated) through the streaming feed (decode + letterbox in worker processes, shared memory,
   dump-writer thread) -> images/s over the wall time, start-up included.

Prints the CPU and its features, both rates, and their ratio (the target on two cores: >= 0.95),
and the projection for COCO val2017 (5000 images). Writes ``bench/results/pipeline.json``.

    python bench/pipeline.py                                  # R50 800x1333, ORT fp32, 100 photos, bs 1
    python bench/pipeline.py --model tuned/best --batch-size 4 --images 200
    python bench/pipeline.py --model demo.onnx --engine openvino --rounds 3
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PHOTOS = REPO.parent / "shared" / "data" / "coco-val2017-sample" / "val2017"
RESULTS = REPO / "bench" / "results" / "pipeline.json"


def r50_onnx(work: Path, shape: tuple[int, int], photos: list, candidates: float) -> Path:
    """FCOS-R50 (random weights, ``candidates`` pairs above 0.05 per photo) exported with NMS in the graph, dynamic batch."""
    import numpy as np

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from r50 import build_r50, set_candidates

    from fcos_offline.data.preprocess import preprocess_image, read_image
    from fcos_offline.export.onnx_export import export_onnx

    out = work / f"fcos_r50_random_{shape[0]}x{shape[1]}_{candidates:.0f}.onnx"
    if not out.is_file():
        calib = np.stack([preprocess_image(read_image(p.path), *shape)[0] for p in photos[:2]])
        model = build_r50(0, calib)
        set_candidates(model, calib, candidates)
        export_onnx(model, out, shape, dynamic_batch=True, verify=False)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model or artifact to run (default: FCOS-R50 random weights exported here)")
    p.add_argument("--engine", help="engine (default: the artifact's, else onnxruntime)")
    p.add_argument("--precision", help="execution precision (default: the artifact's, else fp32)")
    p.add_argument("--threads", type=int, help="engine threads (default: the artifact's, else all cores)")
    p.add_argument("--shape", nargs=2, type=int, default=[800, 1333], metavar=("H", "W"), help="R50 canvas (default 800 1333)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--images", type=int, default=100, help="inputs end to end (the photos repeated)")
    p.add_argument("--photos", default=str(DEFAULT_PHOTOS))
    p.add_argument("--candidates", type=float, default=2000.0, help="R50: (point, class) pairs above 0.05 per photo (a trained model's range)")
    p.add_argument("--workers", type=int, help="feed worker processes (default: infer's choice; 0 decodes in the engine's process)")
    p.add_argument("--rounds", type=int, default=2, help="alternations of engine-alone and end-to-end runs (noise)")
    p.add_argument("--workdir", default=str(REPO / "bench" / "results" / "pipeline"))
    p.add_argument("--output", default=str(RESULTS))
    args = p.parse_args(argv)

    import numpy as np

    from fcos_offline.cpu import cpu_description, describe_cpu
    from fcos_offline.data.preprocess import list_images, preprocess_image, read_image
    from fcos_offline.engine.backends import EngineOptions, open_engine
    from fcos_offline.engine.infer import items_from_images, run_inference
    from fcos_offline.engine.timing import warm_up

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    photos = list_images(args.photos)
    links = Path(tempfile.mkdtemp(prefix="fcos-pipeline-"))
    for i in range(args.images):
        (links / f"{i:06d}{photos[i % len(photos)].suffix}").symlink_to(photos[i % len(photos)].resolve())
    items = items_from_images(links)
    model = Path(args.model) if args.model else r50_onnx(work, (args.shape[0], args.shape[1]), items, args.candidates)
    options = EngineOptions(engine=args.engine, precision=args.precision, threads=args.threads, batch_size=args.batch_size)
    machine = cpu_description()
    print(describe_cpu(machine))
    rounds = []
    with open_engine(model, options) as engine:
        canvas = engine.input_hw
        distinct = len(photos)  # the end-to-end inputs cycle over these: the engine alone runs each once per pass
        tensors = [preprocess_image(read_image(items[i].path), *canvas)[0] for i in range(min(distinct, len(items)))]
        batches = [np.stack([tensors[(i + j) % len(tensors)] for j in range(args.batch_size)]) for i in range(0, len(tensors), args.batch_size)]
        for r in range(args.rounds):
            warm_up(engine, batches[0])
            start = time.perf_counter()
            for b in batches:
                engine.run(b)
            alone = len(batches) * args.batch_size / (time.perf_counter() - start)
            out = work / "dumps"
            s = run_inference(engine, items, out, args.batch_size, show_progress=False, workers=args.workers)
            rounds.append({"engine_alone_img_s": alone, "e2e_img_s": s.throughput_fps, "in_run_engine_img_s": s.infer_fps, "wall_s": s.wall_s})
            print(
                f"round {r + 1}: engine alone {alone:.2f} img/s, end to end {s.throughput_fps:.2f} img/s "
                f"({s.throughput_fps / alone:.1%}), engine within the run {s.infer_fps:.2f} img/s",
                flush=True,
            )
        described = engine.describe()
    alone = float(np.median([r["engine_alone_img_s"] for r in rounds]))
    e2e = float(np.median([r["e2e_img_s"] for r in rounds]))
    result = {
        "machine": machine,
        "model": str(model),
        "engine": described,
        "batch_size": args.batch_size,
        "workers": args.workers,
        "images": len(items),
        "rounds": rounds,
        "engine_alone_img_s": alone,
        "e2e_img_s": e2e,
        "e2e_over_engine": e2e / alone,
        "coco_val2017_minutes_projected": 5000 / e2e / 60,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(
        f"end to end / engine alone = {e2e / alone:.1%} (median of {len(rounds)}); "
        f"COCO val2017 (5000 images) projected at {result['coco_val2017_minutes_projected']:.1f} min; {args.output}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
