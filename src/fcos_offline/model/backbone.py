"""The ResNet backbone (mmdet's module names) and torchvision's input adapter, in pure PyTorch.

No mmcv, mmdet or torchvision import: the maths follows ``shared/spec/fcos-reference.md`` §2.
Module names mirror mmdet's state-dict keys (``backbone.layer1.0.conv1``…); torchvision files are
mapped onto the same names by :mod:`fcos_offline.model.checkpoint`.

Shapes: images ``[B, 3, H, W]``; stage outputs C2..C5 ``[B, ch, H/4…H/32, W/4…W/32]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fcos_offline.model.config import BackboneConfig


class FrozenBatchNorm2d(nn.Module):
    """Inference-only BatchNorm with mmdet's (textbook) or torchvision's arithmetic order."""

    weight: Tensor
    bias: Tensor
    running_mean: Tensor
    running_var: Tensor

    def __init__(self, channels: int, eps: float = 1e-5, impl: str = "mmdet") -> None:
        super().__init__()
        self.eps = eps
        self.impl = impl
        self.register_buffer("weight", torch.ones(channels))
        self.register_buffer("bias", torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        if self.impl == "torchvision":
            scale = self.weight * (self.running_var + self.eps).rsqrt()
            shift = self.bias - self.running_mean * scale
            return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


def _bn(channels: int, cfg: BackboneConfig) -> FrozenBatchNorm2d:
    return FrozenBatchNorm2d(channels, cfg.bn_eps, cfg.bn_impl)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 -> 1x1 residual block; caffe style strides the 1x1, pytorch style the 3x3."""

    def __init__(self, in_ch: int, planes: int, out_ch: int, stride: int, cfg: BackboneConfig) -> None:
        super().__init__()
        s1, s2 = (stride, 1) if cfg.style == "caffe" else (1, stride)
        self.conv1 = nn.Conv2d(in_ch, planes, 1, s1, bias=False)
        self.bn1 = _bn(planes, cfg)
        self.conv2 = nn.Conv2d(planes, planes, 3, s2, 1, bias=False)
        self.bn2 = _bn(planes, cfg)
        self.conv3 = nn.Conv2d(planes, out_ch, 1, bias=False)
        self.bn3 = _bn(out_ch, cfg)
        self.downsample = _downsample(in_ch, out_ch, stride, cfg)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class BasicBlock(nn.Module):
    """3x3 -> 3x3 residual block (ResNet-18/34)."""

    def __init__(self, in_ch: int, planes: int, out_ch: int, stride: int, cfg: BackboneConfig) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, planes, 3, stride, 1, bias=False)
        self.bn1 = _bn(planes, cfg)
        self.conv2 = nn.Conv2d(planes, out_ch, 3, 1, 1, bias=False)
        self.bn2 = _bn(out_ch, cfg)
        self.downsample = _downsample(in_ch, out_ch, stride, cfg)

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


def _downsample(in_ch: int, out_ch: int, stride: int, cfg: BackboneConfig) -> nn.Sequential | None:
    if stride == 1 and in_ch == out_ch:
        return None
    return nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), _bn(out_ch, cfg))


class ResNet(nn.Module):
    """Stem (7x7 s2 conv, BN, ReLU, 3x3 s2 max-pool) and stages; returns C2..C5."""

    def __init__(self, cfg: BackboneConfig) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, cfg.stem_channels, 7, 2, 3, bias=False)
        self.bn1 = _bn(cfg.stem_channels, cfg)
        block_cls = Bottleneck if cfg.block == "bottleneck" else BasicBlock
        in_ch = cfg.stem_channels
        self.stage_names: list[str] = []
        for i, (n_blocks, planes, out_ch) in enumerate(zip(cfg.stage_blocks, cfg.stage_planes, cfg.stage_out_channels)):
            stride = 1 if i == 0 else 2
            blocks = [block_cls(in_ch if b == 0 else out_ch, planes, out_ch, stride if b == 0 else 1, cfg) for b in range(n_blocks)]
            name = f"layer{i + 1}"
            self.add_module(name, nn.Sequential(*blocks))
            self.stage_names.append(name)
            in_ch = out_ch

    def forward(self, x: Tensor) -> list[Tensor]:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)
        outs = []
        for name in self.stage_names:
            x = getattr(self, name)(x)
            outs.append(x)
        return outs


class TorchvisionInput(nn.Module):
    """Maps the recipe's BGR caffe-mean input to torchvision's RGB ImageNet-normalised input.

    Then pads it with zeros bottom/right to multiples of 32 as torchvision's transform does (spec
    §10), so the feature maps have torchvision's sizes (800x1333 -> 800x1344).
    """

    mul: Tensor
    add: Tensor

    def __init__(self) -> None:
        super().__init__()
        caffe_mean_bgr = torch.tensor([102.9801, 115.9465, 122.7717])
        mean_rgb = torch.tensor([0.485, 0.456, 0.406])
        std_rgb = torch.tensor([0.229, 0.224, 0.225])
        # rgb = (bgr_flipped + caffe_mean_rgb) / 255; out = (rgb - mean) / std
        self.register_buffer("mul", (1.0 / (255.0 * std_rgb)).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("add", ((caffe_mean_bgr.flip(0) / 255.0 - mean_rgb) / std_rgb).reshape(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        h, w = int(x.shape[2]), int(x.shape[3])
        return F.pad(x.flip(1) * self.mul + self.add, (0, -w % 32, 0, -h % 32))
