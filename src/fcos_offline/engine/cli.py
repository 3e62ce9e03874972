"""``fcos-offline infer`` and ``fcos-offline convert``."""

from __future__ import annotations

import argparse

from fcos_offline.errors import EXIT_OK, EXIT_SKIPS, UsageError


def add_engine_flags(parser: argparse.ArgumentParser, engines: tuple[str, ...] = ("onnxruntime", "openvino", "torch")) -> None:
    """--engine/--device/--threads/--precision, shared by infer, run and tune."""
    from fcos_offline.cli import add_flag

    add_flag(parser, "--engine", choices=engines, default="onnxruntime", help="inference engine (torch = the online PyTorch baseline)")
    add_flag(parser, "--device", default="cpu", help="cpu (default); onnxruntime: cuda or tensorrt; openvino: CPU, GPU")
    add_flag(parser, "--threads", type=int, help="intra-op threads (default: the engine's choice, all cores)")
    add_flag(parser, "--precision", choices=["fp32", "bf16", "fp16", "auto"], default="fp32",
             help="execution precision; openvino honours bf16/fp16, 'auto' = the engine's default (OpenVINO picks bf16 where the CPU has it)")


def _cmd_infer(args: argparse.Namespace) -> int:
    from fcos_offline.engine.backends import EngineOptions, open_engine
    from fcos_offline.engine.infer import gather_items, run_inference
    from fcos_offline.model.cli import overrides_from_args

    if args.checkpoint and args.engine != "torch":
        raise UsageError("--checkpoint runs with --engine torch; export it for other engines")
    if args.engine == "torch" and not args.checkpoint:
        raise UsageError("--engine torch runs a checkpoint: give --checkpoint X.pth (and --shape H W)")
    model = args.checkpoint if args.engine == "torch" else args.model
    if not model:
        raise UsageError("give --model (ONNX file, OpenVINO .xml or convert folder), or --checkpoint with --engine torch")
    if args.batch_size < 1 or args.loop < 1 or args.warmup < 0 or (args.workers is not None and args.workers < 0):
        raise UsageError("--batch-size and --loop must be >= 1, --warmup and --workers >= 0")
    options = EngineOptions(args.engine, args.device, args.threads, args.precision, args.batch_size)
    engine = open_engine(model, options, tuple(args.shape) if args.shape else None, overrides_from_args(args))
    items = gather_items(args.images, args.input_info)
    fmt = "npy" if args.output_format == "npy" else "bin"
    s = run_inference(engine, items, args.output, args.batch_size, fmt, args.warmup, args.loop, args.resume,
                      args.workers, args.device_id, args.perf_dir)
    lat = s.latency_ms
    print(f"{s.num_inferred} images inferred ({s.num_resumed} resumed, {len(s.skipped)} skipped) with "
          f"{s.engine['engine']} {s.engine['version']} bs{s.batch_size}: {s.throughput_fps:.2f} img/s end to end, "
          f"{s.infer_fps:.2f} img/s in the engine; infer latency p50 {lat['infer']['median']:.1f} ms, p99 {lat['infer']['p99']:.1f} ms per batch")
    print(f"dumps in {s.output_dir}; perf file {s.perf_file}; summary {s.output_dir}/summary.json")
    return EXIT_SKIPS if s.skipped else EXIT_OK


def _cmd_convert(args: argparse.Namespace) -> int:
    from fcos_offline.engine.convert import convert

    art = convert(args.model, args.engine, args.output, args.batch_size, args.precision, args.opt_level)
    print(f"wrote {args.output}/{art['model_file']} ({art['engine']} {art['engine_version']}, batch {art['batch_size']}, "
          f"input {art['input_shape']}, {art['precision']}); run it with: fcos-offline infer --model {args.output} --engine {art['engine']}")
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``infer`` and ``convert``."""
    from fcos_offline.cli import add_flag
    from fcos_offline.model.cli import add_model_flags

    p = sub.add_parser(
        "infer",
        help="offline inference: dumps <stem>_1.bin (labels) / <stem>_2.bin (dets) + perf file",
        description="Run a model over preprocessed .bin tensors (--input-info bin-mode .info, the recipe's flow) or "
        "straight from images (--images DIR or a jpg-mode .info: decoding and preprocessing overlap with inference "
        "in worker processes, no .bin written). Writes per image <stem>_1.bin (labels int64 [100]) and <stem>_2.bin "
        "(dets float32 [100,5]) or .npy, the vendor perf file perf_vision_batchsize_{B}_device_{N}.txt and summary.json "
        "(throughput; latency min/mean/median/p90/p99 per stage). Dumps are written atomically; --resume skips "
        "images whose dumps are complete. Exit 3 when some inputs were skipped.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_flag(p, "--model", "--om-path", dest="model", help="ONNX file, OpenVINO .xml, or a 'convert' output folder")
    add_flag(p, "--checkpoint", help="checkpoint for --engine torch (the online baseline)")
    add_engine_flags(p)
    add_flag(p, "--batch-size", type=int, default=1, help="images per engine call; the last partial batch is padded for static models")
    add_flag(p, "--images", help="folder of images (streaming mode)")
    add_flag(p, "--input-info", "--input-text-path", dest="input_info", help="recipe .info file (bin mode or jpg mode)")
    add_flag(p, "--output", "--output-dir", dest="output", default="result/dumpOutput_device0", help="dump folder")
    add_flag(p, "--output-binary", action="store_true", help="write raw .bin dumps (the default; accepted for the recipe)")
    add_flag(p, "--output-format", choices=["bin", "npy"], default="bin", help="dump format")
    add_flag(p, "--shape", nargs=2, type=int, metavar=("H", "W"), help="input canvas for --engine torch (others read it from the model)")
    add_flag(p, "--warmup", type=int, default=1, help="untimed runs of the first batch")
    add_flag(p, "--loop", type=int, default=1, help="timed repetitions of every batch (the vendor tools' -loop)")
    add_flag(p, "--resume", action="store_true", help="skip images whose dumps are already complete")
    add_flag(p, "--workers", type=int, help="preprocessing worker processes (0 = in-process; default 1 when streaming)")
    add_flag(p, "--device-id", type=int, default=0, help="N in perf_vision_batchsize_{B}_device_{N}.txt")
    add_flag(p, "--perf-dir", help="where the perf file goes (default: the dump folder's parent for dumpOutput_*, else the dump folder)")
    add_model_flags(p)
    p.set_defaults(func=_cmd_infer)

    c = sub.add_parser(
        "convert",
        help="ONNX -> engine artifact for a fixed batch (ORT optimised model, OpenVINO IR)",
        description="The recipe's ATC step on real engines: fix the batch size, apply the engine's graph "
        "optimisations and save an artifact folder (model + artifact.json) that 'infer --model FOLDER' accepts. "
        "TensorRT runs through onnxruntime-gpu's TensorRT provider: infer --engine onnxruntime --device tensorrt.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_flag(c, "--model", required=True, help="exported .onnx file")
    add_flag(c, "--engine", choices=["onnxruntime", "openvino"], default="onnxruntime")
    add_flag(c, "--batch-size", type=int, default=1)
    add_flag(c, "--precision", choices=["fp32", "fp16"], default="fp32", help="stored precision (openvino fp16 compresses weights)")
    add_flag(c, "--opt-level", choices=["basic", "extended", "all"], default="all", help="onnxruntime graph optimisation level")
    add_flag(c, "--output", required=True, help="artifact folder to write")
    c.set_defaults(func=_cmd_convert)
