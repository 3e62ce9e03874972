#!/usr/bin/env python3
"""Run the torchvision parity test on a CPU machine, where installing torchvision would pull a CUDA torch.

torchvision's FCOS is pure Python apart from NMS. This loads the wheel's Python code without its C++
ops (whose build does not match a CPU torch) and defines ``torchvision::nms`` here in Python
(greedy, IoU > threshold suppressed, highest score first), then runs pytest::

    pip download torchvision==0.28.0 --no-deps -d /tmp/tvw      # the release that pairs with torch 2.13
    python -c "import zipfile, glob; zipfile.ZipFile(glob.glob('/tmp/tvw/*.whl')[0]).extractall('/tmp/tvpkg')"
    PYTHONPATH=/tmp/tvpkg python tools/torchvision_shim.py tests/test_gpu.py -k torchvision

On a machine with a working torchvision (the GPU machine) run pytest directly instead.
"""

from __future__ import annotations

import sys
import types

import torch


def greedy_nms(dets: torch.Tensor, scores: torch.Tensor, iou_threshold: float, offset: int = 0) -> torch.Tensor:
    """Kept indices, highest score first; IoU > threshold suppressed (``offset`` 1: mmcv's legacy +1 widths)."""
    order = scores.argsort(descending=True)
    x1, y1, x2, y2 = dets.unbind(1)
    area = (x2 - x1 + offset) * (y2 - y1 + offset)
    suppressed = torch.zeros(len(order), dtype=torch.bool)
    keep = []
    for pos, i in enumerate(order.tolist()):
        if suppressed[pos]:
            continue
        keep.append(i)
        rest = order[pos + 1 :]
        w = (torch.minimum(x2[i], x2[rest]) - torch.maximum(x1[i], x1[rest]) + offset).clamp(min=0)
        h = (torch.minimum(y2[i], y2[rest]) - torch.maximum(y1[i], y1[rest]) + offset).clamp(min=0)
        inter = w * h
        suppressed[pos + 1 :] |= inter / (area[i] + area[rest] - inter) > iou_threshold
    return torch.tensor(keep, dtype=torch.int64)


def install() -> None:
    """Make ``import torchvision`` work without its C++ ops (NMS in Python, no meta kernels)."""
    sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.impl("nms", greedy_nms, "CPU")
    install.lib = lib  # type: ignore[attr-defined]  # the registration lives as long as this object
    import torchvision.extension
    import torchvision.ops.boxes

    torchvision.extension._assert_has_ops = lambda: None
    torchvision.ops.boxes._assert_has_ops = lambda: None


if __name__ == "__main__":
    import pytest

    install()
    sys.exit(pytest.main(["-p", "no:cacheprovider", *sys.argv[1:]]))
