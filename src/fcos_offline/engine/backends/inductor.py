"""PyTorch's compiler as an offline engine: the GPU analog of the recipe's ATC ``.om`` file.

``convert --engine inductor --checkpoint X.pth --shape H W`` writes an artifact folder:

* ``model.weights`` — the network's weights at the stored precision (fp32, fp16 or bf16), a
  ``torch.save`` file of plain tensors that loads with ``torch.load(weights_only=True)``: opening
  an artifact unpickles nothing else and runs no code from it (``torch.export`` programs are not
  used: their loader falls back to unrestricted unpickling);
* ``artifact.json`` — the model config (architecture and post-processing, range-checked when
  read), the batch, canvas, device, precision, layout and engine options, and the sha256 of
  ``model.weights`` (verified before it is read, :mod:`engine.artifact`).

Opening rebuilds the detector network from that config, loads the weights and compiles it with
``torch.compile`` (inductor: C++/OpenMP kernels on CPU, Triton on CUDA; CUDA graphs replay the
static batch on CUDA), then runs the head's post-processing on the same device (exact class-wise NMS
without a host loop on GPUs). ``tf32`` is the fp32 network with TF32 matmuls/convolutions, a CUDA
runtime switch. Inductor's compile cache holds Python modules and shared libraries that are
loaded, so it is never part of an artifact: it lives in a per-user folder (:func:`user_cache`,
mode 0700, ``$FCOS_OFFLINE_CACHE`` or ``~/.cache/fcos-offline``) keyed by the weights' digest;
``convert`` fills it, so ``infer`` on the same machine starts warm, and a cache that fails to load
is removed and rebuilt. AOTInductor packaging is not used: it crashed on the GPU machine this was
built for.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from fcos_offline.engine.artifact import ARTIFACT_FILE, Artifact
from fcos_offline.engine.base import Converted, ConvertRequest, Engine, EngineConfig, EngineOptions, ModelSource, check_canvas
from fcos_offline.engine.torch_runtime import DeviceFeed, device_info, set_fp32_mode, torch_device
from fcos_offline.errors import FcosError, UsageError, first_line, require
from fcos_offline.io import atomic_write_bytes, file_digest
from fcos_offline.progress import warn

if TYPE_CHECKING:
    from fcos_offline.model.checkpoint import ModelOverrides
    from fcos_offline.model.config import DetectorConfig

NAME: str = "inductor"
EXTRA: str = "torch"
PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "fp16", "bf16", "auto")
CONVERT_PRECISIONS: tuple[str, ...] = ("fp32", "tf32", "fp16", "bf16")
CONVERT_FROM: str = "checkpoint"
MODEL_KINDS: tuple[str, ...] = ("torch-weights",)
MODEL_SUFFIXES: tuple[str, ...] = (".weights",)
MODEL_FILE = "model.weights"
#: the environment variable that moves the per-user compile cache
CACHE_ENV = "FCOS_OFFLINE_CACHE"
#: precisions that need a GPU (no fast CPU kernels / no meaning on CPU)
GPU_ONLY = ("fp16", "tf32")
T = TypeVar("T")
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


def user_cache(key: str) -> Path:
    """This user's compile cache for the weights of digest ``key``: ``$FCOS_OFFLINE_CACHE`` (or
    ``$XDG_CACHE_HOME/fcos-offline``, ``~/.cache/fcos-offline``) ``/inductor/<key>``.

    Folders are created with mode 0700; one that another user owns or others may write is refused
    (its compiled code would be loaded). Where the folder cannot be made (a read-only home, as some
    service accounts have), a fresh private temporary folder is used instead, and said: a cold start.
    """
    base = os.environ.get(CACHE_ENV) or os.path.join(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache", "fcos-offline")
    root = Path(base)
    folder = root / "inductor" / key[:32]
    for d in (root, root / "inductor", folder):
        try:
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            st = os.stat(d)
        except OSError as exc:
            fresh = Path(tempfile.mkdtemp(prefix="fcos-offline-inductor-"))  # mode 0700, ours alone
            warn(f"cannot use the compile cache {d} ({exc.strerror or exc}); compiling in {fresh} this time (set {CACHE_ENV})")
            return fresh
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
            raise FcosError(
                f"{d}: the compile cache must be a folder of yours that others cannot write (its compiled code is loaded); "
                f"'chmod 700' it or set {CACHE_ENV} to another folder"
            )
    return folder


@contextlib.contextmanager
def compile_cache(folder: Path) -> Iterator[None]:
    """Compile with ``folder`` as inductor's cache directory."""
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    with temporary_cache_dir(str(folder.resolve())):
        yield


