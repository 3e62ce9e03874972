"""Load mmdetection (v1/v2/v3) and torchvision dense-detector checkpoints without mmcv, mmdet or torchvision.

Families: FCOS (mmdet, torchvision), RetinaNet (mmdet, torchvision v1/v2), ATSS (mmdet),
recognised by their head's key names (``model.heads.spec``). Every architecture number is read
from tensor shapes (anchors per location included). What shapes cannot tell (ResNet style,
``norm_on_bbox``, the centerness branch, ReLU before P7, anchor scales and ratios, box-coder
stds, test settings) comes, in order of precedence, from explicit overrides, the checkpoint's
``meta`` config text, then these documented per-format defaults:

=============  ======================================  ==========================
setting        mmdet default                           torchvision (fixed)
=============  ======================================  ==========================
style          FCOS caffe (the model-zoo files);       pytorch
               RetinaNet, ATSS pytorch
norm_on_bbox   False (exp)                             True (ReLU · anchor size)
centerness     cls branch (FCOS)                       reg branch
FPN extras     source from shapes (P5 output or C5);   source from shapes; ReLU
               ReLU before P7: FCOS yes, others no     before P7
anchors        RetinaNet 4·2^(i/3), ratios .5/1/2;     RetinaNet sizes 32,40,50 ·
               ATSS 8, ratio 1; stds 1 / .1,.1,.2,.2   2^l, ratios .5/1/2
backbone BN    BatchNorm (textbook order)              frozen BN (FCOS; RetinaNet v1
                                                       weights: eps 0); RetinaNet
                                                       files with num_batches_tracked
                                                       (v2): BatchNorm2d
post rule      by meta mmdet_version: none/1.x/<2.18 ->   torchvision (spec §10)
               mmdet2 (§7.2), 2.18+ -> mmdet218, 3.x ->
               mmdet3 (§7.3)
=============  ======================================  ==========================

Files are read by ``model.safe_load`` (``weights_only``, no pickled code ever runs) and their
``meta`` by ``model.meta``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast

from fcos_offline.errors import BadFileError, FcosError, UsageError, first_line
from fcos_offline.model.config import (
    POST_RANGES,
    POST_RULES,
    BackboneConfig,
    DetectorConfig,
    HeadConfig,
    InputAdapter,
    NeckConfig,
    PostConfig,
    default_post_config,
)
from fcos_offline.model.heads.spec import SPECS, HeadSpec, head_spec
from fcos_offline.model.meta import mmdet_version, rule_for_version, settings_from_meta
from fcos_offline.model.safe_load import read_checkpoint_file

#: mmdet detector types whose heads share a served family's key names but not its maths
_LOOKALIKES = {"FSAF": "retinanet", "FreeAnchor": "retinanet", "PAA": "atss", "AutoAssign": "fcos", "NASFCOS": "fcos"}
#: what an anchor head is built with when its meta config does not say (mmdet's published configs)
ANCHOR_DEFAULTS: dict[str, dict[str, Any]] = {
    "retinanet": {"octave_base_scale": 4, "scales_per_octave": 3, "anchor_ratios": (0.5, 1.0, 2.0), "target_stds": (1.0, 1.0, 1.0, 1.0)},
    "atss": {"octave_base_scale": 8, "scales_per_octave": 1, "anchor_ratios": (1.0,), "target_stds": (0.1, 0.1, 0.2, 0.2)},
}


@dataclass
class ModelOverrides:
    """Settings that tensor shapes cannot tell; ``None`` keeps meta/default."""

    style: str | None = None
    norm_on_bbox: bool | None = None
    centerness_on_reg: bool | None = None
    extra_on: str | None = None
    rule: str | None = None
    score_thr: float | None = None
    nms_pre: int | None = None
    iou_thr: float | None = None
    max_per_img: int | None = None


@dataclass
class LoadedCheckpoint:
    """A checkpoint mapped onto :class:`~fcos_offline.model.detector.Detector` names, with its config."""

    path: str
    format: str
    config: DetectorConfig
    state_dict: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)
    class_names: list[str] | None = None
    ignored_objects: list[str] = field(default_factory=list)

    @property
    def num_params(self) -> int:
        """Parameters as the source framework counts them: BN running stats never; frozen-BN
        weight/bias not for torchvision files (buffers there), but for mmdet files (parameters)."""
        frozen_bn = re.compile(r"^backbone\..*(\.bn\d+|bn1|\.downsample\.1)\.(weight|bias)$")
        buffers = self.format == "torchvision" and self.config.backbone.bn_impl == "torchvision"
        return sum(
            int(t.numel())
            for k, t in self.state_dict.items()
            if not k.endswith(("running_mean", "running_var")) and not (buffers and frozen_bn.match(k))
        )


# --------------------------------------------------------------------------- key layouts


def _strip_prefix(sd: dict[str, Any]) -> dict[str, Any]:
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _map_torchvision(sd: dict[str, Any], family: str) -> dict[str, Any]:
    """torchvision FCOS / RetinaNet keys -> our (mmdet-style) module names."""
    out: dict[str, Any] = {}
    convs = head_spec(family).convs
    n_lat = len({k.split(".")[3] for k in sd if k.startswith("backbone.fpn.inner_blocks.")})
    for key, value in sd.items():
        if key.endswith("num_batches_tracked"):  # BN training counters: torchvision's FrozenBatchNorm2d drops them too
            continue
        new = key
        if key.startswith("backbone.body."):
            new = "backbone." + key[len("backbone.body.") :]
        elif m := re.match(r"backbone\.fpn\.inner_blocks\.(\d+)\.(?:0\.)?(weight|bias)$", key):
            new = f"neck.lateral_convs.{m[1]}.conv.{m[2]}"
        elif m := re.match(r"backbone\.fpn\.layer_blocks\.(\d+)\.(?:0\.)?(weight|bias)$", key):
            new = f"neck.fpn_convs.{m[1]}.conv.{m[2]}"
        elif m := re.match(r"backbone\.fpn\.extra_blocks\.p(\d+)\.(weight|bias)$", key):
            new = f"neck.fpn_convs.{n_lat + int(m[1]) - 6}.conv.{m[2]}"
        elif m := re.match(r"head\.(classification|regression)_head\.conv\.(\d+)\.(\d+)\.(weight|bias)$", key):
            # RetinaNet (torchvision >= 0.13): Conv2dNormActivation blocks, .0 conv, .1 GroupNorm (v2)
            branch = "cls_convs" if m[1] == "classification" else "reg_convs"
            new = f"bbox_head.{branch}.{m[2]}.{'conv' if m[3] == '0' else 'gn'}.{m[4]}"
        elif m := re.match(r"head\.(classification|regression)_head\.conv\.(\d+)\.(weight|bias)$", key):
            # flat Sequentials: FCOS (conv, GN, ReLU) x 4; RetinaNet before 0.13 (conv, ReLU) x 4
            branch = "cls_convs" if m[1] == "classification" else "reg_convs"
            idx, per_block = int(m[2]), 3 if family == "fcos" else 2
            new = f"bbox_head.{branch}.{idx // per_block}.{'conv' if idx % per_block == 0 else 'gn'}.{m[3]}"
        elif m := re.match(r"head\.classification_head\.cls_logits\.(weight|bias)$", key):
            new = f"bbox_head.{convs['cls']}.{m[1]}"
        elif m := re.match(r"head\.regression_head\.bbox_reg\.(weight|bias)$", key):
            new = f"bbox_head.{convs['reg']}.{m[1]}"
        elif m := re.match(r"head\.regression_head\.bbox_ctrness\.(weight|bias)$", key):
            new = f"bbox_head.{convs['ctr']}.{m[1]}"
        out[new] = value
    return out


def _map_mmdet(sd: dict[str, Any], spec: HeadSpec) -> dict[str, Any]:
    """mmdet's older head names (v1 ``fcos_*``) -> today's; drop BN ``num_batches_tracked``."""
    out: dict[str, Any] = {}
    for key, value in sd.items():
        if key.endswith("num_batches_tracked"):
            continue
        for old, new in spec.mmdet_renames.items():
            if key.startswith(f"bbox_head.{old}."):
                key = f"bbox_head.{new}." + key[len(f"bbox_head.{old}.") :]
        out[key] = value
    return out


def detect_format(sd: dict[str, Any]) -> tuple[str, str]:
    """(``'mmdet'`` or ``'torchvision'``, head family) from key names; a clear error otherwise."""
    keys = list(sd)
    if any(k.startswith("backbone.body.") for k in keys) and any(k.startswith("head.") for k in keys):
        if any(k.startswith("head.regression_head.bbox_ctrness.") for k in keys):
            return "torchvision", "fcos"
        if any(k.startswith("head.classification_head.cls_logits.") for k in keys):
            return "torchvision", "retinanet"
        raise FcosError("a torchvision detector whose head is neither FCOS nor RetinaNet (no bbox_ctrness or cls_logits keys)")
    if any(k.startswith("bbox_head.") for k in keys) and any(k.startswith("backbone.") for k in keys):
        for spec in SPECS.values():
            names = {*spec.convs.values(), *spec.mmdet_renames}
            if any(k.split(".")[1] in names for k in keys if k.startswith("bbox_head.")):
                return "mmdet", spec.family
        head = sorted({k.split(".")[1] for k in keys if k.startswith("bbox_head.")})
        raise FcosError(f"an mmdet detector whose head ({', '.join(head[:6])}) is not one served here ({', '.join(SPECS)})")
    sample = ", ".join(keys[:5]) or "(no tensors)"
    raise FcosError(
        f"not a dense-detector checkpoint: expected mmdet 'backbone./neck./bbox_head.' or torchvision 'backbone.body./head.' keys, found: {sample}"
    )


# --------------------------------------------------------------------------- shapes -> config


def _shape(sd: dict[str, Any], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise FcosError(f"checkpoint lacks '{key}', which this detector needs")
    return tuple(sd[key].shape)


def _count(sd: dict[str, Any], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in sd if (m := rx.match(k))})


def infer_architecture(sd: dict[str, Any], family: str = "fcos") -> tuple[BackboneConfig, NeckConfig, HeadConfig]:
    """Every number the tensors' shapes tell (mapped key names) for a head of ``family``."""
    stem = _shape(sd, "backbone.conv1.weight")[0]
    n_stages = _count(sd, r"backbone\.layer(\d+)\.")
    if n_stages == 0:
        raise FcosError("checkpoint has no ResNet stages (backbone.layer1...)")
    bottleneck = "backbone.layer1.0.conv3.weight" in sd
    blocks, planes, outs = [], [], []
    for s in range(1, n_stages + 1):
        blocks.append(_count(sd, rf"backbone\.layer{s}\.(\d+)\."))
        planes.append(_shape(sd, f"backbone.layer{s}.0.conv1.weight")[0])
        last = "conv3" if bottleneck else "conv2"
        outs.append(_shape(sd, f"backbone.layer{s}.0.{last}.weight")[0])
    backbone = BackboneConfig(
        stage_blocks=tuple(blocks),
        stage_planes=tuple(planes),
        stage_out_channels=tuple(outs),
        stem_channels=stem,
        block="bottleneck" if bottleneck else "basic",
    )
    n_lat = _count(sd, r"neck\.lateral_convs\.(\d+)\.")
    lat_in = tuple(_shape(sd, f"neck.lateral_convs.{i}.conv.weight")[1] for i in range(n_lat))
    fpn_out = _shape(sd, "neck.lateral_convs.0.conv.weight")[0]
    try:
        start = outs.index(lat_in[0])
    except ValueError:
        raise FcosError(f"FPN lateral input channels {lat_in} do not match the backbone's stage outputs {tuple(outs)}") from None
    num_outs = _count(sd, r"neck\.fpn_convs\.(\d+)\.")
    extra_on: Literal["output", "input"] = "output"
    if num_outs > n_lat and _shape(sd, f"neck.fpn_convs.{n_lat}.conv.weight")[1] != fpn_out:
        extra_on = "input"
    neck = NeckConfig(in_channels=lat_in, out_channels=fpn_out, start_level=start, num_outs=num_outs, extra_on=extra_on)
    spec = head_spec(family)
    stacked = _count(sd, r"bbox_head\.cls_convs\.(\d+)\.")
    gn = "bbox_head.cls_convs.0.gn.weight" in sd
    cls_shape = _shape(sd, f"bbox_head.{spec.convs['cls']}.weight")
    reg_out = _shape(sd, f"bbox_head.{spec.convs['reg']}.weight")[0]
    anchors = 1 if spec.priors == "points" else reg_out // 4
    if reg_out != 4 * anchors or cls_shape[0] % anchors:
        raise FcosError(
            f"the {spec.title} head's box conv has {reg_out} outputs and its class conv {cls_shape[0]}: "
            "not 4 and C per prior (anchors per location do not divide them)"
        )
    feat = cls_shape[1]
    head_in = _shape(sd, "bbox_head.cls_convs.0.conv.weight")[1] if stacked else feat
    n_scales = _count(sd, r"bbox_head\.scales\.(\d+)\.")
    head = HeadConfig(
        family=family,  # type: ignore[arg-type]
        num_classes=cls_shape[0] // anchors,
        in_channels=head_in,
        feat_channels=feat,
        stacked_convs=stacked,
        norm="gn" if gn else "none",
        conv_bias=(not stacked) or "bbox_head.cls_convs.0.conv.bias" in sd,
        strides=tuple(8 * 2**i for i in range(num_outs)),
        use_scale=n_scales > 0,
        pred_kernel=cls_shape[2],
    )
    if spec.priors == "anchors":  # shapes say how many per location; the meta config (read later) says which
        for name, value in ANCHOR_DEFAULTS[family].items():
            setattr(head, name, value)
    if gn:
        head.gn_groups = 32 if feat % 32 == 0 else max(g for g in range(1, feat + 1) if feat % g == 0 and g <= 32)
    return backbone, neck, head


