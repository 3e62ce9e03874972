"""The search space: typed candidate configurations, and the one place build tags are encoded and parsed.

A candidate is an engine, a *build* of the model (``fp32``, ``ort-qdq:<tag>`` = ONNX Runtime
static QDQ, ``nncf:<tag>`` = NNCF post-training quantization for OpenVINO), the precision the
engine runs the remaining float ops in, the conv groups returned to float by the accuracy
fallback, threads, inter-op threads, batch size and ONNX Runtime's optimisation level.

Build tags: ``u8s8-minmax-pc[-qop][-gn]`` (activation type + weight type, calibration method,
per-channel, options, GroupNorm's affine float) and ``performance|mixed[-bc][-mm][-vnni][-gn]``
(NNCF preset, full bias correction, global min/max ranges, every weight in 8 bits, GroupNorm
float). Everything here is pure: no engine library is imported.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass
from typing import Any

from fcos_offline.engine.backends import ONNX_ENGINES, EngineOptions
from fcos_offline.errors import FcosError
from fcos_offline.tune.quantize import CALIB_METHODS, NncfConfig, OrtQuantConfig

#: the engines tune searches over (the offline ones)
TUNE_ENGINES = ONNX_ENGINES
#: the engines whose runs take a graph optimisation level (``EngineOptions.ort_opt_level``)
OPT_LEVEL_ENGINES = ("onnxruntime",)
#: the ORT int8 build whose convs ONNX Runtime fuses into QLinearConv on x86
ORT_QDQ_DEFAULT = "u8s8-minmax-pc-gn"
BUILD_KINDS = ("fp32", "ort-qdq", "nncf")


def parse_build(build: str) -> tuple[str, str]:
    """``"nncf:performance"`` -> (``"nncf"``, ``"performance"``); ``"fp32"`` -> (``"fp32"``, ``""``)."""
    kind, _, tag = build.partition(":")
    if kind not in BUILD_KINDS or (kind == "fp32") != (tag == ""):
        raise FcosError(f"unknown build {build!r} (expected fp32, ort-qdq:<tag> or nncf:<tag>)")
    return kind, tag


def ort_config(tag: str) -> OrtQuantConfig:
    """``u8s8-minmax-pc`` -> :class:`OrtQuantConfig` (``qop``: QOperator format; ``gn``: GroupNorm's affine float)."""
    parts = tag.split("-")
    if len(parts) < 3 or len(parts[0]) != 4 or parts[1] not in CALIB_METHODS or parts[2] not in ("pc", "pt"):
        raise FcosError(f"bad ONNX Runtime build tag {tag!r} (expected e.g. u8s8-minmax-pc)")
    types, method, gran = parts[:3]
    return OrtQuantConfig(
        method=method,
        activation_type=types[:2],
        weight_type=types[2:],
        per_channel=gran == "pc",
        quant_format="qoperator" if "qop" in parts[3:] else "qdq",
        norm_float="gn" in parts[3:],
    )


def nncf_config(tag: str) -> NncfConfig:
    """``performance-bc-mm`` -> :class:`NncfConfig` (``bc``: full bias correction instead of the fast one;
    ``mm``: global min/max activation ranges; ``vnni``: NNCF's overflow fix off, every weight in 8 bits;
    ``gn``: the head's GroupNorm float, its input and its normalised output unquantized)."""
    parts = tag.split("-")
    if parts[0] not in ("performance", "mixed") or not set(parts[1:]) <= {"bc", "mm", "vnni", "gn"}:
        raise FcosError(f"bad NNCF build tag {tag!r} (expected performance|mixed[-bc][-mm][-vnni][-gn])")
    return NncfConfig(
        preset=parts[0],
        fast_bias_correction="bc" not in parts[1:],
        activation_ranges="minmax" if "mm" in parts[1:] else "mean_minmax",
        overflow_fix="vnni" not in parts[1:],
        norm_float="gn" in parts[1:],
    )


@dataclass(frozen=True)
class Candidate:
    """One configuration: how the model is built and how the engine runs it."""

    engine: str  # onnxruntime | openvino
    build: str  # "fp32" | "ort-qdq:<tag>" | "nncf:<tag>"
    exec_precision: str = "fp32"  # engine precision option: fp32 | bf16 | auto
    float_groups: tuple[str, ...] = ()
    threads: int | None = None
    inter_op_threads: int | None = None
    batch_size: int = 1
    opt_level: str = "all"

    def __post_init__(self) -> None:
        parse_build(self.build)
        object.__setattr__(self, "float_groups", tuple(self.float_groups))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Candidate:
        """From its JSON form in tune.json."""
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})

    @property
    def model_id(self) -> str:
        """Names the model file (build + the conv groups returned to float)."""
        base = self.build.replace(":", "-")
        if not self.float_groups:
            return base
        digest = hashlib.sha1("\n".join(sorted(self.float_groups)).encode()).hexdigest()[:8]
        return f"{base}+float{len(self.float_groups)}-{digest}"

    @property
    def quantized(self) -> bool:
        """An int8 build?"""
        return self.build != "fp32"

    @property
    def kind(self) -> str:
        """fp32, ort-qdq or nncf."""
        return parse_build(self.build)[0]

    @property
    def has_opt_level(self) -> bool:
        """Does its engine take a graph optimisation level (``opt_level``)?"""
        return self.engine in OPT_LEVEL_ENGINES

    @property
    def engine_precision(self) -> str:
        """The precision option the engine is opened with (ONNX Runtime runs its graph as built)."""
        return "fp32" if self.engine == "onnxruntime" else self.exec_precision

    def engine_options(self, device: str | None = None) -> EngineOptions:
        """The options the engine runs this configuration with."""
        return EngineOptions(self.engine, device, self.threads, self.engine_precision, self.batch_size, self.opt_level, self.inter_op_threads)

    @property
    def accuracy_id(self) -> str:
        """Configurations with the same accuracy id compute the same numbers (threads/batch aside)."""
        opt = f"|{self.opt_level}" if self.has_opt_level and self.quantized else ""
        return f"{self.engine}|{self.model_id}|{self.exec_precision}{opt}"

    @property
    def key(self) -> str:
        """The trial's cache key in tune.json."""
        t = "auto" if self.threads is None else str(self.threads)
        inter = f"+{self.inter_op_threads}" if self.inter_op_threads else ""
        opt = f"|opt-{self.opt_level}" if self.has_opt_level else ""
        return f"{self.engine}|{self.model_id}|{self.exec_precision}|t{t}{inter}|bs{self.batch_size}{opt}"

    def main_form(self, base_batch: int) -> Candidate:
        """The configuration as the main phase tries it (threads/batch/opt level at their defaults)."""
        return dataclasses.replace(self, threads=None, batch_size=base_batch, opt_level="all", inter_op_threads=None)

    def label(self) -> str:
        """Short human description for tables and logs."""
        if not self.quantized:
            what = {"fp32": "fp32", "bf16": "bf16", "auto": "default"}[self.exec_precision]
        else:
            kind, tag = parse_build(self.build)
            rest = "" if self.engine == "onnxruntime" else f", {self.exec_precision} rest"
            what = f"int8 {kind} {tag}{rest}"
        if self.float_groups:
            what += f", {len(self.float_groups)} groups float"
        return f"{self.engine} {what}"