def _cache_hits() -> int:
    from torch._dynamo.utils import counters

    return int(counters["inductor"]["fxgraph_cache_hit"])


def _compile(module: Any, device: str, cuda_graphs: bool) -> Any:
    import torch

    mode = "reduce-overhead" if cuda_graphs and device.startswith("cuda") else None
    return torch.compile(module, dynamic=False, mode=mode)


def _first_call(cache: Path, call: Callable[[], T]) -> T:
    """Run ``call`` (a compiled module's first call, which compiles it) with ``cache`` as inductor's cache.

    The cache is derived data: a failure is retried once in an emptied cache, then is one line
    naming it and the cause (not the compiler's or dynamo's pages of output).
    """
    import torch

    for attempt in (1, 2):
        try:
            with compile_cache(cache):
                return call()
        except FcosError:
            raise
        except Exception as exc:
            if attempt == 2:
                raise FcosError(f"compiling the network with inductor (cache {cache}) failed: {type(exc).__name__}: {first_line(exc)}") from None
            torch._dynamo.reset()
            shutil.rmtree(cache, ignore_errors=True)
            cache.mkdir(mode=0o700, exist_ok=True)
    raise AssertionError("unreachable")


def _flatten(outputs: Any) -> list[Any]:
    """The head's raw outputs (one list of levels per kind) as one list."""
    return [t for kind in outputs for t in kind]


def _save_weights(network: Any, path: Path) -> None:
    """The network's tensors as a ``torch.save`` file of plain tensors (a full disk is one line naming it)."""
    import torch

    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in network.state_dict().items()}, buffer)
    atomic_write_bytes(path, buffer.getbuffer())


def _load_network(path: Path, config: DetectorConfig, device: str, dtype: Any, memory_format: Any) -> Any:
    """Rebuild the network from ``config`` and the weights file (``weights_only``: nothing in it runs)."""
    import torch

    from fcos_offline.model.detector import Detector

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise TypeError(f"holds a {type(state).__name__}, not a dict of tensors")
        network: Any = Detector(config)
        network.load_state_dict(state, strict=True)
    except Exception as exc:
        raise FcosError(f"{path}: not loadable as this artifact's network weights ({first_line(exc)})") from None
    return network.to(device=device, dtype=dtype, memory_format=memory_format).eval()


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
    example = torch.from_numpy(sample_input(request.batch_size, h, w, seed=0)).to(device).to(dtype).contiguous(memory_format=memory_format)
    set_fp32_mode(device, request.precision == "tf32")
    with torch.no_grad():
        eager = _flatten(network(example))
    _save_weights(network, out / MODEL_FILE)
    settings = {"model": ckpt.config.to_dict(), "channels_last": channels_last, "cuda_graphs": cuda_graphs}
    # what infer will run: the network rebuilt from the written file, compiled into this user's cache
    rebuilt = _load_network(out / MODEL_FILE, ckpt.config, device, dtype, memory_format)
    cache = user_cache(file_digest(out / MODEL_FILE))
    compiled = _compile(rebuilt, device, cuda_graphs)
    with torch.no_grad():
        got = _first_call(cache, lambda: _flatten(compiled(example)))
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


