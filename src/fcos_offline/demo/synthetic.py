"""A synthetic COCO-format detection dataset of coloured shapes (the demo's data).

Every image is a pure function of ``(seed, index)``: the same seed gives byte-identical files.
Images are 200–640 px per side (portrait and landscape), on textured, noisy backgrounds;
~20 % are grayscale and ~25 % PNG (the rest JPEG quality 90). Each holds 1–12 shapes of
:data:`CLASSES` in random colours, sizes log-uniform from 8 px to 85 % of the short side (every
FPN level of strides 8..128 gets objects), rotated and slightly stretched, overlapping.

Occlusion: later shapes are drawn over earlier ones. A shape that would leave an earlier one
with less than :data:`MIN_VISIBLE` of its pixels visible is not drawn, so no annotated object is
mostly hidden. Boxes are tight around the *visible* pixels of each shape (alpha >= 0.5 of the
anti-aliased mask), COCO ``[x, y, w, h]`` with ``w = x_max - x_min + 1``.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import cv2
import numpy as np

from fcos_offline.errors import FcosError
from fcos_offline.progress import info

CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring", "cross")
MIN_SIDE, MAX_SIDE = 200, 640
DEMO_CANVAS: tuple[int, int] = (320, 512)
"""(height, width) the demo model is trained and evaluated on; ``run``'s default canvas for the demo."""
DEMO_VAL_SEED = 1000
"""Seed of the demo validation split (the training split uses seed 0)."""
DEMO_VAL_IMAGES = 100
"""Images in the demo validation split on which the shipped model's mAP is reported."""
MIN_OBJECT = 8
MIN_VISIBLE = 0.6
GRAY_FRACTION = 0.2
PNG_FRACTION = 0.25
JPEG_QUALITY = 90


@dataclass
class Sample:
    """One rendered image: encoded file bytes and its annotations (original pixels)."""

    data: bytes
    ext: str
    width: int
    height: int
    gray: bool
    boxes: np.ndarray  # [N, 4] float32 x1, y1, x2, y2 (pixel edges: x2 = x_max + 1)
    labels: np.ndarray  # [N] int64, 0-based index into CLASSES


