"""mmdet's FPN neck and the mmcv-style conv block every neck and head uses (pure PyTorch).

Maths: ``shared/spec/fcos-reference.md`` §3. Module names mirror mmdet's state-dict keys
(``neck.lateral_convs.0.conv``, ``neck.fpn_convs.3.conv``).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from fcos_offline.model.config import NeckConfig


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
