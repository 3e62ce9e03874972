"""The RetinaNet head (mmdet ``RetinaHead``, torchvision ``RetinaNetHead``): per anchor, class logits and box deltas.

``A = len(anchor_ratios) · scales_per_octave`` anchors per location; channels are anchor-major
(``retina_cls``: ``A·C``, ``retina_reg``: ``A·4``), sigmoid classification, no score factor.
"""

from __future__ import annotations

from torch import Tensor, nn

from fcos_offline.model.config import HeadConfig
from fcos_offline.model.heads.base import conv_branch, pred_conv, towers


class RetinaHead(nn.Module):
    """Shared-weight head; per level (cls logits ``[B,A*C,H,W]``, deltas ``[B,A*4,H,W]``)."""

    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.cls_convs = conv_branch(cfg)
        self.reg_convs = conv_branch(cfg)
        self.retina_cls = pred_conv(cfg, cfg.num_anchors * cfg.num_classes)
        self.retina_reg = pred_conv(cfg, cfg.num_anchors * 4)

    def forward(self, feats: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        cls_out, reg_out = [], []
        for x in feats:
            cls_feat, reg_feat = towers(self.cls_convs, self.reg_convs, x)
            cls_out.append(self.retina_cls(cls_feat))
            reg_out.append(self.retina_reg(reg_feat))
        return cls_out, reg_out
