"""A whole dense detector in pure PyTorch: input adapter, ResNet, FPN and a head of one family.

Module names mirror mmdet's state-dict keys (``backbone.*``, ``neck.*``, ``bbox_head.*``), so an
mmdet checkpoint loads with at most a head rename; torchvision files are mapped onto the same
names by :mod:`fcos_offline.model.checkpoint`. ``forward`` returns the raw per-level outputs, one
list per ``HeadSpec.outputs`` entry; ``model.postprocess`` turns them into detections.
"""

from __future__ import annotations

from torch import Tensor, nn

from fcos_offline.model.backbone import ResNet, TorchvisionInput
from fcos_offline.model.config import DetectorConfig
from fcos_offline.model.heads.atss import ATSSHead
from fcos_offline.model.heads.fcos import FCOSHead
from fcos_offline.model.heads.retinanet import RetinaHead
from fcos_offline.model.neck import FPN

#: head family -> its module (HeadConfig.family; descriptions in model.heads.spec)
HEADS: dict[str, type[nn.Module]] = {"fcos": FCOSHead, "retinanet": RetinaHead, "atss": ATSSHead}


class Detector(nn.Module):
    """The detector's network; ``forward`` returns the raw per-level head outputs."""

    def __init__(self, cfg: DetectorConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.input_adapter = TorchvisionInput() if cfg.input_adapter == "torchvision" else None
        self.backbone = ResNet(cfg.backbone)
        self.neck = FPN(cfg.neck)
        self.bbox_head = HEADS[cfg.head.family](cfg.head)

    def forward(self, images: Tensor) -> tuple[list[Tensor], ...]:
        """``images [B,3,H,W]`` -> per ``HeadSpec.outputs`` entry, one tensor per level."""
        if self.input_adapter is not None:
            images = self.input_adapter(images)
        return self.bbox_head(self.neck(self.backbone(images)))