def _check_post(path: str | Path, post: PostConfig, sources: dict[str, str]) -> None:
    """Post-processing values in :data:`POST_RANGES`: a bad meta value is one line naming the file and the key."""
    for name, allowed in POST_RANGES.items():
        why = allowed.problem(getattr(post, name))
        if why is None:
            continue
        flag = "--" + name.replace("_", "-")
        if sources.get(name) == "flag":
            raise UsageError(f"{flag} {why}")
        raise BadFileError(path, f"its meta config's {name} {why} (give {flag} to override it)")


def _check_overrides(overrides: ModelOverrides, spec: HeadSpec) -> None:
    """Head flags that do not apply to this family are a usage error, not silently ignored."""
    for name in ("norm_on_bbox", "centerness_on_reg"):
        if getattr(overrides, name) is not None and name not in spec.overrides:
            raise UsageError(f"--{name.replace('_', '-')} applies to FCOS heads; this checkpoint's head is {spec.title}")


def _check_anchors(path: str | Path, head: HeadConfig, sd: dict[str, Any], spec: HeadSpec, origin: str) -> None:
    """The anchor settings (from ``origin``) must give as many anchors per location as the head's convs predict for."""
    predicted = _shape(sd, f"bbox_head.{spec.convs['reg']}.weight")[0] // 4
    if head.num_anchors != predicted:
        raise BadFileError(
            path,
            f"its head predicts {predicted} anchors per location, but its anchor settings give {head.num_anchors} "
            f"({len(head.anchor_ratios)} ratios x {head.scales_per_octave} scales per octave, from {origin})",
        )
    if len(head.target_stds) != 4 or len(head.target_means) != 4:
        raise BadFileError(path, f"its box coder's target_means/target_stds must have 4 values, got {head.target_means} / {head.target_stds}")