def quant_description(cand: Candidate) -> dict[str, Any] | None:
    """How an int8 build was made (recorded in the artifact)."""
    if not cand.quantized:
        return None
    kind, tag = parse_build(cand.build)
    if kind == "ort-qdq":
        cfg = ort_config(tag)
        return {"tool": "onnxruntime.quantization.quantize_static", "format": cfg.quant_format.upper(), **dataclasses.asdict(cfg)}
    nncf = nncf_config(tag)
    return {
        "tool": "nncf.quantize",
        "target_device": "CPU",
        "ignored_scope": "post-processing, head Scale/exp, float_nodes" + (", GroupNorm" if nncf.norm_float else ""),
        **dataclasses.asdict(nncf),
    }


def candidate_list(
    engines: tuple[str, ...],
    calib_methods: tuple[str, ...],
    base_batch: int,
    only: tuple[str, ...] | None = None,
    int8_rest: str = "fp32",
    vnni: bool = False,
) -> list[Candidate]:
    """The main candidates, most promising first (threads/batch at their defaults).

    NNCF builds keep the head's GroupNorm float (tag ``-gn``; on the demo model it cut the mean
    int8 drop of ``performance-bc-mm-vnni`` from 0.35 to 0.14 points with fp32 float ops and from
    0.39 to 0.13 with bf16 ones; on an R50 with a GroupNorm head it cost 0.5-1.4% in speed, and a
    model without GroupNorm gets the same graph: README, Tuning); ONNX Runtime
    builds keep its affine float (``-gn`` too; U8S8 MinMax: 0.53 to 0.34, same speed). On CPUs with
    VNNI or AMX (``vnni``) they also keep every weight in 8 bits (tag ``-vnni``: NNCF's overflow fix
    off, see :func:`fcos_offline.tune.quantize.vnni_cpu`). ``only`` names builds with or without
    these suffixes.

    OpenVINO int8 models run their remaining float ops — and the convs the accuracy fallback
    returns to float — in ``int8_rest``: ``bf16`` on CPUs with native bf16 (AVX-512 BF16, AMX),
    where f32 can be several times slower, each followed by its fp32 twin (on the demo model the
    mean drops with bf16 and fp32 float ops were within 0.04 points of each other, GroupNorm int8
    or float; on Zen 4 bf16 was no faster); else ``fp32`` (the sweep then tries bf16 where
    OpenVINO has it). ONNX Runtime int8 models run their float ops in fp32.
    """
    bs, rest = base_batch, int8_rest
    methods = [m for m in CALIB_METHODS if m in calib_methods]
    cands = [Candidate("openvino", "fp32", "auto", batch_size=bs), Candidate("openvino", "nncf:performance", rest, batch_size=bs)]
    cands += [Candidate("onnxruntime", f"ort-qdq:u8s8-{m}-pc", batch_size=bs) for m in methods[:1]]
    cands += [Candidate("openvino", "fp32", "fp32", batch_size=bs), Candidate("openvino", "nncf:performance-bc-mm", rest, batch_size=bs)]
    cands += [Candidate("openvino", "nncf:mixed-bc-mm", rest, batch_size=bs)]
    cands += [Candidate("onnxruntime", f"ort-qdq:u8s8-{m}-pc", batch_size=bs) for m in methods[1:]]
    if methods:
        cands += [Candidate("openvino", f"ort-qdq:u8s8-{methods[0]}-pc", rest, batch_size=bs)]
    cands += [Candidate("openvino", "nncf:mixed-mm", rest, batch_size=bs)]
    if methods:
        cands += [Candidate("onnxruntime", f"ort-qdq:s8s8-{methods[0]}-pc", batch_size=bs)]  # what ORT does not fuse
    cands.append(Candidate("openvino", "fp32", "bf16", batch_size=bs))
    if rest == "bf16":
        cands = [t for c in cands for t in ((c, dataclasses.replace(c, exec_precision="fp32")) if c.engine == "openvino" and c.quantized else (c,))]
    suffix = {"nncf": ("-vnni" if vnni else "") + "-gn", "ort-qdq": "-gn", "fp32": ""}
    cands = [dataclasses.replace(c, build=c.build + suffix[c.kind]) for c in cands]
    cands = [c for c in cands if c.engine in engines]
    if only:
        wanted = {_without_default_suffixes(n) for n in only}
        cands = [c for c in cands if any(_without_default_suffixes(n) in wanted for n in (c.model_id, f"{c.engine}/{c.model_id}/{c.exec_precision}"))]
    return cands


def _without_default_suffixes(name: str) -> str:
    """A build name without the tags ``candidate_list`` adds (``-vnni``, ``-gn``), so either spelling names it."""
    return re.sub(r"-(vnni|gn)(?=[-/]|$)", "", name)


def sweep_variants(base: Candidate, threads: list[int], batch_sizes: tuple[int, ...], nproc: int, has_bf16: bool) -> list[Candidate]:
    """Threads x batch sizes for ``base`` (in its main form), plus ORT opt levels / inter-op or OpenVINO bf16 rest."""
    variants = [dataclasses.replace(base, threads=th, batch_size=bs) for th in threads for bs in batch_sizes]
    if base.has_opt_level:
        variants += [dataclasses.replace(base, threads=threads[0], opt_level=lvl) for lvl in ("extended", "basic")]
        if nproc >= 2:
            variants.append(dataclasses.replace(base, threads=max(1, nproc // 2), inter_op_threads=2))
    elif base.quantized and base.exec_precision == "fp32" and has_bf16:
        variants.append(dataclasses.replace(base, exec_precision="bf16", threads=threads[0]))
    return variants
