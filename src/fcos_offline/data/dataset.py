"""The evaluation set every workflow (``run``, ``tune``) shares: where images and annotations come from.

Sources: a COCO folder (``val2017/`` + ``annotations/``), an image folder plus an annotation
file, or the synthetic demo split generated on the fly (:func:`fcos_offline.demo.synthetic.demo_split`). The set is the annotated images in
file-name order (the first ``num_images`` when limited).

One policy for annotated images that cannot be inferred (the file is missing, or it does not
decode): each is **named** in a warning, **skipped** by inference, **listed** (``missing``) and
makes the verb exit 3; it stays in the evaluated annotations, so it counts as an image without
detections (mAP is never inflated by dropping hard cases). Two images whose names differ only
in extension (``X.jpg`` and ``X.png``) would share one dump name: refused with one line.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from fcos_offline.data.annotations import coco91_names, find_annotation_file, label_to_category, load_annotations
from fcos_offline.errors import FcosError, UsageError
from fcos_offline.io import atomic_write_bytes, file_digest, json_digest
from fcos_offline.progress import warn


@dataclass(frozen=True)
class InputItem:
    """One image to infer: its stem (dump name), path, kind (``bin`` or ``image``) and, for a
    ``.bin`` listed in a bin-mode ``.info``, the tensor's width and height as listed."""

    stem: str
    path: str
    kind: str
    listed_wh: tuple[int, int] | None = None


@dataclass
class EvalSet:
    """The images to infer and the annotations to evaluate them against."""

    images_dir: Path
    ann_file: Path  # the evaluated annotations (a subset file when limited)
    items: list[InputItem]  # images present and decodable, file-name order
    jpg_info: Path  # each item's size (what postprocess needs to undo the letterbox)
    missing: list[dict[str, str]] = field(default_factory=list)  # annotated but not inferable: {"path","problem"}
    demo: bool = False
    description: str = ""

    @cached_property
    def digest(self) -> str:
        """A digest of exactly which images and annotations make up this set: their paths and bytes (SHA-256).

        Content, not size and time: a file replaced by another of the same size and mtime is a
        new set. Read once per set (about 1.2 s per GB from the page cache on one core: SHA-256 has CPU support).
        """
        files = [(i.path, file_digest(i.path)) for i in self.items]
        return json_digest({"items": files, "ann": [str(self.ann_file), file_digest(self.ann_file)]})


def resolve_source(coco: str | None = None, images: str | None = None, annotations: str | None = None) -> tuple[Path, Path]:
    """(image folder, annotation file) of ``--coco DIR`` or ``--images DIR --annotations FILE``."""
    if coco:
        root = Path(coco)
        found = next((root / d for d in ("val2017", "images/val2017", "images") if (root / d).is_dir()), None)
        if found is None:
            raise FcosError(f"{root}: expected a val2017/ image folder inside")
        return found, find_annotation_file(root / "annotations")
    if not (images and annotations):
        raise UsageError("give --coco DIR, or both --images DIR and --annotations FILE")
    if not Path(images).is_dir():
        raise FcosError(f"{images}: no such image folder")
    return Path(images), find_annotation_file(annotations)


#: skipped annotated images named one per line; the rest are counted (all are in the JSON)
MAX_NAMED = 10


def prepare_eval_set(
    listing: Path,
    images_dir: Path,
    ann_file: Path,
    num_images: int | None = None,
    demo: bool = False,
    description: str = "",
    exclude: frozenset[str] = frozenset(),
) -> EvalSet:
    """Build the :class:`EvalSet` in ``listing`` (links to exactly its images, their .info, the subset annotations).

    ``exclude``: image paths (``str(images_dir / file_name)``) left out before the first ``num_images`` are taken.
    """
    from fcos_offline.data.info import make_info

    data = load_annotations(ann_file)
    annotated = sorted((i for i in data["images"] if str(images_dir / i["file_name"]) not in exclude), key=lambda i: i["file_name"])
    if num_images is not None:
        annotated = annotated[:num_images]
    stems: dict[str, str] = {}
    for img in annotated:
        stem = Path(img["file_name"]).stem
        if stem in stems:
            raise FcosError(
                f"{ann_file}: images {stems[stem]} and {img['file_name']} share the name {stem!r}; "
                "dumps are named by file stem, so one image's detections would be credited to both: rename one"
            )
        stems[stem] = img["file_name"]
    listing.mkdir(parents=True, exist_ok=True)
    link_dir = listing / "images"
    shutil.rmtree(link_dir, ignore_errors=True)  # exactly this set's images: never a previous run's
    link_dir.mkdir()
    missing: list[dict[str, str]] = []
    for img in annotated:
        path = images_dir / img["file_name"]
        if not path.is_file():
            missing.append({"path": str(path), "problem": "annotated image is missing"})
            continue
        os.symlink(os.path.abspath(path), link_dir / path.name)
    jpg_info = listing / "fcos_jpeg.info"
    jpg_info.unlink(missing_ok=True)
    entries: list[Any] = []
    if any(link_dir.iterdir()):
        summary = make_info("jpg", link_dir, jpg_info)
        entries = summary.entries
        missing += [{"path": str(images_dir / Path(b.path).name), "problem": b.problem} for b in summary.bad]
    usable = {Path(e.path).name for e in entries}
    items = [InputItem(Path(n).stem, str(images_dir / n), "image") for n in sorted(usable)]
    if not items:
        raise FcosError(f"no usable annotated images in {images_dir} (annotations: {ann_file})")
    for m in missing[:MAX_NAMED]:
        warn(f"skipped {m['path']}: {m['problem']}; it counts as an image without detections")
    if len(missing) > MAX_NAMED:
        warn(f"... and {len(missing) - MAX_NAMED} more annotated images skipped the same way (every one is listed in the run's JSON)")
    if len(annotated) < len(data["images"]):
        ids = {i["id"] for i in annotated}
        subset = dict(data, images=annotated, annotations=[a for a in data.get("annotations", []) if a["image_id"] in ids])
        ann_file = listing / f"annotations_first{len(annotated)}.json"
        text = json.dumps(subset).encode()
        if not ann_file.is_file() or ann_file.read_bytes() != text:  # unchanged: left as it is
            atomic_write_bytes(ann_file, text)
    return EvalSet(images_dir, ann_file, items, jpg_info, missing, demo, description)


def class_names_for(metadata: dict[str, Any], ann_file: Path | dict) -> list[str] | None:
    """Names for a model's labels: its own, COCO's (None = the 80 classes; torchvision's 91), else the annotations'.

    A label count other than COCO's must be the annotations' category count: refused here, before any
    inference, rather than when the dumps are evaluated.
    """
    names = list(metadata.get("class_names") or [])
    num = len(names) or (metadata.get("config") or {}).get("head", {}).get("num_classes", 80)
    if num == 80:
        return names or None
    if num == 91:
        return names or coco91_names()
    data = load_annotations(ann_file)
    label_to_category(data, num)
    return names or [c["name"] for c in sorted(data["categories"], key=lambda c: c["id"])]
