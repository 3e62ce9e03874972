"""The Ascend ``benchmark`` tool's perf file and the recipe's ``test/parse.py`` reading of it.

``result/perf_vision_batchsize_{B}_device_{N}.txt`` has five lines (fps = images per second,
latencies in milliseconds)::

    [e2e] throughputRate: 243.034, latency: 205733
    [data read] throughputRate: 258.963, moduleLatency: 3.86155
    [preprocess] throughputRate: 258.404, moduleLatency: 3.86991
    [infer] throughputRate: 244.435, Interface throughputRate: 382.328, moduleLatency: 3.35758
    [post] throughputRate: 244.435, moduleLatency: 4.09107

``[e2e] latency`` is the whole run's wall time; ``Interface throughputRate`` counts only the
time spent inside the model call. Newer tool versions write ``[inference]``/``[postprocess]``;
:func:`parse_perf` accepts both.

The recipe's parse script joins the lines with commas, takes every ``:(.*?),`` match, and reads
match number 7 (0-based) -- ``Interface throughputRate`` when the lines are in the order above --
times 4, the Ascend 310 card's four chips, printing ``310 bs{B} fps:{value}``. We write the
lines in that order, so that script reads our files the same way; :func:`recipe_fps` does the
same extraction, and ``fcos-offline parse`` prints this machine's one-device fps first and that number only labelled as the
recipe's convention.

``parse`` also reads our ``summary.json`` files: ``infer``'s (``throughput_fps``, ``latency_ms``
per stage) and ``postprocess``'s (``bbox_mAP``...).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fcos_offline.errors import FcosError
from fcos_offline.io import atomic_write_bytes, read_json_bounded, read_text_bounded

RECIPE_FIELD_INDEX = 7
CHIPS_PER_310_CARD = 4
_STAGE_ALIASES = {"inference": "infer", "postprocess": "post"}
_LINE = re.compile(r"^\s*\[(?P<stage>[^\]]+)\]\s*(?P<fields>.*)$")
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


@dataclass
class PerfStats:
    """One run's numbers: fps in images/s, latencies in ms (0 where a stage was not measured)."""

    batch_size: int
    e2e_fps: float
    e2e_latency_ms: float
    interface_fps: float
    infer_fps: float = 0.0
    infer_latency_ms: float = 0.0
    read_fps: float = 0.0
    read_latency_ms: float = 0.0
    preprocess_fps: float = 0.0
    preprocess_latency_ms: float = 0.0
    post_fps: float = 0.0
    post_latency_ms: float = 0.0


def perf_file_name(batch_size: int, device_id: int = 0) -> str:
    """The benchmark tool's file name, ``perf_vision_batchsize_{B}_device_{N}.txt``."""
    return f"perf_vision_batchsize_{batch_size}_device_{device_id}.txt"


def _num(value: float) -> str:
    return f"{value:.3f}".rstrip("0").rstrip(".") if value else "0"


def format_perf(stats: PerfStats) -> str:
    """The perf file's text, the five lines in the benchmark tool's order."""
    return (
        f"[e2e] throughputRate: {_num(stats.e2e_fps)}, latency: {_num(stats.e2e_latency_ms)}\n"
        f"[data read] throughputRate: {_num(stats.read_fps)}, moduleLatency: {_num(stats.read_latency_ms)}\n"
        f"[preprocess] throughputRate: {_num(stats.preprocess_fps)}, "
        f"moduleLatency: {_num(stats.preprocess_latency_ms)}\n"
        f"[infer] throughputRate: {_num(stats.infer_fps)}, Interface throughputRate: {_num(stats.interface_fps)}, "
        f"moduleLatency: {_num(stats.infer_latency_ms)}\n"
        f"[post] throughputRate: {_num(stats.post_fps)}, moduleLatency: {_num(stats.post_latency_ms)}\n"
    )


def write_perf_file(path: str | os.PathLike, stats: PerfStats) -> Path:
    """Write ``stats`` as a benchmark perf file (atomically); a folder gets the standard name."""
    out = Path(path)
    if out.is_dir():
        out = out / perf_file_name(stats.batch_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, format_perf(stats).encode())
    return out


def recipe_fps(text: str, chips: int = CHIPS_PER_310_CARD) -> float:
    """The fps the recipe's parse script reports: colon-field number 7 times ``chips``."""
    fields = [f.strip() for f in re.findall(r":(.*?),", text.replace("\n", ",") + ",")]
    if len(fields) <= RECIPE_FIELD_INDEX:
        raise FcosError(f"only {len(fields)} 'name: value' fields; a benchmark perf file has 11")
    match = _NUMBER.match(fields[RECIPE_FIELD_INDEX])
    if not match:
        raise FcosError(f"field {RECIPE_FIELD_INDEX} is {fields[RECIPE_FIELD_INDEX]!r}, not a number")
    return float(match.group()) * chips


def _batch_size_from_name(path: Path) -> int | None:
    match = re.search(r"batchsize_(\d+)", path.name)
    return int(match.group(1)) if match else None


