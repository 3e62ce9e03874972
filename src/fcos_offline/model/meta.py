"""What an mmdet checkpoint's ``meta`` says: its config text's settings and the mmdet version that wrote it."""

from __future__ import annotations

import re
from typing import Any

from fcos_offline.model.config import PostRule


def _meta_text(meta: dict[str, Any]) -> str:
    cfg = meta.get("config") or meta.get("cfg") or ""
    return cfg if isinstance(cfg, str) else str(cfg)


def _find(text: str, name: str, pattern: str) -> str | None:
    m = re.search(rf"\b{name}\s*=\s*{pattern}", text)
    return m.group(1) if m else None


def settings_from_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """What the ``meta`` config text says about settings shapes cannot tell."""
    text = _meta_text(meta)
    found: dict[str, Any] = {}
    if not text:
        return found
    if (v := _find(text, "style", r"['\"](caffe|pytorch)['\"]")) is not None:
        found["style"] = v
    for name in ("norm_on_bbox", "centerness_on_reg", "relu_before_extra_convs"):
        if (v := _find(text, name, r"(True|False)")) is not None:
            found[name] = v == "True"
    on_inputs = _find(text, "extra_convs_on_inputs", r"(True|False)")
    add_extra = _find(text, "add_extra_convs", r"['\"]?(on_input|on_output|True)['\"]?")
    if on_inputs is not None:
        found["extra_on"] = "input" if on_inputs == "True" else "output"
    elif add_extra is not None:
        found["extra_on"] = "output" if add_extra == "on_output" else "input"
    for name, pat, key in (
        ("num_groups", r"(\d+)", "num_groups"),
        ("nms_pre", r"(\d+)", "nms_pre"),
        ("score_thr", r"([0-9.eE-]+)", "score_thr"),
        ("iou_thr", r"([0-9.eE-]+)", "iou_thr"),
        ("iou_threshold", r"([0-9.eE-]+)", "iou_thr"),
        ("max_per_img", r"(\d+)", "max_per_img"),
    ):
        if (v := _find(text, name, pat)) is not None:
            found[key] = float(v) if "." in v or "e" in v.lower() else int(v)
    for name in ("octave_base_scale", "scales_per_octave"):
        if (v := _find(text, name, r"(\d+)")) is not None:
            found[name] = int(v)
    for name, key in (("ratios", "anchor_ratios"), ("target_stds", "target_stds"), ("target_means", "target_means")):
        if (v := _find(text, name, r"[\[(]([0-9.eE+\-,\s]+)[\])]")) is not None:
            found[key] = tuple(float(x) for x in v.split(",") if x.strip())
    if legacy := re.search(r"Legacy(?:AnchorGenerator|DeltaXYWHBBoxCoder)|\banchor_strides\b", text):
        found["legacy_anchors"] = legacy[0]
    if (v := _find(text, "model", r"dict\(\s*type\s*=\s*['\"](\w+)['\"]")) is not None:
        found["detector_type"] = v
    return found


def rule_for_version(version: str | None) -> tuple[PostRule, str]:
    """The post-processing rule the mmdet version that wrote a file uses, and why."""
    m = re.match(r"\s*(\d+)\.(\d+)", (version or "").replace(".x", ".0", 1))  # "3.x (mmengine …)" too
    if not m:
        return "mmdet2", "default (mmdet2, spec §7.2: no mmdet version in meta)"
    major, minor = int(m[1]), int(m[2])
    if major >= 3:
        return "mmdet3", f"meta mmdet_version {version} (spec §7.3, v3)"
    if major == 2 and minor >= 18:
        return "mmdet218", f"meta mmdet_version {version} (spec §7.3, 2.18+)"
    return "mmdet2", f"meta mmdet_version {version} (spec §7.2)"


def mmdet_version(meta: dict[str, Any]) -> str | None:
    for key in ("mmdet_version", "mmdet"):
        if isinstance(meta.get(key), str):
            return meta[key]
    if isinstance(meta.get("mmengine_version"), str):  # mmdet 3.x files are written by mmengine
        return f"3.x (mmengine {meta['mmengine_version']})"
    return None
