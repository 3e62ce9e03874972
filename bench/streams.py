#!/usr/bin/env python
"""OpenVINO throughput mode (streams) vs one request per batch, on this CPU's cores.

``tune`` times OpenVINO in latency mode (one infer request, all threads, batch 1 or 4). Throughput
mode instead runs several requests at once, each stream on its own share of the cores. This script
measures, in one run and on the same random input, the ms per image of:

* latency mode, batch 1 and batch 4 (what ``tune`` sweeps);
* throughput mode with 1 and with N streams (``NUM_STREAMS``), requests of one image;
* throughput mode with N streams, the batch split evenly over them.

Rounds alternate the configurations, so a noisy neighbour hits them alike.

    python bench/streams.py MODEL.xml --shape 800x1333 --precision bf16 --runs 3
    python bench/streams.py tuned/models/openvino-fp32/model.xml --shape 320x512 --runs 20
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from fcos_offline.cpu import cpu_count


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model", help="an OpenVINO IR (.xml) or ONNX file with a dynamic batch")
    p.add_argument("--shape", default="800x1333", help="input HxW")
    p.add_argument("--precision", default="bf16", choices=("f32", "bf16"), help="INFERENCE_PRECISION_HINT")
    p.add_argument("--batch", type=int, default=4, help="images per timed round")
    p.add_argument("--streams", type=int, default=cpu_count())
    p.add_argument("--runs", type=int, default=5, help="timed rounds per configuration (median reported)")
    p.add_argument("--rounds", type=int, default=2, help="times the whole set of configurations is repeated")
    args = p.parse_args(argv)

    import openvino as ov

    from fcos_offline.cpu import cpu_description, describe_cpu

    print(describe_cpu(cpu_description()), flush=True)
    h, w = (int(v) for v in args.shape.split("x"))
    core = ov.Core()
    threads = cpu_count()
    x = np.random.default_rng(0).normal(0.0, 50.0, (args.batch, 3, h, w)).astype(np.float32)

    def latency(bs: int) -> float:
        compiled = core.compile_model(
            core.read_model(args.model),
            "CPU",
            {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": args.precision, "INFERENCE_NUM_THREADS": threads},
        )
        request, times = compiled.create_infer_request(), []
        chunks = [x[i : i + bs] for i in range(0, args.batch, bs)]
        request.infer({0: chunks[0]})
        for _ in range(args.runs):
            t = time.perf_counter()
            for c in chunks:
                request.infer({0: c})
            times.append((time.perf_counter() - t) / args.batch)
        return 1000.0 * statistics.median(times)

    def throughput(streams: int, per_request: int) -> float:
        compiled = core.compile_model(
            core.read_model(args.model),
            "CPU",
            {"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": streams, "INFERENCE_PRECISION_HINT": args.precision, "INFERENCE_NUM_THREADS": threads},
        )
        queue = ov.AsyncInferQueue(compiled, max(streams, compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        chunks = [x[i : i + per_request] for i in range(0, args.batch, per_request)]
        times = []
        for timed in [False] + [True] * args.runs:
            t = time.perf_counter()
            for c in chunks:
                queue.start_async({0: c})
            queue.wait_all()
            if timed:
                times.append((time.perf_counter() - t) / args.batch)
        return 1000.0 * statistics.median(times)

    per_stream = max(1, args.batch // args.streams)
    configs = {
        "latency mode, batch 1": lambda: latency(1),
        f"latency mode, batch {args.batch}": lambda: latency(args.batch),
        "throughput mode, 1 stream, 1 image per request": lambda: throughput(1, 1),
        f"throughput mode, {args.streams} streams, 1 image per request": lambda: throughput(args.streams, 1),
        f"throughput mode, {args.streams} streams, {per_stream} images per request": lambda: throughput(args.streams, per_stream),
    }
    results: dict[str, list[float]] = {name: [] for name in configs}
    for r in range(args.rounds):
        for name, fn in configs.items():
            results[name].append(fn())
            print(f"round {r}: {name:55s} {results[name][-1]:8.1f} ms/img", flush=True)
    base = statistics.median(results[f"latency mode, batch {args.batch}"])
    print(f"\n{args.model} {h}x{w} {args.precision}, {threads} threads; median of {args.rounds} round(s):")
    for name, ms in results.items():
        print(f"  {name:55s} {statistics.median(ms):8.1f} ms/img  {base / statistics.median(ms):.2f}x latency batch {args.batch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
