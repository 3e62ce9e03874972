"""``fcos-offline infer`` and ``fcos-offline convert``."""

from __future__ import annotations

import argparse
import os

from fcos_offline.cli.common import (
    BATCH,
    COUNT,
    SIDE,
    DefaultsFormatter,
    add_engine_flags,
    add_flag,
    add_model_flags,
    add_ray_flags,
    engine_options_from_args,
    number,
    overrides_from_args,
)
from fcos_offline.data.dumps import FORMATS
from fcos_offline.engine.backends import CONVERT_ENGINES, CONVERT_PRECISIONS
from fcos_offline.engine.backends.onnxruntime import ORT_OPT_LEVELS
from fcos_offline.errors import EXIT_OK, EXIT_SKIPS, FcosError, UsageError
from fcos_offline.io import check_output_apart


def _cmd_infer(args: argparse.Namespace) -> int:
    from fcos_offline.engine.job import InferRequest, RayPlan, infer

    if (args.input_width is None) != (args.input_height is None):
        raise UsageError("give --input_width and --input_height together (or --shape H W)")
    if args.input_width is not None and args.shape and tuple(args.shape) != (args.input_height, args.input_width):
        raise UsageError(f"--shape {args.shape[0]} {args.shape[1]} contradicts --input_height {args.input_height} --input_width {args.input_width}")
    shape = tuple(args.shape) if args.shape else (args.input_height, args.input_width) if args.input_width else None
    _check_infer_output(args)
    s = infer(
        InferRequest(
            model=args.model,
            checkpoint=args.checkpoint,
            images=args.images,
            input_info=args.input_info,
            output=args.output,
            options=engine_options_from_args(args, args.batch_size),
            shape=shape,
            overrides=overrides_from_args(args),
            fmt=args.output_format,
            warmup=args.warmup,
            loop=args.loop,
            resume=args.resume,
            workers=args.workers,
            device_id=args.device_id,
            perf_dir=args.perf_dir,
            ray=RayPlan(args.ray, args.ray_actors, args.ray_cpus_per_actor, args.ray_gpus_per_actor) if args.ray else None,
        )
    )
    lat = s.latency_ms
    print(
        f"{s.num_inferred} images inferred ({s.num_resumed} resumed, {len(s.skipped)} skipped) with "
        f"{s.engine['engine']} {s.engine['version']} {s.engine['execution_precision']} bs{s.batch_size}"
    )
    spread = f" (±{s.engine_spread_pct:.0f}% over the run)" if s.engine_spread_pct is not None else ""
    print(
        f"engine throughput {s.infer_fps:.2f} img/s{spread}; end-to-end throughput {s.throughput_fps:.2f} img/s (files in -> dumps out); "
        f"engine latency per batch of {s.batch_size}: p50 {lat['infer']['median']:.1f} ms, p90 {lat['infer']['p90']:.1f} ms, "
        f"p99 {lat['infer']['p99']:.1f} ms"
    )
    print(f"dumps in {s.output_dir}; perf file {s.perf_file}; summary {s.output_dir}/summary.json")
    if s.skipped and not (s.num_inferred or s.num_resumed):
        raise FcosError(f"no usable inputs: all {len(s.skipped)} were skipped (each named above and in {s.output_dir}/summary.json)")
    return EXIT_SKIPS if s.skipped else EXIT_OK


def _check_infer_output(args: argparse.Namespace) -> None:
    """The dump folder is not, and holds none of, the model, the images, the .info and the folders of the files it lists.

    It may lie inside them: inputs are listed from a folder itself, never its subfolders.
    """
    listed: set[str] = set()
    if args.input_info and os.path.isfile(args.input_info):
        from fcos_offline.engine.infer import items_from_info

        listed = {os.path.dirname(os.path.abspath(i.path)) for i in items_from_info(args.input_info)}
    check_output_apart([args.output], [args.model, args.checkpoint])  # never inside a model folder: an artifact verifies every file in it
    check_output_apart([args.output], [args.images, args.input_info, *sorted(listed)], inside_ok=True)