# --------------------------------------------------------------------------- public API


def load_checkpoint(path: str | Path, overrides: ModelOverrides | None = None) -> LoadedCheckpoint:
    """Read a checkpoint file, map its keys and infer the full :class:`DetectorConfig`.

    Whatever is wrong with the file is one error naming it (never a bare KeyError/IndexError).
    """
    try:
        return _load_checkpoint(path, overrides)
    except FcosError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise BadFileError(path, f"not a detector checkpoint this tool understands ({type(exc).__name__}: {first_line(exc)})") from None


def _load_checkpoint(path: str | Path, overrides: ModelOverrides | None = None) -> LoadedCheckpoint:
    overrides = overrides or ModelOverrides()
    obj, ignored = read_checkpoint_file(path)
    if not isinstance(obj, dict):
        raise BadFileError(path, f"holds a {type(obj).__name__}, not a state dict or {{'state_dict', 'meta'}} checkpoint")
    meta = cast("dict[str, Any]", obj.get("meta") if isinstance(obj.get("meta"), dict) else {})
    sd = obj.get("state_dict", obj.get("model", obj))
    if not isinstance(sd, dict):
        raise BadFileError(path, "its 'state_dict' is not a dict of tensors")
    import torch

    sd = {k: v for k, v in _strip_prefix(sd).items() if isinstance(v, torch.Tensor)}
    trained_bn = any(k.startswith("backbone.body.") and k.endswith("num_batches_tracked") for k in sd)  # torchvision: which BN saved it
    try:
        fmt, family = detect_format(sd)
        spec = head_spec(family)
        sd = _map_torchvision(sd, family) if fmt == "torchvision" else _map_mmdet(sd, spec)
        backbone, neck, head = infer_architecture(sd, family)
    except BadFileError:
        raise
    except FcosError as exc:  # name the file: "X.pth: not a dense-detector checkpoint: ..."
        raise BadFileError(path, str(exc)) from None
    sources = {"architecture": "tensor shapes", "family": f"{'torchvision' if fmt == 'torchvision' else 'mmdet'} {spec.title} head keys"}
    _check_overrides(overrides, spec)
    if fmt == "torchvision":
        backbone.style, backbone.bn_impl = "pytorch", "torchvision"
        if family == "retinanet" and trained_bn:  # nn.BatchNorm2d (v2, or a model built without weights): textbook arithmetic
            backbone.bn_impl = "mmdet"
            sources["bn"] = "BatchNorm2d (the file has num_batches_tracked)"
        elif family == "retinanet" and head.norm == "none":  # v1 COCO weights: frozen BN, eps set to 0 by the builder
            backbone.bn_eps = 0.0
            sources["bn"] = "FrozenBatchNorm2d with eps 0 (retinanet_resnet50_fpn's COCO weights)"
        head.norm_on_bbox, head.centerness_on_reg = True, True
        neck.relu_before_extra = True  # LastLevelP6P7: P7 from ReLU(P6)
        post = default_post_config("torchvision", family)
        settings: dict[str, Any] = {}
        for k in ("style", *spec.overrides, "extra_on", "rule"):
            sources[k] = "torchvision layout"
        adapter: InputAdapter = "torchvision"
    else:
        settings = settings_from_meta(meta)
        kind = settings.get("detector_type")
        if kind in _LOOKALIKES and _LOOKALIKES[kind] == family:
            raise BadFileError(path, f"an mmdet {kind} checkpoint: its head's keys look like {spec.title}'s but its maths differ; not served")
        defaults = spec.mmdet_defaults
        backbone.style = settings.get("style", defaults["style"])
        head.norm_on_bbox = settings.get("norm_on_bbox", False)
        head.centerness_on_reg = settings.get("centerness_on_reg", False)
        neck.relu_before_extra = settings.get("relu_before_extra_convs", defaults["relu_before_extra_convs"])
        if "extra_on" in settings and neck.in_channels[-1] == neck.out_channels:  # shapes can't tell
            neck.extra_on = settings["extra_on"]
        rule, why = rule_for_version(mmdet_version(meta))
        if spec.priors == "anchors" and settings.get("legacy_anchors"):
            raise BadFileError(
                path,
                f"its meta config uses mmdet 1.x anchors ({settings['legacy_anchors']}: centred at (stride-1)/2, +1 box widths), "
                "which are not served; mmdet 2.x/3.x's AnchorGenerator and DeltaXYWHBBoxCoder are",
            )
        post = default_post_config(rule)
        post.iou_thr = defaults.get("iou_thr", post.iou_thr)
        for k in ("style", *spec.overrides, "extra_on"):
            sources[k] = "meta config" if k in settings else f"default (mmdet {spec.title})"
        sources["rule"] = why
        if head.norm == "gn" and "num_groups" in settings:
            head.gn_groups = settings["num_groups"]
            sources["gn_groups"] = "meta config"
        if spec.priors == "anchors":
            for k in ("octave_base_scale", "scales_per_octave", "anchor_ratios", "target_stds", "target_means"):
                if k in settings:
                    setattr(head, k, settings[k])
                sources[k] = "meta config" if k in settings else f"default (mmdet {spec.title})"
        for k in ("nms_pre", "score_thr", "iou_thr", "max_per_img"):
            if k in settings:
                setattr(post, k, settings[k])
                sources[k] = "meta config"
        adapter = "none"
    if spec.priors == "anchors":
        if fmt == "torchvision":
            origin = f"torchvision's {spec.title} anchors"
        elif {"anchor_ratios", "scales_per_octave"} & set(settings):
            origin = "the file's meta config"
        else:
            origin = f"mmdet {spec.title}'s defaults; the file has no meta config saying which anchors it was trained with"
        _check_anchors(path, head, sd, spec, origin)
    if overrides.rule is not None:
        if overrides.rule not in POST_RULES:
            raise FcosError(f"unknown post-processing rule '{overrides.rule}' (choose from {', '.join(POST_RULES)})")
        rule_library = "torchvision" if overrides.rule == "torchvision" else "mmdet"
        if spec.priors == "anchors" and rule_library != fmt:
            raise UsageError(
                f"--rule {overrides.rule} decodes with {rule_library}'s anchors and box coder, but {path} is a {fmt} {spec.title}: "
                f"choose {'torchvision' if fmt == 'torchvision' else 'mmdet2, mmdet218 or mmdet3'}"
            )
        base = default_post_config(overrides.rule, family)  # type: ignore[arg-type]
        if fmt == "mmdet" and overrides.rule.startswith("mmdet"):  # keep the file's test_cfg numbers
            base = dataclasses.replace(base, nms_pre=post.nms_pre, max_per_img=post.max_per_img, score_thr=post.score_thr, iou_thr=post.iou_thr)
        post = base
        sources["rule"] = "flag"
    for name, target in (
        ("style", backbone),
        ("norm_on_bbox", head),
        ("centerness_on_reg", head),
        ("extra_on", neck),
        ("score_thr", post),
        ("nms_pre", post),
        ("iou_thr", post),
        ("max_per_img", post),
    ):
        value = getattr(overrides, name)
        if value is not None:
            setattr(target, name, value)
            sources[name] = "flag"
    config = DetectorConfig(backbone=backbone, neck=neck, head=head, post=post, input_adapter=adapter)
    _check_post(path, post, sources)
    classes = meta.get("CLASSES") or (meta.get("dataset_meta") or {}).get("classes")
    names = [str(c) for c in classes] if isinstance(classes, (list, tuple)) else None
    if names is not None and len(names) != head.num_classes:
        names = None
    if version := mmdet_version(meta):
        sources["mmdet_version"] = version
    return LoadedCheckpoint(str(path), fmt, config, sd, meta, sources, names, ignored)


