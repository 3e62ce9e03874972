"""PyTorch's compiler as an offline engine: the GPU analog of the recipe's ATC ``.om`` file.

``convert --engine inductor --checkpoint X.pth --shape H W`` writes an artifact folder:

* ``model.pt2`` — the network as a ``torch.export`` program at a fixed batch, canvas, device and
  precision (fp32, fp16 or bf16 weights; ``channels_last`` activations on CUDA). It loads with no
  checkpoint and no network code;
* ``artifact.json`` — those settings, the post-processing config and the engine options;
* ``compile-cache/`` — inductor's cache, filled by the compile ``convert`` already did (and
  checked against eager PyTorch), so ``infer --model FOLDER`` starts warm.

Loading compiles the program with ``torch.compile`` (inductor: C++/OpenMP kernels on CPU, Triton
on CUDA; CUDA graphs replay the static batch on CUDA) and runs FCOS post-processing on the same
device (exact class-wise NMS without a host loop on GPUs). ``tf32`` is the fp32 program with
TF32 matmuls/convolutions, a CUDA runtime switch. AOTInductor packaging is not used: it crashed
on the GPU machine this was built for.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fcos_offline.engine.base import Converted, ConvertRequest, Engine, EngineConfig, EngineOptions, ModelSource, check_canvas
from fcos_offline.engine.torch_runtime import DeviceFeed, device_info, set_fp32_mode, torch_device
from fcos_offline.errors import FcosError, UsageError, first_line, require

if TYPE_CHECKING:
    from fcos_offline.model.checkpoint import ModelOverrides

NAME: str = "inductor"
EXTRA: str = "torch"
PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "fp16", "bf16", "auto")
CONVERT_PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "fp16", "bf16")
CONVERT_FROM: str = "checkpoint"
MODEL_KINDS: tuple[str, ...] = ("torch-export",)
MODEL_FILE = "model.pt2"
CACHE_DIR = "compile-cache"
#: precisions that need a GPU (no fast CPU kernels / no meaning on CPU)
GPU_ONLY = ("fp16", "tf32")
#: worst relative error of the compiled network vs eager PyTorch that convert accepts in fp32
FP32_TOLERANCE = 1e-3


def available() -> bool:
    """Is torch importable?"""
    return importlib.util.find_spec("torch") is not None


def version() -> str:
    """torch's version (inductor ships with it)."""
    return str(require("torch", EXTRA).__version__)


def _dtype(precision: str) -> Any:
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)


def _check_compiler(device: str) -> None:
    """Inductor's CPU backend compiles C++: say so plainly where no compiler is installed."""
    import shutil

    if device == "cpu" and not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++")):
        raise FcosError(
            "the inductor engine compiles C++ kernels on the CPU and finds no C++ compiler: install g++ (or set CXX), or use --device cuda"
        )


def _check_precision(precision: str, device: str) -> None:
    if precision in GPU_ONLY and not device.startswith("cuda"):
        raise UsageError(f"{precision} is a GPU precision; on CPU the inductor engine runs fp32 or bf16")


@contextlib.contextmanager
def compile_cache(folder: Path) -> Iterator[bool]:
    """Compile inside ``folder`` (inductor's cache directory); yields whether it is writable.

    A read-only artifact compiles in the default per-user cache instead (a cold start, not an error).
    """
    if os.access(folder.parent, os.W_OK):
        folder.mkdir(exist_ok=True)
    if not (folder.is_dir() and os.access(folder, os.W_OK)):
        yield False
        return
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    with temporary_cache_dir(str(folder.resolve())):
        yield True


def _cache_hits() -> int:
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["fxgraph_cache_hit"])


def _compile(module: Any, device: str, cuda_graphs: bool) -> Any:
    import torch

    mode = "reduce-overhead" if cuda_graphs and device.startswith("cuda") else None
    return torch.compile(module, dynamic=False, mode=mode)


def _flatten(outputs: Any) -> list[Any]:
    cls, reg, ctr = outputs
    return [*cls, *reg, *ctr]


def convert(source: Path, out: Path, request: ConvertRequest) -> Converted:
    """Export the checkpoint's network with ``torch.export``, compile it once into the cache, check it against eager."""
    torch = require("torch", EXTRA)
    from fcos_offline.export.onnx_export import sample_input
    from fcos_offline.model.checkpoint import load_model

    if request.shape is None:
        raise UsageError("the inductor engine compiles for one canvas: give --shape H W")
    device = torch_device(request.device)
    _check_precision(request.precision, device)
    _check_compiler(device)
    h, w = check_canvas(source, *request.shape)
    channels_last = request.channels_last if request.channels_last is not None else device.startswith("cuda")
    cuda_graphs = bool(request.cuda_graphs if request.cuda_graphs is not None else device.startswith("cuda"))
    network, ckpt = load_model(source, request.overrides)
    dtype = _dtype(request.precision)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    network = network.to(device=device, dtype=dtype, memory_format=memory_format)
    example = torch.from_numpy(sample_input(request.batch_size, h, w, seed=0)).to(device)
    set_fp32_mode(device, request.precision == "tf32")
    with torch.no_grad():
        eager = _flatten(network(example.to(dtype).contiguous(memory_format=memory_format)))
        program = torch.export.export(network, (example.to(dtype).contiguous(memory_format=memory_format),))
    torch.export.save(program, str(out / MODEL_FILE))
    settings = {"model": ckpt.config.to_dict(), "channels_last": channels_last, "cuda_graphs": cuda_graphs}
    with compile_cache(out / CACHE_DIR), torch.no_grad():
        compiled = _compile(torch.export.load(str(out / MODEL_FILE)).module(), device, cuda_graphs)
        got = _flatten(compiled(example.to(dtype).contiguous(memory_format=memory_format)))
    worst = max(float(((g.float() - e.float()).abs().max() / e.float().abs().max().clamp(min=1e-6)).item()) for g, e in zip(got, eager))
    if request.precision == "fp32" and worst > FP32_TOLERANCE:
        raise FcosError(f"the compiled network differs from eager PyTorch by {worst:.2e} (relative) in fp32; not writing the artifact")
    settings["compiled_vs_eager_max_rel_error"] = worst
    return Converted(
        MODEL_FILE,
        input_shape=[request.batch_size, 3, h, w],
        settings=settings,
        # inductor's CPU code is specialised for the thread count: infer uses convert's unless told otherwise (warm start)
        engine_options=EngineOptions(
            device=device, precision=request.precision, threads=None if device.startswith("cuda") else torch.get_num_threads()
        ),
    )


