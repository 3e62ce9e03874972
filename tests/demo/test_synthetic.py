"""Synthetic demo dataset: determinism, COCO validity, and the variety the demo relies on."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from fcos_offline.cli import main
from fcos_offline.demo.synthetic import CLASSES, decode_sample, make_demo_data, render_sample


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("shapes")
    summary = make_demo_data(root, split="val", num_images=40, seed=1000)
    return root, summary


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    make_demo_data(tmp_path / "a", num_images=8, seed=7)
    make_demo_data(tmp_path / "b", num_images=8, seed=7)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(a) == 9  # 8 images + the annotation file
    assert a == b


def test_other_seed_gives_other_images(tmp_path: Path) -> None:
    make_demo_data(tmp_path / "a", num_images=4, seed=7)
    make_demo_data(tmp_path / "b", num_images=4, seed=8)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    ann = "annotations/instances_val2017.json"
    assert a[ann] != b[ann]
    assert all(a[k] != b.get(k) for k in a if k != ann)


def test_layout_and_coco_validity(dataset: tuple[Path, dict]) -> None:
    from pycocotools.coco import COCO

    root, summary = dataset
    ann_file = root / "annotations" / "instances_val2017.json"
    assert summary["ann_file"] == str(ann_file) and summary["num_images"] == 40
    coco = COCO(str(ann_file))
    assert sorted(coco.getCatIds()) == list(range(1, len(CLASSES) + 1))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(CLASSES)
    assert len(coco.getImgIds()) == 40 and len(coco.getAnnIds()) == summary["num_annotations"] > 40
    for img in coco.loadImgs(coco.getImgIds()):
        assert img["file_name"] == f"{img['id']:012d}{Path(img['file_name']).suffix}"
        pixels = cv2.imread(str(root / "val2017" / img["file_name"]), cv2.IMREAD_UNCHANGED)
        assert pixels.shape[:2] == (img["height"], img["width"])
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=img["id"])):
            x, y, w, h = ann["bbox"]
            assert ann["iscrowd"] == 0 and ann["area"] == pytest.approx(w * h)
            assert 0 <= x and 0 <= y and w > 0 and h > 0
            assert x + w <= img["width"] and y + h <= img["height"]


def test_variety(dataset: tuple[Path, dict]) -> None:
    root, _ = dataset
    data = json.loads((root / "annotations" / "instances_val2017.json").read_text())
    sizes = [max(a["bbox"][2], a["bbox"][3]) for a in data["annotations"]]
    assert min(sizes) < 16 and max(sizes) > 200
    assert {a["category_id"] for a in data["annotations"]} == set(range(1, len(CLASSES) + 1))
    shapes = [(im["width"], im["height"]) for im in data["images"]]
    assert any(w > h for w, h in shapes) and any(h > w for w, h in shapes)
    assert all(200 <= s <= 640 for wh in shapes for s in wh)
    names = [im["file_name"] for im in data["images"]]
    assert any(n.endswith(".png") for n in names) and any(n.endswith(".jpg") for n in names)
    channels = [cv2.imread(str(root / "val2017" / n), cv2.IMREAD_UNCHANGED).ndim for n in names]
    assert 2 in channels and 3 in channels  # some grayscale, some colour files


def test_boxes_are_tight_around_drawn_shapes() -> None:
    # Find an image with a single object: its box must enclose the pixels that differ from the
    # background, which we can see as the strongest edges of the image.
    for index in range(200):
        sample = render_sample(3, index)
        if len(sample.boxes) == 1 and not sample.gray and sample.ext == ".png":
            break
    else:  # pragma: no cover
        pytest.fail("no single-object colour PNG among 200 images")
    img = decode_sample(sample).astype(np.float32)
    x1, y1, x2, y2 = (int(v) for v in sample.boxes[0])
    grad = np.abs(np.diff(cv2.GaussianBlur(img, (5, 5), 0), axis=1)).max(axis=2)
    strong = grad > 0.5 * grad.max()
    ys, xs = np.nonzero(strong)
    # the strongest edges are the shape's outline, inside the box (with 2 px of blur slack) ...
    assert xs.min() >= x1 - 3 and xs.max() <= x2 + 2 and ys.min() >= y1 - 3 and ys.max() <= y2 + 2
    # ... and they reach the box's left and right sides
    assert xs.min() <= x1 + 3 and xs.max() >= x2 - 4


def test_cli_make_demo_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["make-demo-data", "--out", str(tmp_path), "--split", "train", "--num_images", "2", "--seed", "3"]) == 0
    assert "wrote 2 images" in capsys.readouterr().out
    assert (tmp_path / "annotations" / "instances_train2017.json").is_file()
    assert len(list((tmp_path / "train2017").iterdir())) == 2
    assert main(["make-demo-data", "--out", str(tmp_path), "--num-images", "0"]) == 2
