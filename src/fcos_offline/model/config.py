"""Dense-detector architecture and test-time settings as plain dataclasses.

One detector is a ResNet backbone, an FPN neck and a dense head of one family (FCOS, RetinaNet,
ATSS: ``fcos_offline.model.heads``). Every number that a checkpoint's tensor shapes can tell is
filled in by ``fcos_offline.model.checkpoint``; the rest (style, bbox encoding, centerness
branch, anchor settings, the post-processing rule) comes from the checkpoint's ``meta`` config
text, the head family's documented defaults, or explicit overrides.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Literal

from fcos_offline.model.heads.spec import head_spec

Style = Literal["caffe", "pytorch"]
BlockType = Literal["bottleneck", "basic"]
PostRule = Literal["mmdet2", "mmdet218", "mmdet3", "torchvision"]
PointRule = Literal["mmdet2", "mmdet3", "torchvision"]
BNImpl = Literal["mmdet", "torchvision"]
InputAdapter = Literal["none", "torchvision"]
Family = Literal["fcos", "retinanet", "atss"]

FAMILIES: tuple[str, ...] = ("fcos", "retinanet", "atss")
POST_RULES: tuple[str, ...] = ("mmdet2", "mmdet218", "mmdet3", "torchvision")
"""``mmdet2``: spec §7.2 (mmdet 2.x < 2.18, the recipe's online reference);
``mmdet218``: spec §7.3 as mmdet 2.18–2.x does it; ``mmdet3``: §7.3 with v3's drop of boxes
with w <= 0 or h <= 0; ``torchvision``: spec §10. The same rules serve every head family
(without a score factor, S·c reads S)."""


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
    """A dense head: stacked convs per branch, then its prediction convs (see ``model.heads``).

    ``norm_on_bbox`` and ``centerness_on_reg`` are FCOS's; the anchor and box-coder settings
    are RetinaNet's and ATSS's (mmdet ``AnchorGenerator`` / ``DeltaXYWHBBoxCoder``: anchors of
    ``octave_base_scale · 2^(i / scales_per_octave) · stride`` for every ratio).
    """

    family: Family = "fcos"
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
    pred_kernel: int = 3
    octave_base_scale: int = 4
    scales_per_octave: int = 3
    anchor_ratios: tuple[float, ...] = (0.5, 1.0, 2.0)
    target_means: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0)
    target_stds: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)

    @property
    def num_anchors(self) -> int:
        """Priors per feature-map location (1 for point heads)."""
        return 1 if head_spec(self.family).priors == "points" else len(self.anchor_ratios) * self.scales_per_octave


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
class DetectorConfig:
    """A whole dense detector."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    neck: NeckConfig = field(default_factory=NeckConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    post: PostConfig = field(default_factory=PostConfig)
    input_adapter: InputAdapter = "none"

    def to_dict(self) -> dict:
        """Plain-JSON view (for inspect, reports, ONNX metadata)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> DetectorConfig:
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


@dataclass(frozen=True)
class Range:
    """The values a setting may take: ``kind`` (int or float) in ``[low, high]`` (``(low, high]`` if ``low_open``)."""

    kind: type
    low: float | None = None
    high: float | None = None
    low_open: bool = False

    def describe(self) -> str:
        """``must be >= 1 and <= 100000``."""
        lo = "" if self.low is None else (f"> {self.low:g}" if self.low_open else f">= {self.low:g}")
        hi = "" if self.high is None else f"<= {self.high:g}"
        return "must be " + " and ".join(x for x in (lo, hi) if x)

    def problem(self, value: object) -> str | None:
        """Why ``value`` is not allowed (its type or range), or None when it is."""
        kinds = (int,) if self.kind is int else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds):
            return f"must be {'an integer' if self.kind is int else 'a number'}, got {value!r}"
        if isinstance(value, float) and math.isnan(value):
            return "must be a number, got NaN"
        too_low = self.low is not None and (value <= self.low if self.low_open else value < self.low)
        too_high = self.high is not None and value > self.high
        return f"{self.describe()}, got {value!r}" if too_low or too_high else None


#: the one table of allowed post-processing values: the CLI flags, checkpoint meta and artifact.json all use it
POST_RANGES: dict[str, Range] = {
    "score_thr": Range(float, 0.0, 1.0),
    "nms_pre": Range(int, 1, 1_000_000),
    "iou_thr": Range(float, 0.0, 1.0, low_open=True),
    "max_per_img": Range(int, 1, 100_000),
}
#: a feature level's stride (in input pixels)
STRIDE_RANGE = Range(int, 1, 4096)


def check_config(config: DetectorConfig) -> None:
    """Raise ValueError naming the first out-of-range setting (``post.iou_thr must be > 0 and <= 1, got -3``)."""
    for name, allowed in POST_RANGES.items():
        if (why := allowed.problem(getattr(config.post, name))) is not None:
            raise ValueError(f"post.{name} {why}")
    strides = config.head.strides
    if not isinstance(strides, tuple) or len(strides) != config.neck.num_outs:
        raise ValueError(f"head.strides must list one stride per FPN level ({config.neck.num_outs}), got {strides!r}")
    for s in strides:
        if (why := STRIDE_RANGE.problem(s)) is not None:
            raise ValueError(f"head.strides {why}")
    if list(strides) != sorted(set(strides)):
        raise ValueError(f"head.strides must increase level by level, got {list(strides)}")
    if config.head.family not in FAMILIES:
        raise ValueError(f"head.family must be one of {', '.join(FAMILIES)}, got {config.head.family!r}")
    if config.post.rule not in POST_RULES:
        raise ValueError(f"post.rule must be one of {', '.join(POST_RULES)}, got {config.post.rule!r}")


def default_post_config(rule: PostRule, family: str = "fcos") -> PostConfig:
    """The published test-time defaults of each rule (torchvision's differ by model)."""
    if rule == "torchvision" and family == "retinanet":
        return PostConfig(rule="torchvision", points="torchvision", nms_pre=1000, score_thr=0.05, iou_thr=0.5, max_per_img=300)
    if rule == "torchvision":
        return PostConfig(rule="torchvision", points="torchvision", nms_pre=1000, score_thr=0.2, iou_thr=0.6)
    if rule in ("mmdet218", "mmdet3"):
        return PostConfig(rule=rule, points="mmdet3")
    return PostConfig(rule="mmdet2", points="mmdet2")
