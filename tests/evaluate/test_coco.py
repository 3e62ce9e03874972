"""COCO evaluation: faster-coco-eval agrees with pycocotools, label mapping, edge cases."""

import copy
import json

import numpy as np
import pytest
from conftest import SAMPLE, needs_sample

from fcos_offline.data.annotations import COCO80_CATEGORY_IDS, COCO80_NAMES, find_annotation_file, label_to_category
from fcos_offline.errors import FcosError
from fcos_offline.evaluate.coco import detections_to_coco, evaluate_bbox

ANN_FILE = SAMPLE / "annotations" / "instances_val2017_sample.json" if SAMPLE else None


def _generated_results(data: dict, seed: int) -> list[dict]:
    """Jittered copies of most GT boxes plus false positives, with random scores."""
    rng = np.random.default_rng(seed)
    sizes = {img["id"]: (img["width"], img["height"]) for img in data["images"]}
    cat_ids = [c["id"] for c in data["categories"]]
    results = []
    for ann in data["annotations"]:
        if rng.random() < 0.15:
            continue  # a miss
        x, y, w, h = ann["bbox"]
        jitter = rng.normal(0, 0.08, 4) * [w, h, w, h]
        results.append(
            {
                "image_id": ann["image_id"],
                "category_id": ann["category_id"],
                "bbox": [x + jitter[0], y + jitter[1], max(w + jitter[2], 1.0), max(h + jitter[3], 1.0)],
                "score": float(rng.uniform(0.05, 1.0)),
            }
        )
    for image_id, (width, height) in sizes.items():
        for _ in range(int(rng.integers(3, 12))):
            w, h = rng.uniform(4, width / 2), rng.uniform(4, height / 2)
            results.append(
                {
                    "image_id": image_id,
                    "category_id": int(rng.choice(cat_ids)),
                    "bbox": [float(rng.uniform(0, width - w)), float(rng.uniform(0, height - h)), w, h],
                    "score": float(rng.uniform(0.05, 0.9)),
                }
            )
    return results


@needs_sample
@pytest.mark.parametrize("seed", [0, 1])
def test_faster_coco_eval_matches_pycocotools(seed):
    pycoco = pytest.importorskip("pycocotools.coco")
    pyeval = pytest.importorskip("pycocotools.cocoeval")
    data = json.loads(ANN_FILE.read_text())
    results = _generated_results(data, seed)

    ours = evaluate_bbox(ANN_FILE, results)

    gt = pycoco.COCO(str(ANN_FILE))
    dt = gt.loadRes(copy.deepcopy(results))
    ev = pyeval.COCOeval(gt, dt, "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    np.testing.assert_allclose(ours["stats"], ev.stats[:12], atol=1e-6, rtol=0)
    assert 0.05 < ours["bbox_mAP"] < 0.95  # a non-trivial case
    assert ours["bbox_mAP"] == ours["stats"][0] and ours["bbox_mAP_75"] == ours["stats"][2]
    assert ours["num_images"] == 10
    # class-wise AP the mmdet way, from pycocotools' precision array
    precision = ev.eval["precision"]
    assert [row["category_id"] for row in ours["classwise"]] == sorted(c["id"] for c in data["categories"])
    for k, row in enumerate(ours["classwise"]):
        p = precision[:, :, k, 0, -1]
        expected = p[p > -1].mean() if (p > -1).any() else None
        assert row["AP"] == pytest.approx(expected, abs=1e-6)
    curves = ours["pr_curves"]
    assert len(curves["recall"]) == 101 and len(curves["classes"]) == len(data["categories"])
    first = np.array([v if v is not None else -1 for v in curves["classes"][0]["iou50"]])
    np.testing.assert_allclose(first, precision[0, :, 0, 0, -1], atol=1e-9)


@needs_sample
def test_label_mapping_on_sample_with_23_categories():
    data = json.loads(ANN_FILE.read_text())
    assert len(data["categories"]) == 23
    cat_ids = label_to_category(ANN_FILE, 80)
    assert cat_ids == list(COCO80_CATEGORY_IDS) and len(set(cat_ids)) == 80
    for category in data["categories"]:  # our name table agrees with the file for every listed class
        assert COCO80_NAMES[cat_ids.index(category["id"])] == category["name"]
    assert cat_ids[0] == 1 and cat_ids[79] == 90 and cat_ids[11] == 13  # gaps of spec §12
    # a 23-class model maps onto the file's categories sorted by id; other counts are an error
    assert label_to_category(ANN_FILE, 23) == sorted(c["id"] for c in data["categories"])
    with pytest.raises(FcosError, match="5 classes but the annotation file lists 23"):
        label_to_category(ANN_FILE, 5)


@needs_sample
def test_perfect_and_empty_results():
    data = json.loads(ANN_FILE.read_text())
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1.0} for a in data["annotations"]]
    report = evaluate_bbox(data, perfect)
    assert report["bbox_mAP"] == pytest.approx(1.0) and report["bbox_mAP_50"] == pytest.approx(1.0)
    assert all(row["AP"] == pytest.approx(1.0) for row in report["classwise"])
    empty = evaluate_bbox(ANN_FILE, [])
    assert empty["bbox_mAP"] == 0.0 and empty["bbox_mAP_50"] == 0.0
    assert all(row["AP"] == 0.0 for row in empty["classwise"])
    assert perfect[0]["bbox"] == data["annotations"][0]["bbox"] and "area" not in perfect[0]  # inputs untouched


