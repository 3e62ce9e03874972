"""PyTorch eager backend: the checkpoint itself, the recipe's "online" baseline."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fcos_offline.engine.base import Engine, EngineConfig, ModelSource, check_canvas
from fcos_offline.errors import FcosError, UsageError, require

if TYPE_CHECKING:
    from fcos_offline.model.checkpoint import ModelOverrides

NAME: str = "torch"
EXTRA: str = "torch"
PRECISIONS: tuple[str, ...] = ("fp32", "auto")
CONVERT_PRECISIONS: tuple[str, ...] = ()  # runs the checkpoint; nothing to convert
MODEL_KINDS: tuple[str, ...] = ("checkpoint",)


def available() -> bool:
    """Is torch importable?"""
    return importlib.util.find_spec("torch") is not None


def version() -> str:
    """torch's version."""
    return str(require("torch", EXTRA).__version__)


def convert(fixed_onnx: Path, out: Path, precision: str, opt_level: str) -> str:
    """The torch engine runs checkpoints; there is no artifact to build."""
    raise UsageError("the torch engine runs a checkpoint directly; convert to onnxruntime or openvino")


class TorchEngine(Engine):
    """``FCOSDetector`` (network + post-processing) in eager mode."""

    name = NAME

    def __init__(self, source: ModelSource, config: EngineConfig, shape: tuple[int, int], overrides: ModelOverrides | None = None) -> None:
        super().__init__(source, config)
        self._torch: Any = require("torch", EXTRA)
        from fcos_offline.model.checkpoint import load_model
        from fcos_offline.model.postprocess import FCOSDetector

        if config.threads:
            self._torch.set_num_threads(config.threads)
        if config.precision not in PRECISIONS:
            raise UsageError("the torch engine runs fp32 (the online reference)")
        network, self.checkpoint = load_model(source.path, overrides)
        self.device = "cuda" if config.device.lower() == "cuda" else "cpu"
        if self.device == "cuda" and not self._torch.cuda.is_available():
            raise FcosError("--device cuda asked for but torch sees no CUDA device")
        self.detector: Any = FCOSDetector(network).eval().to(self.device)
        self.input_hw = check_canvas(source.path, *shape)

    def _run(self, batch: np.ndarray) -> list[np.ndarray]:
        with self._torch.inference_mode():
            dets, labels = self.detector(self._torch.from_numpy(batch).to(self.device))
        return [dets.cpu().numpy(), labels.cpu().numpy()]

    def execution_precision(self) -> str:
        return "fp32"

    def model_settings(self) -> dict[str, Any]:
        return dict(self.checkpoint.config.to_dict())

    def version(self) -> str:
        return version()

    def close(self) -> None:
        super().close()
        self.detector = None


def load(source: ModelSource, config: EngineConfig, shape: tuple[int, int] | None = None, overrides: ModelOverrides | None = None) -> Engine:
    """An eager engine for a checkpoint at canvas ``shape``."""
    if shape is None:
        raise UsageError("the torch engine needs the input --shape H W")
    return TorchEngine(source, config, shape, overrides)
