"""A pure-PyTorch FCOS (ResNet + FPN + FCOS head) whose module names follow mmdetection's.

No mmcv, mmdet or torchvision import: the maths follows ``shared/spec/fcos-reference.md``
§2–§4. Module names mirror mmdet's state-dict keys (``backbone.layer1.0.conv1``,
``neck.lateral_convs.0.conv``, ``bbox_head.cls_convs.0.conv``, ``bbox_head.conv_cls``…), so
an mmdet checkpoint loads with at most a head rename; torchvision files are mapped onto the same
names by :mod:`fcos_offline.model.checkpoint`.

Shapes: images ``[B, 3, H, W]``; level ``l`` feature maps ``[B, ch, H_l, W_l]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fcos_offline.model.config import BackboneConfig, FCOSConfig, HeadConfig, NeckConfig


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


class ConvModule(nn.Module):
    """mmcv-style conv -> optional GroupNorm -> optional ReLU (keys ``conv.*``, ``gn.*``)."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int,
        stride: int = 1,
        *,
        bias: bool = True,
        gn_groups: int = 0,
        relu: bool = False,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, bias=bias)
        self.gn = nn.GroupNorm(gn_groups, out_ch, eps=1e-5) if gn_groups else None
        self.relu = relu

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv(x)
        if self.gn is not None:
            x = self.gn(x)
        return F.relu(x) if self.relu else x


class FPN(nn.Module):
    """mmdet FPN: 1x1 laterals, size-based nearest top-down, 3x3 outputs, stride-2 extras."""

    def __init__(self, cfg: NeckConfig) -> None:
        super().__init__()
        self.cfg = cfg
        n_lat = len(cfg.in_channels)
        self.lateral_convs = nn.ModuleList(ConvModule(c, cfg.out_channels, 1) for c in cfg.in_channels)
        convs = [ConvModule(cfg.out_channels, cfg.out_channels, 3) for _ in range(n_lat)]
        for i in range(cfg.num_outs - n_lat):
            in_ch = cfg.in_channels[-1] if (i == 0 and cfg.extra_on == "input") else cfg.out_channels
            convs.append(ConvModule(in_ch, cfg.out_channels, 3, 2))
        self.fpn_convs = nn.ModuleList(convs)

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        inputs = feats[self.cfg.start_level : self.cfg.start_level + len(self.lateral_convs)]
        laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:], mode="nearest")
        outs = [self.fpn_convs[i](lat) for i, lat in enumerate(laterals)]
        for i in range(len(laterals), self.cfg.num_outs):
            if i == len(laterals):
                src = inputs[-1] if self.cfg.extra_on == "input" else outs[-1]
            else:
                src = F.relu(outs[-1]) if self.cfg.relu_before_extra else outs[-1]
            outs.append(self.fpn_convs[i](src))
        return outs


class Scale(nn.Module):
    """A learnable scalar per level (``scales.{l}.scale``)."""

    def __init__(self, value: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(value, dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


class FCOSHead(nn.Module):
    """Shared-weight head; per level returns (cls logits, box distances in pixels, centerness logit)."""

    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        self.cfg = cfg
        groups = cfg.gn_groups if cfg.norm == "gn" else 0

        def branch() -> nn.ModuleList:
            return nn.ModuleList(
                ConvModule(cfg.in_channels if i == 0 else cfg.feat_channels, cfg.feat_channels, 3, bias=cfg.conv_bias, gn_groups=groups, relu=True)
                for i in range(cfg.stacked_convs)
            )

        self.cls_convs = branch()
        self.reg_convs = branch()
        self.conv_cls = nn.Conv2d(cfg.feat_channels, cfg.num_classes, 3, padding=1)
        self.conv_reg = nn.Conv2d(cfg.feat_channels, 4, 3, padding=1)
        self.conv_centerness = nn.Conv2d(cfg.feat_channels, 1, 3, padding=1)
        self.scales = nn.ModuleList(Scale() for _ in cfg.strides) if cfg.use_scale else None

    def forward_level(self, x: Tensor, level: int) -> tuple[Tensor, Tensor, Tensor]:
        """``x [B,C,H,W]`` -> cls ``[B,K,H,W]``, distances ``[B,4,H,W]`` (l,t,r,b px), ctr ``[B,1,H,W]``."""
        cls_feat = x
        for conv in self.cls_convs:
            cls_feat = conv(cls_feat)
        reg_feat = x
        for conv in self.reg_convs:
            reg_feat = conv(reg_feat)
        cls_logits = self.conv_cls(cls_feat)
        ctr_logits = self.conv_centerness(reg_feat if self.cfg.centerness_on_reg else cls_feat)
        reg = self.conv_reg(reg_feat)
        if self.scales is not None:
            reg = self.scales[level](reg)
        reg = reg.float()
        if self.cfg.norm_on_bbox:
            dist = F.relu(reg) * self.cfg.strides[level]
        else:
            dist = reg.exp()
        return cls_logits, dist, ctr_logits

    def forward(self, feats: list[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        outs = [self.forward_level(x, i) for i, x in enumerate(feats)]
        return [o[0] for o in outs], [o[1] for o in outs], [o[2] for o in outs]


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


class FCOS(nn.Module):
    """The detector's network; ``forward`` returns the raw per-level head outputs."""

    def __init__(self, cfg: FCOSConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.input_adapter = TorchvisionInput() if cfg.input_adapter == "torchvision" else None
        self.backbone = ResNet(cfg.backbone)
        self.neck = FPN(cfg.neck)
        self.bbox_head = FCOSHead(cfg.head)

    def forward(self, images: Tensor) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """``images [B,3,H,W]`` -> per level (cls logits, distances px, centerness logits)."""
        if self.input_adapter is not None:
            images = self.input_adapter(images)
        return self.bbox_head(self.neck(self.backbone(images)))
