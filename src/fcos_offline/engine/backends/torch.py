"""PyTorch eager backend: the checkpoint itself, the recipe's "online" baseline."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fcos_offline.engine.base import Converted, ConvertRequest, Engine, EngineConfig, ModelSource, check_canvas
from fcos_offline.engine.torch_runtime import DeviceFeed, device_info, set_fp32_mode, torch_device
from fcos_offline.errors import UsageError, require

if TYPE_CHECKING:
    from fcos_offline.model.checkpoint import ModelOverrides

NAME: str = "torch"
EXTRA: str = "torch"
PRECISIONS: tuple[str, ...] = ("fp32", "auto")
CONVERT_PRECISIONS: tuple[str, ...] = ()  # runs the checkpoint; nothing to convert
CONVERT_FROM: str = "onnx"
MODEL_KINDS: tuple[str, ...] = ("checkpoint",)
MODEL_SUFFIXES: tuple[str, ...] = ()  # runs the checkpoint; stores no model of its own


def available() -> bool:
    """Is torch importable?"""
    return importlib.util.find_spec("torch") is not None


def version() -> str:
    """torch's version."""
    return str(require("torch", EXTRA).__version__)


def convert(source: Path, out: Path, request: ConvertRequest) -> Converted:
    """The torch engine runs checkpoints; there is no artifact to build."""
    raise UsageError("the torch engine runs a checkpoint directly; convert to onnxruntime, openvino or inductor")


class TorchEngine(Engine):
    """``DetectorWithPost`` (network + post-processing) in eager mode."""

    name = NAME

    def __init__(self, source: ModelSource, config: EngineConfig, shape: tuple[int, int], overrides: ModelOverrides | None = None) -> None:
        super().__init__(source, config)
        self._torch: Any = require("torch", EXTRA)
        from fcos_offline.model.checkpoint import load_model
        from fcos_offline.model.postprocess import DetectorWithPost

        if config.threads:
            self._torch.set_num_threads(config.threads)
        if config.precision not in PRECISIONS:
            raise UsageError("the torch engine runs fp32 (the online reference)")
        network, self.checkpoint = load_model(source.path, overrides)
        self.device = torch_device(config.device)
        self.detector: Any = DetectorWithPost(network).eval().to(self.device)
        self.input_hw = check_canvas(source.path, *shape)
        self.feed = DeviceFeed(self.device, self.input_hw)

    def _detect(self, x: Any) -> tuple[np.ndarray, np.ndarray]:
        set_fp32_mode(self.device, tf32=False)  # the reference is IEEE fp32, on GPUs too
        with self._torch.inference_mode():
            dets, labels = self.detector(x)
        return dets.cpu().numpy(), labels.cpu().numpy()

    def _run(self, batch: np.ndarray) -> list[np.ndarray]:
        return list(self._detect(self._torch.from_numpy(batch).to(self.device)))

    def run_letterboxed(self, images: list[np.ndarray], pads: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
        """Letterboxed uint8 images -> detections, the float conversion done on the device."""
        return self._detect(self.feed.batch(images, pads))

    @property
    def device_input(self) -> bool:
        return self.device != "cpu"

    def execution_precision(self) -> str:
        return "fp32"

    def model_settings(self) -> dict[str, Any]:
        return dict(self.checkpoint.config.to_dict())

    def label_info(self) -> dict[str, Any]:
        return {"num_classes": self.checkpoint.config.head.num_classes, "class_names": self.checkpoint.class_names}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "accelerator": device_info(self.device)}

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