def _cmd_convert(args: argparse.Namespace) -> int:
    from fcos_offline.engine.base import ConvertRequest
    from fcos_offline.engine.convert import convert

    if bool(args.model) == bool(args.checkpoint):
        raise UsageError("give --model X.onnx (onnxruntime, openvino) or --checkpoint X.pth --shape H W (inductor)")
    check_output_apart([args.output], [args.model, args.checkpoint])
    request = ConvertRequest(
        precision=args.precision,
        batch_size=args.batch_size,
        opt_level=args.opt_level,
        device=args.device,
        shape=tuple(args.shape) if args.shape else None,
        overrides=overrides_from_args(args),
        channels_last=args.channels_last,
        cuda_graphs=args.cuda_graphs,
    )
    art = convert(args.model or args.checkpoint, args.engine, args.output, request)
    print(
        f"wrote {args.output}/{art.model_file} ({art.engine} {art.engine_version}, batch {art.batch_size}, "
        f"input {art.input_shape}, {art.precision}); run it with: fcos-offline infer --model {args.output}"
    )
    if "compiled_vs_eager_max_rel_error" in art.settings:
        print(f"compiled network vs eager PyTorch: worst relative error {art.settings['compiled_vs_eager_max_rel_error']:.2e}")
    return EXIT_OK


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``infer`` and ``convert``."""
    p = sub.add_parser(
        "infer",
        help="offline inference: dumps <stem>_1.bin (labels) / <stem>_2.bin (dets) + perf file",
        description="Run a model over preprocessed .bin tensors (--input-info bin-mode .info, the recipe's flow) or "
        "straight from images (--images DIR or a jpg-mode .info: decoding and preprocessing overlap with inference "
        "in worker processes, no .bin written). Writes per image <stem>_1.bin (labels int64 [100]) and <stem>_2.bin "
        "(dets float32 [100,5]) or .npy, the vendor perf file perf_vision_batchsize_{B}_device_{N}.txt and summary.json "
        "(throughput; latency min/mean/median/p90/p99 per stage). Dumps are written atomically; --resume skips "
        "images whose dumps are complete. The dump folder holds one model's dumps: a fresh run replaces an earlier "
        "run's of another model (and says so) and refuses dumps this tool did not make; it has one writer at a time (a second "
        "infer into it is refused) and is never, nor holds, an input. Exit 3 when some inputs were "
        "skipped, 1 when none could be used.",
        epilog="examples:\n"
        "  fcos-offline infer --model fcos.onnx --input_text_path fcos.info --batch_size 4 \\\n"
        "      --output result/dumpOutput_device0                   # the recipe's benchmark step\n"
        "  fcos-offline infer --model tuned/best --images val2017   # streaming, its tuned engine options\n"
        "  fcos-offline infer --model fcos_bs4/ --images val2017 --resume   # finish an interrupted run\n"
        "  fcos-offline infer --engine torch --checkpoint fcos.pth --shape 800 1333 --images val2017   # online baseline",
        formatter_class=DefaultsFormatter,
    )
    add_flag(p, "--model", "--om-path", dest="model", help="ONNX file, OpenVINO .xml, or a 'convert' output folder")
    add_flag(p, "--checkpoint", help="checkpoint for --engine torch (the online baseline)")
    add_engine_flags(p)
    add_flag(p, "--batch-size", type=BATCH, default=None,
             help="images per engine call (default: a convert or tune folder's batch, else 1); "
                  "the last partial batch is padded for static models")  # fmt: skip
    add_flag(p, "--images", help="folder of images (streaming mode)")
    add_flag(p, "--input-info", "--input-text-path", dest="input_info", help="recipe .info file (bin mode or jpg mode)")
    add_flag(p, "--output", "--output-dir", dest="output", default="result/dumpOutput_device0", help="dump folder")
    recipe = p.add_argument_group("the recipe's benchmark flags (accepted; what they ask for is what infer does)")
    add_flag(recipe, "--output-binary", nargs="?", const="True", choices=("True", "true", "1"), help="raw .bin dumps (always)")
    add_flag(recipe, "--input-width", type=SIDE, metavar="W", help="canvas width: checked against the model's (the torch engine: sets it)")
    add_flag(recipe, "--input-height", type=SIDE, metavar="H", help="canvas height: checked against the model's (the torch engine: sets it)")
    add_flag(recipe, "--model-type", choices=("vision",), help="the benchmark's model kind (vision)")
    add_flag(recipe, "--use-dvpp", "--useDvpp", choices=("False", "false", "0"), help="no device-side JPEG decoding: images decode on the CPU")
    add_flag(p, "--output-format", choices=FORMATS, default="bin", help="dump format")
    add_flag(
        p,
        "--shape",
        nargs=2,
        type=SIDE,
        metavar=("H", "W"),
        help="input canvas for --engine torch (an exported model has its own: a different one is refused)",
    )
    add_flag(p, "--warmup", type=number(int, 0, 1000), default=1, help="untimed runs of the first batch")
    add_flag(p, "--loop", type=number(int, 1, 100_000), default=1, help="timed repetitions of every batch (the vendor tools' -loop)")
    add_flag(p, "--resume", action="store_true", help="skip images whose dumps are already complete")
    add_flag(
        p,
        "--workers",
        type=number(int, 0, 1024),
        help="preprocessing worker processes (0 = in-process; default: one per core a CPU engine leaves free, none when it uses them all; up to 8 for a GPU engine; at most the cores this process may use: more are capped, with a warning)",
    )
    add_flag(p, "--device-id", type=COUNT, default=0, help="N in perf_vision_batchsize_{B}_device_{N}.txt")
    add_ray_flags(p)
    add_flag(p, "--perf-dir", help="where the perf file goes (default: the dump folder's parent for dumpOutput_*, else the dump folder)")
    add_model_flags(p)
    p.set_defaults(func=_cmd_infer)

    c = sub.add_parser(
        "convert",
        help="ONNX -> engine artifact for a fixed batch (ORT optimised model, OpenVINO IR); checkpoint -> compiled PyTorch program",
        description="The recipe's ATC step on real engines: fix the batch size, apply the engine's graph "
        "optimisations and save an artifact folder (model + artifact.json) that 'infer --model FOLDER' accepts. "
        "onnxruntime/openvino read an exported --model X.onnx. inductor (the GPU analog of ATC's .om) reads "
        "--checkpoint X.pth --shape H W: the weights are saved as plain tensors (model.weights, loaded weights-only) "
        "with the model config in artifact.json, compiled once by PyTorch's inductor for --device cpu or cuda and checked "
        "against eager PyTorch; the compile cache is kept in this user's cache folder ($FCOS_OFFLINE_CACHE, default "
        "~/.cache/fcos-offline), never in the artifact, so infer on this machine starts warm. Every file's sha256 is "
        "recorded in artifact.json and verified when the folder is opened. "
        "TensorRT runs through onnxruntime-gpu's TensorRT provider: infer --engine onnxruntime --device tensorrt.",
        epilog="examples:\n"
        "  fcos-offline convert --model fcos.onnx --engine openvino --batch-size 4 --output fcos_bs4\n"
        "  fcos-offline convert --model fcos.onnx --engine onnxruntime --output fcos_ort   # optimised graph, batch 1\n"
        "  fcos-offline convert --engine inductor --checkpoint fcos.pth --shape 800 1333 --device cuda --output fcos_cuda",
        formatter_class=DefaultsFormatter,
    )
    add_flag(c, "--model", help="exported .onnx file (onnxruntime, openvino)")
    add_flag(c, "--checkpoint", help="checkpoint .pth (inductor)")
    add_flag(c, "--engine", choices=CONVERT_ENGINES, default=CONVERT_ENGINES[0], help="engine to build the artifact for")
    add_flag(c, "--batch-size", type=BATCH, default=1, help="the artifact's fixed batch size")
    add_flag(
        c,
        "--precision",
        choices=CONVERT_PRECISIONS,
        default="fp32",
        help="stored precision: openvino fp16 compresses weights; inductor compiles fp32, bf16, or on CUDA tf32/fp16",
    )
    add_flag(c, "--opt-level", choices=ORT_OPT_LEVELS, default="all", help="onnxruntime graph optimisation level")
    add_flag(c, "--output", required=True, help="artifact folder to write")
    g = c.add_argument_group("inductor (a checkpoint compiled by PyTorch)")
    add_flag(g, "--device", default="cpu", help="cpu or cuda (cuda:N): where the program is exported, compiled and run")
    add_flag(g, "--shape", nargs=2, type=SIDE, metavar=("H", "W"), help="the canvas the network is compiled for (e.g. 800 1333)")
    add_flag(g, "--channels-last", action=argparse.BooleanOptionalAction, default=None, help="NHWC activations (default: on for CUDA)")
    add_flag(
        g,
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="replay the static batch as a CUDA graph (default: on for CUDA)",
    )
    add_model_flags(c)
    c.set_defaults(func=_cmd_convert)