class InductorEngine(Engine):
    """A ``torch.export`` program compiled by inductor, plus FCOS post-processing on the same device."""

    name = NAME

    def __init__(self, source: ModelSource, config: EngineConfig) -> None:
        super().__init__(source, config)
        self.torch = torch = require("torch", EXTRA)
        from fcos_offline.model.config import FCOSConfig
        from fcos_offline.model.postprocess import FCOSPostProcess

        artifact = source.artifact
        if artifact is None:
            raise UsageError(f"{source.path}: open the folder 'convert --engine inductor' wrote (infer --model FOLDER), not the .pt2 alone")
        stored = artifact.precision
        precision = stored if config.precision == "auto" else config.precision
        if precision != stored and {precision, stored} != {"fp32", "tf32"}:
            raise UsageError(f"{source.path.parent} was compiled for {stored}; convert again with --precision {precision}")
        self.device = torch_device(config.device)
        _check_precision(precision, self.device)
        _check_compiler(self.device)
        self.precision = precision
        if config.threads:
            torch.set_num_threads(config.threads)
        settings = artifact.settings
        self.model_config = FCOSConfig.from_dict(settings["model"])
        self.channels_last = bool(settings.get("channels_last", False))
        self.dtype = _dtype(stored)
        self.static_batch = artifact.batch_size
        self.input_hw = artifact.canvas
        try:
            module = torch.export.load(str(source.path)).module().to(self.device)
        except Exception as exc:
            raise FcosError(f"{source.path}: PyTorch cannot load the exported program ({first_line(exc)})") from None
        self.network = _compile(module, self.device, bool(settings.get("cuda_graphs", False)))
        self.post = FCOSPostProcess(self.model_config.post, self.model_config.head.strides)
        self.feed = DeviceFeed(self.device, self.input_hw)
        # compile now (not in the first timed batch), in the artifact's cache: warm after convert
        hits = _cache_hits()
        start = time.perf_counter()
        with compile_cache(source.path.parent / CACHE_DIR) as self.cache_writable:
            self._forward(torch.zeros((self.static_batch, 3, *self.input_hw), device=self.device))
        self.compile_s = time.perf_counter() - start
        self.cache_hit = _cache_hits() > hits
        if not self.cache_hit:
            from fcos_offline.progress import warn

            warn(
                f"compiled {source.path.parent} in {self.compile_s:.0f} s: its compile cache did not fit this run "
                "(another machine, torch version or thread count than convert's)"
            )

    def _forward(self, x: Any) -> tuple[Any, Any]:
        torch = self.torch
        set_fp32_mode(self.device, self.precision == "tf32")
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        with torch.inference_mode():
            cls, reg, ctr = self.network(x.to(self.dtype).contiguous(memory_format=memory_format))
            f32 = [[t.float() for t in level] for level in (cls, reg, ctr)]
            return self.post(*f32, self.input_hw)

    def _run_tensor(self, x: Any) -> tuple[np.ndarray, np.ndarray]:
        n = x.shape[0]
        if n < self.static_batch:
            x = self.torch.cat([x, x.new_zeros((self.static_batch - n, *x.shape[1:]))])
        dets, labels = self._forward(x)
        return dets[:n].cpu().numpy(), labels[:n].cpu().numpy()

    def _run(self, batch: np.ndarray) -> list[np.ndarray]:
        return list(self._run_tensor(self.torch.from_numpy(batch).to(self.device)))

    def run_letterboxed(self, images: list[np.ndarray], pads: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
        """Letterboxed uint8 images -> detections, the float conversion done on the device."""
        dets, labels = [], []
        for start in range(0, len(images), self.static_batch or len(images)):
            chunk = slice(start, start + (self.static_batch or len(images)))
            d, lab = self._run_tensor(self.feed.batch(images[chunk], pads[chunk]))
            dets.append(d)
            labels.append(lab)
        return np.concatenate(dets).astype(np.float32), np.concatenate(labels).astype(np.int64)

    @property
    def device_input(self) -> bool:
        return self.device != "cpu"

    def execution_precision(self) -> str:
        return self.precision

    def model_settings(self) -> dict[str, Any]:
        return dict(self.model_config.to_dict())

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "compile_s": round(self.compile_s, 2),
            "compile_cache_hit": self.cache_hit,
            "accelerator": device_info(self.device),
        }

    def version(self) -> str:
        return version()

    def close(self) -> None:
        super().close()
        self.network = None


def load(source: ModelSource, config: EngineConfig, shape: tuple[int, int] | None = None, overrides: ModelOverrides | None = None) -> Engine:
    """An engine for an inductor artifact (the model's canvas and settings come from it)."""
    return InductorEngine(source, config)
