"""What the two PyTorch engines (eager ``torch``, compiled ``inductor``) share: the device, the
fp32/tf32 switch, a description of the accelerator, and the input batch built on the device.

The device batch is the second half of preprocessing (:func:`data.preprocess.to_input_tensor`)
done where the network runs: letterboxed uint8 images are copied (from pinned host memory,
asynchronously on CUDA) and the float conversion and BGR-mean subtraction happen on the device,
with the same float32 operations as the CPU path, so the tensor is bit-identical to it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fcos_offline.data.preprocess import MEAN_BGR
from fcos_offline.errors import FcosError, UsageError, require

DEVICES = ("cpu", "cuda")


def torch_device(name: str) -> str:
    """``cpu`` or ``cuda`` (``cuda:N`` kept); a usage error otherwise, a clear error when CUDA is absent."""
    torch = require("torch", "torch")
    lowered = name.lower()
    if lowered.split(":")[0] not in DEVICES:
        raise UsageError(f"PyTorch engines run on {' or '.join(DEVICES)} (cuda:N for another GPU), not {name!r}")
    if lowered.startswith("cuda") and not torch.cuda.is_available():
        raise FcosError(f"--device {name} asked for but this torch ({torch.__version__}) sees no CUDA device")
    return lowered


def set_fp32_mode(device: str, tf32: bool) -> None:
    """On CUDA, fp32 means IEEE fp32 (PyTorch lets cuDNN use TF32 by default) and tf32 means TF32."""
    if not device.startswith("cuda"):
        return
    import torch

    mode = "tf32" if tf32 else "ieee"
    torch.backends.cuda.matmul.fp32_precision = mode
    torch.backends.cudnn.conv.fp32_precision = mode  # type: ignore[attr-defined]  # a submodule torch adds at import


def device_info(device: str) -> dict[str, Any]:
    """The accelerator as a report names it: GPU name, capability, memory, CUDA and driver versions."""
    import torch

    info: dict[str, Any] = {"device": device, "torch": torch.__version__}
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        props = torch.cuda.get_device_properties(index)
        info.update(
            gpu=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            driver=_driver_version(),
        )
    return info


def _driver_version() -> str | None:
    """The NVIDIA driver's version (from ``/proc/driver/nvidia/version``), None if unknown."""
    try:
        with open("/proc/driver/nvidia/version") as f:
            first = f.readline()
        words = [w for w in first.split() if w[:1].isdigit() and "." in w]
        return words[0] if words else None
    except OSError:
        return None


class DeviceFeed:
    """Builds ``[B,3,H,W]`` float32 input batches on a device from letterboxed uint8 images.

    One pinned host buffer (CUDA) receives each batch's images; the copy to the device is
    asynchronous, then the canvas is zeroed and each image's region is set to ``pixel - mean``
    in float32 — the very operations of :func:`data.preprocess.to_input_tensor`.
    """

    def __init__(self, device: str, canvas_hw: tuple[int, int]) -> None:
        import torch

        self.torch = torch
        self.device = torch.device(device)
        self.canvas_hw = canvas_hw
        self.mean = torch.tensor(MEAN_BGR, dtype=torch.float32, device=self.device).view(3, 1, 1)
        self._host: Any = None
        self._copied: Any = None  # CUDA event: the last copy out of the host buffer is done

    def _host_buffer(self, batch: int) -> Any:
        h, w = self.canvas_hw
        if self._host is None or self._host.shape[0] < batch:
            pinned = self.device.type == "cuda"
            self._host = self.torch.empty((batch, h, w, 3), dtype=self.torch.uint8, pin_memory=pinned)
        return self._host[:batch]

    def batch(self, images: list[np.ndarray], pads: list[tuple[int, int]]) -> Any:
        """``images`` (resized uint8 HxWx3 BGR, each at most the canvas) placed at ``pads`` (top, left)."""
        torch = self.torch
        h, w = self.canvas_hw
        if self._copied is not None:
            self._copied.synchronize()  # the previous batch's copy has left the pinned buffer
        host = self._host_buffer(len(images))
        for i, img in enumerate(images):
            host[i, : img.shape[0], : img.shape[1]] = torch.from_numpy(img)
        staged = host.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            self._copied = torch.cuda.Event()
            self._copied.record()
        out = torch.zeros((len(images), 3, h, w), dtype=torch.float32, device=self.device)
        for i, (img, (top, left)) in enumerate(zip(images, pads)):
            ih, iw = img.shape[:2]
            region = staged[i, :ih, :iw].permute(2, 0, 1).to(torch.float32)
            out[i, :, top : top + ih, left : left + iw] = region - self.mean
        return out
