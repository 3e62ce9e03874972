"""The layers every dense head builds from: conv towers, prediction convs, ``Scale``."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fcos_offline.model.config import HeadConfig
from fcos_offline.model.neck import ConvModule


class Scale(nn.Module):
    """A learnable scalar per level (``scales.{l}.scale``)."""

    def __init__(self, value: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(value, dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


def conv_branch(cfg: HeadConfig) -> nn.ModuleList:
    """``stacked_convs`` × (3x3 conv [→ GroupNorm] → ReLU): a head's cls or reg tower (``cls_convs.{i}``)."""
    groups = cfg.gn_groups if cfg.norm == "gn" else 0
    return nn.ModuleList(
        ConvModule(cfg.in_channels if i == 0 else cfg.feat_channels, cfg.feat_channels, 3, bias=cfg.conv_bias, gn_groups=groups, relu=True)
        for i in range(cfg.stacked_convs)
    )


def pred_conv(cfg: HeadConfig, out_channels: int) -> nn.Conv2d:
    """A prediction conv (``pred_kernel`` square, same padding, with bias)."""
    return nn.Conv2d(cfg.feat_channels, out_channels, cfg.pred_kernel, padding=cfg.pred_kernel // 2)


def towers(branch_cls: nn.ModuleList, branch_reg: nn.ModuleList, x: Tensor) -> tuple[Tensor, Tensor]:
    """Both towers on one level's feature map."""
    cls_feat = x
    for conv in branch_cls:
        cls_feat = conv(cls_feat)
    reg_feat = x
    for conv in branch_reg:
        reg_feat = conv(reg_feat)
    return cls_feat, reg_feat