def _background(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Base colour + gradient + low-frequency blotches + thin clutter lines, float32 BGR."""
    base = rng.uniform(20, 235, size=3).astype(np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    xs = np.arange(w, dtype=np.float32) * np.float32(math.cos(angle) / w)
    ys = np.arange(h, dtype=np.float32) * np.float32(math.sin(angle) / h)
    ramp = (ys[:, None] + xs[None, :])[..., None]
    img = base + ramp * rng.uniform(-60, 60, size=3).astype(np.float32)
    cells = rng.uniform(-1, 1, size=(int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3)).astype(np.float32)
    img += cv2.resize(cells, (w, h), interpolation=cv2.INTER_CUBIC) * np.float32(rng.uniform(5, 35))
    img = np.clip(img, 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(0, 8))):
        p1 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        p2 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        shade = (img[p1[1], p1[0]].astype(np.int32) + rng.integers(-25, 26, size=3)).clip(0, 255)
        cv2.line(img, p1, p2, tuple(int(c) for c in shade), int(rng.integers(1, 3)), cv2.LINE_AA)
    return img


def _polygon(kind: str, rng: np.random.Generator) -> np.ndarray:
    """Outline of a polygonal class, scaled to fit the unit circle."""
    pts: list[tuple[float, float]] | np.ndarray
    if kind == "square":
        pts = [(-1, -1), (1, -1), (1, 1), (-1, 1)]
    elif kind == "triangle":
        pts = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
    elif kind == "star":
        inner = rng.uniform(0.38, 0.5)
        pts = [
            (
                (1 if k % 2 == 0 else inner) * math.cos(-math.pi / 2 + k * math.pi / 5),
                (1 if k % 2 == 0 else inner) * math.sin(-math.pi / 2 + k * math.pi / 5),
            )
            for k in range(10)
        ]
    else:  # cross
        t = rng.uniform(0.25, 0.4)
        pts = [(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t), (t, 1), (-t, 1), (-t, t), (-1, t), (-1, -t), (-t, -t)]
    pts = np.asarray(pts, dtype=np.float64)
    return pts / np.linalg.norm(pts, axis=1).max()  # inside the unit circle: no shape leaves its box


def _shape_mask(kind: str, rng: np.random.Generator, h: int, w: int, cx: float, cy: float, size: float) -> np.ndarray:
    """Anti-aliased uint8 mask of one shape of about ``size`` px centred at (cx, cy)."""
    mask = np.zeros((h, w), dtype=np.uint8)
    sx, sy = size / 2 * rng.uniform(0.8, 1.0), size / 2 * rng.uniform(0.8, 1.0)
    shift = 4  # sub-pixel precision of cv2 drawing
    one = 1 << shift
    if kind in ("circle", "ring"):
        center = (int(round(cx * one)), int(round(cy * one)))
        axes = (int(round(sx * one)), int(round(sy * one)))
        cv2.ellipse(mask, center, axes, float(rng.uniform(0, 180)), 0, 360, 255, -1, cv2.LINE_AA, shift)
        if kind == "ring":
            k = rng.uniform(0.45, 0.7)
            inner = (int(round(sx * k * one)), int(round(sy * k * one)))
            cv2.ellipse(mask, center, inner, 0, 0, 360, 0, -1, cv2.LINE_AA, shift)
        return mask
    pts = _polygon(kind, rng)
    theta = rng.uniform(0, 2 * math.pi) if kind != "triangle" else rng.uniform(-0.5, 0.5)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    pts = (pts @ rot.T) * (sx, sy) + (cx, cy)
    cv2.fillPoly(mask, [np.round(pts * one).astype(np.int32)], 255, cv2.LINE_AA, shift)
    return mask


def _contrasting_colour(rng: np.random.Generator, region: np.ndarray) -> np.ndarray:
    """A random BGR colour whose luminance differs from the region's mean by >= 50."""
    weights = np.array([0.114, 0.587, 0.299])
    lum_bg = float(region.reshape(-1, 3).mean(0) @ weights)
    colour = rng.uniform(0, 255, size=3)
    for _ in range(20):
        if abs(float(colour @ weights) - lum_bg) >= 50:
            break
        colour = rng.uniform(0, 255, size=3)
    else:
        colour = np.full(3, 255.0 if lum_bg < 128 else 0.0)
    return colour


def _extent(mask: np.ndarray) -> tuple[int, int, int, int]:
    """``(y0, y1, x0, x1)`` of the true pixels of a non-empty bool mask (end exclusive)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def render_sample(seed: int, index: int) -> Sample:
    """Render image ``index`` of the dataset with ``seed`` (deterministic)."""
    rng = np.random.default_rng([seed, index])
    w, h = (int(v) for v in rng.integers(MIN_SIDE, MAX_SIDE + 1, size=2))
    img = _background(rng, h, w)
    visible: list[np.ndarray] = []  # bool masks, what is still visible of each object
    full_px: list[int] = []
    labels: list[int] = []
    max_size = 0.85 * min(h, w)
    for _ in range(int(rng.integers(1, 13))):
        label = int(rng.integers(len(CLASSES)))
        size = math.exp(rng.uniform(math.log(MIN_OBJECT), math.log(max_size)))
        cx = rng.uniform(size / 2 + 1, w - size / 2 - 1)
        cy = rng.uniform(size / 2 + 1, h - size / 2 - 1)
        mask = _shape_mask(CLASSES[label], rng, h, w, cx, cy, size)
        covered = mask >= 128
        if not covered.any():
            continue
        if any(np.count_nonzero(v & ~covered) < MIN_VISIBLE * n for v, n in zip(visible, full_px)):
            continue  # would hide most of an earlier shape
        y0, y1, x0, x1 = _extent(mask > 0)
        alpha = mask[y0:y1, x0:x1, None].astype(np.float32) / 255.0
        colour = _contrasting_colour(rng, img[y0:y1, x0:x1])
        roi = img[y0:y1, x0:x1].astype(np.float32)
        img[y0:y1, x0:x1] = np.clip(roi * (1 - alpha) + colour * alpha + 0.5, 0, 255).astype(np.uint8)
        visible = [v & ~covered for v in visible]
        visible.append(covered)
        full_px.append(int(np.count_nonzero(covered)))
        labels.append(label)
    noise = rng.standard_normal(img.shape, dtype=np.float32) * np.float32(rng.uniform(2, 12))
    img = np.clip(img + noise, 0, 255).astype(np.uint8)
    boxes = np.zeros((len(visible), 4), dtype=np.float32)
    for i, v in enumerate(visible):
        y0, y1, x0, x1 = _extent(v)
        boxes[i] = (x0, y0, x1, y1)
    gray = bool(rng.random() < GRAY_FRACTION)
    ext = ".png" if rng.random() < PNG_FRACTION else ".jpg"
    pixels = cv2.cvtColor(img, cv2.COLOR_BGR2GRAY) if gray else img
    params = [cv2.IMWRITE_PNG_COMPRESSION, 3] if ext == ".png" else [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]
    ok, buf = cv2.imencode(ext, pixels, params)
    if not ok:  # pragma: no cover - OpenCV always encodes uint8 images
        raise RuntimeError("cv2.imencode failed")
    return Sample(buf.tobytes(), ext, w, h, gray, boxes, np.asarray(labels, dtype=np.int64))


def decode_sample(sample: Sample) -> np.ndarray:
    """The BGR uint8 pixels a reader gets from the file (``cv2.IMREAD_COLOR``)."""
    return cast("np.ndarray", cv2.imdecode(np.frombuffer(sample.data, dtype=np.uint8), cv2.IMREAD_COLOR))


def make_demo_data(out_dir: str | Path, split: str = "val", num_images: int = 50, seed: int = 1000, first: int = 0) -> dict:
    """Write ``<out>/<split>2017/*.jpg|png`` and ``<out>/annotations/instances_<split>2017.json``.

    Images are ``render_sample(seed, i)`` for ``first <= i < first + num_images``, named by
    12-digit id ``i + 1`` (so a later part of a split has the same files as the whole split).
    Returns a summary: ``image_dir``, ``ann_file``, ``num_images``, ``num_annotations``,
    ``classes``, ``seconds``.
    """
    if num_images < 1 or first < 0:
        raise ValueError("num_images must be >= 1 and first >= 0")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", split):
        raise FcosError(f"split name {split!r}: use letters, digits, '_' and '-' only (it names the folder <split>2017 inside the output)")
    start = time.perf_counter()
    out = Path(out_dir)
    image_dir = out / f"{split}2017"
    ann_dir = out / "annotations"
    image_dir.mkdir(parents=True, exist_ok=True)
    ann_dir.mkdir(parents=True, exist_ok=True)
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for i in range(first, first + num_images):
        sample = render_sample(seed, i)
        image_id = i + 1
        file_name = f"{image_id:012d}{sample.ext}"
        (image_dir / file_name).write_bytes(sample.data)
        images.append({"id": image_id, "file_name": file_name, "width": sample.width, "height": sample.height})
        for box, label in zip(sample.boxes.tolist(), sample.labels.tolist()):
            bw, bh = box[2] - box[0], box[3] - box[1]
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": label + 1,
                    "bbox": [box[0], box[1], bw, bh],
                    "area": bw * bh,
                    "iscrowd": 0,
                }
            )
    coco = {
        "info": {"description": f"fcos-offline synthetic shapes, split {split}, seed {seed}"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": k + 1, "name": name, "supercategory": "shape"} for k, name in enumerate(CLASSES)],
    }
    ann_file = ann_dir / f"instances_{split}2017.json"
    ann_file.write_text(json.dumps(coco))
    return {
        "image_dir": str(image_dir),
        "ann_file": str(ann_file),
        "num_images": len(images),
        "num_annotations": len(annotations),
        "classes": list(CLASSES),
        "seconds": time.perf_counter() - start,
    }


def demo_split(root: Path, split: str, num_images: int, seed: int, first: int = 0) -> Path:
    """Images ``first .. first + num_images - 1`` of the synthetic demo ``split`` under ``root`` (generated once per range and seed)."""
    marker = root / (f".done_{split}_{num_images}_{seed}" + (f"_from{first}" if first else ""))
    if not marker.exists():
        shutil.rmtree(root, ignore_errors=True)
        info(f"generating {num_images} demo {split} images (seed {seed}" + (f", from image {first}" if first else "") + f") in {root}")
        make_demo_data(root, split=split, num_images=num_images, seed=seed, first=first)
        marker.touch()
    return root
