"""Annotation files and label lists: reading and checking COCO instances JSON, finding it in a folder, and
what a model's labels name.

Labels: an 80-class model's contiguous labels 0..79 map to the standard COCO category ids
(spec §12) whatever subset of categories an annotation file lists; a 91-class (torchvision)
model's label is the category id itself; for any other class count
the annotation file's categories sorted by id are used, and their number must match.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

from fcos_offline.errors import FcosError
from fcos_offline.io import read_json_bounded, read_text_bounded
from fcos_offline.progress import warn

COCO80_CATEGORY_IDS: tuple[int, ...] = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27,
    28, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53,
    54, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80,
    81, 82, 84, 85, 86, 87, 88, 89, 90,
)  # fmt: skip

COCO80_NAMES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip

AnnotationSource = str | os.PathLike | dict


def load_annotations(ann: AnnotationSource) -> dict:
    """The annotation JSON as a dict (a dict passes through)."""
    if isinstance(ann, dict):
        return ann
    data = read_json_bounded(ann, what="annotation file")
    check_instances(data, ann)
    return data


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_instances(data: Any, ann: object = "annotations") -> None:
    """Raise FcosError naming ``ann`` and the first entry that is not COCO instances format.

    Checked: a JSON object with ``images`` (``id`` int, ``file_name`` string), ``annotations``
    (``id``, ``image_id``, ``category_id`` ints, ``bbox`` 4 finite numbers; ``area`` a number and
    ``iscrowd`` 0/1 when present) and ``categories`` (``id`` int, ``name`` string) lists; image
    and category ids unique; annotation ids unique and box sizes not negative. An annotation of an
    image that is not listed is ignored by COCO's evaluation: a warning names the first.
    """
    if not isinstance(data, dict):
        raise FcosError(f"annotation file {ann} holds a JSON {type(data).__name__}, not a COCO instances object")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise FcosError(f"annotation file {ann} has no '{key}' list (not COCO instances format)")
        if not isinstance(data[key], list):
            raise FcosError(f"annotation file {ann}: '{key}' is a {type(data[key]).__name__}, not a list")

    def bad(key: str, i: int, problem: str) -> FcosError:
        return FcosError(f"annotation file {ann}: {key}[{i}] {problem} (not COCO instances format)")

    seen: set[int] = set()
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or not _is_int(img.get("id")) or not isinstance(img.get("file_name"), str):
            raise bad("images", i, "needs an integer 'id' and a string 'file_name'")
        if img["id"] in seen:
            raise bad("images", i, f"repeats image id {img['id']}")
        seen.add(img["id"])
    seen = set()
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")) or not isinstance(cat.get("name"), str):
            raise bad("categories", i, "needs an integer 'id' and a string 'name'")
        if cat["id"] in seen:
            raise bad("categories", i, f"repeats category id {cat['id']}")
        seen.add(cat["id"])
    ann_ids: set[int] = set()
    for i, a in enumerate(data["annotations"]):
        if not isinstance(a, dict) or not all(_is_int(a.get(k)) for k in ("id", "image_id", "category_id")):
            raise bad("annotations", i, "needs integer 'id', 'image_id' and 'category_id'")
        box = a.get("bbox")
        if not (isinstance(box, list) and len(box) == 4 and all(_is_number(v) and math.isfinite(v) for v in box)):
            raise bad("annotations", i, f"has bbox {box!r}, not 4 finite numbers [x, y, w, h]")
        if "area" in a and not (_is_number(a["area"]) and math.isfinite(a["area"])):
            raise bad("annotations", i, f"has area {a['area']!r}, not a number")
        if "iscrowd" in a and a["iscrowd"] not in (0, 1):
            raise bad("annotations", i, f"has iscrowd {a['iscrowd']!r}, not 0 or 1")
        if box[2] < 0 or box[3] < 0:
            raise bad("annotations", i, f"has a box of negative size (w {box[2]}, h {box[3]})")
        if a["id"] in ann_ids:
            raise bad("annotations", i, f"repeats annotation id {a['id']} (COCO's index would keep only one of them)")
        ann_ids.add(a["id"])
    image_ids = {img["id"] for img in data["images"]}
    orphans = [a for a in data["annotations"] if a["image_id"] not in image_ids]
    if orphans:
        warn(
            f"annotation file {ann}: {len(orphans)} annotation(s) of images not listed in 'images' (first: id {orphans[0]['id']}, "
            f"image_id {orphans[0]['image_id']}); COCO's evaluation ignores them"
        )


def read_class_names(path: str | os.PathLike) -> list[str]:
    """A class-name list: one name per line (blank lines ignored), label 0 first."""
    names = [line.strip() for line in read_text_bounded(path, 16 << 20, "class-name list").splitlines() if line.strip()]
    if not names:
        raise FcosError(f"no class names in {path}")
    return names


def coco91_names() -> list[str]:
    """Names of torchvision's 91 labels (label = category id; unused ids are 'N/A')."""
    names = ["N/A"] * 91
    for cat_id, name in zip(COCO80_CATEGORY_IDS, COCO80_NAMES):
        names[cat_id] = name
    names[0] = "__background__"
    return names


def label_to_category(ann: AnnotationSource, num_classes: int = 80) -> list[int]:
    """Category id of each model label 0..num_classes-1 (see the module docstring)."""
    if num_classes == 80:
        return list(COCO80_CATEGORY_IDS)
    if num_classes == 91:  # torchvision's layout: the label is the COCO category id itself
        return list(range(91))
    cat_ids = sorted(c["id"] for c in load_annotations(ann)["categories"])
    if len(cat_ids) != num_classes:
        raise FcosError(
            f"the model has {num_classes} classes but the annotation file lists {len(cat_ids)} categories; they must match for a non-COCO-80 model"
        )
    return cat_ids


def find_annotation_file(annotations_path: str | os.PathLike) -> Path:
    """A JSON file as given, or in a folder ``instances_val2017.json``, else its only ``instances_*.json``."""
    path = Path(annotations_path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FcosError(f"annotations not found: {path}")
    default = path / "instances_val2017.json"
    if default.is_file():
        return default
    candidates = sorted(path.glob("instances_*.json"))
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise FcosError(f"no instances_val2017.json or instances_*.json in {path}")
    raise FcosError(f"several instances_*.json in {path} ({', '.join(c.name for c in candidates)}); pass the file itself")