def test_detections_to_coco_drops_padding_and_maps_labels():
    labels = np.array([0, 79, 2, -1, -1], np.int64)
    dets = np.array(
        [[10, 20, 30, 60, 0.9], [0, 0, 5, 5, 0.5], [1, 1, 2, 2, 0.0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]],
        np.float32,
    )
    out = detections_to_coco(42, labels, dets, list(COCO80_CATEGORY_IDS))
    assert out == [
        {"image_id": 42, "bbox": [10.0, 20.0, 20.0, 40.0], "score": pytest.approx(0.9), "category_id": 1},
        {"image_id": 42, "bbox": [0.0, 0.0, 5.0, 5.0], "score": 0.5, "category_id": 90},
    ]
    with pytest.raises(FcosError, match="label 3 out of range"):
        detections_to_coco(1, np.array([3]), np.array([[0, 0, 1, 1, 0.5]]), [1, 2, 3])


def test_small_synthetic_dataset_and_annotation_lookup(tmp_path):
    data = {
        "images": [{"id": 1, "file_name": "a.jpg", "width": 100, "height": 100}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [10, 10, 50, 50], "area": 2500, "iscrowd": 0}],
        "categories": [{"id": 7, "name": "thing"}, {"id": 9, "name": "other"}],
    }
    (tmp_path / "instances_mini.json").write_text(json.dumps(data))
    assert find_annotation_file(tmp_path) == tmp_path / "instances_mini.json"
    (tmp_path / "instances_val2017.json").write_text(json.dumps(data))
    assert find_annotation_file(tmp_path).name == "instances_val2017.json"
    report = evaluate_bbox(tmp_path / "instances_mini.json", [
        {"image_id": 1, "category_id": 7, "bbox": [10, 10, 50, 25], "score": 0.8},  # IoU 0.5: TP at 0.50 only
    ])  # fmt: skip
    assert report["bbox_mAP_50"] == pytest.approx(1.0) and report["bbox_mAP_75"] == pytest.approx(0.0)
    assert report["bbox_mAP"] == pytest.approx(0.1)
    assert report["classwise"][1] == {"category_id": 9, "name": "other", "AP": None}
    with pytest.raises(FcosError, match="not found"):
        find_annotation_file(tmp_path / "nope")


def _synthetic_instances(n_images: int, seed: int = 0) -> dict:
    """``n_images`` images of 640x480 with 6 boxes each over 3 categories."""
    rng = np.random.default_rng(seed)
    images = [{"id": i + 1, "file_name": f"{i + 1:012d}.jpg", "width": 640, "height": 480} for i in range(n_images)]
    annotations = []
    for img in images:
        for _ in range(6):
            w, h = rng.uniform(20, 200, 2)
            x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": img["id"],
                    "category_id": int(rng.integers(1, 4)),
                    "bbox": [x, y, w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
    return {"images": images, "annotations": annotations, "categories": [{"id": c, "name": f"c{c}"} for c in (1, 2, 3)]}


def test_map_difference_spread_is_the_half_sample_spread_of_a_drop():
    from fcos_offline.evaluate.coco import map_difference_spread

    data = _synthetic_instances(40)
    reference = _generated_results(data, seed=0)
    same = map_difference_spread(data, reference, reference, rounds=8)
    assert same["difference"] == 0.0 and same["se"] == 0.0 and same["images"] == 40 and same["rounds"] == 8
    # the candidate loses its detections on a quarter of the images: a drop that depends on which images are drawn
    lost = {img["id"] for img in data["images"][::4]}
    candidate = [r for r in reference if r["image_id"] not in lost]
    spread = map_difference_spread(data, reference, candidate, rounds=12)
    full = evaluate_bbox(data, reference)["bbox_mAP"] - evaluate_bbox(data, candidate)["bbox_mAP"]
    assert spread["difference"] == pytest.approx(full, abs=1e-9) and full > 0.03
    assert 0.0 < spread["se"] < full  # the images drawn matter, less than the drop itself
    # a uniform drop (every image loses the same share) owes less to the sample than a concentrated one
    uniform = [r for i, r in enumerate(reference) if i % 4]
    assert map_difference_spread(data, reference, uniform, rounds=12)["se"] < spread["se"]
    with pytest.raises(FcosError, match="at least 4 images"):
        map_difference_spread(_synthetic_instances(3), [], [])
