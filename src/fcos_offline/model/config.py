"""FCOS architecture and test-time settings as plain dataclasses.

Every number that a checkpoint's tensor shapes can tell is filled in by
``fcos_offline.model.checkpoint``; the rest (style, bbox encoding, centerness branch, the
post-processing rule) comes from the checkpoint's ``meta`` config text, documented per-format
defaults, or explicit overrides.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal

Style = Literal["caffe", "pytorch"]
BlockType = Literal["bottleneck", "basic"]
PostRule = Literal["mmdet2", "mmdet218", "mmdet3", "torchvision"]
PointRule = Literal["mmdet2", "mmdet3", "torchvision"]
BNImpl = Literal["mmdet", "torchvision"]
InputAdapter = Literal["none", "torchvision"]

POST_RULES: tuple[str, ...] = ("mmdet2", "mmdet218", "mmdet3", "torchvision")
"""``mmdet2``: spec §7.2 (mmdet 2.x < 2.18, the recipe's online reference);
``mmdet218``: spec §7.3 as mmdet 2.18–2.x does it; ``mmdet3``: §7.3 with v3's drop of boxes
with w <= 0 or h <= 0; ``torchvision``: spec §10."""


@dataclass
class BackboneConfig:
    """ResNet: stem conv, then stages of residual blocks (C2..C5)."""

    stage_blocks: tuple[int, ...] = (3, 4, 6, 3)
    stage_planes: tuple[int, ...] = (64, 128, 256, 512)
    stage_out_channels: tuple[int, ...] = (256, 512, 1024, 2048)
    stem_channels: int = 64
    block: BlockType = "bottleneck"
    style: Style = "caffe"
    bn_impl: BNImpl = "mmdet"
    bn_eps: float = 1e-5


@dataclass
class NeckConfig:
    """FPN over backbone stages ``start_level``.. plus stride-2 extra levels."""

    in_channels: tuple[int, ...] = (512, 1024, 2048)
    out_channels: int = 256
    start_level: int = 1
    num_outs: int = 5
    extra_on: Literal["output", "input"] = "output"
    relu_before_extra: bool = True


@dataclass
class HeadConfig:
    """FCOS head: stacked convs per branch, then cls / reg / centerness convs."""

    num_classes: int = 80
    in_channels: int = 256
    feat_channels: int = 256
    stacked_convs: int = 4
    norm: Literal["none", "gn"] = "none"
    gn_groups: int = 32
    conv_bias: bool = True
    strides: tuple[int, ...] = (8, 16, 32, 64, 128)
    use_scale: bool = True
    norm_on_bbox: bool = False
    centerness_on_reg: bool = False


@dataclass
class PostConfig:
    """Test-time post-processing (spec §7 / §10)."""

    rule: PostRule = "mmdet2"
    points: PointRule = "mmdet2"
    nms_pre: int = 1000
    score_thr: float = 0.05
    iou_thr: float = 0.5
    max_per_img: int = 100


@dataclass
class FCOSConfig:
    """A whole FCOS detector."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    neck: NeckConfig = field(default_factory=NeckConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    post: PostConfig = field(default_factory=PostConfig)
    input_adapter: InputAdapter = "none"

    def to_dict(self) -> dict:
        """Plain-JSON view (for inspect, reports, ONNX metadata)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> FCOSConfig:
        """Inverse of :meth:`to_dict` (lists become tuples)."""

        def _tuples(d: dict) -> dict:
            return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}

        return cls(
            backbone=BackboneConfig(**_tuples(data["backbone"])),
            neck=NeckConfig(**_tuples(data["neck"])),
            head=HeadConfig(**_tuples(data["head"])),
            post=PostConfig(**_tuples(data["post"])),
            input_adapter=data.get("input_adapter", "none"),
        )


def default_post_config(rule: PostRule) -> PostConfig:
    """The published test-time defaults of each rule."""
    if rule == "torchvision":
        return PostConfig(rule="torchvision", points="torchvision", nms_pre=1000, score_thr=0.2, iou_thr=0.6)
    if rule in ("mmdet218", "mmdet3"):
        return PostConfig(rule=rule, points="mmdet3")
    return PostConfig(rule="mmdet2", points="mmdet2")
