"""The ATSS head (mmdet ``ATSSHead``): one anchor per location, box deltas, a centerness score factor.

GN towers (convs without bias), ``Scale`` per level on the deltas, centerness from the
regression tower; decoding by ``DeltaXYWHBBoxCoder`` (stds 0.1, 0.1, 0.2, 0.2 by default).
"""

from __future__ import annotations

from torch import Tensor, nn

from fcos_offline.model.config import HeadConfig
from fcos_offline.model.heads.base import Scale, conv_branch, pred_conv, towers


class ATSSHead(nn.Module):
    """Shared-weight head; per level (cls logits, scaled deltas, centerness logits)."""

    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.cls_convs = conv_branch(cfg)
        self.reg_convs = conv_branch(cfg)
        self.atss_cls = pred_conv(cfg, cfg.num_anchors * cfg.num_classes)
        self.atss_reg = pred_conv(cfg, cfg.num_anchors * 4)
        self.atss_centerness = pred_conv(cfg, cfg.num_anchors)
        self.scales = nn.ModuleList(Scale() for _ in cfg.strides)

    def forward(self, feats: list[Tensor]) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        cls_out, reg_out, ctr_out = [], [], []
        for level, x in enumerate(feats):
            cls_feat, reg_feat = towers(self.cls_convs, self.reg_convs, x)
            cls_out.append(self.atss_cls(cls_feat))
            reg_out.append(self.scales[level](self.atss_reg(reg_feat)).float())
            ctr_out.append(self.atss_centerness(reg_feat))
        return cls_out, reg_out, ctr_out