def _read_settings(folder: Path, artifact: Artifact) -> tuple[DetectorConfig, bool, bool]:
    """The model config, channels-last and CUDA-graphs flags ``artifact.json`` records, checked (one line naming it)."""
    from fcos_offline.model.config import DetectorConfig, check_config

    where = folder / ARTIFACT_FILE
    if artifact.precision not in CONVERT_PRECISIONS:
        raise FcosError(f"{where}: precision {artifact.precision!r} is not one an inductor artifact is stored in ({', '.join(CONVERT_PRECISIONS)})")
    settings = artifact.settings
    try:
        config = DetectorConfig.from_dict(settings["model"])
        check_config(config)
    except KeyError as exc:
        raise FcosError(f"{where}: settings.model lacks {exc}; convert again") from None
    except (TypeError, ValueError, AttributeError) as exc:
        raise FcosError(f"{where}: settings.model is not a valid detector config: {first_line(exc)}") from None
    flags = [settings.get(k, False) for k in ("channels_last", "cuda_graphs")]
    if not all(isinstance(v, bool) for v in flags):
        raise FcosError(f"{where}: settings.channels_last and settings.cuda_graphs must be true or false")
    return config, flags[0], flags[1]


class InductorEngine(Engine):
    """The detector network rebuilt from an artifact's config and weights, compiled by inductor, plus post-processing on the same device."""

    name = NAME

    def __init__(self, source: ModelSource, config: EngineConfig) -> None:
        super().__init__(source, config)
        self.torch = torch = require("torch", EXTRA)
        from fcos_offline.model.postprocess import DensePostProcess

        artifact = source.artifact
        if artifact is None:
            raise UsageError(f"{source.path}: open the folder 'convert --engine inductor' wrote (infer --model FOLDER), not a file in it")
        folder = source.path.parent
        self.model_config, self.channels_last, cuda_graphs = _read_settings(folder, artifact)
        stored = artifact.precision
        precision = stored if config.precision == "auto" else config.precision
        if precision != stored and {precision, stored} != {"fp32", "tf32"}:
            raise UsageError(f"{folder} was compiled for {stored}; convert again with --precision {precision}")
        self.device = torch_device(config.device)
        _check_precision(precision, self.device)
        _check_compiler(self.device)
        self.precision = precision
        if config.threads:
            torch.set_num_threads(config.threads)
        self.dtype = _dtype(stored)
        self.static_batch = artifact.batch_size
        self.input_hw = artifact.canvas
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        network = _load_network(source.path, self.model_config, self.device, self.dtype, memory_format)
        self.network = _compile(network, self.device, cuda_graphs)
        self.post = DensePostProcess(self.model_config)
        self.feed = DeviceFeed(self.device, self.input_hw)
        # compile now (not in the first timed batch), in this user's cache for these weights: warm after convert
        self.cache = user_cache(artifact.files.get(source.path.name) or file_digest(source.path))
        hits = _cache_hits()
        start = time.perf_counter()
        _first_call(self.cache, lambda: self._forward(torch.zeros((self.static_batch, 3, *self.input_hw), device=self.device)))
        self.compile_s = time.perf_counter() - start
        self.cache_hit = _cache_hits() > hits
        if not self.cache_hit:
            from fcos_offline.progress import warn

            warn(
                f"compiled {folder} in {self.compile_s:.0f} s: no compile cache of it in {self.cache} fitted this run "
                "(converted on another machine or account, or another torch version or thread count than convert's)"
            )

    def _forward(self, x: Any) -> tuple[Any, Any]:
        torch = self.torch
        set_fp32_mode(self.device, self.precision == "tf32")
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        with torch.inference_mode():
            raw = self.network(x.to(self.dtype).contiguous(memory_format=memory_format))
            return self.post([[t.float() for t in kind] for kind in raw], self.input_hw)

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