def build_model(ckpt: LoadedCheckpoint):
    """Instantiate :class:`~fcos_offline.model.detector.Detector` and load every tensor; missing/unexpected keys are an error."""
    from fcos_offline.model.detector import Detector

    model = Detector(ckpt.config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(ckpt.state_dict))
    unexpected = sorted(set(ckpt.state_dict) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {', '.join(missing[:8])}{' …' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:8])}{' …' if len(unexpected) > 8 else ''}")
        raise FcosError(f"{ckpt.path}: checkpoint does not match the inferred {ckpt.config.head.family} architecture: " + "; ".join(parts))
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in ckpt.state_dict.items() if v.shape != expected[k].shape]
    if wrong:
        raise FcosError(f"{ckpt.path}: tensor shapes do not fit: {'; '.join(wrong[:5])}")
    not_float = [
        f"{k} ({str(v.dtype).removeprefix('torch.')})"
        for k, v in ckpt.state_dict.items()
        if expected[k].is_floating_point() and not v.is_floating_point()
    ]
    if not_float:
        raise FcosError(
            f"{ckpt.path}: {len(not_float)} weight tensor(s) are not floating point, so not trained weights: "
            f"{', '.join(not_float[:5])}{' …' if len(not_float) > 5 else ''}"
        )
    non_finite = [
        f"{k} ({int((~v.isfinite()).sum())} of {v.numel()})"
        for k, v in ckpt.state_dict.items()
        if v.is_floating_point() and not bool(v.isfinite().all())
    ]
    if non_finite:
        raise FcosError(
            f"{ckpt.path}: {len(non_finite)} tensor(s) hold NaN/inf values (a diverged or corrupted checkpoint): "
            f"{', '.join(non_finite[:5])}{' …' if len(non_finite) > 5 else ''}"
        )
    model.load_state_dict({k: v.float() for k, v in ckpt.state_dict.items()}, strict=True)
    return model.eval()


