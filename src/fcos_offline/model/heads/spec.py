"""Head descriptions (torch-free): what the rest of the code asks instead of naming a head's tensors.

A :class:`HeadSpec` says a family's raw outputs and their layout, its score factor, its priors
and box coder, the nodes an int8 build keeps in float, the override flags it accepts and how
mmdet files name it. Export, tune, compare ``--layers``, the PyTorch engines and the CLI read it;
the offline side (compare, tune's quantizers) reads it without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class HeadSpec:
    """A head family's description (one per module in ``model.heads``)."""

    family: str  # "fcos", "retinanet", "atss": HeadConfig.family
    title: str  # how reports name it
    outputs: tuple[str, ...]  # raw outputs per level, in the network's order ("cls", "reg"[, "ctr"])
    layout: dict[str, str]  # output -> what its channels hold
    convs: dict[str, str]  # output -> the bbox_head convolution that produces it
    score_factor: str | None  # the output multiplied into the class scores (FCOS/ATSS centerness), or None
    priors: Literal["points", "anchors"]  # one point per location, or anchors (HeadConfig's generator settings)
    coder: Literal["distance", "delta_xywh"]  # l,t,r,b distances from a point, or (dx,dy,dw,dh) of an anchor
    #: ONNX node-name patterns under the head an int8 build keeps in float (per-level scales, exp, casts)
    float_nodes: tuple[str, ...] = ()
    #: ModelOverrides fields that mean something for this head (besides style/extra_on/rule/post)
    overrides: tuple[str, ...] = ()
    #: mmdet's names for its prediction convs (older spellings first are mapped to ``convs``)
    mmdet_renames: dict[str, str] = field(default_factory=dict)
    #: what an mmdet file of this family is built with when its meta config does not say
    mmdet_defaults: dict[str, Any] = field(default_factory=dict)

    @property
    def scores(self) -> tuple[str, ...]:
        """Outputs read through a sigmoid as scores (their error matters where the score is near the threshold)."""
        return tuple(o for o in self.outputs if o != "reg")

    def raw_names(self, num_levels: int) -> list[str]:
        """``cls_0, reg_0[, ctr_0], cls_1, …``: the raw outputs of a ``--no-nms`` export."""
        return [f"{kind}_{lvl}" for lvl in range(num_levels) for kind in self.outputs]


FCOS = HeadSpec(
    family="fcos",
    title="FCOS",
    outputs=("cls", "reg", "ctr"),
    layout={"cls": "[B,C,H,W] class logits", "reg": "[B,4,H,W] l,t,r,b distances in pixels", "ctr": "[B,1,H,W] centerness logit"},
    convs={"cls": "conv_cls", "reg": "conv_reg", "ctr": "conv_centerness"},
    score_factor="ctr",
    priors="points",
    coder="distance",
    float_nodes=(r"scales\.\d+/", r"Cast", r"Exp"),
    overrides=("norm_on_bbox", "centerness_on_reg"),
    mmdet_renames={"fcos_cls": "conv_cls", "fcos_reg": "conv_reg", "fcos_centerness": "conv_centerness"},
    mmdet_defaults={"style": "caffe", "relu_before_extra_convs": True},
)

RETINANET = HeadSpec(
    family="retinanet",
    title="RetinaNet",
    outputs=("cls", "reg"),
    layout={"cls": "[B,A*C,H,W] class logits per anchor", "reg": "[B,A*4,H,W] (dx,dy,dw,dh) per anchor"},
    convs={"cls": "retina_cls", "reg": "retina_reg"},
    score_factor=None,
    priors="anchors",
    coder="delta_xywh",
    mmdet_defaults={"style": "pytorch", "relu_before_extra_convs": False},
)

ATSS = HeadSpec(
    family="atss",
    title="ATSS",
    outputs=("cls", "reg", "ctr"),
    layout={"cls": "[B,A*C,H,W] class logits per anchor", "reg": "[B,A*4,H,W] (dx,dy,dw,dh) per anchor", "ctr": "[B,A,H,W] centerness logit"},
    convs={"cls": "atss_cls", "reg": "atss_reg", "ctr": "atss_centerness"},
    score_factor="ctr",
    priors="anchors",
    coder="delta_xywh",
    float_nodes=(r"scales\.\d+/", r"Cast"),
    mmdet_defaults={"style": "pytorch", "relu_before_extra_convs": False, "iou_thr": 0.6},
)

#: family name -> its description (HeadConfig.family)
SPECS: dict[str, HeadSpec] = {s.family: s for s in (FCOS, RETINANET, ATSS)}


def head_spec(family: str) -> HeadSpec:
    """The description of a head family (``fcos``, ``retinanet``, ``atss``)."""
    return SPECS[family]
