"""Error analysis: TIDE error counts and ΔAP on a constructed case, the confusion matrix, agreement of the
class table with COCO evaluation, and the per-image ordering."""

import copy
import json

import numpy as np
import pytest

from fcos_offline.errors import FcosError
from fcos_offline.evaluate.coco import evaluate_bbox
from fcos_offline.evaluate.errors import analyse

CATS = {1: "cat", 2: "dog", 3: "bird"}
SCORE_THR = 0.3

# ground truth: key -> (image, category, box)
GT = {
    "A": (1, 1, [10, 10, 40, 40]),
    "B": (1, 2, [60, 10, 30, 30]),
    "C": (1, 3, [10, 60, 30, 30]),
    "D": (2, 1, [10, 10, 40, 40]),
    "E": (2, 2, [60, 60, 30, 30]),
    "F": (3, 3, [10, 10, 40, 40]),
    "G": (3, 1, [60, 60, 30, 30]),
    "H": (3, 2, [10, 60, 30, 30]),
    "I": (4, 1, [10, 10, 30, 30]),  # missed
    "J": (4, 2, [50, 50, 30, 30]),  # missed
}
# detections: (image, category, box, score, intended kind, GT it hits or None)
DETS = [
    (1, 1, [10, 10, 40, 40], 0.95, "tp", "A"),
    (1, 2, [60, 10, 30, 30], 0.90, "tp", "B"),
    (1, 3, [10, 60, 30, 30], 0.90, "tp", "C"),
    (1, 1, [12, 12, 40, 40], 0.40, "dupe", "A"),  # IoU 0.82 with A, below the TP on A
    (2, 2, [10, 10, 40, 40], 0.85, "cls", "D"),  # a dog on the cat D
    (2, 2, [60, 60, 30, 30], 0.90, "tp", "E"),
    (2, 2, [61, 61, 30, 30], 0.20, "dupe", "E"),  # below the score threshold
    (3, 1, [10, 10, 40, 40], 0.80, "cls", "F"),  # a cat on the bird F
    (3, 1, [70, 70, 30, 30], 0.75, "loc", "G"),  # IoU 0.29 with G
    (3, 2, [10, 60, 30, 30], 0.90, "tp", "H"),
    (3, 3, [20, 70, 30, 30], 0.93, "both", "H"),  # a bird with IoU 0.29 on the dog H
    (4, 1, [60, 5, 20, 20], 0.97, "bkg", None),
    (4, 2, [5, 60, 20, 20], 0.92, "bkg", None),
    (5, 3, [10, 10, 20, 20], 0.50, "bkg", None),  # an image without GT
]
EXPECTED_COUNTS = {"cls": 2, "loc": 1, "both": 1, "dupe": 2, "bkg": 3, "missed": 2}


def make_gt(gt: dict = GT) -> dict:
    return {
        "images": [{"id": i, "file_name": f"{i}.jpg", "width": 100, "height": 100} for i in range(1, 6)],
        "annotations": [
            {"id": n, "image_id": img, "category_id": cat, "bbox": box, "area": box[2] * box[3], "iscrowd": 0}
            for n, (img, cat, box) in enumerate(gt.values(), 1)
        ],
        "categories": [{"id": c, "name": name} for c, name in CATS.items()],
    }


def make_results(dets: list = DETS) -> list[dict]:
    return [{"image_id": img, "category_id": cat, "bbox": list(box), "score": score} for img, cat, box, score, _, _ in dets]


def tide_ap(gt: dict, results: list[dict]) -> float:
    return analyse(gt, results, score_thr=SCORE_THR)["tide"]["ap"]