def load_model(path: str | Path, overrides: ModelOverrides | None = None):
    """Checkpoint file -> (eval-mode :class:`~fcos_offline.model.detector.Detector`, :class:`LoadedCheckpoint`)."""
    ckpt = load_checkpoint(path, overrides)
    try:
        return build_model(ckpt), ckpt
    except FcosError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError) as exc:
        raise BadFileError(path, f"cannot build a detector from it ({type(exc).__name__}: {first_line(exc)})") from None


def mmdet_state_dict(model, head_names: str = "conv", with_num_batches_tracked: bool = True) -> dict[str, Any]:
    """Our model's weights under mmdet key names (``head_names='fcos'`` for the v1 layout)."""
    import torch

    out: dict[str, Any] = {}
    for key, value in model.state_dict().items():
        if head_names == "fcos":
            key = re.sub(r"^bbox_head\.conv_(cls|reg|centerness)\.", r"bbox_head.fcos_\1.", key)
        out[key] = value.clone()
        if with_num_batches_tracked and key.endswith("running_var"):
            out[key[: -len("running_var")] + "num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    return out


def describe_depth(cfg: DetectorConfig) -> str:
    """'ResNet-50'-style name from the block counts."""
    per_block = 3 if cfg.backbone.block == "bottleneck" else 2
    return f"ResNet-{per_block * sum(cfg.backbone.stage_blocks) + 2}"


def inspect_checkpoint(path: str | Path, overrides: ModelOverrides | None = None) -> dict[str, Any]:
    """Everything inferred about a checkpoint, as a JSON-able dict (loads and checks every tensor)."""
    ckpt = load_checkpoint(path, overrides)
    build_model(ckpt)  # proves every tensor is used and every shape fits
    cfg = ckpt.config
    spec = head_spec(cfg.head.family)
    return {
        "path": ckpt.path,
        "format": ckpt.format,
        "family": cfg.head.family,
        "title": spec.title,
        "priors": spec.priors,
        "coder": spec.coder,
        "score_factor": spec.score_factor,
        "raw_outputs": dict(spec.layout),
        "head_flags": {name: getattr(cfg.head, name) for name in spec.overrides},
        "mmdet_version": ckpt.sources.get("mmdet_version"),
        "depth": describe_depth(cfg),
        "num_classes": cfg.head.num_classes,
        "num_params": ckpt.num_params,
        "config": cfg.to_dict(),
        "sources": ckpt.sources,
        "class_names": ckpt.class_names,
        "ignored_pickled_objects": ckpt.ignored_objects,
    }