def parse_perf(path: str | os.PathLike, chips: int = CHIPS_PER_310_CARD) -> dict[str, Any]:
    """Read a benchmark perf file into ``{stages, batch_size, e2e_fps, interface_fps, recipe_fps, chips}``."""
    p = Path(path)
    text = read_text_bounded(p, 16 << 20, "perf file")
    stages: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        match = _LINE.match(line)
        if not match:
            continue
        stage = match.group("stage").strip()
        values: dict[str, float] = {}
        for part in match.group("fields").split(","):
            name, sep, raw = part.partition(":")
            number = _NUMBER.search(raw)
            value = float(number.group()) if sep and number else None
            if sep and (value is None or not 0 <= value < float("inf")):  # a rate or latency: a finite number >= 0
                raise FcosError(f"{p}: [{stage}] {name.strip()} is {raw.strip()!r}; rates and latencies are finite numbers >= 0")
            if value is not None:
                values[name.strip()] = value
        stages[_STAGE_ALIASES.get(stage, stage)] = values
    try:
        interface = stages["infer"]["Interface throughputRate"]
        e2e = stages["e2e"]["throughputRate"]
    except KeyError as exc:
        raise FcosError(f"{p}: not a benchmark perf file (missing {exc.args[0]!r})") from None
    return {
        "path": str(p),
        "stages": stages,
        "batch_size": _batch_size_from_name(p),
        "e2e_fps": e2e,
        "interface_fps": interface,
        "recipe_fps": recipe_fps(text, chips),
        "chips": chips,
    }


def parse_summary(path: str | os.PathLike) -> dict[str, Any]:
    """Read the fps/latency (infer) or mAP (postprocess) parts of one of our summary.json files."""
    p = Path(path)
    data = read_json_bounded(p, 256 << 20, "summary")
    if not isinstance(data, dict) or not ({"throughput_fps", "bbox_mAP"} & data.keys()):
        raise FcosError(f"{p}: no 'throughput_fps' (infer summary) or 'bbox_mAP' (postprocess summary)")
    for key in ("throughput_fps", "infer_fps", "bbox_mAP", "bbox_mAP_50", "bbox_mAP_75"):
        if key in data and (not isinstance(data[key], (int, float)) or isinstance(data[key], bool)):
            raise FcosError(f"{p}: '{key}' is {data[key]!r}, not a number")
    if not isinstance(data.get("latency_ms", {}), dict):
        raise FcosError(f"{p}: 'latency_ms' is {type(data['latency_ms']).__name__}, not an object of stages")
    keys = ("engine", "batch_size", "throughput_fps", "infer_fps", "latency_ms", "bbox_mAP", "bbox_mAP_50", "bbox_mAP_75")
    return {"path": str(p), **{k: data[k] for k in keys if k in data}}


def parse_file(path: str | os.PathLike, chips: int = CHIPS_PER_310_CARD) -> dict[str, Any]:
    """``parse_summary`` for .json, ``parse_perf`` otherwise."""
    return parse_summary(path) if str(path).endswith(".json") else parse_perf(path, chips)


def _fps_text(value: Any) -> str:
    """Floats to 3 decimals, counts as integers; a dict as 'key value' pairs, unset (None) entries left out."""
    if isinstance(value, dict):
        return ", ".join(f"{k} {_fps_text(v)}" for k, v in value.items() if v is not None)
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def describe(result: dict[str, Any]) -> list[str]:
    """Human lines for a :func:`parse_file` result: this machine's measured figures first, the recipe's
    multiplied "310" convention only labelled as such; mAP in percent."""
    from fcos_offline.units import percent

    lines = [result["path"]]
    if "interface_fps" in result:
        bs = result["batch_size"] if result["batch_size"] is not None else "?"
        lines.append(
            f"measured, one device, batch {bs}: {result['interface_fps']:.3f} img/s in the model (Interface throughputRate), "
            f"{result['e2e_fps']:.3f} img/s end to end"
        )
        lines.append(
            f"recipe's table convention (not a measurement): 310 bs{bs} fps:{result['recipe_fps']:.3f} "
            f"= Interface throughputRate x {result['chips']} chips of an Ascend 310 card (--chips)"
        )
        return lines
    if isinstance(result.get("engine"), dict):
        lines.append(f"engine: {_fps_text(result['engine'])}")
    if "infer_fps" in result:
        lines.append(f"engine throughput: {_fps_text(result['infer_fps'])} img/s (time inside the engine call only)")
    if "throughput_fps" in result:
        bs = f" (batch size {result['batch_size']})" if "batch_size" in result else ""
        lines.append(f"end-to-end throughput{bs}: {_fps_text(result['throughput_fps'])} img/s (files in -> dumps out)")
    for stage, stats in (result.get("latency_ms") or {}).items():
        lines.append(f"latency {stage}: {_fps_text(stats)} ms")
    if "bbox_mAP" in result:
        keys = [k for k in ("bbox_mAP", "bbox_mAP_50", "bbox_mAP_75") if k in result]
        lines.append("bbox " + "  ".join(f"{k[5:]} {percent(result[k])}" for k in keys) + "  (percent)")
    return lines