def test_constructed_case_counts_each_error_kind_and_its_fix():
    gt, results = make_gt(), make_results()
    out = analyse(gt, results, score_thr=SCORE_THR)
    json.dumps(out)  # JSON-able
    tide = out["tide"]
    assert tide["counts"] == EXPECTED_COUNTS
    base, delta = tide["ap"], tide["delta_ap"]

    # every detection at the threshold carries its intended kind, every GT its missed flag
    kinds = {(d["category_id"], tuple(d["bbox"]), d["score"]): d["kind"] for im in out["images"] for d in im["dets"]}
    assert kinds == {(cat, tuple(box), score): kind for _, cat, box, score, kind, _ in DETS if score >= SCORE_THR}
    missed = {(g["category_id"], tuple(g["bbox"])) for im in out["images"] for g in im["gt"] if g["error"] == "missed"}
    assert missed == {(GT[k][1], tuple(GT[k][2])) for k in "IJ"}

    # the oracle: ΔAP equals the AP of the data with those errors fixed by hand
    without = {kind: make_results([d for d in DETS if d[4] != kind]) for kind in ("dupe", "bkg", "both")}
    for kind, fixed_results in without.items():
        assert delta[kind] == pytest.approx(tide_ap(gt, fixed_results) - base, abs=1e-12)
    relabelled = [(img, GT[hit][1], box, s, k, hit) if k == "cls" else (img, cat, box, s, k, hit) for img, cat, box, s, k, hit in DETS]
    assert delta["cls"] == pytest.approx(tide_ap(gt, make_results(relabelled)) - base, abs=1e-12)
    moved = [(img, cat, GT[hit][2], s, k, hit) if k == "loc" else (img, cat, box, s, k, hit) for img, cat, box, s, k, hit in DETS]
    assert delta["loc"] == pytest.approx(tide_ap(gt, make_results(moved)) - base, abs=1e-12)
    found = make_gt({k: v for k, v in GT.items() if k not in "IJ"})
    assert delta["missed"] == pytest.approx(tide_ap(found, results) - base, abs=1e-12)

    # by construction: the duplicates score below every TP of their class and cannot cost AP; the other kinds outrank a TP
    # (bkg, both), or fixing them adds a TP (cls, loc) or takes a GT out of the count (missed)
    assert delta["dupe"] == 0
    assert all(delta[k] > 0 for k in ("cls", "loc", "both", "bkg", "missed"))
    assert delta["bkg"] > delta["dupe"]

    # a kind with no errors costs nothing
    no_both = analyse(gt, without["both"], score_thr=SCORE_THR)["tide"]
    assert no_both["counts"]["both"] == 0 and no_both["delta_ap"]["both"] == 0


def test_perfect_detections_give_ap_one_and_no_errors():
    gt = make_gt()
    results = [{"image_id": img, "category_id": cat, "bbox": box, "score": 0.5 + 0.01 * n} for n, (img, cat, box) in enumerate(GT.values())]
    tide = analyse(gt, results)["tide"]
    assert tide["ap"] == pytest.approx(1.0)
    assert tide["counts"] == dict.fromkeys(EXPECTED_COUNTS, 0)
    assert tide["delta_ap"] == dict.fromkeys(EXPECTED_COUNTS, 0.0)


def test_confusion_matrix_of_the_constructed_case():
    out = analyse(make_gt(), make_results(), score_thr=SCORE_THR)
    labels, matrix = out["confusion"]["labels"], np.array(out["confusion"]["matrix"])
    assert labels == [*CATS.values(), "background"]
    index = {c: k for k, c in enumerate(CATS)}
    bg = len(CATS)
    shown = [d for d in DETS if d[3] >= SCORE_THR]

    gt_per_class = np.bincount([index[cat] for _, cat, _ in GT.values()], minlength=len(CATS))
    dets_per_class = np.bincount([index[d[1]] for d in shown], minlength=len(CATS))
    assert (matrix[:bg].sum(axis=1) == gt_per_class).all()
    assert (matrix[:, :bg].sum(axis=0) == dets_per_class).all()

    # detections on a GT at IoU >= 0.5 (tp, cls) land in its class's row; the others, bkg included, in the background row;
    # GT nobody took at IoU >= 0.5 (the missed ones and G, hit only by a poorly localised detection) in the background column
    expected = np.zeros_like(matrix)
    taken = set()
    for _, cat, _, _, kind, hit in shown:
        if kind in ("tp", "cls"):
            expected[index[GT[hit][1]], index[cat]] += 1
            taken.add(hit)
        else:
            expected[bg, index[cat]] += 1
    for key, (_, cat, _) in GT.items():
        if key not in taken:
            expected[index[cat], bg] += 1
    assert (matrix == expected).all()


def _random_case(seed: int) -> tuple[dict, list[dict]]:
    """Random GT (some crowd) of 3 classes plus a category with detections only and one with nothing;
    jittered, relabelled and background detections with distinct random scores."""
    rng = np.random.default_rng(seed)
    images, anns, results = [], [], []
    for i in range(1, 31):
        images.append({"id": i, "file_name": f"{i}.jpg", "width": 200, "height": 200})
        for _ in range(int(rng.integers(0, 7))):
            w, h = rng.uniform(10, 80, 2)
            box = [float(rng.uniform(0, 200 - w)), float(rng.uniform(0, 200 - h)), float(w), float(h)]
            cat = int(rng.integers(1, 4))
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": cat, "bbox": box, "area": w * h, "iscrowd": int(rng.random() < 0.08)})
            for _ in range(int(rng.integers(0, 3))):
                jitter = rng.normal(0, 0.12, 4) * [w, h, w, h]
                label = cat if rng.random() < 0.8 else int(rng.integers(1, 4))
                det = [box[0] + jitter[0], box[1] + jitter[1], max(w + jitter[2], 2.0), max(h + jitter[3], 2.0)]
                results.append({"image_id": i, "category_id": label, "bbox": det, "score": float(rng.uniform(0.01, 1))})
        for _ in range(int(rng.integers(0, 4))):
            w, h = rng.uniform(5, 60, 2)
            box = [float(rng.uniform(0, 200 - w)), float(rng.uniform(0, 200 - h)), float(w), float(h)]
            results.append({"image_id": i, "category_id": int(rng.integers(1, 5)), "bbox": box, "score": float(rng.uniform(0.01, 1))})
    cats = [{"id": c, "name": n} for c, n in {1: "cat", 2: "dog", 3: "bird", 4: "fish", 5: "unused"}.items()]
    return {"images": images, "annotations": anns, "categories": cats}, results


