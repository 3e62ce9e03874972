"""Argument helpers every verb shares: recipe flag spellings, checked numbers, model and engine flags.

Flag choices come from the library's constants (engines from the backend mapping, precisions,
post-processing rules), so the CLI never repeats them. Helpers turn parsed flags into the
library's option records: :class:`ModelOverrides` and :class:`EngineOptions` (``None`` = not given).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from fcos_offline.engine.backends import ENGINES
from fcos_offline.engine.base import PRECISIONS, EngineOptions
from fcos_offline.model.checkpoint import ModelOverrides
from fcos_offline.model.config import POST_RANGES, POST_RULES, Range

ArgParser = argparse.ArgumentParser | argparse._ArgumentGroup


def add_flag(parser: ArgParser, *names: str, **kwargs: Any) -> argparse.Action:
    """Add an option under its hyphenated names plus the recipe's underscore spellings."""
    spellings: list[str] = []
    for name in names:
        variants = [name]
        if name.startswith("--"):
            variants.append("--" + name[2:].replace("-", "_"))
        spellings.extend(v for v in variants if v not in spellings)
    return parser.add_argument(*spellings, **kwargs)


def number(kind: type, low: float | None = None, high: float | None = None, low_open: bool = False) -> Callable[[str], Any]:
    """An argparse ``type`` that parses ``kind`` and checks ``low <= value <= high`` (``low < value`` if ``low_open``)."""
    allowed = Range(kind, low, high, low_open)

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if kind is float and value != value:  # NaN
            raise argparse.ArgumentTypeError("expected a number, got NaN")
        if allowed.problem(value) is not None:
            raise argparse.ArgumentTypeError(f"{allowed.describe()}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    parse.low, parse.high, parse.low_open = low, high, low_open  # type: ignore[attr-defined]  # read by the flag tests
    return parse


def ranged(allowed: Range) -> Callable[[str], Any]:
    """:func:`number` for a range of the model layer's table (the same limits as files are checked against)."""
    return number(allowed.kind, allowed.low, allowed.high, allowed.low_open)


#: the usual ranges
POSITIVE_INT = number(int, 1)
COUNT = number(int, 0)
#: threads: at least one, and no more than any machine this runs on could use
THREADS = number(int, 1, 1024)
#: canvas sides (a model input larger than this is not a detector deployment)
SIDE = number(int, 1, 16384)
#: batch sizes
BATCH = number(int, 1, 1024)


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """Overrides for what tensor shapes cannot tell (default: the checkpoint's meta, else per format)."""
    g = parser.add_argument_group("model settings shapes cannot tell (default: checkpoint meta, else the family's default)")
    add_flag(
        g,
        "--style",
        choices=["caffe", "pytorch"],
        help="ResNet style: stride on the 1x1 (caffe: mmdet FCOS's default) or the 3x3 (pytorch: RetinaNet's, ATSS's)",
    )
    add_flag(
        g, "--norm-on-bbox", action=argparse.BooleanOptionalAction, default=None, help="FCOS only: box distances as ReLU(x)*stride instead of exp(x)"
    )
    add_flag(
        g,
        "--centerness-on-reg",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="FCOS only: centerness from the regression branch instead of the classification branch",
    )
    add_flag(
        g,
        "--extra-on",
        choices=["output", "input"],
        help="FPN P6 from the P5 output (FCOS, ATSS) or from C5 (RetinaNet); shapes tell unless C5 has the FPN width",
    )
    add_flag(
        g,
        "--rule",
        choices=POST_RULES,
        help="test-time post-processing: mmdet2 = spec §7.2 (mmdet 1.x/2.x<2.18 files and files without a version), "
        "mmdet218 = §7.3 as mmdet 2.18+ (files whose meta says so), mmdet3 = §7.3 with v3's size filter, torchvision = §10",
    )
    add_flag(g, "--score-thr", type=ranged(POST_RANGES["score_thr"]), help="score threshold in [0, 1] (default 0.05 mmdet, 0.2 torchvision)")
    add_flag(g, "--nms-pre", type=ranged(POST_RANGES["nms_pre"]), help="candidates kept per level before NMS (default 1000)")
    add_flag(g, "--iou-thr", type=ranged(POST_RANGES["iou_thr"]), help="NMS IoU threshold in (0, 1] (default 0.5 mmdet, 0.6 torchvision)")
    add_flag(g, "--max-per-img", type=ranged(POST_RANGES["max_per_img"]), help="detections kept per image (default 100)")


def overrides_from_args(args: argparse.Namespace) -> ModelOverrides:
    """:class:`ModelOverrides` from the flags of :func:`add_model_flags`."""
    return ModelOverrides(**{k: getattr(args, k, None) for k in ModelOverrides.__dataclass_fields__})


def add_engine_flags(parser: argparse.ArgumentParser, engines: tuple[str, ...] = ENGINES) -> None:
    """--engine/--device/--threads/--precision (unset = the artifact's value, else the default)."""
    add_flag(
        parser,
        "--engine",
        choices=engines,
        default=None,
        help="inference engine (default: an artifact's own, else onnxruntime; torch = the online PyTorch baseline; "
        "inductor = a 'convert --engine inductor' folder)",
    )
    add_flag(
        parser,
        "--device",
        default=None,
        help="cpu (default); torch/inductor: cuda (cuda:N); onnxruntime: cuda, tensorrt or cann (execution providers); openvino: CPU, GPU",
    )
    add_flag(parser, "--threads", type=THREADS, help="intra-op threads (default: a tuned artifact's, else the engine's choice, all cores)")
    add_flag(
        parser,
        "--precision",
        choices=PRECISIONS,
        default=None,
        help="execution precision (default: a tuned artifact's, else fp32); openvino honours bf16/fp16, "
        "inductor runs what it was converted to (tf32 <-> fp32 switchable on CUDA), "
        "'auto' = the engine's default (OpenVINO picks bf16 where the CPU has it)",
    )


def engine_options_from_args(args: argparse.Namespace, batch_size: int | None = None) -> EngineOptions:
    """:class:`EngineOptions` from the flags of :func:`add_engine_flags` (unset flags stay ``None``)."""
    return EngineOptions(
        engine=getattr(args, "engine", None),
        device=getattr(args, "device", None),
        threads=getattr(args, "threads", None),
        precision=getattr(args, "precision", None),
        batch_size=batch_size,
    )


def add_ray_flags(parser: argparse.ArgumentParser) -> None:
    """--ray [ADDRESS] and the actor pool's size (pip install 'fcos-offline[ray]')."""
    g = parser.add_argument_group("distributed (Ray Data; pip install 'fcos-offline[ray]')")
    add_flag(
        g,
        "--ray",
        nargs="?",
        const="auto",
        default=None,
        metavar="ADDRESS",
        help="run on Ray: alone, $RAY_ADDRESS or the cluster `ray start` began on this machine, else a new local one; or a cluster address (ray://head:10001, host:6379)",
    )
    add_flag(g, "--ray-actors", type=number(int, 1, 100_000), default=1, help="engine actors, one engine each (default 1)")
    add_flag(g, "--ray-cpus-per-actor", type=number(float, 0.0, 1024, low_open=True), default=1.0, help="CPUs per actor (default 1)")
    add_flag(g, "--ray-gpus-per-actor", type=number(float, 0.0, 64), default=0.0, help="GPUs per actor (default 0)")


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default only where there is one and its help does not state it already;
    reflows text paragraphs but keeps an ``examples:`` paragraph line for line."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        fill = super()._fill_text
        return "\n\n".join(p if p.startswith("examples:") else fill(p, width, indent) for p in text.split("\n\n"))

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action)
