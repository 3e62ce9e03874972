"""The FCOS head (spec §4): per point, class logits, l,t,r,b distances in pixels, a centerness logit."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from fcos_offline.model.config import HeadConfig
from fcos_offline.model.heads.base import Scale, conv_branch, pred_conv, towers


class FCOSHead(nn.Module):
    """Shared-weight head; per level (cls logits, box distances in pixels, centerness logit)."""

    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.cls_convs = conv_branch(cfg)
        self.reg_convs = conv_branch(cfg)
        self.conv_cls = pred_conv(cfg, cfg.num_classes)
        self.conv_reg = pred_conv(cfg, 4)
        self.conv_centerness = pred_conv(cfg, 1)
        self.scales = nn.ModuleList(Scale() for _ in cfg.strides) if cfg.use_scale else None

    def forward_level(self, x: Tensor, level: int) -> tuple[Tensor, Tensor, Tensor]:
        """``x [B,C,H,W]`` -> cls ``[B,K,H,W]``, distances ``[B,4,H,W]`` (l,t,r,b px), ctr ``[B,1,H,W]``."""
        cls_feat, reg_feat = towers(self.cls_convs, self.reg_convs, x)
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