@pytest.mark.parametrize("seed", [0, 1])
def test_class_table_agrees_with_evaluate_bbox(seed):
    gt, results = _random_case(seed)
    out = analyse(copy.deepcopy(gt), results)
    coco = evaluate_bbox(copy.deepcopy(gt), results)
    rows = {r["category_id"]: r for r in out["classes"]}
    assert sorted(rows) == [1, 2, 3, 4]  # categories with GT or detections
    assert rows[4]["AP"] is None and rows[4]["num_gt"] == 0 and rows[4]["recall"] is None

    curves = {c["category_id"]: c for c in coco["pr_curves"]["classes"]}
    for entry in coco["classwise"]:
        if entry["category_id"] not in rows:
            continue
        row = rows[entry["category_id"]]
        assert row["AP"] == pytest.approx(entry["AP"], abs=1e-12)
        for key, curve in (("AP50", "iou50"), ("AP75", "iou75")):
            values = [v for v in curves[entry["category_id"]][curve] if v is not None]
            assert row[key] == pytest.approx(float(np.mean(values)) if values else None, abs=1e-12)
    with_gt = [r for r in out["classes"] if r["num_gt"]]
    assert np.mean([r["AR100"] for r in with_gt]) == pytest.approx(coco["stats"][8], abs=1e-12)
    # our own matching and 101-point AP reproduce COCO's AP at the same IoU threshold
    assert out["tide"]["ap"] == pytest.approx(np.mean([r["AP50"] for r in with_gt]), abs=1e-9)
    at75 = analyse(copy.deepcopy(gt), results, iou_thr=0.75)
    assert at75["tide"]["ap"] == pytest.approx(np.mean([r["AP75"] for r in with_gt]), abs=1e-9)
    for row in out["classes"]:
        assert row["tp"] + row["fn"] == row["num_gt"]


def test_images_are_sorted_worst_first():
    gt = make_gt({"a": (1, 1, [0, 0, 50, 50]), "b": (2, 1, [0, 0, 50, 50]), "c": (2, 2, [50, 50, 40, 40]), "d": (3, 2, [10, 10, 40, 40])})
    results = [
        {"image_id": 2, "category_id": 1, "bbox": [0, 0, 50, 50], "score": 0.9},  # image 2: one of two classes found
        {"image_id": 1, "category_id": 1, "bbox": [0, 0, 50, 50], "score": 0.8},  # image 1: perfect
        {"image_id": 3, "category_id": 2, "bbox": [60, 60, 30, 30], "score": 0.7},  # image 3: nothing found
        {"image_id": 4, "category_id": 2, "bbox": [60, 60, 30, 30], "score": 0.7},  # images 4, 5: no GT; two false
        {"image_id": 4, "category_id": 1, "bbox": [10, 10, 30, 30], "score": 0.6},  # positives on 4, nothing on 5
    ]
    out = analyse(gt, results, names={1: "Cat"})
    # no objects but false positives: as bad as AP 0 (more of them first); no objects and nothing found: as good as AP 1
    assert [im["image_id"] for im in out["images"]] == [4, 3, 2, 1, 5]
    assert [out["images"][i]["ap"] for i in (0, 4)] == [None, None]
    worst = out["images"][1]
    assert worst["ap"] == 0 and not worst["gt"][0]["detected"] and worst["dets"][0]["kind"] == "bkg"
    assert out["units"]["bbox"].startswith("x, y, width, height")
    assert out["images"][3]["gt"][0] == {"bbox": [0, 0, 50, 50], "category_id": 1, "name": "Cat", "crowd": False, "detected": True, "error": None}


def test_results_of_unknown_images_are_refused():
    with pytest.raises(FcosError, match="image id 99"):
        analyse(make_gt(), [{"image_id": 99, "category_id": 1, "bbox": [0, 0, 1, 1], "score": 0.5}])


def test_results_of_categories_the_ground_truth_does_not_list_are_left_out_and_counted():
    """An 80-class model on an annotation file listing some of COCO's categories: COCO evaluates only those (the run on
    the 10-photo sample failed here); the page says how many results that leaves out."""
    base = analyse(make_gt(), [])
    out = analyse(make_gt(), [{"image_id": 1, "category_id": 999, "bbox": [0, 0, 10, 10], "score": 0.9}])
    assert out["results_of_unlisted_categories"] == 1 and base["results_of_unlisted_categories"] == 0
    assert out["tide"] == base["tide"] and out["classes"] == base["classes"]
